"""A mixture served inside an application's own route (Starlette; FastAPI works the same).

`POST /ask {"question": "..."}` streams the answer as plain text, and `/v1/...` mounts moa's
OpenAI-compatible app beside it. Run with MOA_EXAMPLE_SERVE=1 to keep serving on port 8000;
by default it starts, asks itself once over HTTP, and exits (CI runs it as a test).
"""

import os

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Mount, Route

from moa import Mixture
from moa.events import FinalDelta
from moa.openai.server import ServerThread, create_app
from moa.testing import LoopbackServer, ModelBehavior


def build_app(registry) -> Starlette:
    config = {"mode": "layered",
              "layers": [{"agents": [{"model": "loop/a"}, {"model": "loop/b"}]}],
              "aggregator": {"model": "loop/agg"}}
    mixture = Mixture(config, registry=registry)

    async def ask(request: Request) -> StreamingResponse:
        question = (await request.json())["question"]

        async def answer():
            async for event in mixture.stream(question):
                if isinstance(event, FinalDelta):
                    yield event.text

        return StreamingResponse(answer(), media_type="text/plain")

    openai_app = create_app({"moa": mixture.config}, registry=registry)
    return Starlette(routes=[Route("/ask", ask, methods=["POST"]), Mount("/openai", openai_app)])


if __name__ == "__main__":
    upstream = ModelBehavior(reply="Mixtures answer better together.", tokens_per_s=200)
    with LoopbackServer(default=upstream) as srv:
        app = build_app(srv.registry())
        if os.environ.get("MOA_EXAMPLE_SERVE"):
            uvicorn.run(app, host="127.0.0.1", port=8000)
        else:
            with ServerThread(app) as server:
                root = server.base_url.removesuffix("/v1")
                with httpx.stream("POST", f"{root}/ask", json={"question": "Why mix?"}) as r:
                    streamed = "".join(r.iter_text())
                print(streamed)
                body = {"model": "moa", "messages": [{"role": "user", "content": "Why mix?"}]}
                reply = httpx.post(f"{root}/openai/v1/chat/completions", json=body).json()
                print(reply["choices"][0]["message"]["content"])
                # Both routes ran the mixture: the answer is the aggregator's reply.
                assert streamed == upstream.reply, streamed
                assert reply["choices"][0]["message"]["content"] == upstream.reply, reply
