"""`moa serve`'s app over real sockets: the official SDK and raw httpx against it, and a
loopback upstream behind it."""

from __future__ import annotations

import json
from collections.abc import Iterator

import anyio
import httpx
import openai
import pytest

from moa.config import PRESETS, MixtureConfig
from moa.openai.server import ServerThread, create_app
from moa.testing import LoopbackServer, ModelBehavior

AGG = "Paris is the capital of France."
HI = [{"role": "user", "content": "Capital of France?"}]


def mixture() -> MixtureConfig:
    return MixtureConfig.model_validate({
        "name": "test", "mode": "layered",
        "layers": [{"agents": [{"model": "loop/a"}, {"model": "loop/b"}]}],
        "aggregator": {"model": "loop/agg"},
    })


@pytest.fixture
def upstream() -> Iterator[LoopbackServer]:
    behaviors = {
        "a": ModelBehavior(reply="Paris."),
        "b": ModelBehavior(reply="It is Paris."),
        "agg": ModelBehavior(reply=AGG, tokens_per_s=400),
    }
    with LoopbackServer(behaviors) as server:
        yield server


def serving(upstream: LoopbackServer, **kw) -> ServerThread:
    app = create_app({"moa": mixture()}, registry=upstream.registry(), **kw)
    return ServerThread(app)


def sdk(server: ServerThread, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0)


def test_sdk_non_streaming_with_usage_and_trace(upstream: LoopbackServer) -> None:
    with serving(upstream) as server:
        response = sdk(server).chat.completions.create(model="moa", messages=HI)  # type: ignore[arg-type]
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    assert response.choices[0].message.content == AGG
    assert response.choices[0].finish_reason == "stop"
    assert response.usage is not None and response.usage.completion_tokens > 6
    trace = (response.model_extra or {})["moa"]
    assert trace["calls"] == 3 and [a["id"] for a in trace["agents"]] == ["L1.1", "L1.2", "final"]
    assert "text" not in trace
    aggregator = next(r for r in upstream.requests if r.model == "agg")
    assert "It is Paris." in aggregator.body["messages"][0]["content"]


def test_sdk_streaming_chunks_usage_and_done(upstream: LoopbackServer) -> None:
    with serving(upstream) as server:
        stream = sdk(server).chat.completions.create(
            model="moa", messages=HI, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True},
        )
        with stream:
            chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == AGG
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) > 3, "tokens must arrive as they are generated, not in one chunk"
    assert len({c.id for c in chunks}) == 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None


def test_silent_stretches_get_keep_alive_comments_the_sdk_ignores(
    upstream: LoopbackServer,
) -> None:
    upstream.set_behavior("a", ModelBehavior(reply="Paris.", ttft_s=0.4))
    with serving(upstream, keepalive_s=0.1) as server:
        with httpx.stream("POST", f"{server.base_url}/chat/completions", timeout=10,
                          json={"model": "moa", "messages": HI, "stream": True}) as response:
            lines = [line for line in response.iter_lines() if line]
        stream = sdk(server).chat.completions.create(model="moa", messages=HI, stream=True)  # type: ignore[arg-type]
        with stream:
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data: "))
    assert first_data >= 2 and set(lines[:first_data]) == {": keep-alive"}
    assert lines[-1] == "data: [DONE]" and text == AGG


def test_async_sdk_streaming(upstream: LoopbackServer) -> None:
    async def main(url: str) -> str:
        client = openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0)
        parts = []
        stream = await client.chat.completions.create(model="moa", messages=HI, stream=True)  # type: ignore[arg-type]
        async for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
        await client.close()
        return "".join(parts)

    with serving(upstream) as server:
        assert anyio.run(main, server.base_url) == AGG


def test_models_and_health(upstream: LoopbackServer) -> None:
    with serving(upstream) as server:
        models = sdk(server).models.list()
        health = httpx.get(server.base_url.removesuffix("/v1") + "/health").json()
    assert [m.id for m in models.data] == ["moa"]
    assert health["status"] == "ok"


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, "not valid JSON"),
        (json.dumps({"model": "moa"}).encode(), 400, "'messages'"),
        (json.dumps({"model": "moa", "messages": HI, "temperature": "hot"}).encode(), 400,
         "'temperature'"),
        (json.dumps({"model": "moa", "messages": [{"role": "robot"}]}).encode(), 400,
         "messages[0]"),
        (json.dumps({"model": "moa", "messages": HI, "n": 0}).encode(), 400,
         "'n' must be an integer from 1 to 128"),
        (json.dumps({"model": "moa", "messages": HI, "tools": [{"x": 1}]}).encode(), 400,
         "tools must be a list of function tools"),
        (json.dumps({"model": "moa", "messages": HI, "frobnicate": 1}).encode(), 400,
         "frobnicate"),
        (json.dumps({"model": "nope", "messages": HI}).encode(), 404, "does not exist"),
        (json.dumps({"model": "moa", "messages": HI, "x": "y" * 5000}).encode(), 413, "larger"),
    ],
)
def test_bad_requests_get_openai_errors(
    upstream: LoopbackServer, body: bytes, status: int, needle: str
) -> None:
    with serving(upstream, max_body_bytes=4000) as server:
        response = httpx.post(server.base_url + "/chat/completions", content=body,
                              headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert needle in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text
    assert not upstream.requests


def test_bearer_auth(upstream: LoopbackServer) -> None:
    with serving(upstream, api_key="s3cret") as server:
        with pytest.raises(openai.AuthenticationError):
            sdk(server, "wrong").chat.completions.create(model="moa", messages=HI)  # type: ignore[arg-type]
        assert httpx.get(server.base_url + "/models").status_code == 401
        ok = sdk(server, "s3cret").chat.completions.create(model="moa", messages=HI)  # type: ignore[arg-type]
    assert ok.choices[0].message.content == AGG


def test_overload_answers_429_before_a_stream_starts(upstream: LoopbackServer) -> None:
    upstream.set_behavior("a", ModelBehavior(reply="slow " * 40, tokens_per_s=20))
    with serving(upstream, max_concurrency=1, max_queue=0) as server, \
            httpx.Client(base_url=server.base_url, timeout=10) as http:
        client = sdk(server)
        with http.stream("POST", "/chat/completions",
                         json={"model": "moa", "messages": HI, "stream": True}) as first:
            for stream in (False, True):
                with pytest.raises(openai.RateLimitError, match="concurrency limit") as info:
                    client.chat.completions.create(model="moa", messages=HI, stream=stream)  # type: ignore[call-overload]
                assert info.value.response.headers["retry-after"] == "1"
            assert "Paris" in first.read().decode()


def test_error_after_the_stream_began_is_raised_by_the_sdk(upstream: LoopbackServer) -> None:
    upstream.set_behavior("agg", ModelBehavior(reply=AGG, error_after=2, fail_times=None))
    with serving(upstream) as server:
        stream = sdk(server).chat.completions.create(model="moa", messages=HI, stream=True)  # type: ignore[arg-type]
        received = []
        with pytest.raises(openai.APIError, match="final aggregator failed"):
            for chunk in stream:
                received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "Paris is"


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_the_upstream_calls(
    upstream: LoopbackServer, stream: bool
) -> None:
    upstream.set_behavior("a", ModelBehavior(reply="slow " * 200, tokens_per_s=20))
    body = {"model": "moa", "messages": HI, "stream": stream}
    with serving(upstream) as server:
        with httpx.Client(base_url=server.base_url, timeout=0.5) as http, \
                pytest.raises(httpx.ReadTimeout):
            http.post("/chat/completions", json=body)
        assert upstream.requests, "the mixture had started"
        assert upstream.wait_idle(), "an upstream call kept running after the client left"
        assert not [r for r in upstream.requests if r.model == "agg"]


def test_moa_serve_command_serves_the_options_mixture_and_presets(
    upstream: LoopbackServer, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moa.testing.processes import serve_process

    monkeypatch.delenv("TOGETHER_API_KEY", raising=False)

    config = tmp_path / "serve.toml"
    config.write_text(
        f'mode = "layered"\n[providers.loop]\nkind = "openai"\n'
        f'base_url = "{upstream.base_url}"\nkey_required = false\n'
    )
    options = ["-c", str(config), "-p", "loop/a", "-p", "loop/b", "-a", "loop/agg"]
    with serve_process(*options) as url:
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        models = [m.id for m in client.models.list().data]
        assert models == ["mixture", *PRESETS]
        for name in ("mixture", "moa/mixture"):
            reply = client.chat.completions.create(model=name, messages=HI)  # type: ignore[arg-type]
            assert reply.choices[0].message.content == AGG
        for name in ("moa", "moa/moa"):  # the preset, not hidden; without its key: 503
            with pytest.raises(openai.InternalServerError, match="TOGETHER_API_KEY") as info:
                client.chat.completions.create(model=name, messages=HI)  # type: ignore[arg-type]
            assert info.value.status_code == 503


def test_bench_serve_runs_three_processes_and_checks_every_stream() -> None:
    import argparse

    from moa.bench import serve

    rows, _ = serve.run(argparse.Namespace(clients="3", rounds=1))
    assert [(r["clients"], r["path"]) for r in rows] == [
        (3, "direct"), (3, "direct-one-pool"), (3, "by hand"), (3, "server")
    ]
    assert all(r["bad_streams"] == 0 and r["ttft_p50_ms"] > 0 for r in rows)
    assert "overhead_p50_ms" in rows[-1]
