"""`moa bench serve --replicas N --redis URL`: N `moa serve` replicas sharing state in Redis,
against one replica with its state in process.

Both paths serve the same mixture (2 proposers + aggregator on the loopback upstream) with a
session budget and provider `rpm` / `tpm` / `max_concurrency` limits, so every call reserves,
takes a rate-window entry and a concurrency slot, then settles: in process for the baseline, in
Redis (atomic scripts, one round trip each) for the replicas. Clients are spread round-robin
over the replicas. The table shows throughput and TTFT p50 / p95, and what the shared state
adds to them against the single in-process replica at the same concurrency.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
from contextlib import AsyncExitStack, ExitStack
from pathlib import Path
from typing import Any

NAME = "bench-replicas"
"""The served name: the session ledger is `session:bench-replicas`, apart from real ones."""
KEYS = ("{moa:ledger:session:bench-replicas}", "{moa:ledger:session:bench-replicas}:res",
        "{moa:ledger:session:bench-replicas}:amt", "{moa:provider:loop}:log",
        "{moa:provider:loop}:w", "{moa:provider:loop}:slots")
"""The keys the bench writes (removed after it)."""
CONFIG = """\
name = "bench-replicas"
mode = "layered"
layers = [{{agents = [{{model = "loop/a"}}, {{model = "loop/b"}}]}}]
aggregator = {{model = "loop/agg"}}
session_budget = {{tokens = 1000000000}}

[providers.loop]
kind = "openai"
base_url = "{base_url}"
key_required = false
limits = {{max_concurrency = 512, pool_size = 16, rpm = 1000000, tpm = 1000000000}}
"""


async def _measure(paths: dict[str, list[str]], clients: list[int],
                   rounds: int) -> dict[tuple[int, str], list[Any]]:
    import httpx

    from moa.bench.serve import POOL, _served

    limits = httpx.Limits(max_connections=POOL, max_keepalive_connections=POOL)
    async with AsyncExitStack() as stack:
        pools: dict[str, list[Any]] = {}
        for path, urls in paths.items():
            per_url = -(-max(clients) // (POOL * len(urls)))
            pools[path] = [
                await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=60,
                                                                  limits=limits))
                for _ in range(per_url) for url in urls  # interleaved: round-robin replicas
            ]
            await _served(pools[path], 2 * len(urls), NAME)  # warm up every replica
        results: dict[tuple[int, str], list[Any]] = {}
        for n in clients:
            for _ in range(rounds):
                for path, pool in pools.items():
                    results.setdefault((n, path), []).append(await _served(pool, n, NAME))
        return results


def run(args: Any) -> tuple[list[dict[str, Any]], list[str]]:
    import anyio

    from moa.bench.serve import REPLY, TOKENS_PER_S, TTFT_S, _pct
    from moa.providers.secrets import mask_url
    from moa.state import REDIS_URL_ENV
    from moa.testing.processes import loopback_process, serve_process
    from moa.testing.redis import RedisServer

    clients = [int(c) for c in args.clients.split(",")]
    concurrency = str(max(clients))
    notes: list[str] = []
    with ExitStack() as stack:
        url = args.redis or os.environ.get(REDIS_URL_ENV)
        if not url:
            url = stack.enter_context(RedisServer(fsync="everysec")).url
            notes.append("Redis: a temporary local redis-server (pass --redis URL for yours).")
        else:
            notes.append(f"Redis: {mask_url(url)}.")
        upstream = stack.enter_context(loopback_process(
            "--reply", REPLY, "--ttft", str(TTFT_S), "--tokens-per-s", str(TOKENS_PER_S)))
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        config = Path(tmp) / "replicas.toml"
        config.write_text(CONFIG.format(base_url=upstream))
        common = ("-c", str(config), "--name", NAME, "--max-concurrency", concurrency,
                  "--max-queue", concurrency)
        local = stack.enter_context(serve_process(*common))
        shared = [stack.enter_context(serve_process(*common, "--redis", url))
                  for _ in range(args.replicas)]
        paths = {"1 replica, state in process": [local],
                 f"{args.replicas} replicas, state in Redis": shared}
        results = anyio.run(_measure, paths, clients, args.rounds)
        with contextlib.suppress(Exception):
            import redis

            redis.Redis.from_url(url).delete(*KEYS)
    rows: list[dict[str, Any]] = []
    for (n, path), runs in results.items():
        ttfts = [t for r in runs for t in r[0]]
        row = {
            "clients": n,
            "path": path,
            "requests_per_s": round(n * len(runs) / sum(r[2] for r in runs), 1),
            "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1),
            "ttft_p95_ms": round(1000 * _pct(ttfts, 0.95), 1),
            "bad_streams": sum(r[1] for r in runs),
        }
        base = next((r for r in rows if r["clients"] == n), None)
        if base is not None:
            row["added_p50_ms"] = round(row["ttft_p50_ms"] - base["ttft_p50_ms"], 1)
            row["added_p95_ms"] = round(row["ttft_p95_ms"] - base["ttft_p95_ms"], 1)
        rows.append(row)
    notes.append(
        f"Mixture: 2 proposers + aggregator on the loopback upstream (TTFT {TTFT_S * 1000:.0f} "
        f"ms, {TOKENS_PER_S:.0f} tokens/s); every call reserves in a session budget, a rate "
        f"window and a concurrency cap; upstream, each replica and the clients run in their own "
        f"processes; {args.rounds} rounds per concurrency; added = against 1 replica with its "
        "state in process."
    )
    return rows, notes
