"""What every request to `moa serve` passes before a mixture runs: errors in OpenAI's shape
(`Refused`) and the status of a failed run, the concurrency gate (429 / 503 before any stream
starts), the body's content type, size and time limit, and a time limit on request headers.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import anyio
from starlette.requests import Request

from moa.openai.wire import Refused

HEADER_TIMEOUT_S = 10.0
"""A connection whose request headers have not all arrived by then is closed."""
BODY_TIMEOUT_S = 30.0
"""A request whose body has not all arrived by then gets 408."""


class Gate:
    """At most `limit` requests run; `queue` more may wait up to `timeout` seconds."""

    def __init__(self, limit: int, queue: int, timeout: float) -> None:
        self.slots = anyio.Semaphore(limit)
        self.queue, self.timeout = queue, timeout
        self.waiting = self.active = 0

    async def enter(self) -> None:
        """Take a slot (call `leave()` after), or raise 429 (queue full) / 503 (waited too long)."""
        try:
            self.slots.acquire_nowait()
        except anyio.WouldBlock:
            # Only requests that really wait count against the queue (not those that took a
            # free slot and have not resumed yet: a burst would see a full queue too early).
            if self.waiting >= self.queue:
                raise Refused(429, "The server is at its concurrency limit; retry shortly.",
                              "rate_limit_error", "overloaded", retry_after=1) from None
            self.waiting += 1
            try:
                with anyio.move_on_after(self.timeout) as waited:
                    await self.slots.acquire()
            finally:
                self.waiting -= 1
            if waited.cancelled_caught:
                raise Refused(503, "The server is overloaded: no slot freed in time.",
                              "server_error", "overloaded", retry_after=1) from None
        self.active += 1

    def leave(self) -> None:
        self.active -= 1
        self.slots.release()


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
    (uvicorn has no such timeout; without it idle half-requests hold sockets forever), and
    answering a request the HTTP parser rejects with an OpenAI-shaped 400."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools missing: uvicorn's h11 protocol, without the timeout
        return "auto"

    class Protocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(HEADER_TIMEOUT_S, self.transport.close)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            body = json.dumps(Refused(400, "The request is not valid HTTP/1.1.",
                                      code="bad_http_request").body()).encode()
            self.transport.write(
                b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
            )
            self.transport.close()

    return Protocol
