"""A minimal HTTP/1.1 connection for the loopback server (asyncio, no dependencies).

Written by hand so faults are real: a dropped socket is an aborted transport in the
middle of a chunked body, a stall is an open socket that sends nothing.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

MAX_HEADER_BYTES = 64 * 1024


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:  # e.g. 529, Anthropic's "overloaded"
        return "Overloaded" if status == 529 else "Error"


class BadRequest(Exception):
    """The bytes received are not an HTTP/1.1 request this server understands."""


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Connection:
    """One client socket: request parsing, plain and chunked responses."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    buffer: bytearray = field(default_factory=bytearray)

    async def _fill(self) -> bool:
        data = await self.reader.read(65536)
        self.buffer.extend(data)
        return bool(data)

    async def read_request(self) -> Request | None:
        """The next request, or None when the client closed the connection."""
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            if len(self.buffer) > MAX_HEADER_BYTES:
                raise BadRequest("header block too large")
            if not await self._fill():
                return None
        head = bytes(self.buffer[:end]).decode("latin-1")
        del self.buffer[: end + 4]
        request_line, *header_lines = head.split("\r\n")
        try:
            method, path, _version = request_line.split(" ", 2)
        except ValueError:
            raise BadRequest(f"bad request line {request_line!r}") from None
        headers: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise BadRequest("chunked request bodies are not supported")
        length = int(headers.get("content-length") or 0)
        while len(self.buffer) < length:
            if not await self._fill():
                return None
        body = bytes(self.buffer[:length])
        del self.buffer[:length]
        return Request(method.upper(), path.split("?", 1)[0], headers, body)

    async def send(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        lines = [
            f"HTTP/1.1 {status} {_phrase(status)}",
            f"content-type: {content_type}",
            f"content-length: {len(body)}",
            *(f"{k}: {v}" for k, v in (headers or {}).items()),
        ]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await self.writer.drain()

    async def send_json(
        self, status: int, payload: Any, headers: dict[str, str] | None = None
    ) -> None:
        await self.send(status, json.dumps(payload).encode(), headers=headers)

    async def start_stream(self) -> None:
        """Send the headers of a chunked `text/event-stream` response."""
        head = (
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            "cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        self.writer.write(head.encode("latin-1"))
        await self.writer.drain()

    async def write_chunk(self, data: bytes) -> None:
        if data:
            self.writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            await self.writer.drain()

    async def end_stream(self) -> None:
        self.writer.write(b"0\r\n\r\n")
        await self.writer.drain()

    def abort(self) -> None:
        """Drop the socket at once, mid-body if a response is under way."""
        self.writer.transport.abort()

    async def run_until_disconnect(self, work: Callable[[], Awaitable[None]]) -> bool:
        """Run `work` (a streamed response) while watching for the client going away.

        Returns False when the client closed its socket first (the work is cancelled).
        """
        task = asyncio.ensure_future(work())
        while True:
            watcher = asyncio.ensure_future(self.reader.read(65536))
            done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                if watcher.done() and not watcher.exception():
                    self.buffer.extend(watcher.result())
                else:
                    watcher.cancel()
                    await asyncio.gather(watcher, return_exceptions=True)
                task.result()
                return True
            data = watcher.result() if not watcher.exception() else b""
            if data:
                self.buffer.extend(data)
                continue
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return False
