"""Server-sent events parsed from a response's bytes, a network chunk at a time.

The rules are httpx_sse's (the WHATWG event-stream interpretation): lines end at CRLF, CR or
LF; a blank line dispatches the event; `:` starts a comment; `data` lines are joined with LF;
an event not closed by a blank line when the stream ends is dropped. Parsing a whole chunk in
one call (most chunks hold one or more complete events) costs a fraction of a line-by-line
async iterator, and lets the transport check its deadline once per network read.
"""

from __future__ import annotations

import contextlib

from ._lean import ServerSentEvent


class SSEParser:
    """Feed it the body's bytes as they arrive; it returns the events they complete."""

    __slots__ = ("_buffer", "_data", "_event", "_id", "_retry")

    def __init__(self) -> None:
        self._buffer = b""
        self._event = ""
        self._data: list[str] = []
        self._id = ""
        self._retry: int | None = None

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        buffer = self._buffer + chunk if self._buffer else chunk
        held = b""
        if b"\r" in buffer:
            if buffer.endswith(b"\r"):  # maybe the first half of a CRLF: wait for the next byte
                buffer, held = buffer[:-1], b"\r"
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = buffer.split(b"\n")
        self._buffer = lines.pop() + held
        events: list[ServerSentEvent] = []
        for raw in lines:
            if raw:
                self._field(raw)
            elif self._data or self._event or self._id or self._retry is not None:
                data = self._data
                events.append(ServerSentEvent(
                    self._event, data[0] if len(data) == 1 else "\n".join(data),
                    self._id, self._retry,
                ))
                self._event, self._data, self._retry = "", [], None  # the id is kept
        return events

    def _field(self, raw: bytes) -> None:
        if raw.startswith(b"data: "):  # nearly every line
            self._data.append(raw[6:].decode("utf-8", "replace"))
            return
        line = raw.decode("utf-8", "replace")
        if line.startswith(":"):
            return
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._id = value
        elif name == "retry":
            with contextlib.suppress(ValueError):
                self._retry = int(value)
