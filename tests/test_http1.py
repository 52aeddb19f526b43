"""`moa.providers.http1`: the lean HTTP/1.1 transport, against real sockets.

A scripted server in the test's own event loop answers each request with the next scripted
reply (bytes, or a coroutine that writes what it likes), so framing, faults, timeouts,
cancellation and the pool are exercised on real connections; the body parser is also fed a
byte at a time. TLS needs the `openssl` command (skipped without it).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from anyio import wait_all_tasks_blocked

from moa.errors import ProviderError, ProviderTimeout, StreamInterrupted, StreamTimeout
from moa.providers.base import ChatRequest
from moa.providers.http import _no_ca_context, _ssl_context
from moa.providers.http1 import (
    MAX_BUFFERED,
    Body,
    Http1Transport,
    _Connection,
    _framing,
    body_chunks,
    lean_transport,
)
from moa.providers.openai_compat import OpenAICompatProvider
from moa.providers.registry import Limits, ProviderSpec
from moa.testing import LoopbackServer, ModelBehavior

pytestmark = pytest.mark.anyio

Reply = bytes | Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
HI = [{"role": "user", "content": "hi"}]
SSE = (b'data: {"choices": [{"index": 0, "delta": {"content": "Hello"}, '
       b'"finish_reason": "stop"}]}\n\ndata: [DONE]\n\n')


def ok(body: bytes = b"hello", *headers: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in headers)
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%b\r\n%b" % (len(body), head.encode(), body)


SSE_REPLY = ok(SSE, "content-type: text/event-stream")
CHUNKED_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n")


async def until_closed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Hold the connection until the client closes it."""
    await reader.read()


def partial_then(rest: Callable[..., Awaitable[None]], data: bytes) -> Reply:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
        await rest(reader, writer)

    return reply


async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


class Scripted:
    """An HTTP/1.1 server on 127.0.0.1 in the test's event loop: the n-th request (on any
    connection) gets the n-th reply. Counts the connections it accepted and saw end."""

    def __init__(self, *replies: Reply, tls: ssl.SSLContext | None = None) -> None:
        self.replies = list(replies)
        self.tls = tls
        self.requests: list[bytes] = []
        self.accepted = 0
        self.ended = 0
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> Scripted:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for writer in self._writers:
            writer.transport.abort()  # ends every handler: its reads see the socket gone
        with anyio.fail_after(10):
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def wait_ended(self, count: int) -> None:
        """Until `count` connections have ended (the client closed them)."""
        with anyio.fail_after(10):
            while self.ended < count:
                await self._changed.wait()
                self._changed.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        self._writers.append(writer)
        self.accepted += 1
        try:
            while not writer.is_closing():
                head = await reader.readuntil(b"\r\n\r\n")
                lowered = head.lower()
                if b"transfer-encoding: chunked" in lowered:
                    body = await reader.readuntil(b"0\r\n\r\n")
                else:
                    length = lowered.partition(b"content-length: ")[2].partition(b"\r\n")[0]
                    body = await reader.readexactly(int(length or 0))
                self.requests.append(head + body)
                reply = self.replies.pop(0)
                if isinstance(reply, bytes):
                    writer.write(reply)
                    await writer.drain()
                else:
                    await reply(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()
            self.ended += 1
            self._changed.set()


@contextlib.asynccontextmanager
async def silent() -> AsyncIterator[str]:
    """A server that accepts connections and never reads from them nor writes to them."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for writer in held:
            writer.transport.abort()


def client(srv: Scripted | None = None, size: int = 4, context: ssl.SSLContext | None = None,
           **timeouts: float) -> tuple[httpx.AsyncClient, Http1Transport]:
    transport = Http1Transport(context or _no_ca_context(), size)
    timeout = httpx.Timeout(**{"timeout": 10.0, **timeouts})  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, timeout=timeout), transport


def provider(url: str, **limits: Any) -> OpenAICompatProvider:
    settings = {"max_retries": 0, "backoff_initial": 0.001, **limits}
    spec = ProviderSpec(prefix="lab", base_url=url, key_required=False,
                        limits=Limits(**settings))
    return OpenAICompatProvider(spec, None)


# -- messages and framing ------------------------------------------------------------


async def test_requests_share_one_kept_connection_and_bodies_arrive_whole() -> None:
    chunked = CHUNKED_HEAD + b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n"
    gzipped = gzip.compress(b"unzipped")
    replies = ok(), chunked, ok(gzipped, "content-encoding: gzip"), ok(b""), ok(
        bytes(range(256)) * (16 << 10))
    async with Scripted(*replies) as srv:
        http, transport = client(srv)
        async with http:
            response = await http.post(srv.url + "/v1/x?q=1", json={"a": 1})
            assert response.status_code == 200 and response.content == b"hello"
            assert response.http_version == "HTTP/1.1" and response.reason_phrase == "OK"
            async with http.stream("GET", srv.url) as response:
                assert b"".join([chunk async for chunk in body_chunks(response)]) == (
                    b"hello world")
            async with http.stream("GET", srv.url) as response:
                chunks = body_chunks(response)
                assert not isinstance(chunks, Body), "a content coding goes through httpx"
                assert b"".join([chunk async for chunk in chunks]) == b"unzipped"
            assert (await http.head(srv.url)).content == b""
            big = await http.get(srv.url)
            assert big.content == bytes(range(256)) * (16 << 10)  # 4 MiB: reading pauses
            assert srv.accepted == 1 and transport.connections == 1
        assert srv.requests[0].startswith(b"POST /v1/x?q=1 HTTP/1.1\r\n")
        assert srv.requests[0].endswith(b'\r\n\r\n{"a":1}')
        await srv.wait_ended(1)
        assert transport.connections == 0


async def test_a_streamed_request_body_is_sent_chunked() -> None:
    async def parts():  # type: ignore[no-untyped-def]
        yield b"ab"
        yield b""
        yield b"cde"

    async with Scripted(ok()) as srv:
        http, _ = client(srv)
        async with http:
            assert (await http.post(srv.url, content=parts())).content == b"hello"
        assert srv.requests[0].endswith(b"\r\n\r\n2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n")


async def test_connection_close_http10_and_an_informational_reply_are_honoured() -> None:
    http10 = partial_then(hang_up, b"HTTP/1.0 200 OK\r\n\r\nuntil the end")
    continued = b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"after 100")
    async with Scripted(ok(b"once", "connection: close"), http10, continued) as srv:
        http, transport = client(srv)
        async with http:
            assert (await http.get(srv.url)).content == b"once"
            assert transport.connections == 0
            response = await http.get(srv.url)  # read up to the end of the connection
            assert response.content == b"until the end"
            assert (await http.get(srv.url)).content == b"after 100"
            assert srv.accepted == 3


@pytest.mark.parametrize("raw, pieces", [
    (CHUNKED_HEAD + b"3\r\nabc\r\n1;x=y\r\nd\r\n0\r\nx-t: 1\r\n\r\n", b"abcd"),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nabcd", b"abcd"),
])
async def test_the_body_parser_takes_any_split(raw: bytes, pieces: bytes) -> None:
    """Fed a byte at a time, each only once the reader waits: the same body, and the
    connection goes back to the pool at its end."""
    transport = Http1Transport(_no_ca_context(), 1)
    conn = _Connection(asyncio.get_running_loop(), ("http", "h", 80))
    conn.transport = _FakeSocket()  # type: ignore[assignment]
    got: list[bytes] = []

    async def read() -> None:
        status, _, headers, _ = await transport._read_head(conn, None)
        mode, length, close = _framing("GET", status, headers)
        transport._busy.add(conn)
        transport._count = 1
        async for chunk in Body(transport, conn, mode, length, close, None):
            got.append(chunk)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            for i in range(len(raw)):
                await wait_all_tasks_blocked()
                conn.data_received(raw[i:i + 1])
    assert b"".join(got) == pieces and transport.connections == 1, "kept for the next request"


async def test_reading_pauses_while_a_megabyte_waits_unread() -> None:
    conn = _Connection(asyncio.get_running_loop(), ("http", "h", 80))
    conn.transport = sock = _FakeSocket()  # type: ignore[assignment]
    conn.data_received(b"x" * MAX_BUFFERED)
    assert not sock.paused
    conn.data_received(b"x")
    assert sock.paused
    conn.buffer.clear()  # read
    async with anyio.create_task_group() as tg:
        tg.start_soon(conn.receive, None)
        await wait_all_tasks_blocked()
        assert not sock.paused, "a read that waits resumes reading"
        conn.data_received(b"y")
    assert conn.buffer == b"y"


@pytest.mark.parametrize("raw, error", [
    (CHUNKED_HEAD + b"5\r\nhel", "incomplete chunked read"),
    (CHUNKED_HEAD + b"zz\r\n", "bad chunk-size line"),
    (CHUNKED_HEAD + b"2\r\nabc\r\n", "chunk data longer than its size"),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nabc", "6 bytes missing"),
    (b"HTTP/1.1 2x0 OK\r\n\r\n", "bad status line"),
    (b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n", "bad header line"),
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n", "unsupported transfer-encoding"),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n", "content-length"),
    (b"HTTP/1.1 200 OK\r\ncontent", "in the middle of the response head"),
])
async def test_broken_replies_are_protocol_errors_and_drop_the_connection(
    raw: bytes, error: str
) -> None:
    async with Scripted(partial_then(hang_up, raw)) as srv:
        http, transport = client(srv)
        async with http:
            with pytest.raises(httpx.RemoteProtocolError, match=error):
                async with http.stream("GET", srv.url) as response:
                    async for _ in body_chunks(response):
                        pass
            assert transport.connections == 0


async def test_a_server_that_hangs_up_without_a_reply() -> None:
    async with Scripted(hang_up) as srv:
        http, transport = client(srv)
        async with http:
            with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
                await http.get(srv.url)
            assert transport.connections == 0


async def test_header_injection_is_refused_before_anything_is_sent() -> None:
    async with Scripted(ok()) as srv:
        http, _ = client(srv)
        async with http:
            with pytest.raises(httpx.LocalProtocolError, match="Illegal header"):
                await http.get(srv.url, headers={"x-a": "b\r\nx-evil: 1"})
            assert (await http.get(srv.url)).content == b"hello"
        assert len(srv.requests) == 1 and b"x-evil" not in srv.requests[0]


# -- timeouts and cancellation ---------------------------------------------------------


async def test_a_stalled_body_is_a_read_timeout_and_closes_the_socket() -> None:
    async with Scripted(partial_then(until_closed, CHUNKED_HEAD + b"5\r\nhello\r\n")) as srv:
        http, transport = client(srv, read=0.05)
        async with http:
            async with http.stream("GET", srv.url) as response:
                chunks = body_chunks(response)
                assert await anext(chunks) == b"hello"
                with pytest.raises(httpx.ReadTimeout):
                    await anext(chunks)
            assert transport.connections == 0
        await srv.wait_ended(1)


async def test_a_cancelled_read_closes_the_socket() -> None:
    async with Scripted(partial_then(until_closed, CHUNKED_HEAD + b"5\r\nhello\r\n")) as srv:
        http, transport = client(srv)
        async with http, http.stream("GET", srv.url) as response:
            chunks = body_chunks(response)
            assert await anext(chunks) == b"hello"
            async with anyio.create_task_group() as tg:
                tg.start_soon(anext, chunks)
                await wait_all_tasks_blocked()  # the read waits for data
                tg.cancel_scope.cancel()
            assert transport.connections == 0
            await srv.wait_ended(1)


async def test_a_peer_that_does_not_read_is_a_write_timeout() -> None:
    async with silent() as url:
        http, transport = client(write=0.2)
        async with http:
            with pytest.raises(httpx.WriteTimeout):
                await http.post(url, content=b"x" * (32 << 20))
            assert transport.connections == 0


async def test_connect_refused_and_an_unanswered_handshake() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    http, transport = client(connect=0.2)
    async with http:
        with pytest.raises(httpx.ConnectError):
            await http.get(f"http://127.0.0.1:{port}/")
        assert transport.connections == 0
    async with silent() as url:  # takes the connection, never answers the TLS hello
        secure = provider(url.replace("http:", "https:") + "/v1", connect_timeout=0.2)
        with pytest.raises(ProviderTimeout, match=r"lab/m: could not connect within 0\.2 s\."):
            await secure.complete(ChatRequest(model="m", messages=HI))
        await secure.aclose()


# -- the pool --------------------------------------------------------------------------


async def test_at_most_max_connections_open_at_once() -> None:
    async with Scripted(*[ok()] * 8) as srv:
        http, transport = client(srv, size=2)
        async with http:
            async with anyio.create_task_group() as tg:
                for _ in range(8):
                    tg.start_soon(http.get, srv.url)
            assert srv.accepted == 2 and transport.connections == 2


async def test_a_cancelled_wait_for_a_connection_leaves_no_trace() -> None:
    async with Scripted(partial_then(until_closed, CHUNKED_HEAD), ok(b"third")) as srv:
        http, transport = client(srv, size=1)
        got: list[bytes] = []

        async def third() -> None:
            got.append((await http.get(srv.url)).content)

        async with http:
            held = await http.send(http.build_request("GET", srv.url), stream=True)
            async with anyio.create_task_group() as second:  # waits for the only connection
                second.start_soon(http.get, srv.url)
                await wait_all_tasks_blocked()
                second.cancel_scope.cancel()
            async with anyio.create_task_group() as tg:
                tg.start_soon(third)
                await wait_all_tasks_blocked()
                assert not got and transport.connections == 1
                await held.aclose()  # its body unread: the connection is dropped, room made
        assert got == [b"third"] and srv.accepted == 2 and len(srv.requests) == 2


# -- the providers on it ---------------------------------------------------------------


async def test_providers_stream_over_it_and_its_faults_read_as_before(
    loopback: LoopbackServer,
) -> None:
    loopback.set_behavior("m", ModelBehavior(reply="a b c d"))
    lab = provider(loopback.base_url, read_timeout=0.2)
    [done] = await lab.complete(ChatRequest(model="m", messages=HI))
    assert done.text == "a b c d"
    [pool] = lab.transport._loop_state().pools
    transport = pool._transport  # the client's transport (httpx keeps no public name for it)
    assert isinstance(transport, Http1Transport) and transport.connections == 1
    loopback.set_behavior("m", ModelBehavior(reply="a b c d", drop_after=2))
    with pytest.raises(StreamInterrupted, match=r"lost mid-stream \(RemoteProtocolError\)") as e:
        await lab.complete(ChatRequest(model="m", messages=HI))
    assert e.value.received == "a b" and transport.connections == 0
    loopback.set_behavior("m", ModelBehavior(reply="a b c d", stall_after=1))
    with pytest.raises(StreamTimeout, match=r"no data for 0\.2 s \(stalled stream\)"):
        await lab.complete(ChatRequest(model="m", messages=HI))
    assert transport.connections == 0
    await lab.aclose()


# -- TLS, proxies, trio: where the lean path serves -------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed (needed to make a test certificate)")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=moa-test",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


async def test_tls_verifies_the_certificate(
    certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = certificate
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(cert, key)
    async with Scripted(ok(b"secret"), tls=server_side) as srv:
        http, _ = client(srv, context=ssl.create_default_context(cafile=str(cert)))
        async with http:
            assert (await http.get(srv.url)).content == b"secret"
        http, transport = client(srv)  # trusts nothing
        async with http:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await http.get(srv.url)
            assert transport.connections == 0
        untrusted = provider(srv.url + "/v1")  # the system's CA bundle
        with pytest.raises(ProviderError, match=r"connection to https://127\.0\.0\.1:\d+ "
                                                r"failed \(.*certificate verify failed"):
            await untrusted.complete(ChatRequest(model="m", messages=HI))
        await untrusted.aclose()
    async with Scripted(SSE_REPLY, tls=server_side) as srv:
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        _ssl_context.cache_clear()
        try:
            trusted = provider(srv.url + "/v1")
            [done] = await trusted.complete(ChatRequest(model="m", messages=HI))
            assert done.text == "Hello"
            await trusted.aclose()
        finally:
            monkeypatch.delenv("SSL_CERT_FILE")
            _ssl_context.cache_clear()


def _no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


async def test_a_proxy_in_the_environment_leaves_it_to_httpx(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _no_proxies(monkeypatch)
    assert isinstance(lean_transport(_no_ca_context(), 4), Http1Transport)
    async with Scripted(SSE_REPLY) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        assert lean_transport(_no_ca_context(), 4) is None
        proxied = provider("http://upstream.invalid/v1")
        [done] = await proxied.complete(ChatRequest(model="m", messages=HI))
        await proxied.aclose()
    assert done.text == "Hello"
    assert proxy.requests[0].startswith(
        b"POST http://upstream.invalid/v1/chat/completions HTTP/1.1\r\n")


def test_outside_asyncio_it_is_httpx_own(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_proxies(monkeypatch)
    assert lean_transport(_ssl_context(), 4) is None, "no event loop"

    class TrioToken:
        native_token = object()

    monkeypatch.setattr(anyio.lowlevel, "current_token", TrioToken)
    assert lean_transport(_ssl_context(), 4) is None, "trio (any loop but asyncio's)"


# -- helpers ---------------------------------------------------------------------------


class _FakeSocket:
    """Enough of an asyncio transport for a connection fed by hand."""

    paused = False

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def close(self) -> None: ...
    def abort(self) -> None: ...
    def write(self, data: bytes) -> None: ...

