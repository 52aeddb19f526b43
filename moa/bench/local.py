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

`--case long` times a long question (`--long-tokens`, default 3,000) with one answer token,
side by side: one raw llama-cpp-python prefill of the rendered prompt (no moa), one engine
call, and the mixture `moa chat -p local/smollm2 -a local/smollm2 --max-tokens 1` runs (a
proposer, then an aggregator whose prompt holds the question again) in the paper layout (the
references before the question: two prefills) and in the cache layout (the question first,
as the proposer read it: the engine reuses its KV and evaluates only what follows).
`2 proposers, 1 with system prompt, cache layout`: the aggregator's prompt extends
the first proposer's, but the second proposer's prompt (its system prompt, then the question)
ran in between; the engine saved the first one's KV when the second replaced it and loads it
back for the aggregator. The `prompt_cache_bytes = 0` row is the same without saved states
(only the last prompt's KV is reused).
`--case cancel` cancels an engine call `--cancel-after` seconds into the long prefill and
reports how long the call took to return after the cancel (`cancel_s`).
`--case first-run` runs the `local` preset as shipped and the same caps without its stop rule
and instruction over six everyday questions (seed 1), counting answers cut at `max_tokens`.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

QUESTION = "Give three short tips for writing clear code."


CASES = ("mixture", "long", "cancel", "first-run")
PERSONA = "2 proposers, 1 with system prompt, cache layout"
FIRST_RUN_QUESTIONS = (
    "Why is the sky blue?", "What causes the seasons on Earth?",
    "How does a refrigerator keep food cold?", "Why do we dream?", "What is photosynthesis?",
    "Explain how vaccines work.",
)
FILLER = (
    "Consensus protocols such as Paxos and Raft let a group of machines agree on a sequence "
    "of values even when some of them fail or messages are delayed. "
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=48, help="max tokens per call (default 48)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per row, best kept")
    parser.add_argument("--case", choices=[*CASES, "all"], default="all",
                        help="which rows to run (default all): " + ", ".join(CASES))
    parser.add_argument("--long-tokens", type=int, default=3000,
                        help="tokens of the long question (default 3000)")
    parser.add_argument("--cancel-after", type=float, default=0.5,
                        help="seconds into the long prefill to cancel (default 0.5)")


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


def _long_question(tokens: int, case: str) -> str:
    """A question of about `tokens` tokens; `case` starts it, so no two rows share a cache
    (a repeat of a row finds only the chat template's head cached, as a new question would)."""
    from moa.local_engine.llamacpp import model_pool
    from moa.local_engine.model_files import bundled_model_path

    pool = model_pool(bundled_model_path(), False, {})
    count = pool.instances[0].count
    repeats = max(1, tokens // max(1, count(FILLER)))
    return f"{case}\n{FILLER * repeats}\nSummarise the text above in one sentence."


def _raw_prefill(question: str) -> dict[str, Any]:
    """One prefill of the rendered prompt by llama-cpp-python alone, on its own context."""
    from llama_cpp import Llama

    from moa.local_engine.llamacpp import DEFAULT_CTX, model_pool, render_prompt
    from moa.local_engine.model_files import bundled_model_path

    path = bundled_model_path()
    formatter = model_pool(path, False, {}).instances[0].formatter
    prompt, _ = render_prompt(formatter, [{"role": "user", "content": question}], False)
    llm = Llama(model_path=str(path), n_ctx=DEFAULT_CTX, n_threads=os.cpu_count() or 1,
                verbose=False)
    tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    llm.eval(tokens[:8])  # warm the context up, as the engine's instance is
    llm.reset()
    start = time.perf_counter()
    llm.eval(tokens)
    total = time.perf_counter() - start
    llm.close()
    return {"calls": 1, "prompt_tokens": len(tokens), "total_s": total}


async def _engine_long(registry: Any, question: str) -> dict[str, Any]:
    from moa.providers.base import ChatRequest

    provider, model = registry.resolve("local/smollm2")
    request = ChatRequest(model=model, messages=[{"role": "user", "content": question}],
                          max_tokens=1, temperature=0.0)
    start = time.perf_counter()
    out = await provider.complete(request)
    return {"calls": 1, "prompt_tokens": out[0].usage.prompt_tokens,
            "total_s": time.perf_counter() - start}


def _long_config(layout: str, *, persona: bool = False) -> Any:
    """One proposer and an aggregator, one token each; with `persona`, a second proposer
    with a system prompt of its own."""
    from moa.config import AgentConfig, LayerConfig, MixtureConfig, StaircaseConfig

    agent = AgentConfig(model="local/smollm2", max_tokens=1)
    agents = [agent]
    if persona:
        agents.append(agent.model_copy(update={"system": "You are a careful fact checker."}))
    return MixtureConfig(name="long", mode="layered", layers=[LayerConfig(agents=agents)],
                         aggregator=agent.model_copy(),
                         staircase=StaircaseConfig(layout=layout))  # type: ignore[arg-type]


async def _mixture_long(registry: Any, question: str, layout: str) -> dict[str, Any]:
    from moa.mixture import Mixture

    start = time.perf_counter()
    result = await Mixture(_long_config(layout), registry=registry).run(question)
    return {"calls": result.calls, "prompt_tokens": result.usage.prompt_tokens,
            "cached_tokens": result.usage.cached_tokens, "total_s": time.perf_counter() - start}


async def _persona(registry: Any, question: str) -> dict[str, Any]:
    from moa.mixture import Mixture

    start = time.perf_counter()
    result = await Mixture(_long_config("cache", persona=True), registry=registry).run(question)
    return {"calls": result.calls, "prompt_tokens": result.usage.prompt_tokens,
            "cached_tokens": result.usage.cached_tokens, "total_s": time.perf_counter() - start}


async def _cancel(registry: Any, question: str, after: float) -> dict[str, Any]:
    """Cancel an engine call `after` seconds in; seconds from the cancel to its return."""
    import anyio

    from moa.providers.base import ChatRequest

    provider, model = registry.resolve("local/smollm2")
    request = ChatRequest(model=model, messages=[{"role": "user", "content": question}],
                          max_tokens=64, temperature=0.0)
    cancelled_at = 0.0
    start = time.perf_counter()
    with anyio.CancelScope() as scope:

        async def cancel_later() -> None:
            nonlocal cancelled_at
            await anyio.sleep(after)
            cancelled_at = time.perf_counter()
            scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_later)
            await provider.complete(request)
            tg.cancel_scope.cancel()  # finished before the cancel: nothing to measure
    end = time.perf_counter()
    return {"calls": 1, "total_s": end - start,
            "cancel_s": end - cancelled_at if scope.cancelled_caught else None}


def _long_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    import anyio

    registry = _registry({})
    anyio.run(_alone, registry, 1)  # load the model
    label = f"long prompt (~{args.long_tokens} tok)"
    rows: list[dict[str, Any]] = []
    if args.case in ("long", "all"):
        unsaved = _registry({"prompt_cache_bytes": 0})
        anyio.run(_alone, unsaved, 1)
        cases = [
            ("raw llama-cpp prefill", _raw_prefill),
            ("engine call, 1 token", lambda q: anyio.run(_engine_long, registry, q)),
            ("moa chat -p -a, 1 token", lambda q: anyio.run(_mixture_long, registry, q, "paper")),
            ("same, cache layout", lambda q: anyio.run(_mixture_long, registry, q, "cache")),
            (PERSONA, lambda q: anyio.run(_persona, registry, q)),
            ("same, prompt_cache_bytes = 0", lambda q: anyio.run(_persona, unsaved, q)),
        ]
        runs: dict[str, list[dict[str, Any]]] = {dispatch: [] for dispatch, _ in cases}
        for i in range(args.repeats):  # interleaved, so a change of load hits every row
            for n, (dispatch, measure) in enumerate(cases):
                runs[dispatch].append(measure(_long_question(args.long_tokens, f"Case {n}.{i}")))
        for dispatch, got_all in runs.items():
            got = min(got_all, key=lambda g: g["total_s"])
            rows.append({"workload": label, "dispatch": dispatch, "calls": got["calls"],
                         "prompt_tokens": got["prompt_tokens"],
                         "cached_tokens": got.get("cached_tokens", 0),
                         "total_s": round(got["total_s"], 3)})
    if args.case in ("cancel", "all"):
        got = anyio.run(_cancel, registry, _long_question(args.long_tokens, "Cancel"),
                        args.cancel_after)
        rows.append({"workload": label, "dispatch": f"cancel at {args.cancel_after:g} s",
                     "calls": 1, "total_s": round(got["total_s"], 3),
                     "cancel_s": None if got["cancel_s"] is None else round(got["cancel_s"], 3)})
    return rows


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    cores = os.cpu_count() or 1
    notes = [f"{cores} cores; SmolLM2-135M Q4_1; best of {args.repeats} runs per row but the "
             "cancel row."]
    rows = _mixture_rows(args, cores) if args.case in ("mixture", "all") else []
    queued = next((r for r in rows if r["dispatch"] == "concurrent, queued"), None)
    for row in rows:
        if queued and row["dispatch"].startswith("concurrent, parallel"):
            ratio = row["tokens_per_s"] / queued["tokens_per_s"]
            notes.append(f"{row['dispatch']}: tokens/s x{ratio:.2f} vs queued.")
    long_rows = _long_rows(args) if args.case in ("long", "cancel", "all") else []
    if args.case in ("first-run", "all"):
        long_rows += _first_run_rows()
    by_dispatch = {r["dispatch"]: r for r in long_rows}
    raw = by_dispatch.get("raw llama-cpp prefill")
    for dispatch in ("engine call, 1 token", "moa chat -p -a, 1 token", "same, cache layout",
                     PERSONA, "same, prompt_cache_bytes = 0"):
        if raw and dispatch in by_dispatch:
            ratio = by_dispatch[dispatch]["total_s"] / raw["total_s"]
            notes.append(f"{dispatch}: x{ratio:.2f} the raw prefill's time.")
    return rows + long_rows, notes


def _mixture_rows(args: argparse.Namespace, cores: int) -> list[dict[str, Any]]:
    import anyio

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
    return rows


def _first_run_rows() -> list[dict[str, Any]]:
    """The `local` preset beside the same caps without its stop rule and instruction, run
    question by question in turn (so load changes hit both alike), after a warm-up."""
    from moa.config import preset
    from moa.mixture import Mixture

    shipped = preset("local")
    bare = shipped.model_copy(deep=True)
    for agent in [*bare.layers[0].agents, bare.final]:
        agent.stop, agent.system = None, None
    variants = {"local preset": Mixture(shipped), "caps only": Mixture(bare)}
    variants["local preset"].run_sync("Hi", max_tokens=4)  # load the model
    totals = {name: dict.fromkeys(("cut_p", "cut_a", "tok_p", "tok_a", "n_p", "s"), 0.0)
              for name in variants}
    for question in FIRST_RUN_QUESTIONS:
        for name, mixture in variants.items():
            t, start = totals[name], time.perf_counter()
            result = mixture.run_sync(question, seed=1)
            t["s"] += time.perf_counter() - start
            for out in result.outputs:
                kind = "a" if out.agent.final else "p"
                t[f"cut_{kind}"] += out.finish_reason == "length"
                t[f"tok_{kind}"] += out.usage.completion_tokens
                t["n_p"] += kind == "p"
    runs = len(FIRST_RUN_QUESTIONS)
    return [
        {
            "workload": "first run", "dispatch": name,
            "proposals_cut": f"{t['cut_p']:.0f}/{t['n_p']:.0f}",
            "answers_cut": f"{t['cut_a']:.0f}/{runs}",
            "proposal_tokens": round(t["tok_p"] / t["n_p"]),
            "answer_tokens": round(t["tok_a"] / runs),
            "total_s": round(t["s"] / runs, 2),
        }
        for name, t in totals.items()
    ]
