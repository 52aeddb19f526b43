"""Where limits, budgets and ledgers live: one interface, two implementations.

`LocalState` (the default) keeps them in this process, as a single `moa serve` or script needs;
`RedisState` (extra `moa-stack[redis]`) keeps them in Redis, so every replica behind a load
balancer shares one session budget, one set of client-key budgets and one rate and
concurrency limit per provider. The runtime never knows which one it talks to:

    state = RedisState("redis://localhost:6379/0")
    mixture = Mixture("moa-lite", state=state)      # session_budget shared by every process

What a state holds:
- ledgers (`ledger(name, limit)`): budgets in dollars and tokens; a call's worst case is
  reserved before it is sent and settled after it ends; shared reservations expire, so a
  crashed process leaks nothing for longer than the lease;
- a call's permit (`acquire(ref, limits, ...)`): the provider's `rpm` / `tpm` window and its
  concurrency caps, waited for before the call is sent and given back when it ends;
- client rate windows (`hit(name, rpm)`): a non-blocking check for `moa serve --keys`.
"""

from __future__ import annotations

import os
from typing import Protocol

from moa.providers.registry import Limits
from moa.runtime.budget import Budget, Ledger

from .local import LocalState, Window

REDIS_URL_ENV = "MOA_REDIS_URL"

__all__ = ["REDIS_URL_ENV", "LocalState", "Permit", "State", "Window", "from_url"]


class Permit(Protocol):
    """A call's admission by its provider's limits; `close` it when the call ends."""

    async def close(self, tokens: int | None) -> None:
        """Give back the slot and record the call's actual tokens (None: keep the estimate)."""
        ...


class State(Protocol):
    """The state interface the runtime and the server talk to."""

    shared: bool
    """True when other processes see the same state."""

    def ledger(
        self, name: str, limit: Budget, *, scope: str = "session", quota: bool = False,
        keep_s: float | None = None,
    ) -> Ledger:
        """The ledger called `name` (the same object for the same name); `keep_s` lets a
        shared store forget it that long after its last use (per-day budgets)."""
        ...

    async def acquire(self, ref: str, limits: Limits, tokens: int, requests: int = 1) -> Permit:
        """Wait until the call to model `ref` fits its provider's rate window and concurrency
        caps (`tokens`: its worst case, for `tpm`), then hold its place."""
        ...

    async def hit(self, name: str, rpm: int) -> float:
        """Count one request in the window `name` and return 0, or the seconds until it would
        fit (then nothing is counted)."""
        ...

    async def aclose(self) -> None:
        """Close this event loop's connections."""
        ...


def from_url(url: str | None = None, **options: object) -> State:
    """`RedisState(url)` for a URL (or `$MOA_REDIS_URL`), else a new `LocalState`."""
    url = url or os.environ.get(REDIS_URL_ENV) or None
    if url is None:
        return LocalState()
    from .redis import RedisState

    return RedisState(url, **options)  # type: ignore[arg-type]
