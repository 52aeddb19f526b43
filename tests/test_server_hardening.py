"""`moa serve` against hostile bodies, huge headers, failing mixtures, bursts beyond its limits,
slow clients and shutdown signals: every answer an OpenAI-shaped error with the right status
and SDK exception, decided before a stream's 200, logged once, with the connection still
usable; a shutdown drains for a bounded grace and ends every open stream in its own shape."""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import httpx
import openai
import pytest

from moa.config import MixtureConfig
from moa.openai import guards
from moa.openai.guards import Gate
from moa.openai.server import ServerThread, create_app
from moa.providers.registry import Limits
from moa.testing import Gate as Pacing
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
        ("proposers-fail", 502, openai.InternalServerError, r"HTTP 500.*L1\.1, L1\.2 on loop/down"),
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


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait for `condition` (checked between event-loop turns), for at most 60 s."""
    with anyio.fail_after(60):
        while not condition():
            await anyio.sleep(0.005)
    assert condition(), what


def test_a_burst_beyond_the_limits_gets_429_before_any_stream_then_recovers(
    upstream: LoopbackServer,
) -> None:
    """Three run, three wait, the rest get 429 at once — exactly, however loaded the machine:
    the admitted streams are held by the upstream until every refusal has arrived."""
    hold = Pacing()
    upstream.set_behavior("steady", ModelBehavior(reply="Paris " * 10, gate=hold))
    n = 12

    async def burst(url: str) -> list[tuple[int, str, dict[str, str]]]:
        results: list[tuple[int, str, dict[str, str]]] = []
        statuses: list[int] = []
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:

            async def one() -> None:
                request = {"model": "steady", "messages": HI, "stream": True}
                async with http.stream("POST", "/chat/completions", json=request) as response:
                    statuses.append(response.status_code)
                    text = (await response.aread()).decode()
                    results.append((response.status_code, text, dict(response.headers)))

            async with anyio.create_task_group() as tg:
                for _ in range(n):
                    tg.start_soon(one)
                await until(lambda: statuses.count(429) == n - 6 and statuses.count(200) == 3,
                            "three streaming, three queued, the rest refused")
                health = (await http.get(url.removesuffix("/v1") + "/health")).json()
                assert (health["active"], health["queued"]) == (3, 3)
                hold.open()
            health = (await http.get(url.removesuffix("/v1") + "/health")).json()
            assert (health["active"], health["queued"]) == (0, 0), "slots freed before [DONE]"
        return results

    with ServerThread(app(upstream, max_concurrency=3, max_queue=3,
                          queue_timeout_s=600)) as server:
        results = anyio.run(burst, server.base_url)
        ok = [text for status, text, _ in results if status == 200]
        refused = [(text, headers) for status, text, headers in results if status == 429]
        assert (len(ok), len(refused)) == (6, n - 6)
        for text in ok:
            assert text.rstrip().endswith("data: [DONE]") and 'data: {"error"' not in text, text
        assert all(h["retry-after"] == "1" and "concurrency limit" in t for t, h in refused)
        with httpx.Client(base_url=server.base_url, timeout=60) as http:
            after = [http.post("/chat/completions", json={"model": "steady", "messages": HI})
                     for _ in range(3)]
        assert [r.status_code for r in after] == [200, 200, 200], "recovered"


def test_a_slot_freed_in_a_burst_leaves_room_in_the_queue_at_once() -> None:
    """A freed slot goes to the first waiter at once, so the request right behind it queues
    (the queue has room) instead of getting 429 before that waiter's task has run."""

    async def scenario() -> None:
        gate = Gate(limit=1, queue=1, timeout=60)
        first = await gate.enter()

        async def waiter() -> None:
            (await gate.enter()).release()

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await until(lambda: gate.waiting == 1, "the second request waits")
            first.release()  # the slot is the waiter's now; the queue is empty again
            assert (gate.active, gate.waiting) == (1, 0)
            with anyio.fail_after(60):
                third = await gate.enter()  # no checkpoint since release(): not 429
            third.release()
        assert (gate.active, gate.waiting, gate.free) == (0, 0, 1)

    anyio.run(scenario)


def test_a_waiter_cancelled_as_it_is_handed_a_slot_passes_it_on() -> None:
    async def scenario() -> None:
        gate = Gate(limit=1, queue=2, timeout=60)
        first = await gate.enter()
        entered: list[object] = []
        gone = anyio.CancelScope()

        async def leaving() -> None:
            with gone:
                await gate.enter()
                entered.append("leaving")

        async def staying() -> None:
            (await gate.enter()).release()
            entered.append("staying")

        async with anyio.create_task_group() as tg:
            tg.start_soon(leaving)
            await until(lambda: gate.waiting == 1, "queued")
            tg.start_soon(staying)
            await until(lambda: gate.waiting == 2, "both queued")
            gone.cancel()  # `leaving` is cancelled, but before its task runs again ...
            first.release()  # ... the slot is handed to it: it must pass it on to `staying`
        assert entered == ["staying"]
        assert (gate.active, gate.waiting, gate.free) == (0, 0, 1)

    anyio.run(scenario)


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
        (["--shutdown-grace", "-1"], 2, "--shutdown-grace: must be from 0 to 3600"),
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


def exchange(server: ServerThread, head: bytes, filler: bytes = b"", most: int = 0) -> bytes:
    """Send `head`, then `filler` pieces (up to `most` bytes) until the server answers; then
    end the request and read the whole answer."""
    with socket.create_connection((server.host, server.port), timeout=60) as sock:
        sock.sendall(head)
        sent = 0
        while filler and sent < most and not select.select([sock], [], [], 0)[0]:
            sock.sendall(filler)
            sent += len(filler)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def refused_431(answer: bytes) -> None:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 Request Header Fields Too Large"), head
    response = httpx.Response(431, content=body, headers={"content-type": "application/json"},
                              request=httpx.Request("POST", "http://x/v1/chat/completions"))
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "request_headers_too_large" and "65536 bytes" in error["message"]
    assert type(sdk_error(response)) is openai.APIStatusError


def test_request_headers_over_64_kib_get_431_before_any_work(
    upstream: LoopbackServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="moa.openai.server")
    post = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
    request = body()
    with ServerThread(app(upstream, api_key=KEY)) as server:
        # One header of 100 KiB, a complete request without a key: 431, not 401.
        refused_431(exchange(server, post + b"x-pad: " + b"a" * 100_000 + b"\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(request), request)))
        # Many small headers: the total counts.
        many = b"".join(b"x-h%d: %s\r\n" % (i, b"b" * 100) for i in range(1000))
        refused_431(exchange(server, post + many + b"\r\n"))
        # A 16 MB header that never ends: refused after the first 64 KiB or so, the rest dropped.
        refused_431(exchange(server, post + b"x-huge: ", b"c" * 65536, most=16_000_000))
        with httpx.Client(base_url=server.base_url, timeout=60) as http:
            auth = {"authorization": f"Bearer {KEY}"}
            assert http.get("/models", headers=auth).status_code == 200
            just_under = http.post("/chat/completions", content=request,
                                   headers={**JSON, **auth, "x-pad": "d" * 60_000})
            assert just_under.status_code == 200, just_under.text
    assert [r.model for r in upstream.requests] == ["a", "agg"], "only the last request ran"
    assert caplog.text.count("HTTP 431") == 3


class Transport(asyncio.Transport):
    """What a protocol writes, kept; reads arrive exactly as the test feeds them."""

    def __init__(self) -> None:
        super().__init__()
        self.written, self.closing = bytearray(), False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"sockname": ("127.0.0.1", 1), "peername": ("127.0.0.1", 2)}.get(name, default)


@pytest.mark.parametrize(
    ("reads", "status"),
    [
        # One read holding a whole request with a body over 64 KiB (a loaded machine reads
        # that way): the body is not counted as headers.
        ([b"POST /nowhere HTTP/1.1\r\nHost: x\r\ncontent-length: 100000\r\n\r\n"
          + b"[" * 100_000], 404),
        # A complete head with one 70 KiB header in one read: counted as parsed.
        ([b"GET /health HTTP/1.1\r\nHost: x\r\nx-pad: " + b"a" * 70_000 + b"\r\n\r\n"], 431),
        # A header that never ends, in 32 KiB reads: refused once the reads pass 64 KiB.
        ([b"GET /health HTTP/1.1\r\nHost: x\r\nx-pad: "] + [b"a" * 32_768] * 3, 431),
    ],
    ids=["body-in-one-read", "whole-head-in-one-read", "endless-header"],
)
def test_the_header_limit_counts_head_bytes_only_whatever_the_reads(
    upstream: LoopbackServer, reads: list[bytes], status: int,
) -> None:
    import uvicorn
    from uvicorn.server import ServerState

    async def scenario() -> bytes:
        config = uvicorn.Config(app(upstream), lifespan="off")
        state = ServerState()
        protocol = guards.http_protocol()(config=config, server_state=state, app_state={})
        transport = Transport()
        protocol.connection_made(transport)
        for data in reads:
            protocol.data_received(data)
        if status == 431:
            assert not state.tasks, "refused before the app ran"
        with anyio.fail_after(60):
            while b"\r\n\r\n" not in transport.written:
                await anyio.sleep(0.005)
        protocol.connection_lost(None)
        return bytes(transport.written)

    answer = asyncio.run(scenario())
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:200]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Served:
    """`moa serve` in a subprocess, its stderr read line by line by a thread."""

    def __init__(self, *argv: str, host: str = "127.0.0.1") -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moa.cli", "serve", "--host", host, "--port", str(self.port),
             *argv], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line)
        self.lines.put(None)

    def expect(self, needle: str) -> str:
        """The next stderr line holding `needle` (fails at the end of stderr, or after 60 s)."""
        while True:
            line = self.lines.get(timeout=60)
            assert line is not None, f"no {needle!r} in: {''.join(self.stderr)}"
            self.stderr.append(line)
            if needle in line:
                return line

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def __enter__(self) -> Served:
        self.expect("moa: serving")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(60)


def served_config(tmp_path: Path, upstream: LoopbackServer) -> str:
    """A config file: proposer `loop/a`, aggregator `loop/agg`, on the loopback upstream; no
    stall or read timeout cuts a held stream (the shutdown must)."""
    config = tmp_path / "served.toml"
    config.write_text(
        'mode = "layered"\n[[layers]]\nagents = [{model = "loop/a"}]\n'
        '[aggregator]\nmodel = "loop/agg"\n[staircase]\nstall_s = 3600\n'
        f'[providers.loop]\nbase_url = "{upstream.base_url}"\nkey_required = false\n'
        "[providers.loop.limits]\nread_timeout = 3600\nmax_retries = 0\n"
    )
    return str(config)


def open_stream(http: httpx.Client, base_url: str) -> tuple[Iterator[str], httpx.Response]:
    """A streamed request, read up to its first content chunk (the answer is being written)."""
    request = http.build_request("POST", f"{base_url}/chat/completions", json={
        "model": "mixture", "messages": HI, "stream": True})
    response = http.send(request, stream=True)
    assert response.status_code == 200
    lines = response.iter_lines()
    for line in lines:
        if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get(
                "content"):
            return lines, response
    raise AssertionError("the stream ended before any content")


def data_lines(lines: Iterator[str]) -> list[str]:
    return [line for line in lines if line.startswith("data: ")]


def test_sigterm_drains_for_the_grace_then_ends_open_streams_with_an_error_and_done(
    upstream: LoopbackServer, tmp_path: Path,
) -> None:
    upstream.set_behavior("agg", ModelBehavior(reply=AGG, gate=Pacing(1)))  # held after 1 token
    with Served("-c", served_config(tmp_path, upstream), "--shutdown-grace", "1") as served, \
            httpx.Client(timeout=60) as http:
        served.expect("any process on this machine can run the embedded engine of 'local'")
        lines, response = open_stream(http, served.base_url)
        served.signal()
        served.expect("shutting down: 1 open request(s) get up to 1 s")
        with pytest.raises(httpx.ConnectError):  # no longer accepting
            http.get(served.base_url + "/models")
        rest = data_lines(lines)
        response.close()
        served.expect("shutdown grace of 1 s passed: ending 1 open request(s)")
        assert served.proc.wait(60) is not None
    *_, error, done = rest
    assert done == "data: [DONE]"
    assert json.loads(error[6:]) == {"error": {
        "message": "The server is shutting down; retry the request.", "type": "server_error",
        "param": None, "code": "shutting_down"}}
    assert "Traceback" not in "".join(served.stderr)


def test_sigterm_lets_a_stream_finish_within_the_grace_and_a_second_signal_exits_at_once(
    upstream: LoopbackServer, tmp_path: Path,
) -> None:
    hold = Pacing(1)
    # The first answer stalls for good after one token; the second is held by the gate.
    upstream.set_behavior("agg", ModelBehavior(reply=AGG, gate=hold, stall_after=1,
                                               fail_times=1))
    with Served("-c", served_config(tmp_path, upstream), "--shutdown-grace", "600") as served, \
            httpx.Client(timeout=60) as http:
        _, stalled = open_stream(http, served.base_url)
        lines, response = open_stream(http, served.base_url)
        served.signal()
        served.expect("shutting down: 2 open request(s) get up to 600 s")
        hold.open()
        finished = data_lines(lines)
        response.close()
        assert finished[-1] == "data: [DONE]"
        assert not any(x.startswith('data: {"error"') for x in finished), finished
        served.signal()  # the stalled stream would hold the shutdown for 600 s
        assert served.proc.wait(60) == 128 + signal.SIGTERM
        served.expect("a second signal: exiting now")
        stalled.close()


def test_a_request_open_when_the_grace_passes_gets_503_shutting_down(
    upstream: LoopbackServer,
) -> None:
    upstream.set_behavior("steady", ModelBehavior(reply="Paris.", gate=Pacing()))  # held
    answers: list[httpx.Response] = []
    server = ServerThread(app(upstream), shutdown_grace_s=0.2)
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        with server:  # leaving it shuts the server down, with the request open
            asking = threading.Thread(target=lambda: answers.append(http.post(
                "/chat/completions", json={"model": "steady", "messages": HI})))
            asking.start()
            anyio.run(until, lambda: upstream.active_streams > 0, "the proposer's call is open")
        asking.join(60)
    [answer] = answers
    assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
    assert answer.json()["error"]["code"] == "shutting_down"
    assert type(sdk_error(answer)) is openai.InternalServerError


def test_an_embedded_engine_without_a_key_needs_a_flag_off_loopback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MOA_SERVER_API_KEY", raising=False)
    port = str(free_port())
    refused = moa_serve("--host", "0.0.0.0", "--port", port)
    assert refused.returncode == 1 and "serving" not in refused.stderr
    assert refused.stderr.strip().splitlines() == [
        "moa: Serving the embedded engine of 'mixture', 'local', 'local-debate' on 0.0.0.0 "
        "without an API key would let "
        "anyone who reaches it run the engine: set --api-key (or MOA_SERVER_API_KEY), or pass "
        "--allow-unauthenticated."]
    with Served("--allow-unauthenticated", host="0.0.0.0") as served:
        served.expect("moa: no API key: anyone who can reach it can run the embedded engine of "
                      "'mixture', 'local', 'local-debate'.")
        assert httpx.get(served.base_url + "/models", timeout=60).status_code == 200
        served.signal()
        assert served.proc.wait(60) is not None
