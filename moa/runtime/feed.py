"""An agent's output as the agents downstream see it: text cut into token-sized chunks.

Every agent writes into a `Feed`; aggregating agents read the feeds of the layer before. All
feeds of a run share one `Board`, a change signal an aggregator waits on (new chunk, finish,
failure) instead of polling.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

import anyio

from moa.tokens import count_tokens

State = Literal["waiting", "streaming", "done", "failed"]


class Board:
    """A run-wide change signal: `changed()` wakes everyone in `wait()`."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def changed(self) -> None:
        self._event.set()
        self._event = anyio.Event()

    async def wait(self, timeout: float | None) -> None:
        """Return at the next change, or after `timeout` seconds (None: no limit)."""
        event = self._event
        with anyio.move_on_after(timeout):
            await event.wait()


class Feed:
    """Text released in chunks: chunk `i` is released once it holds `chunk_size(i)` tokens.

    A chunk ends on a delta boundary (never inside a streamed piece); when the agent finishes,
    the remainder is released as the last chunk. Without `chunk_size` (layered mode, where
    nobody reads a reference before it is done) the whole text is one chunk.
    """

    def __init__(self, board: Board, chunk_size: Callable[[int], int] | None) -> None:
        self.board = board
        self.chunk_size = chunk_size
        self.chunks: list[str] = []
        self.pending = ""
        self.state: State = "waiting"
        self.truncated = False
        """Failed mid-stream with its text kept."""
        self.first_chunk_at: float | None = None
        self.done_at: float | None = None
        self.last_activity = time.monotonic()
        self.held = False
        """Its agent is waiting for its own references (busy, not stalled)."""
        self._resumed_at = self.last_activity
        self.peers: list[Feed] = []
        """Feeds of the other agents on the same backend instance."""
        self.queued = False
        """Its backend serves requests in turn (`Capabilities.queued`)."""
        self.calls_open = 0
        """Calls of its agent sent and not yet ended."""

    def quiet_for(self, now: float) -> float:
        """Seconds in which neither this agent nor another on its backend wrote anything (0
        while this agent waits for its own references). A backend that serves one request at
        a time (the embedded llama.cpp engine) is busy, not stalled, while it serves another,
        and while any call on it is open (queued or in a long prompt evaluation)."""
        if self.held or (self.queued and any(f.calls_open for f in [self, *self.peers])):
            return 0.0
        return now - max(self._resumed_at, *(f.last_activity for f in [self, *self.peers]))

    def hold(self, held: bool) -> None:
        """Mark the agent as waiting for its references (True) or working again (False)."""
        self.held = held
        self._resumed_at = time.monotonic()
        self.board.changed()

    @property
    def resolved(self) -> bool:
        return self.state in ("done", "failed")

    @property
    def usable(self) -> bool:
        """Holds text an aggregator may use: finished, kept after a failure, or a chunk."""
        return bool(self.chunks) and (self.state != "failed" or self.truncated)

    @property
    def text(self) -> str:
        """Released text (all of it once the agent finished)."""
        return "".join(self.chunks)

    @property
    def partial(self) -> str:
        """Everything written so far, released or not."""
        return self.text + self.pending

    def push(self, text: str) -> None:
        self.state = "streaming"
        self.last_activity = time.monotonic()
        self.pending += text
        if self.chunk_size and count_tokens(self.pending) >= self.chunk_size(len(self.chunks)):
            self._release()

    def finish(self) -> None:
        self._release()
        self.state = "done"
        self.done_at = time.monotonic()
        self.board.changed()

    def fail(self, keep: bool) -> None:
        """Mark a failure; keep what arrived (labelled truncated downstream) or drop it."""
        if keep:
            self._release()
            self.truncated = bool(self.chunks)
        self.state = "failed"
        self.board.changed()

    def _release(self) -> None:
        if not self.pending:
            return
        self.chunks.append(self.pending)
        self.pending = ""
        if self.first_chunk_at is None:
            self.first_chunk_at = time.monotonic()
        self.board.changed()
