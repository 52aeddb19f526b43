"""Three `moa serve` replicas on one real Redis and one loopback upstream: shared rate limits,
one session budget, per-key access, a killed replica and a Redis outage.

Replicas are `create_app` instances served by `ServerThread`s (each with its own RedisState,
connections and event loop, as separate processes would have); the SIGKILL test runs `moa
serve` itself in a child process.
"""

from __future__ import annotations

import datetime as dt
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import redis as sync_redis

from moa.config import MixtureConfig
from moa.openai.keys import KeyRing, hash_key
from moa.openai.server import ServerThread, create_app
from moa.providers.registry import Limits, Registry
from moa.runtime.budget import Budget
from moa.state.redis import UNAVAILABLE, RedisState
from moa.testing import Gate, LoopbackServer, ModelBehavior
from moa.testing.redis import free_port

HI = [{"role": "user", "content": "Say something short."}]
SLOTS = "{moa:provider:loop}:slots"


def mixture(**extra: Any) -> MixtureConfig:
    return MixtureConfig.model_validate({
        "name": "shared", "mode": "layered",
        "layers": [{"agents": [{"model": "loop/p", "max_tokens": 8}]}],
        "aggregator": {"model": "loop/agg", "max_tokens": 8}, **extra,
    })


@contextmanager
def replicas(
    url: str, mixtures: dict[str, MixtureConfig], registry: Callable[[], Registry], n: int = 3,
    keys: KeyRing | None = None, **options: Any,
) -> Iterator[list[str]]:
    """`n` replicas, each with its own RedisState on `url`; yields their base URLs."""
    with ExitStack() as stack:
        servers = [
            stack.enter_context(ServerThread(create_app(
                mixtures, registry=registry(), state=RedisState(url, **options), keys=keys,
                max_concurrency=64, max_queue=64,
            )))
            for _ in range(n)
        ]
        yield [server.base_url for server in servers]


def post_all(urls: list[str], n: int, model: str = "m",
             key: str | None = None) -> list[httpx.Response]:
    """`n` chat requests at once, request i to replica i mod len(urls)."""
    headers = {"authorization": f"Bearer {key}"} if key else {}

    async def main() -> list[httpx.Response]:
        out: list[httpx.Response] = []
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            async def one(i: int) -> None:
                out.append(await client.post(f"{urls[i % len(urls)]}/chat/completions",
                                              json={"model": model, "messages": HI},
                                              headers=headers))

            async with anyio.create_task_group() as tg:
                for i in range(n):
                    tg.start_soon(one, i)
        return out

    return anyio.run(main)


def ledger(url: str, name: str, limit: Budget) -> Any:
    """A fresh reader's view of a shared ledger (its totals as Redis holds them now)."""
    async def read() -> Any:
        state = RedisState(url)
        found = state.ledger(name, limit)
        await found.refresh()
        await state.aclose()
        return found

    return anyio.run(read)


def test_a_shared_rpm_limit_holds_across_replicas(redis_server) -> None:
    """rpm = 3 per (1 s) window, 4 requests of 2 calls over 3 replicas: the upstream never sees
    more than 3 calls inside one window (each replica alone would have let 3 through)."""
    limits = Limits(rpm=3, max_retries=0, read_timeout=10)
    with LoopbackServer(default=ModelBehavior(reply="one two")) as srv, \
            replicas(redis_server.url, {"m": mixture()}, lambda: srv.registry(limits=limits),
                     window_s=1.0) as urls:
        responses = post_all(urls, 4)
    assert [r.status_code for r in responses] == [200] * 4
    times = sorted(r.time for r in srv.requests)
    assert len(times) == 8
    slack = 0.4  # admission to arrival: cold connections, a loaded machine
    assert all(times[i + 3] - times[i] >= 1.0 - slack for i in range(len(times) - 3)), times


def test_a_shared_budget_holds_under_64_concurrent_requests(redis_server) -> None:
    """64 requests at once over 3 replicas against one session budget: the spend never passes
    the limit (the bound: limit + what calls in flight at the last admission report beyond
    their reserved worst case — nothing here, the upstream honours max_tokens)."""
    limit = 1500
    config = mixture(session_budget={"tokens": limit})
    with LoopbackServer(default=ModelBehavior(reply="one two three four")) as srv, \
            replicas(redis_server.url, {"m": config}, lambda: srv.registry()) as urls:
        responses = post_all(urls, 64)
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 400, 502}, statuses
        assert 1 <= statuses.count(200) < 64
        session = ledger(redis_server.url, "session:m", Budget(tokens=limit))
    assert session.refused >= 1
    assert 0 < session.spent_tokens <= limit
    assert session.reserved_tokens == 0 and session.calls == len(srv.requests)


def test_per_key_access_rates_budgets_and_usage(redis_server, tmp_path: Path) -> None:
    alice, bob, carol, dave = "sk-alice-0123456789", "sk-bob-0123456789", "sk-carol-01234567", \
        "sk-dave-0123456789"
    (tmp_path / "keys.toml").write_text(
        f'[keys.alice]\nsha256 = "{hash_key(alice)}"\nmixtures = ["m"]\nrpm = 2\n'
        f'[keys.bob]\nsha256 = "{hash_key(bob)}"\nbudget = {{ tokens = 150 }}\n'
        f'[keys.carol]\nsha256 = "{hash_key(carol)}"\nadmin = true\n'
        f'[keys.dave]\nsha256 = "{hash_key(dave)}"\nbudget = {{ tokens = 9000, per = "day" }}\n'
    )
    keys = KeyRing.load(tmp_path / "keys.toml")
    mixtures = {"m": mixture(), "other": mixture()}

    def usage(base: str, name: str, key: str) -> httpx.Response:
        return httpx.get(f"{base}/moa/keys/{name}/usage",
                         headers={"authorization": f"Bearer {key}"})

    with LoopbackServer(default=ModelBehavior(reply="one two three")) as srv:
        with replicas(redis_server.url, mixtures, lambda: srv.registry(), keys=keys) as urls:
            assert [r.status_code for r in post_all(urls, 3, key="sk-nobody-0123")] == [401] * 3
            assert [r.status_code for r in post_all(urls, 3)] == [401] * 3  # no key at all
            denied = post_all(urls[:1], 1, model="other", key=alice)[0]
            assert denied.status_code == 403
            assert denied.json()["error"]["code"] == "model_not_allowed"
            rated = [post_all([url], 1, key=alice)[0] for url in urls]  # one per replica
            assert [r.status_code for r in rated] == [200, 200, 429]
            assert 1 <= int(rated[2].headers["retry-after"]) <= 60
            spent = [post_all([urls[i % 3]], 1, key=bob)[0] for i in range(6)]
            codes = [r.status_code for r in spent]
            assert codes[0] == 200 and codes[-1] == 429, codes
            refusal = spent[-1]
            assert refusal.json()["error"]["code"] == "insufficient_quota"
            assert refusal.json()["error"]["type"] == "insufficient_quota"
            assert refusal.headers["x-should-retry"] == "false"
            own = usage(urls[2], "bob", bob)
            assert own.status_code == 200
            report = own.json()
            assert 0 < report["spent_tokens"] <= 150 and report["limit_tokens"] == 150
            assert report["reserved_tokens"] == 0 and report["calls"] >= 2
            assert usage(urls[0], "bob", alice).status_code == 403
            assert usage(urls[1], "bob", carol).json() == report  # an admin reads any key
            assert post_all(urls[:1], 1, key=dave)[0].status_code == 200
            today = dt.datetime.now(dt.UTC).date().isoformat()
            assert usage(urls[0], "dave", dave).json()["day"] == today
        # Every replica restarted: the spend is still there (it lives in Redis).
        with replicas(redis_server.url, mixtures, lambda: srv.registry(), n=1,
                      keys=keys) as (url,):
            assert usage(url, "bob", carol).json() == report


def test_a_killed_replica_leaves_no_reservation_behind(redis_server, tmp_path: Path) -> None:
    """`moa serve --redis` SIGKILLed while its call streams: its reservation and its
    concurrency slot expire after the lease, and nothing was spent."""
    gate = Gate()  # the upstream sends headers, then waits: the call stays open
    with LoopbackServer(default=ModelBehavior(reply="one two three", gate=gate)) as srv:
        config = tmp_path / "crash.toml"
        config.write_text(
            'name = "crash"\nmode = "layered"\nsession_budget = { tokens = 100000 }\n'
            'layers = [{ agents = [{ model = "loop/slow", max_tokens = 50 }] }]\n'
            'aggregator = { model = "loop/agg", max_tokens = 8 }\n'
            f'[providers.loop]\nkind = "openai"\nbase_url = "{srv.base_url}"\n'
            'key_required = false\nlimits = { max_concurrency = 4 }\n'
        )
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "moa.cli", "serve", "-c", str(config), "--name", "crash",
             "--redis", redis_server.url, "--lease-ttl", "0.5", "--port", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            _wait_health(base, process)
            body = {"model": "crash", "messages": HI, "stream": True}
            client = threading.Thread(
                target=_quietly, args=(lambda: httpx.post(f"{base}/v1/chat/completions",
                                                          json=body, timeout=30),),
                daemon=True,
            )
            client.start()
            srv.wait_requests("slow", 1)  # sent: reserved and holding a slot
            held = ledger(redis_server.url, "session:crash", Budget(tokens=100000))
            assert held.reserved_tokens > 0
            assert _live(redis_server.url, SLOTS) == 1
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            gone = _until(lambda: ledger(redis_server.url, "session:crash",
                                         Budget(tokens=100000)).reserved_tokens == 0)
            assert gone and _live(redis_server.url, SLOTS) == 0
            after = ledger(redis_server.url, "session:crash", Budget(tokens=100000))
            assert after.expired == 1 and after.spent_tokens == 0 and after.calls == 0
        finally:
            gate.open()
            if process.poll() is None:
                process.kill()
                process.wait(10)


def test_redis_killed_and_restarted_mid_run(redis_server, caplog) -> None:
    """Redis away: budgets answer one 503 sentence at once, rate limits keep serving on local
    counters, one warning per replica; Redis back: every replica recovers by itself."""
    caplog.set_level(logging.WARNING, "moa.state")
    limits = Limits(rpm=1000, max_retries=0, read_timeout=10)
    mixtures = {"budgeted": mixture(session_budget={"tokens": 100_000}), "limited": mixture()}
    with LoopbackServer(default=ModelBehavior(reply="one two")) as srv, \
            replicas(redis_server.url, mixtures, lambda: srv.registry(limits=limits),
                     retry_s=0.1, timeout_s=0.5) as urls:
        assert [r.status_code for r in post_all(urls, 3, "budgeted")] == [200] * 3
        before = ledger(redis_server.url, "session:budgeted", Budget(tokens=100_000))
        redis_server.kill()
        start = time.monotonic()
        refused = post_all(urls, 6, "budgeted")
        assert time.monotonic() - start < 5  # bounded: nothing waits on the dead connection
        assert [r.status_code for r in refused] == [503] * 6
        assert {r.json()["error"]["message"] for r in refused} == {UNAVAILABLE}
        assert all(r.headers["retry-after"] == "1" for r in refused)
        assert [r.status_code for r in post_all(urls, 6, "limited")] == [200] * 6
        state_log = [r.getMessage() for r in caplog.records if r.name == "moa.state"]
        assert sum("cannot be reached" in m for m in state_log) == 3  # once per replica
        redis_server.start()
        assert _until(lambda: all(post_all([url], 1, "budgeted")[0].status_code == 200
                                  for url in urls))
        state_log = [r.getMessage() for r in caplog.records if r.name == "moa.state"]
        assert sum("reachable again" in m for m in state_log) == 3
        after = ledger(redis_server.url, "session:budgeted", Budget(tokens=100_000))
    assert after.spent_tokens > before.spent_tokens > 0  # the budget survived the restart
    assert after.reserved_tokens == 0


def _quietly(work: Callable[[], Any]) -> None:
    with suppress(httpx.HTTPError):
        work()


def _wait_health(base: str, process: subprocess.Popen[bytes]) -> None:
    def up() -> bool:
        assert process.poll() is None, "moa serve exited"
        try:
            return httpx.get(f"{base}/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    assert _until(up, 30)


def _until(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll `check` until true or `timeout` seconds passed."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _live(url: str, key: str) -> int:
    """Leases in the zset `key` that have not expired (by Redis's clock)."""
    client = sync_redis.Redis.from_url(url)
    seconds, micros = client.time()
    live = client.zcount(key, seconds * 1000 + micros // 1000, "+inf")
    client.close()
    return int(live)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
