"""`moa bench serve`: concurrent streaming clients through `moa serve`, against direct calls.

Three processes, as in a deployment: the loopback upstream (the fake models), `moa serve`, and
this one, which holds the clients. For each concurrency N the same mixture (2 proposers +
aggregator) is run N times at once, in rounds that take every path in turn: directly with
`Mixture.stream` in this process (the baseline); the same with every upstream connection in one
httpx pool (`pool_size` 512 instead of 16, which shows what small pools save); the same three
calls made by hand with httpx (both proposers at once, then the aggregator with their replies in
its prompt: the pattern a user would write without moa); and through the server by N streaming
HTTP clients. TTFT is the time to the answer's first token; the server's overhead is the
difference of the p50s, and its p50 / p95 ratios are taken against the hand-made pattern's.
The server runs with its default slots and queue unless `--slots` / `--queue` say otherwise.
Every stream is checked: the text must be the aggregator's reply exactly, and a served stream
must end with `[DONE]`.

`--replicas N` (with `--redis URL`) measures N replicas sharing their state in Redis against
one replica with its state in process instead (`moa.bench.replicas`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

REPLY = " ".join(f"token{i}" for i in range(40))
TTFT_S, TOKENS_PER_S = 0.05, 100.0
POOL = 16
CONFIG = """\
name = "bench-serve"
mode = "layered"
layers = [{{agents = [{{model = "loop/a"}}, {{model = "loop/b"}}]}}]
aggregator = {{model = "loop/agg"}}

[providers.loop]
kind = "openai"
base_url = "{base_url}"
key_required = false
limits = {{max_concurrency = 512, pool_size = {pool_size}}}
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", default="1,16,64", help="concurrencies (default 1,16,64)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds per concurrency, each running every path (default 3)")
    parser.add_argument("--slots", type=int, default=None, metavar="N",
                        help="the server's --max-concurrency (default: its own default)")
    parser.add_argument("--queue", type=int, default=None, metavar="N",
                        help="the server's --max-queue (default: its own default)")
    parser.add_argument("--replicas", type=int, default=0, metavar="N",
                        help="compare N replicas sharing state in Redis with one in-process "
                             "replica instead")
    parser.add_argument("--redis", metavar="URL",
                        help="with --replicas: the Redis (default $MOA_REDIS_URL, else a "
                             "temporary local redis-server)")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _direct(mixture: Any, n: int) -> tuple[list[float], int, float]:
    import anyio

    from moa.events import FinalDelta

    ttfts: list[float] = []
    bad = 0

    async def one() -> None:
        nonlocal bad
        start, first, text = time.perf_counter(), None, []
        async for event in mixture.stream("Benchmark question?"):
            if isinstance(event, FinalDelta):
                first = first or time.perf_counter() - start
                text.append(event.text)
        ttfts.append(first or 0.0)
        bad += "".join(text) != REPLY

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one)
    return ttfts, bad, time.perf_counter() - start


async def _by_hand(clients: list[Any], n: int) -> tuple[list[float], int, float]:
    """The mixture's three calls made directly with httpx: both proposers at once, then the
    aggregator, its prompt holding their replies."""
    import anyio

    ttfts: list[float] = []
    bad = 0
    question = {"role": "user", "content": "Benchmark question?"}

    async def call(client: Any, model: str, messages: list[dict[str, str]],
                   start: float | None = None) -> tuple[str, float | None]:
        body = {"model": model, "messages": messages, "stream": True}
        first, text = None, []
        async with client.stream("POST", "/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                piece = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
                if piece:
                    if start is not None and first is None:
                        first = time.perf_counter() - start
                    text.append(piece)
        return "".join(text), first

    async def one(client: Any) -> None:
        nonlocal bad
        start = time.perf_counter()
        replies: dict[str, str] = {}

        async def propose(model: str) -> None:
            replies[model] = (await call(client, model, [question]))[0]

        async with anyio.create_task_group() as tg:
            for model in ("a", "b"):
                tg.start_soon(propose, model)
        refs = "\n\n".join(f"{i}. {replies[m]}" for i, m in enumerate(("a", "b"), 1))
        system = {"role": "system", "content": f"Synthesize these responses:\n{refs}"}
        text, first = await call(client, "agg", [system, question], start)
        ttfts.append(first or 0.0)
        bad += text != REPLY

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(one, clients[i % len(clients)])
    return ttfts, bad, time.perf_counter() - start


async def _served(clients: list[Any], n: int,
                  model: str = "mixture") -> tuple[list[float], int, float]:
    import anyio

    ttfts: list[float] = []
    bad = 0
    body = {"model": model, "messages": [{"role": "user", "content": "Benchmark question?"}],
            "stream": True}

    async def one(client: Any) -> None:
        nonlocal bad
        start, first, text, done = time.perf_counter(), None, [], False
        async with client.stream("POST", "/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                chunk = json.loads(line[6:])
                piece = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
                if piece:
                    first = first or time.perf_counter() - start
                    text.append(piece)
        ttfts.append(first or 0.0)
        bad += not done or "".join(text) != REPLY

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(one, clients[i % len(clients)])
    return ttfts, bad, time.perf_counter() - start


async def _measure(
    mixtures: dict[str, Any], url: str, clients: list[int], rounds: int, upstream: str = ""
) -> dict[tuple[int, str], list[Any]]:
    """For each concurrency, `rounds` rounds of every path in turn, in one event loop."""
    from contextlib import AsyncExitStack
    from functools import partial

    import httpx

    # Small pools on the client side too: httpcore's bookkeeping grows with a pool's square.
    limits = httpx.Limits(max_connections=POOL, max_keepalive_connections=POOL)
    async with AsyncExitStack() as stack:
        pools = [
            await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=60,
                                                              limits=limits))
            for _ in range(-(-max(clients) // POOL))
        ]
        paths = {path: partial(_direct, mixture) for path, mixture in mixtures.items()}
        if upstream:
            hand = [
                await stack.enter_async_context(httpx.AsyncClient(base_url=upstream, timeout=60,
                                                                  limits=limits))
                for _ in range(-(-3 * max(clients) // POOL))
            ]
            paths["by hand"] = partial(_by_hand, hand)
        paths["server"] = partial(_served, pools)
        for run_path in paths.values():
            await run_path(2)  # warm up: tokenizer, connection pools
        results: dict[tuple[int, str], list[Any]] = {}
        for n in clients:
            for _ in range(rounds):
                for path, run_path in paths.items():
                    results.setdefault((n, path), []).append(await run_path(n))
        return results


def _row(n: int, path: str, results: list[tuple[list[float], int, float]]) -> dict[str, Any]:
    ttfts = [t for r in results for t in r[0]]
    return {
        "clients": n,
        "path": path,
        "requests_per_s": round(n * len(results) / sum(r[2] for r in results), 1),
        "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1),
        "ttft_p95_ms": round(1000 * _pct(ttfts, 0.95), 1),
        "ttft_p99_ms": round(1000 * _pct(ttfts, 0.99), 1),
        "bad_streams": sum(r[1] for r in results),
    }


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    if getattr(args, "replicas", 0):
        from moa.bench import replicas

        return replicas.run(args)
    import anyio

    from moa.mixture import Mixture
    from moa.testing.processes import loopback_process, serve_process

    clients = [int(c) for c in args.clients.split(",")]
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    upstream = loopback_process("--reply", REPLY, "--ttft", str(TTFT_S),
                                "--tokens-per-s", str(TOKENS_PER_S))
    with tempfile.TemporaryDirectory() as tmp, upstream as upstream_url:
        configs = {}
        for path, pool_size in (("direct", POOL), ("direct-one-pool", 512)):
            configs[path] = Path(tmp) / f"{path}.toml"
            configs[path].write_text(CONFIG.format(base_url=upstream_url, pool_size=pool_size))
        mixtures = {path: Mixture(config) for path, config in configs.items()}
        limits = []
        if getattr(args, "slots", None) is not None:
            limits += ["--max-concurrency", str(args.slots)]
        if getattr(args, "queue", None) is not None:
            limits += ["--max-queue", str(args.queue)]
        with serve_process("-c", str(configs["direct"]), *limits) as server_url:
            results = anyio.run(_measure, mixtures, server_url, clients, args.rounds,
                                upstream_url)
    for (n, path), runs in results.items():
        rows.append(_row(n, path, runs))
        if path == "server":
            direct = next(r for r in rows if r["clients"] == n and r["path"] == "direct")
            hand = next(r for r in rows if r["clients"] == n and r["path"] == "by hand")
            served = rows[-1]
            overhead = served["ttft_p50_ms"] - direct["ttft_p50_ms"]
            served["overhead_p50_ms"] = round(overhead, 1)
            served["p50_ratio"] = round(served["ttft_p50_ms"] / hand["ttft_p50_ms"], 3)
            served["p95_ratio"] = round(served["ttft_p95_ms"] / hand["ttft_p95_ms"], 3)
            notes.append(f"{n} clients: server adds {overhead:.1f} ms p50 TTFT; against the "
                         f"hand-made pattern p50 x{served['p50_ratio']:.2f}, p95 "
                         f"x{served['p95_ratio']:.2f} (targets 1.1 and 1.3 at 64 clients); "
                         f"{served['bad_streams']} streams lost or corrupted.")
    notes.append(
        f"Mixture: 2 proposers + aggregator on the loopback upstream (TTFT {TTFT_S * 1000:.0f} "
        f"ms, {TOKENS_PER_S:.0f} tokens/s, 40-token replies); upstream, `moa serve` and the "
        f"clients each run in their own process; {args.rounds} rounds per concurrency; server "
        f"slots {getattr(args, 'slots', None) or 'default'}, queue "
        f"{getattr(args, 'queue', None) or 'default'}."
    )
    return rows, notes
