"""HTTP/1.1 for httpx on raw asyncio: the providers' lean connection pool.

httpx's default transport (httpcore, h11, anyio) spends most of a streamed reply's CPU between
the socket and the bytes: an anyio `fail_after` scope and a task lookup per read, h11's event
machinery, five async iterators stacked per chunk. `Http1Transport` is an
`httpx.AsyncBaseTransport` that speaks HTTP/1.1 itself over an `asyncio.Protocol`: the bytes land
in a buffer as the loop receives them, a read waits on a future only when that buffer is empty
(its read timeout is a loop timer armed then, none when data is already there), and a chunked
body is unframed with a few bytes operations. Connections are kept per origin, as many as
`max_connections` in all, idle ones for `keepalive_expiry` seconds; timeouts come from the
request (httpx's `timeout` extension) and end as httpx's own exceptions, so callers see httpx.

`lean_transport()` gives one where it can serve: on asyncio with no proxy in the environment
(httpx applies environment proxies only to its own transports); elsewhere (trio, a proxy) None,
and the client keeps httpx's default. `body_chunks()` reads a response's body at this layer
(a plain coroutine per chunk) when it came from here with no content coding.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
import urllib.request
from collections import deque
from collections.abc import AsyncIterator
from contextlib import suppress
from typing import Protocol

import anyio.lowlevel

from ._lean import httpx

MAX_HEAD_BYTES = 64 * 1024
"""The longest response head (status line and headers) accepted."""
MAX_BUFFERED = 1 << 20
"""Received bytes held unread before the socket stops being read (until they are)."""
BODY = "moa.body"
"""The response extension holding this transport's `Body` (see `body_chunks`)."""

_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(rb"[^\r\n\x00]*")


class ByteChunks(Protocol):
    """A response body read a piece at a time, closed when done with."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...
    async def __anext__(self) -> bytes: ...
    async def aclose(self) -> None: ...


def lean_transport(
    ssl_context: ssl.SSLContext, max_connections: int, keepalive_expiry: float = 5.0
) -> Http1Transport | None:
    """An `Http1Transport` for a new client, or None where httpx's own transport must serve:
    not on asyncio (trio), or a proxy set in the environment."""
    try:
        loop = anyio.lowlevel.current_token().native_token
    except RuntimeError:  # no event loop
        return None
    if not isinstance(loop, asyncio.AbstractEventLoop):
        return None
    if any(scheme != "no" for scheme in urllib.request.getproxies()):
        return None
    return Http1Transport(ssl_context, max_connections, keepalive_expiry)


def body_chunks(response: httpx.Response) -> ByteChunks:
    """The response's body as it arrives: this transport's reader when the response came from
    it and has no content coding, else httpx's `aiter_bytes()`."""
    body = response.extensions.get(BODY)
    coding = response.headers.get("content-encoding", "identity").strip().lower()
    if isinstance(body, Body) and coding in ("identity", ""):
        return body
    return response.aiter_bytes()  # type: ignore[return-value]  # an async generator


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class _Connection(asyncio.Protocol):
    """One socket: the bytes received and not yet read (`buffer`), whether it is still open."""

    def __init__(self, loop: asyncio.AbstractEventLoop, origin: tuple[str, str, int]) -> None:
        self.loop = loop
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        """No more bytes will come (the peer closed its side, or the socket is gone)."""
        self.error: Exception | None = None
        self.idle_since = 0.0
        self._paused = False
        """Reading is paused: `MAX_BUFFERED` bytes wait to be read."""
        self._waiter: asyncio.Future[bool] | None = None
        self._writable: asyncio.Future[None] | None = None
        """Set while the transport's write buffer is over its high-water mark."""

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > MAX_BUFFERED and not self._paused:
            self._paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    def eof_received(self) -> bool:
        self._ended()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.error = exc
        self._ended()
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    def pause_writing(self) -> None:
        self._writable = self.loop.create_future()

    def resume_writing(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    def _ended(self) -> None:
        self.eof = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    # -- used by the transport -------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    async def receive(self, timeout: float | None) -> None:
        """Wait until more bytes (or the end of the stream) arrive: `httpx.ReadTimeout` after
        `timeout` seconds without any. Called when what is buffered is not enough and no end
        has been seen; a paused socket is read again."""
        if self._paused:
            self._paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]
        waiter = self._waiter = self.loop.create_future()
        timer = None if timeout is None else self.loop.call_later(timeout, _expire, waiter)
        try:
            if not await waiter:
                raise httpx.ReadTimeout(f"no data for {timeout:g} s")
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    async def send(self, data: bytes, timeout: float | None) -> None:
        """Write `data`; wait (up to `timeout`: `httpx.WriteTimeout`) while the peer is not
        reading. A connection already closed takes nothing: the response read says why."""
        if self.closed:
            return
        self.transport.write(data)  # type: ignore[union-attr]
        if self._writable is not None:
            try:
                async with asyncio.timeout(timeout):
                    await self._writable
            except TimeoutError:
                raise httpx.WriteTimeout(f"could not write for {timeout:g} s") from None

    def lost(self, what: str) -> httpx.TransportError:
        """The error for a connection that ended while `what` was still expected."""
        if isinstance(self.error, OSError):
            return httpx.ReadError(str(self.error) or type(self.error).__name__)
        return httpx.RemoteProtocolError(what)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class Body(httpx.AsyncByteStream):
    """A response body read from its connection's buffer: chunked, of a known length, or up to
    the end of the connection. At its end the connection goes back to the pool (if it can be
    reused); closed before, or failing, the connection is dropped."""

    __slots__ = ("_close_after", "_conn", "_crlf", "_mode", "_pool", "_remaining", "_timeout")

    def __init__(
        self, pool: Http1Transport, conn: _Connection, mode: str, length: int,
        close_after: bool, timeout: float | None,
    ) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn
        self._mode = mode
        """"chunked", "length" or "close" (read until the connection closes)."""
        self._remaining = length
        """Bytes left: of the body ("length") or of the current chunk ("chunked"); in a
        chunked body -1 while a chunk-size line is expected, -2 in the trailer."""
        self._crlf = False
        """A chunk's data has been read and its CRLF has not."""
        self._close_after = close_after
        self._timeout = timeout
        if mode == "length" and not length:
            self._finish()

    def __aiter__(self) -> Body:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        if conn is None:
            raise StopAsyncIteration
        try:
            while True:
                data, done = self._take(conn)
                if done:
                    self._finish()
                    if data:
                        return data
                    raise StopAsyncIteration
                if data:
                    return data
                if conn.eof:
                    raise self._truncated(conn)
                await conn.receive(self._timeout)
        except StopAsyncIteration:
            raise
        except BaseException:
            self._drop()
            raise

    async def aclose(self) -> None:
        self._drop()

    def _take(self, conn: _Connection) -> tuple[bytes, bool]:
        """The body bytes now in the buffer, and whether the body is complete."""
        buffer = conn.buffer
        if self._mode == "length":
            n = min(self._remaining, len(buffer))
            data = bytes(buffer[:n])
            del buffer[:n]
            self._remaining -= n
            return data, not self._remaining
        if self._mode == "close":
            data = bytes(buffer)
            buffer.clear()
            return data, conn.eof and not isinstance(conn.error, OSError)
        pieces: list[bytes] = []
        while buffer:
            if self._remaining > 0:
                n = min(self._remaining, len(buffer))
                pieces.append(bytes(buffer[:n]))
                del buffer[:n]
                self._remaining -= n
                self._crlf = not self._remaining
                continue
            end = buffer.find(b"\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD_BYTES:
                    raise httpx.RemoteProtocolError("chunk-size line too long")
                break
            line = bytes(buffer[:end])
            del buffer[: end + 2]
            if self._crlf:
                if line:
                    raise httpx.RemoteProtocolError("chunk data longer than its size")
                self._crlf = False
            elif self._remaining == -2:  # trailer fields, up to a blank line
                if not line:
                    return b"".join(pieces), True
            else:
                self._remaining = _chunk_size(line) or -2
        return b"".join(pieces), False

    def _truncated(self, conn: _Connection) -> httpx.TransportError:
        detail = (
            "incomplete chunked read" if self._mode == "chunked"
            else f"{self._remaining} bytes missing"
        )
        return conn.lost(f"peer closed connection without sending complete message body: "
                         f"{detail}")

    def _finish(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            reuse = not (self._close_after or conn.eof or conn.buffer)
            self._pool.release(conn, reuse)

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool.drop(conn)


def _chunk_size(line: bytes) -> int:
    size = line.partition(b";")[0].strip(b" \t")
    if not size or len(size) > 16 or size.lstrip(b"0123456789abcdefABCDEF"):
        raise httpx.RemoteProtocolError(f"bad chunk-size line {line[:40]!r}")
    return int(size, 16)


def _head_end(buffer: bytearray, start: int) -> tuple[int, int]:
    """Where the head ends in `buffer` (searched from `start`) and its blank line's length."""
    end = buffer.find(b"\r\n\r\n", start)
    if end >= 0:
        return end, 4
    end = buffer.find(b"\n\n", start)  # bare-LF line ends, as h11 takes them
    return end, 2


class Http1Transport(httpx.AsyncBaseTransport):
    """HTTP/1.1 connections on asyncio, pooled per origin (see the module's docstring)."""

    def __init__(
        self, ssl_context: ssl.SSLContext, max_connections: int, keepalive_expiry: float = 5.0
    ) -> None:
        self._ssl = ssl_context
        self._max = max_connections
        self._expiry = keepalive_expiry
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._busy: set[_Connection] = set()
        self._count = 0
        """Open connections, idle, busy or connecting."""
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    @property
    def connections(self) -> int:
        """The connections open now: idle, busy or connecting."""
        return self._count

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout") or {}
        read_timeout = timeouts.get("read")
        url = request.url
        head, body, close = await self._request_bytes(request)
        conn = await self._acquire(url, request.extensions.get("sni_hostname"), timeouts)
        try:
            await conn.send(head + body if body is not None else head, timeouts.get("write"))
            if body is None:  # a chunked request body
                async for part in request.stream:  # type: ignore[union-attr]
                    if part:
                        await conn.send(b"%x\r\n%b\r\n" % (len(part), part),
                                        timeouts.get("write"))
                await conn.send(b"0\r\n\r\n", timeouts.get("write"))
            status, reason, headers, old = await self._read_head(conn, read_timeout)
            mode, length, close_after = _framing(request.method, status, headers)
        except BaseException:
            self.drop(conn)
            raise
        stream = Body(self, conn, mode, length, close or close_after or old, read_timeout)
        return httpx.Response(
            status, headers=headers, stream=stream,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": reason, BODY: stream},
        )

    async def aclose(self) -> None:
        """Close every connection, busy ones too (as httpcore does)."""
        self._closed = True
        for conns in self._idle.values():
            for conn in conns:
                conn.abort()
        for conn in self._busy:
            conn.abort()
        self._idle.clear()
        self._busy.clear()
        self._count = 0
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def release(self, conn: _Connection, reuse: bool) -> None:
        """Take back `conn` when its response is over: idle for the next request on its origin
        if `reuse`, else closed."""
        if conn not in self._busy:
            return  # the pool was closed meanwhile
        self._busy.discard(conn)
        if reuse and not self._closed and not conn.closed:
            conn.idle_since = time.monotonic()
            self._idle.setdefault(conn.origin, []).append(conn)
        else:
            if conn.transport is not None:
                conn.transport.close()
            self._count -= 1
        self._wake_one()

    def drop(self, conn: _Connection) -> None:
        """Abort `conn` (its response was cut short or failed) and free its place."""
        conn.abort()
        self.release(conn, False)

    # -- the pool --------------------------------------------------------------------

    async def _acquire(
        self, url: httpx.URL, sni: str | None, timeouts: dict[str, float | None]
    ) -> _Connection:
        scheme = url.scheme
        if scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"Request URL has an unsupported protocol "
                                            f"'{scheme}://'.")
        origin = (scheme, url.host, url.port or (443 if scheme == "https" else 80))
        while True:
            if self._closed:
                raise RuntimeError("The connection pool was closed.")
            idle = self._idle.get(origin)
            if idle:
                now = time.monotonic()
                while idle:
                    conn = idle.pop()
                    if (conn.closed or conn.eof or conn.buffer
                            or now - conn.idle_since > self._expiry):
                        conn.abort()
                        self._count -= 1
                        continue
                    self._busy.add(conn)
                    return conn
            if self._count < self._max:
                break
            other = next((conns for conns in self._idle.values() if conns), None)
            if other is not None:  # an idle connection to another origin makes room
                other.pop(0).abort()
                self._count -= 1
                continue
            await self._wait_for_room(timeouts.get("pool"))
        self._count += 1
        try:
            conn = await self._connect(origin, sni, timeouts.get("connect"))
        except BaseException:
            self._count -= 1
            self._wake_one()
            raise
        if self._closed:
            conn.abort()
            raise RuntimeError("The connection pool was closed.")
        self._busy.add(conn)
        return conn

    async def _connect(
        self, origin: tuple[str, str, int], sni: str | None, timeout: float | None
    ) -> _Connection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        conn = _Connection(loop, origin)
        tls = self._ssl if scheme == "https" else None
        options: dict[str, object] = {}
        if isinstance(loop, asyncio.BaseEventLoop):  # uvloop has no happy eyeballs option
            options["happy_eyeballs_delay"] = 0.25
        try:
            async with asyncio.timeout(timeout):
                await loop.create_connection(
                    lambda: conn, host, port, ssl=tls,
                    server_hostname=(sni or host) if tls else None, **options,  # type: ignore[arg-type]
                )
        except TimeoutError as exc:
            conn.abort()
            raise httpx.ConnectTimeout(f"could not connect within {timeout:g} s") from exc
        except OSError as exc:  # refused, unreachable, name resolution, TLS (ssl.SSLError)
            conn.abort()
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
        except BaseException:
            conn.abort()
            raise
        return conn

    async def _wait_for_room(self, timeout: float | None) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self._wake_one()  # woken as it was cancelled: pass the turn on
            else:
                with suppress(ValueError):
                    self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise httpx.PoolTimeout(f"no connection free within {timeout:g} s") from exc
            raise

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    # -- the messages ----------------------------------------------------------------

    @staticmethod
    async def _request_bytes(request: httpx.Request) -> tuple[bytes, bytes | None, bool]:
        """The request head, its body (None: sent chunked from `request.stream`) and whether
        the request asks to close the connection after it."""
        parts = [request.method.encode("ascii"), b" ", request.url.raw_path, b" HTTP/1.1\r\n"]
        chunked = close = False
        for name, value in request.headers.raw:
            if not _TOKEN.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
                raise httpx.LocalProtocolError(f"Illegal header {name[:40]!r}")
            lowered = name.lower()
            if lowered == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif lowered == b"connection":
                close = b"close" in value.lower()
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        head = b"".join(parts)
        if chunked:
            return head, None, close
        stream = request.stream
        if isinstance(stream, httpx.ByteStream):
            return head, request.content, close
        return head, b"".join([part async for part in stream]), close  # type: ignore[union-attr]

    @staticmethod
    async def _read_head(
        conn: _Connection, timeout: float | None
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]], bool]:
        """The final response's status, reason phrase, headers, and whether it is older than
        HTTP/1.1 (its connection is not kept); informational 1xx responses are skipped."""
        while True:
            start = 0
            while True:
                buffer = conn.buffer
                end, blank = _head_end(buffer, start)
                if end >= 0:
                    break
                if len(buffer) > MAX_HEAD_BYTES:
                    raise httpx.RemoteProtocolError("the response head is too long")
                if conn.eof:
                    if buffer:
                        raise conn.lost("peer closed connection in the middle of the "
                                        "response head")
                    raise conn.lost("Server disconnected without sending a response.")
                start = max(0, len(buffer) - 3)
                await conn.receive(timeout)
            lines = bytes(buffer[:end]).replace(b"\r\n", b"\n").split(b"\n")
            del buffer[: end + blank]
            version, _, rest = lines[0].partition(b" ")
            code, _, reason = rest.partition(b" ")
            if version[:7] != b"HTTP/1." or len(code) != 3 or not code.isdigit():
                raise httpx.RemoteProtocolError(f"bad status line {lines[0][:60]!r}")
            headers: list[tuple[bytes, bytes]] = []
            for line in lines[1:]:
                name, colon, value = line.partition(b":")
                if not colon or not _TOKEN.fullmatch(name):
                    raise httpx.RemoteProtocolError(f"bad header line {line[:60]!r}")
                headers.append((name, value.strip(b" \t")))
            status = int(code)
            if status >= 200 or status == 101:
                return status, reason, headers, version != b"HTTP/1.1"


def _framing(method: str, status: int, headers: list[tuple[bytes, bytes]]) -> tuple[str, int, bool]:
    """How the body is delimited ("chunked", "length" or "close"), its length, and whether
    the connection closes after it."""
    close = False
    chunked = False
    length: int | None = None
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"transfer-encoding":
            codings = [c.strip() for c in value.lower().split(b",")]
            if codings[-1] != b"chunked":
                raise httpx.RemoteProtocolError(f"unsupported transfer-encoding {value!r}")
            chunked = True
        elif lowered == b"content-length":
            if not value.isdigit() or (length is not None and int(value) != length):
                raise httpx.RemoteProtocolError(f"bad content-length {value[:30]!r}")
            length = int(value)
        elif lowered == b"connection":
            close = close or b"close" in value.lower()
    if status == 101:
        raise httpx.RemoteProtocolError("protocol upgrades are not supported")
    if method == "HEAD" or status in (204, 304):
        return "length", 0, close
    if chunked:
        return "chunked", -1, close or length is not None
    if length is not None:
        return "length", length, close
    return "close", 0, True
