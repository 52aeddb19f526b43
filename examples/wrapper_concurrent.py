"""Many concurrent mixture calls on one wrapped `openai.AsyncOpenAI` client, some streamed.

They share the mixtures' connection pools, which stay open until the client closes (`async
with`). Runs against the bundled loopback test server, so it needs no key: the mixture's models
are on the wrapped client's own server (prefix `client/`).
"""

import anyio

import moa
from moa.errors import MoaError
from moa.openai.client import WrappedClient
from moa.testing import LoopbackServer, ModelBehavior

TEAM = {
    "mode": "layered",
    "layers": [{"agents": [{"model": "client/fast"}, {"model": "client/careful"}]}],
    "aggregator": {"model": "client/judge"},
}
QUESTIONS = [f"Question {i}: why is the sky blue?" for i in range(8)]


async def ask(client: WrappedClient, question: str, stream: bool) -> str:
    messages = [{"role": "user", "content": question}]
    try:
        if not stream:
            reply = await client.chat.completions.create(model="team", messages=messages)
            return reply.choices[0].message.content
        chunks = await client.chat.completions.create(model="team", messages=messages,
                                                      stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
    except MoaError as err:  # a mixture that failed (e.g. its aggregator): one sentence
        return f"failed: {err}"


async def main(base_url: str) -> None:
    answers: dict[int, str] = {}

    async def one(i: int) -> None:
        answers[i] = await ask(client, QUESTIONS[i], stream=i % 2 == 0)

    client = moa.AsyncOpenAI(base_url=base_url, api_key="unused", mixtures={"team": TEAM})
    async with client, anyio.create_task_group() as tg:  # closing the client closes the pools
        for i in range(len(QUESTIONS)):
            tg.start_soon(one, i)
    for i in sorted(answers):
        print(f"{i} ({'streamed' if i % 2 == 0 else 'document'}): {answers[i]}")
    assert all(not a.startswith("failed") for a in answers.values())


if __name__ == "__main__":
    models = {
        "fast": ModelBehavior(reply="Blue light scatters most.", tokens_per_s=200),
        "careful": ModelBehavior(reply="Rayleigh scattering: shorter wavelengths scatter more."),
        "judge": ModelBehavior(reply="Air scatters blue light more than red.", tokens_per_s=200),
    }
    with LoopbackServer(models) as server:
        anyio.run(main, server.base_url)
