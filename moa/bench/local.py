"""`moa bench local`: the embedded CPU engine alone vs a 3-proposer self-MoA on it.

Rows, all on the bundled SmolLM2-135M with the same token budget per call:
- `engine alone`: one generation (the engine's own speed and TTFT);
- `self-moa sequential`: the 3 proposers one after another, then the aggregator;
- `self-moa concurrent, queued`: the mixture as the executor runs it (proposers dispatched at
  once), one llama.cpp instance with every core — requests wait their turn;
- `self-moa concurrent, parallel=K`: K llama.cpp instances of the model, each with
  cores / K threads, serving the proposers at the same time.
`tokens_per_s` is completion tokens of all calls over the wall time; `ttft_s` is the time to
the first token of the answer (the aggregator's, or the single call's).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

QUESTION = "Give three short tips for writing clear code."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=48, help="max tokens per call (default 48)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per row, best kept")


def _registry(options: dict[str, Any]) -> Any:
    from moa.providers.registry import ProviderSpec, Registry

    return Registry([ProviderSpec(prefix="local", kind="llamacpp", key_required=False,
                                  options=options)])


def _config(tokens: int) -> Any:
    from moa.config import AgentConfig, LayerConfig, MixtureConfig

    agent = AgentConfig(model="local/smollm2", n=3, max_tokens=tokens, temperature=0.7)
    return MixtureConfig(
        name="local", mode="layered", layers=[LayerConfig(agents=[agent])],
        aggregator=AgentConfig(model="local/smollm2", max_tokens=tokens, temperature=0.3),
    )


async def _alone(registry: Any, tokens: int) -> dict[str, Any]:
    from moa.providers.base import ChatRequest

    provider, model = registry.resolve("local/smollm2")
    request = ChatRequest(model=model, messages=[{"role": "user", "content": QUESTION}],
                          max_tokens=tokens, temperature=0.7, seed=1)
    start = time.perf_counter()
    ttft, produced = await _timed_stream(provider, request, start)
    return {"calls": 1, "tokens": produced, "total_s": time.perf_counter() - start,
            "ttft_s": ttft}


async def _timed_stream(provider: Any, request: Any, start: float) -> tuple[float | None, int]:
    """Stream `request` to its end: (seconds from `start` to its first text, tokens produced)."""
    ttft, produced = None, 0
    async for delta in provider.stream(request):
        if delta.text and ttft is None:
            ttft = time.perf_counter() - start
        if delta.usage:
            produced += delta.usage.completion_tokens
    return ttft, produced


async def _sequential(registry: Any, tokens: int) -> dict[str, Any]:
    """Proposers one at a time, then the aggregator (what a naive loop would do)."""
    from moa.providers.base import ChatRequest
    from moa.runtime.prompts import Reference, aggregate_messages, readable_block

    provider, model = registry.resolve("local/smollm2")
    user = [{"role": "user", "content": QUESTION}]
    start = time.perf_counter()
    answers, produced = [], 0
    for i in range(3):
        out = await provider.complete(ChatRequest(model=model, messages=user, max_tokens=tokens,
                                                  temperature=0.7, seed=i))
        answers.append(out[0].text)
        produced += out[0].usage.completion_tokens
    messages = aggregate_messages(user, readable_block([Reference(a) for a in answers]))
    aggregate = ChatRequest(model=model, messages=messages, max_tokens=tokens, temperature=0.3)
    ttft, aggregated = await _timed_stream(provider, aggregate, start)
    produced += aggregated
    return {"calls": 4, "tokens": produced, "total_s": time.perf_counter() - start,
            "ttft_s": ttft}


async def _mixture(registry: Any, tokens: int) -> dict[str, Any]:
    from moa.mixture import Mixture

    start = time.perf_counter()
    result = await Mixture(_config(tokens), registry=registry).run(QUESTION)
    return {"calls": result.calls, "tokens": result.usage.completion_tokens,
            "total_s": time.perf_counter() - start, "ttft_s": result.ttft_s}


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    import anyio

    cores = os.cpu_count() or 1
    cases = [
        ("engine alone", "single call", _alone, {}),
        ("self-moa", "sequential", _sequential, {}),
        ("self-moa", "concurrent, queued", _mixture, {}),
        *[
            ("self-moa", f"concurrent, parallel={k}", _mixture,
             {"parallel": k, "n_threads": max(1, cores // k)})
            for k in (2, 3)
        ],
    ]
    rows: list[dict[str, Any]] = []

    async def main() -> None:
        for workload, dispatch, fn, options in cases:
            registry = _registry(options)
            await fn(registry, 4)  # load the model instances and warm up
            best: dict[str, Any] | None = None
            for _ in range(args.repeats):
                got = await fn(registry, args.tokens)
                if best is None or got["total_s"] < best["total_s"]:
                    best = got
            assert best is not None
            rows.append({
                "workload": workload,
                "dispatch": dispatch,
                "calls": best["calls"],
                "tokens": best["tokens"],
                "ttft_s": round(best["ttft_s"] or 0.0, 3),
                "total_s": round(best["total_s"], 3),
                "tokens_per_s": round(best["tokens"] / best["total_s"], 1),
            })

    anyio.run(main)
    queued = next(r for r in rows if r["dispatch"] == "concurrent, queued")
    notes = [f"{cores} cores; SmolLM2-135M Q4_1; best of {args.repeats} runs per row."]
    for row in rows:
        if row["dispatch"].startswith("concurrent, parallel"):
            ratio = row["tokens_per_s"] / queued["tokens_per_s"]
            notes.append(f"{row['dispatch']}: tokens/s x{ratio:.2f} vs queued.")
    return rows, notes
