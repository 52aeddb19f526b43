"""The mixture beside the same calls made by hand with httpx, and the cold start to a request.

Used by `moa bench overhead`. The upstream is a loopback server in its own process, so the CPU
this process spends (`time.process_time`) is the client's alone. The hand-made path sends the
very bodies the mixture sent (recorded once on an in-process loopback server with the same
replies), layer after layer, each layer's calls at once, on one httpx pool, reading the SSE
lines and `json.loads`-ing each chunk: what a user of httpx would write. The two paths run
interleaved, in one event loop, so drift in the machine's load hits both alike.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

CONFIG = """\
name = "moa-3x6"
mode = "layered"
layers = [
  {{agents = [{l1}]}},
  {{agents = [{l2}]}},
]
aggregator = {{model = "loop/final"}}

[providers.loop]
kind = "openai"
base_url = "{base_url}"
key_required = false
"""
COLD_START = textwrap.dedent("""\
    import sys
    from moa import Mixture
    mixture = Mixture(sys.argv[1])
    mixture.run_sync("Cold start?")
""")
LAYERS = (6, 6, 1)


def config_text(base_url: str) -> str:
    def agents(layer: int) -> str:
        return ", ".join(f'{{model = "loop/L{layer}a{i}"}}' for i in range(6))

    return CONFIG.format(l1=agents(1), l2=agents(2), base_url=base_url)


def _layer(model: str) -> int:
    return 3 if model == "final" else int(model[1])


def record_bodies(reply: str, config: str) -> list[list[dict[str, Any]]]:
    """The request bodies of one run, by layer (in-process loopback server, no delays)."""
    from moa.mixture import Mixture
    from moa.testing import LoopbackServer, ModelBehavior

    with LoopbackServer(default=ModelBehavior(reply=reply)) as srv, \
            tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "moa.toml"
        path.write_text(config.replace("{base_url}", srv.base_url))
        Mixture(path).run_sync("How much overhead?")
        layers: list[list[dict[str, Any]]] = [[] for _ in LAYERS]
        for request in srv.requests:
            assert request.body is not None and request.model is not None
            layers[_layer(request.model) - 1].append(request.body)
    assert [len(b) for b in layers] == list(LAYERS), [len(b) for b in layers]
    return layers


async def by_hand(client: Any, url: str, layers: list[list[dict[str, Any]]]) -> int:
    """The same calls made directly: each layer's at once, layer after layer; tokens read."""
    import anyio

    tokens = 0

    async def one(body: dict[str, Any]) -> None:
        nonlocal tokens
        parts: list[str] = []
        async with client.stream("POST", url, json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        parts.append(text)
                        tokens += 1
        assert parts, "the upstream sent no text"

    for bodies in layers:
        async with anyio.create_task_group() as tg:
            for body in bodies:
                tg.start_soon(one, body)
    return tokens


def versus_httpx(repeats: int, tokens: int, ttft_s: float, rate: float
                 ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """`repeats` interleaved pairs (mixture, by hand); rows and the medians."""
    import anyio
    import httpx

    from moa.mixture import Mixture
    from moa.testing.processes import loopback_process

    reply = " ".join(f"w{i}" for i in range(tokens))
    bodies = record_bodies(reply, config_text("{base_url}"))
    rows: list[dict[str, Any]] = []
    upstream = loopback_process("--reply", reply, "--ttft", str(ttft_s),
                                "--tokens-per-s", str(rate))
    with upstream as url, tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "moa.toml"
        path.write_text(config_text(url))
        mixture = Mixture(path)

        async def measure() -> None:
            limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
            async with httpx.AsyncClient(timeout=60, limits=limits) as client:
                endpoint = f"{url}/chat/completions"
                for _ in range(2):  # warm up both: pools, tokenizer, code paths
                    await mixture.run("How much overhead?")
                    await by_hand(client, endpoint, bodies)
                for i in range(repeats):
                    pair: dict[str, tuple[float, float]] = {}
                    order = ("moa", "httpx") if i % 2 == 0 else ("httpx", "moa")
                    for path_name in order:
                        wall, cpu = time.perf_counter(), time.process_time()
                        if path_name == "moa":
                            result = await mixture.run("How much overhead?")
                            assert result.calls == sum(LAYERS)
                        else:
                            await by_hand(client, endpoint, bodies)
                        pair[path_name] = (time.perf_counter() - wall, time.process_time() - cpu)
                    (moa_wall, moa_cpu), (raw_wall, raw_cpu) = pair["moa"], pair["httpx"]
                    rows.append({
                        "mixture": "moa-3x6", "mode": "layered", "api": "moa vs httpx",
                        "run": i + 1, "calls": sum(LAYERS),
                        "moa_ms": round(1000 * moa_wall, 1),
                        "httpx_ms": round(1000 * raw_wall, 1),
                        "per_layer_ms": round(1000 * (moa_wall - raw_wall) / len(LAYERS), 2),
                        "cpu_moa_ms": round(1000 * moa_cpu, 1),
                        "cpu_httpx_ms": round(1000 * raw_cpu, 1),
                        "cpu_ratio": round(moa_cpu / raw_cpu, 3) if raw_cpu else None,
                    })
            await mixture.aclose()

        anyio.run(measure)
    medians = {
        "per_layer_ms": statistics.median(r["per_layer_ms"] for r in rows),
        "cpu_ratio": statistics.median(
            r["cpu_moa_ms"] / r["cpu_httpx_ms"] for r in rows if r["cpu_httpx_ms"]
        ) if any(r["cpu_httpx_ms"] for r in rows) else float("nan"),
    }
    return rows, medians


TARGET_PER_LAYER_MS = 2.0
TARGET_CPU_RATIO = 1.15
TARGET_COLD_START_S = 0.3
RATE = 5000.0
TTFT_S = 0.01


def run(pairs: int, tokens: int, starts: int) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows and notes `moa bench overhead` adds: the pairs, then the cold start (the
    median of `starts` new processes)."""
    rows, medians = versus_httpx(max(pairs, 1), tokens, TTFT_S, RATE)
    cold, cold_s = cold_start(max(1, starts))
    bare = _bare_start()

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    per_layer, ratio = medians["per_layer_ms"], medians["cpu_ratio"]
    notes = [
        f"moa vs httpx rows: the same {sum(LAYERS)} calls with the same bodies made by hand "
        f"with httpx (each layer at once, SSE lines, json.loads), interleaved with the "
        f"mixture's runs in one event loop; upstream in its own process ({tokens} tokens at "
        f"{RATE:g} tokens/s, TTFT {1000 * TTFT_S:g} ms); cpu = this process's CPU time.",
        f"median of {len(rows)} pairs: {per_layer:+.2f} ms per layer (target <= "
        f"{TARGET_PER_LAYER_MS:g}: {verdict(per_layer <= TARGET_PER_LAYER_MS)}), client CPU "
        f"x{ratio:.3f} (target <= {TARGET_CPU_RATIO:g}: {verdict(ratio <= TARGET_CPU_RATIO)}).",
        f"cold start row: a new Python runs `from moa import Mixture`, loads a config and "
        f"calls run_sync; process start to the first upstream request, median of "
        f"{cold['run']}: {cold_s:.3f} s (target <= {TARGET_COLD_START_S:g}: "
        f"{verdict(cold_s <= TARGET_COLD_START_S)}); a bare `python -c pass` takes "
        f"{bare:.3f} s on this machine now.",
    ]
    return [*rows, cold], notes


def _bare_start() -> float:
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.monotonic() - start


def cold_start(repeats: int = 3) -> tuple[dict[str, Any], float]:
    """Process start to the first upstream request: `from moa import Mixture`, the config,
    `run_sync` (a new Python each time, the loopback server in this process).

    One start before the measured ones, uncounted, may write the bytecode cache (even where
    `PYTHONDONTWRITEBYTECODE` is set): an installed package has its bytecode, and a checkout
    whose edited modules were compiled anew at every start (5-15 ms each for the larger ones)
    would measure the compiler, not the start."""
    from moa.testing import LoopbackServer, ModelBehavior

    times: list[float] = []
    with LoopbackServer(default=ModelBehavior(reply="cold")) as srv, \
            tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "moa.toml"
        path.write_text(config_text(srv.base_url))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        subprocess.run([sys.executable, "-c", COLD_START, str(path)], check=True,
                       stdout=subprocess.DEVNULL, env=env)
        for _ in range(repeats):
            seen = len(srv.requests)
            start = time.monotonic()  # CLOCK_MONOTONIC: the same clock in every process
            subprocess.run([sys.executable, "-c", COLD_START, str(path)], check=True,
                           stdout=subprocess.DEVNULL)
            first = min(r.time for r in srv.requests[seen:])
            times.append(first - start)
    median = statistics.median(times)
    row = {"mixture": "moa-3x6", "mode": "layered", "api": "cold start", "run": repeats,
           "calls": sum(LAYERS), "cold_start_s": round(median, 3)}
    return row, median
