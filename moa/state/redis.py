"""`RedisState`: ledgers, rate windows and concurrency caps in Redis, shared by every replica.

    state = RedisState("rediss://:password@redis.internal:6380/0")

Each check-and-change is one atomic Lua script (`moa.state._lua`) on keys with one hash tag,
so Redis Cluster works. Reservations and concurrency slots are leases: this process renews
its own every `lease_ttl_s / 3`; a process that dies stops renewing, and its holds expire.

When Redis cannot be reached (every command is bounded by `timeout_s`): shared budgets refuse
calls (`StateUnavailable`, fail closed), rate limits and concurrency caps fall back to this
process's own counters (fail open); one warning is logged when Redis goes away and one when it
is back. Redis is tried again `retry_s` after a failure, so recovery needs nobody. Settlements
that could not be written are kept (up to `BACKLOG`) and written first once Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, ClassVar

import anyio

from moa.errors import ConfigError, StateUnavailable
from moa.providers.base import Usage
from moa.providers.registry import Limits
from moa.providers.secrets import mask_url
from moa.runtime.budget import Budget, Ledger

from . import _lua
from .local import NO_PERMIT, LocalState, _NoPermit, _WindowPermit, wait_in

log = logging.getLogger("moa.state")

UNAVAILABLE = (
    "The shared state store (Redis) cannot be reached, so calls that spend a shared budget "
    "are refused until it is back."
)
BACKLOG = 10_000
"""Settlements kept while Redis is away (the oldest are dropped beyond it)."""
NANO = 1e9
"""Dollars are counted in integer nano-dollars in Redis."""
_SCRIPTS = {
    "reserve": _lua.RESERVE,
    "settle": _lua.SETTLE,
    "read": _lua.READ,
    "admit": _lua.ADMIT,
    "release": _lua.RELEASE,
    "refresh": _lua.REFRESH,
}


def _nusd(usd: float | None) -> int:
    return round(usd * NANO) if usd else 0


class _Conn:
    """One event loop's client, scripts and the leases it keeps alive."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.scripts = {name: client.register_script(src) for name, src in _SCRIPTS.items()}
        self.leases: dict[str, set[str]] = {}
        self.idle = asyncio.Event()
        self.beat: asyncio.Task[None] | None = None
        self.closed = False


class RedisLedger(Ledger):
    """A ledger kept in Redis; its fields mirror the totals Redis last returned."""

    shared: ClassVar[bool] = True

    def __init__(self, state: RedisState, name: str, limit: Budget, scope: str, quota: bool,
                 keep_s: float | None) -> None:
        super().__init__(limit=limit, scope=scope, quota=quota)
        self.name = name
        self.expired = 0
        """Reservations that expired (their process stopped renewing them)."""
        self._state = state
        base = state.key("ledger", name)
        self._keys = [base, f"{base}:res", f"{base}:amt"]
        self._keep_ms = round(keep_s * 1000) if keep_s else 0

    def __repr__(self) -> str:
        return f"RedisLedger({self.name!r}, limit={self.limit!r})"

    def _mirror(self, totals: list[Any]) -> None:
        usd, tokens, r_usd, r_tokens, calls, refused, unpriced, expired = (
            int(v or 0) for v in totals
        )
        self.spent_usd, self.spent_tokens = usd / NANO, tokens
        self.reserved_usd, self.reserved_tokens = r_usd / NANO, r_tokens
        self.calls, self.refused, self.unpriced, self.expired = calls, refused, unpriced, expired

    async def take(self, model: str, usd: float | None, tokens: int) -> tuple[str | None, str]:
        ticket = uuid.uuid4().hex
        limit = self.limit
        out = await self._state.eval("reserve", self._keys, [
            "" if limit.usd is None else _nusd(limit.usd),
            "" if limit.tokens is None else limit.tokens,
            _nusd(usd), tokens, ticket, self._state.lease_ms, self._keep_ms,
        ])
        over = out[0].decode() if isinstance(out[0], bytes) else str(out[0])
        self._mirror(out[1:])
        if over:
            return None, self.overflow(usd, tokens) or f"its {over} limit is reached"
        self._state.hold(self._keys[1], ticket)
        return ticket, ""

    async def give(self, ticket: str | None, usd: float | None, usage: Usage | None) -> None:
        if ticket is not None:
            self._state.drop(self._keys[1], ticket)
        args = [ticket or "", _nusd(usd), usage.total_tokens if usage else 0,
                int(usage is not None), int(usage is not None and usd is None), self._keep_ms]
        # If Redis is away the settlement waits in the backlog; the reservation expires.
        with contextlib.suppress(StateUnavailable):
            self._mirror(await self._state.eval("settle", self._keys, args, keep=True))

    async def refresh(self) -> None:
        self._mirror(await self._state.eval("read", self._keys, []))

    def report(self) -> dict[str, Any]:
        return {**super().report(), "reserved_usd": round(self.reserved_usd, 8),
                "reserved_tokens": self.reserved_tokens, "expired": self.expired}


@dataclass
class _RedisPermit:
    """A call's place in its provider's window and caps (in Redis, or local while it is away)."""

    state: RedisState
    keys: list[str]
    ticket: str | None
    local: _WindowPermit | None = None
    held: list[str] = field(default_factory=list)

    async def close(self, tokens: int | None) -> None:
        with anyio.CancelScope(shield=True):
            if self.local is not None:
                await self.local.close(tokens)
            if self.ticket is None:
                return
            for key in self.held:
                self.state.drop(key, self.ticket)
            # If Redis is away, the slots expire and the estimate stays in the window.
            with contextlib.suppress(StateUnavailable):
                await self.state.eval("release", self.keys,
                                      [self.ticket, "" if tokens is None else tokens])


class RedisState:
    """Shared state in Redis (`redis.asyncio`); see the module docstring for the policy.

    `url`: `redis://`, `rediss://` (TLS) or `unix://`, password and database in it (its query
    may set redis-py options such as `socket_timeout`). `prefix` namespaces the keys (several
    deployments on one Redis); `window_s` is the rate window (`rpm` / `tpm` count per window).
    """

    shared = True

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "moa",
        lease_ttl_s: float = 30.0,
        timeout_s: float = 1.0,
        retry_s: float = 1.0,
        window_s: float = 60.0,
    ) -> None:
        try:
            import redis.asyncio  # noqa: F401
        except ImportError:
            raise ConfigError(
                "A Redis state needs the redis package: pip install 'moa-stack[redis]'."
            ) from None
        self.url = url
        self.prefix = prefix.replace("{", "_").replace("}", "_")
        self.lease_ms = max(1, round(lease_ttl_s * 1000))
        self.timeout_s, self.retry_s, self.window_s = timeout_s, retry_s, window_s
        self.local = LocalState(window_s)
        """Rate windows used while Redis is away (fail open)."""
        self._conns: dict[object, _Conn] = {}
        self._ledgers: dict[str, RedisLedger] = {}
        self._lock = threading.Lock()
        self._retry_at = 0.0
        self._down = False
        self._backlog: deque[tuple[str, list[str], list[Any]]] = deque(maxlen=BACKLOG)

    def __repr__(self) -> str:
        return f"RedisState({mask_url(self.url)!r}, prefix={self.prefix!r})"

    def key(self, kind: str, name: str) -> str:
        """The hash-tagged key of `kind` `name` (`{moa:kind:name}`)."""
        clean = name.replace("{", "_").replace("}", "_")
        return f"{{{self.prefix}:{kind}:{clean}}}"

    # ---- connection, policy ------------------------------------------------------------

    def _conn(self) -> _Conn:
        loop = asyncio.get_running_loop()
        conn = self._conns.get(loop)
        if conn is None:
            import redis.asyncio as aioredis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            for old in [k for k in list(self._conns) if getattr(k, "is_closed", bool)()]:
                self._conns.pop(old, None)
            client = aioredis.Redis.from_url(
                self.url, socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s,
                retry=Retry(NoBackoff(), 1),  # one reconnect: pooled sockets die with a restart
            )
            conn = self._conns[loop] = _Conn(client)
        return conn

    async def eval(self, script: str, keys: list[str], args: list[Any], *,
                   keep: bool = False) -> Any:
        """Run one script; `StateUnavailable` when Redis cannot be reached (then, with `keep`,
        the call is written later, before anything else)."""
        try:
            if time.monotonic() < self._retry_at:
                raise StateUnavailable(UNAVAILABLE)
            conn = self._conn()
            while self._backlog:
                await self._run(conn, *self._backlog[0])
                self._backlog.popleft()
            result = await self._run(conn, script, keys, args)
        except StateUnavailable:
            if keep:
                self._backlog.append((script, keys, args))
            raise
        if self._down:
            self._down = False
            log.warning("Redis at %s is reachable again: shared budgets and limits resume.",
                        mask_url(self.url))
        return result

    async def _run(self, conn: _Conn, script: str, keys: list[str], args: list[Any]) -> Any:
        from redis.exceptions import RedisError

        try:
            with anyio.fail_after(self.timeout_s * 2):
                return await conn.scripts[script](keys=keys, args=args)
        except (RedisError, OSError, TimeoutError) as err:
            self._retry_at = time.monotonic() + self.retry_s
            if not self._down:
                self._down = True
                log.warning(
                    "Redis at %s cannot be reached (%s): shared budgets refuse calls (503) and "
                    "rate limits use this process's counters until it is back.",
                    mask_url(self.url), f"{type(err).__name__}: {err}".rstrip(": "),
                )
            raise StateUnavailable(UNAVAILABLE) from None

    # ---- leases ------------------------------------------------------------------------

    def hold(self, key: str, ticket: str) -> None:
        """Keep renewing `ticket` in the zset `key` until `drop`."""
        conn = self._conn()
        conn.leases.setdefault(key, set()).add(ticket)
        conn.idle.clear()
        if conn.beat is None or conn.beat.done():
            conn.beat = asyncio.get_running_loop().create_task(self._beat(conn))

    def drop(self, key: str, ticket: str) -> None:
        conn = self._conn()
        held = conn.leases.get(key)
        if held is not None:
            held.discard(ticket)
            if not held:
                del conn.leases[key]
        if not conn.leases:
            conn.idle.set()

    async def _beat(self, conn: _Conn) -> None:
        """Renew this loop's leases every third of their lifetime while it holds any."""
        while conn.leases and not conn.closed:
            with anyio.move_on_after(self.lease_ms / 3000):
                await conn.idle.wait()
            for key, tickets in list(conn.leases.items()):
                if conn.closed:
                    return
                try:
                    await self.eval("refresh", [key], [self.lease_ms, *tickets])
                except StateUnavailable:
                    break

    # ---- the State interface -----------------------------------------------------------

    def ledger(
        self, name: str, limit: Budget, *, scope: str = "session", quota: bool = False,
        keep_s: float | None = None,
    ) -> RedisLedger:
        with self._lock:
            ledger = self._ledgers.get(name)
            if ledger is None:
                ledger = RedisLedger(self, name, limit, scope, quota, keep_s)
                self._ledgers[name] = ledger
            return ledger

    async def acquire(
        self, ref: str, limits: Limits, tokens: int, requests: int = 1
    ) -> _NoPermit | _RedisPermit:
        prefix, _, model = ref.partition("/")
        rated = limits.rpm is not None or limits.tpm is not None
        cap = limits.max_concurrency if "max_concurrency" in limits.model_fields_set else 0
        model_cap = limits.max_concurrency_per_model or 0
        if not (rated or cap or model_cap):
            return NO_PERMIT
        keys = self._limit_keys("provider", prefix, model)
        ticket, delay = uuid.uuid4().hex, 0.005
        while True:
            try:
                wait_ms = int(await self.eval("admit", keys, [
                    round(self.window_s * 1000), limits.rpm or 0, limits.tpm or 0, requests,
                    tokens, ticket, cap, model_cap, self.lease_ms,
                ]))
            except StateUnavailable:  # fail open: this process's window and caps
                local = None
                if rated:
                    window = self.local.window(f"provider:{prefix}")
                    local = await wait_in(window, limits, tokens, requests)
                return _RedisPermit(self, keys, None, local)
            if wait_ms == 0:
                break
            if wait_ms > 0:  # the rate window is full until then
                await anyio.sleep(wait_ms / 1000)
            else:  # every slot is taken: poll, backing off
                await anyio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.2)
        held = [key for key, n in ((keys[2], cap), (keys[3], model_cap)) if n]
        for key in held:
            self.hold(key, ticket)
        return _RedisPermit(self, keys, ticket, None, held)

    def _limit_keys(self, kind: str, name: str, model: str = "_") -> list[str]:
        """Rate log, rate weights, slots, per-model slots: all under one hash tag."""
        base = self.key(kind, name)
        return [f"{base}:log", f"{base}:w", f"{base}:slots", f"{base}:slots:{model}"]

    async def hit(self, name: str, rpm: int) -> float:
        try:
            wait_ms = int(await self.eval("admit", self._limit_keys("client", name), [
                round(self.window_s * 1000), rpm, 0, 1, 0, uuid.uuid4().hex, 0, 0, 0,
            ]))
        except StateUnavailable:
            return await self.local.hit(name, rpm)
        return wait_ms / 1000

    async def aclose(self) -> None:
        conn = self._conns.pop(asyncio.get_running_loop(), None)
        if conn is not None:
            conn.closed = True
            conn.idle.set()
            if conn.beat is not None:
                conn.beat.cancel()
            await conn.client.aclose()
