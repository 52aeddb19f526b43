"""The state interface: in-process windows, and the Redis scripts against a real redis-server.

Redis tests start their own `redis-server` (fixture `redis_server`); without one they fail.
"""

from __future__ import annotations

import logging
import socket
import time

import anyio
import pytest
import redis as sync_redis

from moa import Mixture
from moa.errors import StateUnavailable
from moa.providers.base import Usage
from moa.providers.registry import Limits
from moa.runtime.budget import Budget
from moa.state import LocalState, Window, from_url
from moa.state.redis import UNAVAILABLE, RedisState
from moa.testing import LoopbackServer, ModelBehavior

pytestmark = pytest.mark.anyio


def test_window_counts_requests_and_tokens() -> None:
    window = Window(60)
    first, wait = window.take(rpm=2, tpm=100, tokens=60)
    assert first is not None and wait == 0
    assert window.take(rpm=2, tpm=100, tokens=60)[0] is None  # 120 tokens > tpm
    window.settle(first, 10)  # the call used 10, not its worst case of 60
    assert window.take(rpm=2, tpm=100, tokens=60)[0] is not None
    entry, wait = window.take(rpm=2, tpm=None, tokens=0)  # a third request > rpm
    assert entry is None and 59 < wait <= 60
    assert Window(60).take(rpm=None, tpm=10, tokens=50)[0] is not None  # alone, it goes


def test_limits_take_rpm_and_tpm() -> None:
    limits = Limits(rpm=100, tpm=50_000, max_concurrency=4)
    assert (limits.rpm, limits.tpm) == (100, 50_000)
    assert "max_concurrency" in limits.model_fields_set  # shared across replicas when set
    assert isinstance(from_url(None), LocalState)


async def test_local_state_holds_rpm_per_process() -> None:
    """rpm = 2 per (0.6 s) window in process: 4 calls of 2 mixtures take two windows (the
    slack: the first calls' cold connections, admitted earlier than they arrive)."""
    config = {
        "name": "paced", "mode": "layered",
        "layers": [{"agents": [{"model": "loop/p", "max_tokens": 8}]}],
        "aggregator": {"model": "loop/agg", "max_tokens": 8},
    }
    state = LocalState(window_s=0.6)
    with LoopbackServer(default=ModelBehavior(reply="one two")) as srv:
        registry = srv.registry(limits=Limits(rpm=2, max_retries=0))
        mixtures = [Mixture(config, registry=registry, state=state) for _ in range(2)]
        async with anyio.create_task_group() as tg:
            for mixture in mixtures:
                tg.start_soon(mixture.run, "Hi?")
    times = sorted(r.time for r in srv.requests)
    assert len(times) == 4 and times[2] - times[0] >= 0.6 - 0.3


async def test_ledger_reserves_settles_and_mirrors(redis_server) -> None:
    state = RedisState(redis_server.url)
    ledger = state.ledger("session:t", Budget(usd=1.0, tokens=100))
    ticket, why = await ledger.take("p/m", 0.4, 60)
    assert ticket and not why and ledger.reserved_tokens == 60
    assert ledger.reserved_usd == pytest.approx(0.4)
    assert await ledger.take("p/m", 0.4, 60) == (None, "120 tokens would exceed the limit of 100")
    await ledger.give(ticket, 0.1, Usage(10, 20))
    other = RedisState(redis_server.url).ledger("session:t", Budget(usd=1.0, tokens=100))
    await other.refresh()  # another process sees the same totals
    assert (other.spent_tokens, other.reserved_tokens, other.calls, other.refused) == (30, 0, 1, 1)
    assert other.spent_usd == pytest.approx(0.1)
    await state.aclose()


async def test_check_and_reserve_cannot_be_split(redis_server) -> None:
    """32 reservations released at once by a barrier, room for 5: exactly 5 are admitted. The
    same barrier placed between a separate check and increment admits every one of them, so
    this test would catch a check-then-increment that can be split."""
    n, fit, cost = 32, 5, 100
    states = [RedisState(redis_server.url) for _ in range(4)]  # four replicas' connections
    ledgers = [s.ledger("session:race", Budget(tokens=fit * cost)) for s in states]
    start, checked = anyio.Event(), anyio.Event()
    arrived = read = 0
    atomic: list[bool] = []
    split: list[bool] = []
    client = sync_redis.asyncio.Redis.from_url(redis_server.url)

    async def one(i: int) -> None:
        nonlocal arrived
        arrived += 1
        if arrived == n:
            start.set()
        await start.wait()
        atomic.append((await ledgers[i % 4].take("p/m", None, cost))[0] is not None)

    async def one_split() -> None:
        nonlocal read
        used = int(await client.hget("split", "reserved") or 0)  # check ...
        read += 1
        if read == n:
            checked.set()
        await checked.wait()  # ... every task has checked before any increments
        if used + cost <= fit * cost:
            await client.hincrby("split", "reserved", cost)
            split.append(True)

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(one, i)
    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one_split)
    assert sum(atomic) == fit
    assert len(split) == n  # the split version over-admits: the barrier test can see it
    await client.aclose()
    for state in states:
        await state.aclose()


async def test_rate_window_admits_what_one_process_would(redis_server) -> None:
    states = [RedisState(redis_server.url) for _ in range(3)]
    go = anyio.Event()
    waits: list[float] = []

    async def one(i: int) -> None:
        await go.wait()
        waits.append(await states[i % 3].hit("alice", 5))

    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(one, i)
        go.set()
    assert sum(w == 0 for w in waits) == 5 and all(0 < w <= 60 for w in waits if w)
    for state in states:
        await state.aclose()


async def test_reservation_of_a_stopped_process_expires(redis_server) -> None:
    """A live process renews its reservation; once it stops (dies), the reservation expires."""
    dying = RedisState(redis_server.url, lease_ttl_s=0.3)
    ticket, _ = await dying.ledger("session:crash", Budget(tokens=1000)).take("p/m", None, 400)
    assert ticket is not None
    key = dying.key("ledger", "session:crash") + ":res"
    client = sync_redis.asyncio.Redis.from_url(redis_server.url)
    first = await client.zscore(key, ticket)
    with anyio.fail_after(5):  # renewed: its expiry moves forward
        while await client.zscore(key, ticket) == first:
            await anyio.sleep(0.02)
    await dying.aclose()  # stops renewing, as a SIGKILLed replica does
    watcher = RedisState(redis_server.url).ledger("session:crash", Budget(tokens=1000))
    with anyio.fail_after(5):
        while True:
            await watcher.refresh()
            if watcher.reserved_tokens == 0:
                break
            await anyio.sleep(0.05)
    assert watcher.expired == 1 and watcher.spent_tokens == 0
    await client.aclose()


async def test_redis_down_budgets_fail_closed_limits_fail_open(redis_server, caplog) -> None:
    caplog.set_level(logging.WARNING, "moa.state")
    state = RedisState(redis_server.url, retry_s=0.1, timeout_s=0.5, window_s=60)
    ledger = state.ledger("session:down", Budget(tokens=1000))
    ticket, _ = await ledger.take("p/m", None, 100)
    redis_server.kill()
    with anyio.fail_after(3):
        with pytest.raises(StateUnavailable, match="refused until it is back"):
            await ledger.take("p/m", None, 100)
        await ledger.give(ticket, None, Usage(10, 5))  # kept, written once Redis is back
        for _ in range(3):  # rate limits: this process's own counters
            permit = await state.acquire("loop/m", Limits(rpm=10), 10)
            await permit.close(5)
        assert await state.hit("bob", 1) == 0 and await state.hit("bob", 1) > 0
    down = [r for r in caplog.records if "cannot be reached" in r.getMessage()]
    assert len(down) == 1  # logged once, not per call
    redis_server.start()
    with anyio.fail_after(5):  # recovers by itself
        while True:
            try:
                await ledger.refresh()
                break
            except StateUnavailable:
                await anyio.sleep(0.05)
    assert (ledger.spent_tokens, ledger.reserved_tokens) == (15, 0)  # the backlog was written
    assert any("reachable again" in r.getMessage() for r in caplog.records)
    await state.aclose()


async def test_a_dead_connection_never_hangs() -> None:
    """A server that accepts and never answers: every call ends within its timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        state = RedisState(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", timeout_s=0.2)
        start = time.monotonic()
        with pytest.raises(StateUnavailable) as caught:
            await state.ledger("session:x", Budget(tokens=10)).take("p/m", None, 1)
        assert str(caught.value) == UNAVAILABLE
        permit = await state.acquire("loop/m", Limits(rpm=5, max_concurrency=2), 1)
        await permit.close(1)
        assert time.monotonic() - start < 3


async def test_mixtures_share_a_session_budget_through_redis(redis_server) -> None:
    """Two `Mixture` objects (as in two processes) with one RedisState URL: one budget."""
    config = {
        "name": "shared", "mode": "layered", "session_budget": {"tokens": 400},
        "layers": [{"agents": [{"model": "loop/p", "max_tokens": 8}]}],
        "aggregator": {"model": "loop/agg", "max_tokens": 8},
    }
    with LoopbackServer(default=ModelBehavior(reply="one two three")) as srv:
        mixtures = [
            Mixture(config, registry=srv.registry(), state=RedisState(redis_server.url))
            for _ in range(2)
        ]
        done = 0
        for i in range(20):
            try:
                await mixtures[i % 2].run("Hello there?")
                done += 1
            except Exception:
                break
        session = mixtures[0].session
        assert session is not None
        await session.refresh()
        assert done >= 2 and session.refused >= 1
        assert session.spent_tokens <= 400 and session.reserved_tokens == 0
        assert mixtures[1].session is not session  # its own mirror of the same ledger
