"""`moa bench staircase`: layered vs staircase (lockstep and eager pacing), side by side.

Loopback backend (default): paper-like settings — 6 proposers writing 512 tokens each, per-model
TTFT spread over 0.3–1.5 s and rates over 30–80 tokens/s — for MoA-Lite (2 layers) and the
3-layer MoA. The loopback aggregator's reply has a fixed length (512 tokens) whenever it is asked:
a continued request goes on where the previous one stopped, within `max_tokens`. Every request
pays its TTFT again, continued staircase steps included (the loopback server's prompt cache
only counts cached tokens, the way OpenAI reports them; it saves no time, and every run starts
with it empty). Reply words are single tiktoken tokens, so loopback and tiktoken counts agree.
`--backend local` runs the same comparison on the embedded CPU engine (`local/smollm2`).

Columns: `coverage` is the least share of a reference's tokens shown to the final aggregator
when it wrote its last token; `margin` the least (reference tokens shown − answer tokens written)
over its calls and the unfinished references they show (negative: it wrote ahead of what it
had read; empty: every reference was complete); `unread` the most unfinished references a call
showed nothing of (the start rule's grace let it begin without them); `agg_calls` and
`agg_prompt_tokens` sum over every aggregating agent (the cost of the steps).
`--steps 16,32,64,128` runs another schedule (chunk_tokens and step_tokens alike).
`--plot PATH` also draws every run's timeline (each agent's tokens over time, `moa.timeline`)
as one SVG.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moa.timeline import Timeline

TARGET_TTFT_CUT = 0.85
NOMINAL_MODEL = "openai/gpt-4.1"
"""Whose list prices (cached input at 25 % of input) the cost columns use, every call alike."""
VOCABULARY = (
    "the of and to in is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there been one all we their has would when if so "
    "no will can more other its time also into only some what these two may first then any "
    "could like water fire light model answer reason point world part way day"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=["loopback", "local"], default="loopback")
    parser.add_argument("--quick", action="store_true", help="small numbers for a smoke test")
    parser.add_argument("--tokens", type=int, help="tokens per reply (default 512; quick 48)")
    parser.add_argument("--layout", choices=["paper", "cache", "both"], default="both",
                        help="prompt layout(s) of the aggregators (default: both, side by side)")
    parser.add_argument(
        "--pacing",
        choices=["lockstep", "eager", "both"],
        default="both",
        help="staircase pacing rule(s) to run beside layered (default: both)",
    )
    parser.add_argument(
        "--steps", metavar="N,N,...", type=schedule,
        help="staircase schedule, both chunk_tokens and step_tokens (default: StaircaseConfig's)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--plot", metavar="PATH",
        help="also draw every run's tokens over time as an SVG (one panel per run, stacked)",
    )


def schedule(text: str) -> list[int]:
    """A `--steps` value: positive integers like 16,32,64."""
    try:
        steps = [int(n) for n in text.split(",")]
    except ValueError:
        steps = []
    if not steps or min(steps) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers like 16,32,64, not {text!r}")
    return steps


def _spread(n: int, low: float, high: float) -> list[float]:
    return [low + (high - low) * i / max(n - 1, 1) for i in range(n)]


def _words(seed: int, tokens: int) -> str:
    """`tokens` words, each one tiktoken token, different for every seed."""
    from moa.tokens import count_tokens

    vocabulary = [w for w in VOCABULARY.split() if count_tokens(f" {w}") == 1 == count_tokens(w)]
    return " ".join(random.Random(seed).choices(vocabulary, k=tokens))


def _loopback_models(tokens: int, scale: float) -> dict[str, Any]:
    """Six models per layer: TTFT and rate spread across agents, not in the same order."""
    from moa.testing import ModelBehavior

    ttfts = _spread(6, 0.3 * scale, 1.5 * scale)
    rates = [r / scale for r in (80.0, 40.0, 70.0, 30.0, 60.0, 50.0)]
    models = {}
    for li, layer in enumerate(("p", "r")):
        for i, (ttft, rate) in enumerate(zip(ttfts, rates, strict=True)):
            reply = _words(10 * li + i, tokens)
            models[f"{layer}{i}"] = ModelBehavior(reply=reply, ttft_s=ttft, tokens_per_s=rate)
    models["agg"] = ModelBehavior(
        reply=_words(99, tokens), ttft_s=0.3 * scale, tokens_per_s=60.0 / scale
    )
    return models


def _shapes(
    prefix: str, proposers: list[str], refiners: list[str], agg: str, tokens: int
) -> dict[str, dict[str, Any]]:
    from moa.bench.staircase_coverage import FINAL_PREFIX

    def layer(models: list[str]) -> dict[str, Any]:
        return {"agents": [{"model": f"{prefix}/{m}", "max_tokens": tokens} for m in models]}

    aggregator = {"model": f"{FINAL_PREFIX}/{agg}", "max_tokens": tokens}
    return {
        "moa-lite": {"layers": [layer(proposers)], "aggregator": aggregator},
        "moa": {"layers": [layer(proposers), layer(refiners)], "aggregator": aggregator},
    }


def _modes(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """(row label, config overrides) for each run of one mixture."""
    pacings = ["lockstep", "eager"] if args.pacing == "both" else [args.pacing]
    runs: list[tuple[str, dict[str, Any]]] = [("layered", {"mode": "layered"})]
    for pacing in pacings:
        label = "staircase" if pacing == "lockstep" else f"staircase/{pacing}"
        runs.append((label, {"mode": "staircase", "pacing": pacing}))
    return runs


async def _measure(
    config: dict[str, Any], base: Any, prefix: str, question: str, planned: int,
    timeline: Timeline,
) -> dict[str, Any]:
    from moa.bench.staircase_coverage import RecordingRegistry, coverage, reuse
    from moa.events import RunFinished
    from moa.mixture import Mixture
    from moa.pricing import cost
    from moa.providers.base import Usage

    registry = RecordingRegistry(base, prefix)
    mixture = Mixture(config, registry=registry)
    start = time.perf_counter()
    result = None
    async with contextlib.aclosing(mixture.stream(question)) as events:
        async for event in events:
            timeline.on_event(event)  # cheap: tokens are counted only when drawn
            if isinstance(event, RunFinished):
                result = event.result
    total = time.perf_counter() - start
    await mixture.aclose()
    assert result is not None
    last_layer = len(config["layers"]) - 1
    refs = [
        (o.text, o.ok and o.finish_reason != "cancelled", planned)
        for o in result.outputs
        if o.agent.layer == last_layer and not o.agent.final
    ]
    cover = coverage(registry.calls, refs, result.text)
    aggregators = [o for o in result.outputs if o.agent.layer > 0]
    shared = reuse(registry.calls)
    usage = result.usage
    return {
        "ttft_s": round(result.ttft_s or total, 3),
        "total_s": round(total, 3),
        "coverage": f"{100 * cover.share:.0f} %",
        "margin": cover.margin,
        "unread": cover.unread,
        "agg_calls": sum(o.calls for o in aggregators),
        "agg_prompt_tokens": sum(o.usage.prompt_tokens for o in aggregators),
        "prompt_tokens": usage.prompt_tokens,
        "cached": f"{100 * usage.cached_tokens / max(usage.prompt_tokens, 1):.0f} %",
        "uncached_prompt": usage.uncached_prompt_tokens,
        "step_reuse": "-" if shared is None else f"{100 * shared:.0f} %",
        "cost_usd": round(cost(NOMINAL_MODEL, usage) or 0.0, 5),
        "cost_no_cache_usd": round(
            cost(NOMINAL_MODEL, Usage(usage.prompt_tokens, usage.completion_tokens)) or 0.0, 5
        ),
        "answer_tokens": result.outputs[-1].usage.completion_tokens,
        "mode_run": result.mode,
    }


def _run_all(
    args: argparse.Namespace,
    shapes: dict[str, dict[str, Any]],
    base: Any,
    prefix: str,
    question: str,
    planned: int,
    cold: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every mixture in every mode; with `--plot`, draw the runs' timelines. `cold`
    empties the backend's prompt cache before each run, so no run is billed as cached for
    the prompts of the runs before it."""
    import anyio

    from moa.cli.progress import Bar
    from moa.timeline import Timeline, write_svg

    rows: list[dict[str, Any]] = []
    timelines: list[Timeline] = []
    layouts = ["paper", "cache"] if args.layout == "both" else [args.layout]
    bar = Bar("staircase", len(shapes) * len(_modes(args)) * len(layouts))

    async def main() -> None:
        for name, shape in shapes.items():
            for layout in layouts:
                for label, how in _modes(args):
                    staircase = {"layout": layout, "pacing": how.get("pacing", "lockstep")}
                    if getattr(args, "steps", None):
                        staircase |= {"chunk_tokens": args.steps, "step_tokens": args.steps}
                    config = {**shape, "name": name, "mode": how["mode"], "staircase": staircase}
                    timeline = Timeline(f"{name} · {layout} · {label}")
                    if cold is not None:
                        cold()
                    row = await _measure(config, base, prefix, question, planned, timeline)
                    rows.append({"mixture": name, "layout": layout, "mode": label, **row})
                    timelines.append(timeline)
                    bar.advance()

    anyio.run(main)
    if args.plot:
        write_svg(args.plot, timelines)
    return rows


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    notes: list[str] = []
    if args.plot:
        from moa.timeline import check_output_path

        check_output_path(args.plot, "--plot")
    rows = _run_local(args, notes) if args.backend == "local" else _run_loopback(args, notes)
    if getattr(args, "steps", None):
        notes.append(f"staircase schedule: chunk_tokens = step_tokens = {args.steps}.")
    if args.plot:
        notes.append(f"plot: {args.plot} (each agent's tokens over time, one panel per run).")
    return rows, notes


def _run_loopback(args: argparse.Namespace, notes: list[str]) -> list[dict[str, Any]]:
    from moa.testing import LoopbackServer

    tokens = args.tokens or (48 if args.quick else 512)

    scale = 0.25 if args.quick else 1.0
    shapes = _shapes(
        "loop", [f"p{i}" for i in range(6)], [f"r{i}" for i in range(6)], "agg", tokens
    )
    with LoopbackServer(_loopback_models(tokens, scale)) as srv:
        question = "Explain staircase streaming."
        rows = _run_all(args, shapes, srv.registry(), "loop", question, tokens,
                        srv.forget_prompts)
    notes.append(
        f"loopback: 6 proposers x {tokens} tokens, TTFT {0.3 * scale:g}-{1.5 * scale:g} s, "
        f"{30 / scale:g}-{80 / scale:g} tokens/s across agents; aggregator {tokens} tokens, "
        f"TTFT {0.3 * scale:g} s, {60 / scale:g} tokens/s; every step "
        "request pays its TTFT again; every run starts with an empty prompt cache."
    )
    return _with_ratios(rows, notes)


def _run_local(args: argparse.Namespace, notes: list[str]) -> list[dict[str, Any]]:
    import importlib

    from moa.providers.registry import Registry

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
    question = "Why is the sky blue? Answer briefly."
    rows = _run_all(args, shapes, Registry(), "local", question, 0)
    notes.append(
        f"local/smollm2 on the CPU: {n} proposers x {tokens} tokens; real prefill cost; "
        "coverage against what each reference finally wrote."
    )
    return _with_ratios(rows, notes)


def _with_ratios(rows: list[dict[str, Any]], notes: list[str]) -> list[dict[str, Any]]:
    """Add one ratio row per mixture and layout (lockstep staircase / layered) and a verdict
    note."""
    out: list[dict[str, Any]] = []
    for name, layout in dict.fromkeys((r["mixture"], r["layout"]) for r in rows):
        runs = [r for r in rows if (r["mixture"], r["layout"]) == (name, layout)]
        out += runs
        pair = {r["mode"]: r for r in runs}
        layered, stair = pair["layered"], pair.get("staircase")
        if stair is None:
            continue
        ratio = {k: round(stair[k] / layered[k], 3) for k in ("ttft_s", "total_s")}
        cost = {k: round(stair[k] / layered[k], 2)
                for k in ("agg_calls", "agg_prompt_tokens", "prompt_tokens", "uncached_prompt",
                          "cost_usd")}
        out.append({"mixture": name, "layout": layout, "mode": "ratio", **ratio, **cost})
        cut = 1 - ratio["ttft_s"]
        paced = stair["margin"] is None or stair["margin"] >= 0
        met = cut >= TARGET_TTFT_CUT and ratio["total_s"] <= 1.0 and paced
        notes.append(
            f"{name} ({layout}): TTFT {100 * cut:.1f} % lower, end-to-end x{ratio['total_s']}, "
            f"pacing {'kept' if paced else 'violated'} (target: >= {100 * TARGET_TTFT_CUT:g} % "
            f"lower, no slower, pacing kept) -> {'met' if met else 'not met'}; staircase ran as "
            f"{stair['mode_run']}."
            + (f" Its first steps began without {stair['unread']} of the references (the "
               "start rule: start_k arrived and grace_s passed); pacing binds a reference "
               "once it has shown a chunk." if stair.get("unread") else "")
        )
    return out
