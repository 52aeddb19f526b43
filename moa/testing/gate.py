"""`Gate`: explicit pacing of a loopback stream, for tests that must not depend on timing."""

from __future__ import annotations

import asyncio
import sys
import threading

ALL = sys.maxsize


class Gate:
    """Holds streamed replies back: token `i` of a reply goes out once more than `i` are open.

    Thread-safe: a test opens it from its own thread or event loop while the server (in its
    background thread) waits on it. One gate may pace several models or requests at once.
    """

    def __init__(self, tokens: int = 0) -> None:
        self._open = tokens
        self._lock = threading.Lock()
        self._waiters: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    @property
    def tokens(self) -> int:
        """Tokens of each reply that may be sent now."""
        return self._open

    def open(self, tokens: int = ALL) -> None:
        """Let each reply send its first `tokens` tokens (default: all of them)."""
        with self._lock:
            self._open = max(self._open, tokens)
            ready = [w for w in self._waiters if w[0] < self._open]
            self._waiters = [w for w in self._waiters if w[0] >= self._open]
        for _, loop, future in ready:
            loop.call_soon_threadsafe(_release, future)

    async def passage(self, position: int) -> None:
        """Return once token `position` (0-based) may be sent."""
        with self._lock:
            if position < self._open:
                return
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append((position, asyncio.get_running_loop(), future))
        await future


def _release(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
