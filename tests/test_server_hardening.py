"""`moa serve` against hostile bodies, failing mixtures, bursts beyond its limits and slow
clients: every answer an OpenAI-shaped error with the right status and SDK exception, decided
before a stream's 200, logged once, with the connection still usable."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
from collections.abc import Iterator

import anyio
import httpx
import openai
import pytest

from moa.config import MixtureConfig
from moa.openai import guards
from moa.openai.server import ServerThread, create_app
from moa.providers.registry import Limits
from moa.testing import LoopbackServer, ModelBehavior

HI = [{"role": "user", "content": "Capital of France?"}]
AGG = "Paris is the capital of France."
KEY = "server-token-123456"
FAST = Limits(backoff_initial=0.001, backoff_max=0.002, max_retries=1, read_timeout=5)


def team(proposers: list[str], aggregator: str, **extra: object) -> MixtureConfig:
    return MixtureConfig.model_validate({
        "mode": "layered", **extra,
        "layers": [{"agents": [{"model": f"loop/{m}"} for m in proposers]}],
        "aggregator": {"model": f"loop/{aggregator}"},
    })


@pytest.fixture
def upstream() -> Iterator[LoopbackServer]:
    behaviors = {
        "a": ModelBehavior(reply="Paris."),
        "agg": ModelBehavior(reply=AGG),
        "down": ModelBehavior(fail_status=500),
        "slow": ModelBehavior(reply="late", ttft_s=30),
        "steady": ModelBehavior(reply="Paris " * 10, tokens_per_s=100),
    }
    with LoopbackServer(behaviors) as server:
        yield server


def app(upstream: LoopbackServer, **kw: object):
    mixtures = {
        "moa": team(["a"], "agg"),
        "agg-fails": team(["a"], "down"),
        "proposers-fail": team(["down", "down"], "agg"),
        "deadline": team(["slow"], "agg", deadline_s=0.3),
        "keyless": MixtureConfig.model_validate({
            "layers": [{"agents": [{"model": "openai/gpt-4o-mini"}]}],
            "aggregator": {"model": "openai/gpt-4o-mini"}}),
        "steady": team(["steady"], "agg"),
    }
    return create_app(mixtures, registry=upstream.registry(limits=FAST), **kw)  # type: ignore[arg-type]


def sdk_error(response: httpx.Response) -> openai.APIStatusError:
    """The exception the official SDK raises for this response."""
    client = openai.OpenAI(base_url="http://127.0.0.1:9/v1", api_key="x")
    return client._make_status_error_from_response(response)


def body(**fields: object) -> bytes:
    return json.dumps({"model": "moa", "messages": HI, **fields}).encode()


JSON = {"content-type": "application/json"}
CORPUS = [
    # (case, content, headers, status, SDK exception)
    ("malformed JSON", b"{not json", JSON, 400, openai.BadRequestError),
    ("empty body", b"", JSON, 400, openai.BadRequestError),
    ("a JSON array", b"[]", JSON, 400, openai.BadRequestError),
    ("100k nested brackets", b"[" * 100_000, JSON, 400, openai.BadRequestError),
    ("nested 40 deep", body(metadata={"x": json.loads("[" * 38 + "]" * 38)}), JSON, 400,
     openai.BadRequestError),
    ("lone surrogate", body().replace(b"Capital", b"\\ud800Capital"), JSON, 400,
     openai.BadRequestError),
    ("invalid UTF-8", body().replace(b"Capital", b"\xff\xfe"), JSON, 400,
     openai.BadRequestError),
    ("text/plain", body(), {"content-type": "text/plain"}, 415, openai.APIStatusError),
    ("no content type", body(), {"content-type": ""}, 415, openai.APIStatusError),
    ("form", body(), {"content-type": "application/x-www-form-urlencoded"}, 415,
     openai.APIStatusError),
    ("huge body", body(user="y" * 300_000), JSON, 413, openai.APIStatusError),
    ("model not a string", body(model=5), JSON, 400, openai.BadRequestError),
    ("messages not a list", body(messages="hi"), JSON, 400, openai.BadRequestError),
    ("temperature a word", body(temperature="hot"), JSON, 400, openai.BadRequestError),
    ("4000-digit max_tokens", body().replace(b"}", b', "max_tokens": ' + b"9" * 4000 + b"}"),
     JSON, 400, openai.BadRequestError),
    ("max_tokens over the ceiling", body(max_tokens=10**7), JSON, 400, openai.BadRequestError),
    ("tools", body(tools=[{"type": "function"}]), JSON, 400, openai.BadRequestError),
    ("unknown model", body(model="nope"), JSON, 404, openai.NotFoundError),
    ("no key", body(), {**JSON, "authorization": ""}, 401, openai.AuthenticationError),
    ("wrong key", body(), {**JSON, "authorization": "Bearer nope"}, 401,
     openai.AuthenticationError),
    ("basic auth", body(), {**JSON, "authorization": f"Basic {KEY}"}, 401,
     openai.AuthenticationError),
    ("key with no scheme", body(), {**JSON, "authorization": KEY}, 401,
     openai.AuthenticationError),
]


def test_bad_input_corpus_gets_the_right_status_and_sdk_exception(
    upstream: LoopbackServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with ServerThread(app(upstream, api_key=KEY, max_body_bytes=200_000)) as server, \
            httpx.Client(base_url=server.base_url, timeout=30) as http:
        auth = {"authorization": f"Bearer {KEY}"}
        for case, content, headers, status, exception in CORPUS:
            response = http.post("/chat/completions", content=content,
                                 headers={**auth, **headers})
            assert response.status_code == status, (case, response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, case
            assert type(sdk_error(response)) is exception, case
        assert http.get("/chat/completions").status_code == 405
        nowhere = http.post("/nowhere", json={})
        assert nowhere.json()["error"]["message"] == "No route '/v1/nowhere'."
        lower = http.post("/chat/completions", content=body(),
                          headers={**JSON, "authorization": f"bearer {KEY}"})
        assert lower.status_code == 200, "the scheme is case-insensitive"
    assert [r.model for r in upstream.requests] == ["a", "agg"], "only the good request ran"
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize(
    ("model", "status", "exception", "needle"),
    [
        ("agg-fails", 502, openai.InternalServerError, "final aggregator failed"),
        ("proposers-fail", 502, openai.InternalServerError, "proposer"),
        ("deadline", 504, openai.InternalServerError, "deadline"),
        ("keyless", 503, openai.InternalServerError, "OPENAI_API_KEY"),
    ],
)
def test_failed_mixtures_get_their_status_once_logged_and_the_connection_survives(
    upstream: LoopbackServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
    model: str, status: int, exception: type[Exception], needle: str,
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    caplog.set_level(logging.INFO, logger="moa.openai.server")
    with ServerThread(app(upstream)) as server:
        # The SDK's default retries: the server tells it not to repeat a failed mixture.
        client = openai.OpenAI(base_url=server.base_url, api_key="x")
        with pytest.raises(exception, match=needle) as info:
            client.chat.completions.create(model=model, messages=HI)  # type: ignore[arg-type]
        assert info.value.status_code == status  # type: ignore[attr-defined]
        through_sdk = len(upstream.requests)
        with httpx.Client(base_url=server.base_url, timeout=30) as http:
            failed = http.post("/chat/completions", json={"model": model, "messages": HI})
            assert len(upstream.requests) == 2 * through_sdk, "the SDK did not repeat the run"
            again = http.post("/chat/completions", json={"model": "moa", "messages": HI})
            assert failed.status_code == status and again.status_code == 200
            assert http.get("/models").status_code == 200  # same keep-alive connection
    server_lines = [r for r in caplog.records if r.name == "moa.openai.server"]
    assert len(server_lines) == 2, "one line per failed request"
    assert all(r.exc_info is None for r in server_lines), "no traceback without --debug"
    assert "Traceback" not in caplog.text


def test_an_internal_error_is_a_bare_500_logged_with_its_traceback(
    upstream: LoopbackServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from moa.mixture import Mixture

    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug with internal details")

    monkeypatch.setattr(Mixture, "run", broken)  # stands for a bug in moa itself
    with ServerThread(app(upstream)) as server, \
            httpx.Client(base_url=server.base_url, timeout=30) as http:
        response = http.post("/chat/completions", json={"model": "moa", "messages": HI})
        assert http.get("/models").status_code == 200, "the connection stays usable"
    assert response.status_code == 500 and type(sdk_error(response)) is openai.InternalServerError
    assert response.json()["error"]["message"] == "Internal server error."
    [line] = [r for r in caplog.records if r.name == "moa.openai.server"]
    assert line.levelno == logging.ERROR and line.exc_info is not None


def test_a_burst_beyond_the_limits_gets_429_before_any_stream_then_recovers(
    upstream: LoopbackServer,
) -> None:
    async def one(http: httpx.AsyncClient) -> tuple[int, str, dict[str, str]]:
        request = {"model": "steady", "messages": HI, "stream": True}
        async with http.stream("POST", "/chat/completions", json=request) as response:
            text = (await response.aread()).decode()
            return response.status_code, text, dict(response.headers)

    async def burst(url: str, n: int) -> list[tuple[int, str, dict[str, str]]]:
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
            results: list[tuple[int, str, dict[str, str]]] = []

            async def run() -> None:
                results.append(await one(http))

            async with anyio.create_task_group() as tg:
                for _ in range(n):
                    tg.start_soon(run)
            return results

    with ServerThread(app(upstream, max_concurrency=3, max_queue=3)) as server:
        results = anyio.run(burst, server.base_url, 40)
        ok = [text for status, text, _ in results if status == 200]
        refused = [(text, headers) for status, text, headers in results if status == 429]
        assert len(ok) + len(refused) == 40 and len(ok) >= 6 and refused
        for text in ok:
            assert text.rstrip().endswith("data: [DONE]") and 'data: {"error"' not in text, text
        assert all(h["retry-after"] == "1" and "concurrency limit" in t for t, h in refused)
        health = httpx.get(server.base_url.removesuffix("/v1") + "/health").json()
        assert (health["active"], health["queued"]) == (0, 0)
        after = anyio.run(burst, server.base_url, 3)
        assert [status for status, _, _ in after] == [200, 200, 200], "recovered"


def test_a_queue_timeout_is_a_503_before_the_stream(upstream: LoopbackServer) -> None:
    upstream.set_behavior("steady", ModelBehavior(reply="Paris " * 200, tokens_per_s=50))
    with ServerThread(app(upstream, max_concurrency=1, max_queue=1,
                          queue_timeout_s=0.2)) as server, \
            httpx.Client(base_url=server.base_url, timeout=30) as http, \
            http.stream("POST", "/chat/completions",
                        json={"model": "steady", "messages": HI, "stream": True}) as first:
        assert first.status_code == 200
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError, match="no slot freed") as info:
            client.chat.completions.create(model="moa", messages=HI, stream=True)  # type: ignore[arg-type]
        assert info.value.status_code == 503
        assert info.value.response.headers["retry-after"] == "1"


def test_slow_request_headers_time_out(
    upstream: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(guards, "HEADER_TIMEOUT_S", 0.2)
    with ServerThread(app(upstream)) as server, \
            socket.create_connection((server.host, server.port), timeout=20) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # never finished
        assert sock.recv(100) == b"", "the server closed the half-sent request"
        with httpx.Client(base_url=server.base_url, timeout=30) as http:
            assert http.get("/models").status_code == 200


@pytest.mark.parametrize("raw", [b"GARBAGE\r\n\r\n",
                                 b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                 b"content-length: 5\r\ncontent-length: 9\r\n\r\n{}"])
def test_a_request_the_http_parser_rejects_gets_an_openai_error(
    upstream: LoopbackServer, raw: bytes
) -> None:
    with ServerThread(app(upstream)) as server, \
            socket.create_connection((server.host, server.port), timeout=20) as sock:
        sock.sendall(raw)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    head, _, body = answer.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 400") and "application/json" in head
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "bad_http_request"


def test_a_slow_body_gets_408(upstream: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guards, "BODY_TIMEOUT_S", 0.2)
    with ServerThread(app(upstream)) as server, \
            socket.create_connection((server.host, server.port), timeout=20) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"content-type: application/json\r\ncontent-length: 100\r\n\r\n{")
        answer = sock.recv(4096).decode()
    assert answer.startswith("HTTP/1.1 408") and "did not arrive within 0.2 s" in answer


def moa_serve(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "moa.cli", "serve", *argv], text=True,
                          capture_output=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize(
    ("argv", "code", "needle"),
    [
        (["--port", "99999"], 2, "--port: must be from 1 to 65535, not 99999"),
        (["--max-concurrency", "0"], 2, "--max-concurrency: must be from 1 to 4096"),
        (["--max-queue", "-1"], 2, "--max-queue: must be from 0"),
        (["--name", "moa"], 1, "would hide the preset"),
        (["-p", "groq/llama-3.1-8b-instant"], 1, "GROQ_API_KEY"),
    ],
)
def test_moa_serve_start_up_checks(argv: list[str], code: int, needle: str,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GROQ_API_KEY", raising=False)
    proc = moa_serve(*argv)
    assert proc.returncode == code and needle in proc.stderr, proc.stderr
    assert "serving" not in proc.stderr and "Traceback" not in proc.stderr


def test_moa_serve_port_in_use_is_one_sentence() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = moa_serve("--port", str(port))
    assert proc.returncode == 1 and "serving" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"moa: Cannot serve on 127.0.0.1:{port}: Address already in use."
    ]
