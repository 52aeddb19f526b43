"""`moa bench serve`: concurrent streaming clients through the OpenAI-compatible server.

For each concurrency N, the same mixture (2 proposers + aggregator on the loopback server) is
run N times at once twice: directly with `Mixture.stream` in this process (the baseline), and
through `moa.server` by N streaming HTTP clients. TTFT is the time to the answer's first token;
the server's overhead is the difference of the p50s. Every stream is checked: the text must be
the aggregator's reply exactly, and it must end with `[DONE]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

REPLY = " ".join(f"token{i}" for i in range(40))
CONFIG = {
    "name": "bench-serve",
    "mode": "layered",
    "layers": [{"agents": [{"model": "loop/a"}, {"model": "loop/b"}]}],
    "aggregator": {"model": "loop/agg"},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", default="1,16,64", help="concurrencies (default 1,16,64)")


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


async def _served(url: str, n: int) -> tuple[list[float], int, float]:
    import anyio
    import httpx

    ttfts: list[float] = []
    bad = 0
    body = {"model": "moa", "messages": [{"role": "user", "content": "Benchmark question?"}],
            "stream": True}

    async def one(client: httpx.AsyncClient) -> None:
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

    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(one, client)
        return ttfts, bad, time.perf_counter() - start


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    import anyio

    from moa.mixture import Mixture
    from moa.server import ServerThread, create_app
    from moa.testing import LoopbackServer, ModelBehavior

    clients = [int(c) for c in args.clients.split(",")]
    behavior = ModelBehavior(reply=REPLY, ttft_s=0.05, tokens_per_s=400)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    with LoopbackServer(default=behavior) as upstream:
        mixture = Mixture(CONFIG, registry=upstream.registry())
        app = create_app({"moa": mixture.config}, registry=upstream.registry(),
                         max_concurrency=max(clients), max_queue=max(clients))
        with ServerThread(app) as server:
            anyio.run(_direct, mixture, 2)  # warm up: tokenizer, connection pools
            anyio.run(_served, server.base_url, 2)
            for n in clients:
                direct = anyio.run(_direct, mixture, n)
                served = anyio.run(_served, server.base_url, n)
                for path, (ttfts, bad, wall) in (("direct", direct), ("server", served)):
                    rows.append({
                        "clients": n,
                        "path": path,
                        "requests_per_s": round(n / wall, 1),
                        "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1),
                        "ttft_p99_ms": round(1000 * _pct(ttfts, 0.99), 1),
                        "bad_streams": bad,
                    })
                overhead = rows[-1]["ttft_p50_ms"] - rows[-2]["ttft_p50_ms"]
                rows[-1]["overhead_p50_ms"] = round(overhead, 1)
                notes.append(f"{n} clients: server adds {overhead:.1f} ms p50 TTFT; "
                             f"{rows[-1]['bad_streams']} streams lost or corrupted.")
    notes.append("Mixture: 2 proposers + aggregator on the loopback server (TTFT 50 ms, "
                 "400 tokens/s, 40-token replies); server, upstream and clients share 1 process.")
    return rows, notes
