"""`LocalState`: limits and ledgers in this process (the default; today's behaviour).

Rate windows (`rpm` / `tpm`) are sliding logs shared by every mixture of the process that uses
the same state (`LOCAL` unless one is passed). Concurrency caps are the transport's own
semaphores (`moa.providers.http`), so a local permit only holds a rate-window entry.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import anyio

from moa.providers.registry import Limits
from moa.runtime.budget import Budget, Ledger


@dataclass(eq=False)
class _Entry:
    at: float
    requests: int
    tokens: int
    live: bool = True


class Window:
    """A sliding-window log of requests and their tokens over `seconds` (thread-safe)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._entries: deque[_Entry] = deque()
        self._requests = 0
        self._tokens = 0
        self._lock = threading.Lock()

    def _purge(self, now: float) -> None:
        while self._entries and self._entries[0].at <= now - self.seconds:
            entry = self._entries.popleft()
            entry.live = False
            self._requests -= entry.requests
            self._tokens -= entry.tokens

    def take(
        self, rpm: int | None, tpm: int | None, tokens: int, requests: int = 1
    ) -> tuple[_Entry | None, float]:
        """(entry, 0) when the call fits and is counted, else (None, seconds to wait).

        A call larger than a whole window's allowance is let through an empty window.
        """
        with self._lock:
            now = time.monotonic()
            self._purge(now)
            busy = self._requests > 0
            if busy and (
                (rpm is not None and self._requests + requests > rpm)
                or (tpm is not None and self._tokens + tokens > tpm)
            ):
                return None, max(0.001, self._entries[0].at + self.seconds - now)
            entry = _Entry(now, requests, tokens)
            self._entries.append(entry)
            self._requests += requests
            self._tokens += tokens
            return entry, 0.0

    def settle(self, entry: _Entry, tokens: int) -> None:
        """Replace an entry's estimated tokens by the actual ones (if it is still counted)."""
        with self._lock:
            if entry.live:
                self._tokens += tokens - entry.tokens
                entry.tokens = tokens

    @property
    def requests(self) -> int:
        with self._lock:
            self._purge(time.monotonic())
            return self._requests


class _NoPermit:
    async def close(self, tokens: int | None) -> None:
        return None


NO_PERMIT = _NoPermit()
"""The permit of a call whose provider sets no rate limit."""


@dataclass
class _WindowPermit:
    window: Window
    entry: _Entry

    async def close(self, tokens: int | None) -> None:
        if tokens is not None:
            self.window.settle(self.entry, tokens)


async def wait_in(window: Window, limits: Limits, tokens: int, requests: int) -> _WindowPermit:
    """Wait until the call fits `window`'s rate limits; count it there."""
    while True:
        entry, wait = window.take(limits.rpm, limits.tpm, tokens, requests)
        if entry is not None:
            return _WindowPermit(window, entry)
        await anyio.sleep(wait)


class LocalState:
    """Ledgers and rate windows in this process; `window_s` is the rate window (tests shorten
    it; `rpm` and `tpm` then count per window)."""

    shared = False

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self._windows: dict[str, Window] = {}
        self._ledgers: dict[str, Ledger] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LocalState(window_s={self.window_s:g})"

    def ledger(
        self, name: str, limit: Budget, *, scope: str = "session", quota: bool = False,
        keep_s: float | None = None,
    ) -> Ledger:
        with self._lock:
            ledger = self._ledgers.get(name)
            if ledger is None:
                ledger = self._ledgers[name] = Ledger(limit=limit, scope=scope, quota=quota)
            return ledger

    def window(self, name: str) -> Window:
        with self._lock:
            return self._windows.setdefault(name, Window(self.window_s))

    async def acquire(
        self, ref: str, limits: Limits, tokens: int, requests: int = 1
    ) -> _NoPermit | _WindowPermit:
        if limits.rpm is None and limits.tpm is None:
            return NO_PERMIT
        return await wait_in(self.window(f"provider:{ref.partition('/')[0]}"), limits, tokens,
                             requests)

    async def hit(self, name: str, rpm: int) -> float:
        return self.window(f"client:{name}").take(rpm, None, 0)[1]

    async def aclose(self) -> None:
        return None


LOCAL = LocalState()
"""The process-wide default state (a `Mixture` without `state=` uses it)."""
