"""What every request to `moa serve` passes before a mixture runs: errors in OpenAI's shape
(`Refused`) and the status of a failed run, the concurrency gate (429 / 503 before any stream
starts), the body's content type, size and time limit, a time and size limit on request
headers (431), and the drain that ends open requests when a shutdown's grace has passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import Iterator
from http import HTTPStatus
from typing import Any

import anyio
from starlette.requests import Request

from moa.openai.wire import Refused

log = logging.getLogger("moa.openai.server")

HEADER_TIMEOUT_S = 10.0
"""A connection whose request headers have not all arrived by then is closed."""
MAX_HEADER_BYTES = 64 * 1024
"""The request line and headers of one request, at most; beyond it 431 before any work."""
LINGER_S = 2.0
"""After a 431, what the client still sends is read and dropped this long (closing at once
with unread bytes would reset the connection and lose the answer), then it is closed."""
BODY_TIMEOUT_S = 30.0
"""A request whose body has not all arrived by then gets 408."""
SHUTTING_DOWN = Refused(503, "The server is shutting down; retry the request.",
                        "server_error", "shutting_down", retry_after=1)
"""What a request still open when the shutdown's grace passes is answered."""


class Slot:
    """A gate slot held by one request; `release()` gives it back (again: a no-op)."""

    def __init__(self, gate: Gate) -> None:
        self.gate, self.held = gate, True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.gate.leave()


class Gate:
    """At most `limit` requests run; `queue` more may wait up to `timeout` seconds.

    Admission is exact: a freed slot is handed to the first waiter at once (it stops
    counting as waiting then, not when its task next runs), so the queue's room is always
    what `/health` shows, and a request finding a free slot takes it without yielding.
    """

    def __init__(self, limit: int, queue: int, timeout: float) -> None:
        self.free, self.queue, self.timeout = limit, queue, timeout
        self.active = 0
        self._waiters: deque[anyio.Event] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def enter(self) -> Slot:
        """Take a slot, or raise 429 (queue full) / 503 (waited `timeout` for one)."""
        if self.free:
            self.free -= 1
            self.active += 1
            return Slot(self)
        if len(self._waiters) >= self.queue:
            raise Refused(429, "The server is at its concurrency limit; retry shortly.",
                          "rate_limit_error", "overloaded", retry_after=1)
        granted = anyio.Event()
        self._waiters.append(granted)
        try:
            with anyio.move_on_after(self.timeout):
                await granted.wait()
        except BaseException:  # cancelled (client gone, shutdown): give back what was handed
            if granted.is_set():
                self.leave()
            else:
                self._waiters.remove(granted)
            raise
        if not granted.is_set():
            self._waiters.remove(granted)
            raise Refused(503, "The server is overloaded: no slot freed in time.",
                          "server_error", "overloaded", retry_after=1)
        return Slot(self)

    def leave(self) -> None:
        """Hand the slot to the first waiter, else free it (use `Slot.release`)."""
        if self._waiters:
            self._waiters.popleft().set()
        else:
            self.active -= 1
            self.free += 1


class Drain:
    """The requests in progress, and ending them when a shutdown's grace has passed.

    Each request runs inside `open()`; `expire()` cancels every one (and any opened later),
    and the request answers `SHUTTING_DOWN` in its own shape: a stream ends with an error
    event and its end marker, a JSON request gets a 503.
    """

    def __init__(self) -> None:
        self.expired = False
        self._scopes: set[anyio.CancelScope] = set()

    @property
    def open_requests(self) -> int:
        return len(self._scopes)

    @contextlib.contextmanager
    def open(self) -> Iterator[anyio.CancelScope]:
        """A scope that `expire()` cancels; `scope.cancelled_caught` says it was."""
        with anyio.CancelScope() as scope:
            self._scopes.add(scope)
            if self.expired:
                scope.cancel()
            try:
                yield scope
            finally:
                self._scopes.discard(scope)

    def expire(self) -> None:
        """End every open request now (and refuse later ones)."""
        self.expired = True
        for scope in list(self._scopes):
            scope.cancel()


async def read_body(request: Request, limit: int) -> bytes:
    """The body, at most `limit` bytes (else 413), within `BODY_TIMEOUT_S` (else 408)."""
    too_large = Refused(413, f"The request body is larger than {limit} bytes.")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    with anyio.move_on_after(BODY_TIMEOUT_S) as timer:
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise too_large
    if timer.cancelled_caught:
        raise Refused(408, f"The request body did not arrive within {BODY_TIMEOUT_S:g} s.",
                      code="timeout")
    return bytes(body)


def check_content_type(request: Request) -> None:
    """Only `application/json`: a form or `text/plain` body is what a hostile web page can send
    from a visitor's browser without a CORS preflight."""
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind != "application/json":
        raise Refused(415, "The request body must be JSON with content-type: application/json.",
                      code="unsupported_media_type")


def http_protocol() -> Any:
    """uvicorn's HTTP/1.1 protocol, closing a connection whose request headers are too slow
    (uvicorn has no such timeout; without it idle half-requests hold sockets forever),
    answering 431 to request headers over `MAX_HEADER_BYTES` before the app sees them, and
    answering a request the HTTP parser rejects with an OpenAI-shaped 400."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools missing: uvicorn's h11 protocol, without these limits
        return "auto"

    class Protocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None
        _head_bytes: int | None = 0
        """Bytes received while the current request's headers were incomplete (None once they
        are): bounds what the parser buffers for a header that never ends."""
        _heads = 0
        """Requests whose headers were complete, on this connection."""
        _head_fields = 0
        """Bytes of the current request's target, header names and values, as parsed."""
        _refused = False

        def _arm(self, delay: float = HEADER_TIMEOUT_S) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(delay, self.transport.close)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _answer(self, refused: Refused) -> None:
            body = json.dumps(refused.body()).encode()
            status = HTTPStatus(refused.status)
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                % (status.value, status.phrase.encode(), len(body), body)
            )

        def _too_large(self) -> None:
            """Answer 431, read and drop what else comes for `LINGER_S`, then close."""
            self._refused = True
            log.info("HTTP 431: request headers over %d bytes", MAX_HEADER_BYTES)
            self._answer(Refused(
                431, f"The request line and headers are larger than {MAX_HEADER_BYTES} bytes.",
                code="request_headers_too_large"))
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self._arm(LINGER_S)

        def _count(self, size: int) -> None:
            self._head_fields += size
            if self._head_fields > MAX_HEADER_BYTES and not self._refused:
                self._too_large()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            in_head, heads = self._head_bytes is not None, self._heads
            super().data_received(data)
            if in_head and self._heads == heads and not self._refused:  # all of it head bytes
                self._head_bytes = (self._head_bytes or 0) + len(data)
                if self._head_bytes > MAX_HEADER_BYTES:
                    self._too_large()

        def on_message_begin(self) -> None:
            if not self._refused:
                self._head_fields = 0
                super().on_message_begin()

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            if not self._refused:
                super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value))
            if not self._refused:
                super().on_header(name, value)

        def on_headers_complete(self) -> None:
            if not self._refused:
                self._head_bytes, self._heads = None, self._heads + 1
                self._disarm()
                super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if not self._refused:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if not self._refused:
                self._head_bytes = 0  # what follows is the next request's head
                super().on_message_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            self._answer(Refused(400, "The request is not valid HTTP/1.1.",
                                 code="bad_http_request"))
            self.transport.close()

    return Protocol
