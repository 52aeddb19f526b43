"""`moa eval TASKFILE`: score mixtures, single models and router policies on verifiable tasks.

    moa eval tasks.jsonl -c moa-lite -c routed.toml -m openai/gpt-4o-mini \\
        --policy always-strong --policy marginal

Each `-c` config (preset or file) runs as written, routed stages under its own `[router]`;
each `-m` model runs alone; each `--policy` runs the routed mixture of `--routing` (default:
the first `-c` file with a routed stage; or `--cheap M --strong M`) under that policy. Every
mixture runs through the one executor. One table row per configuration. On a terminal, a
progress bar per configuration is drawn on stderr (not with `--json`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import TYPE_CHECKING, Any

from moa.cli.options import check_model_keys
from moa.cli.progress import Bar, shown
from moa.config import from_dict
from moa.errors import ConfigError
from moa.providers.registry import ProviderSpec, Registry, default_registry

if TYPE_CHECKING:
    from moa.routing.evaluate import Outcome, Runner


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("taskfile", metavar="TASKFILE", help="JSONL with 'question' and 'answer'")
    parser.add_argument(
        "-c",
        "--config",
        action="append",
        default=[],
        metavar="FILE|PRESET",
        help="a mixture to score (repeatable)",
    )
    parser.add_argument(
        "-m",
        "--model",
        action="append",
        default=[],
        metavar="MODEL",
        help="a single model to score (repeatable)",
    )
    parser.add_argument(
        "--policy",
        action="append",
        default=[],
        metavar="SPEC",
        help="router policy, e.g. always-strong, threshold:signal=agreement,"
        "threshold=0.67, marginal, random:p_strong=0.3 (repeatable)",
    )
    parser.add_argument(
        "--routing", metavar="FILE", help="mixture file with routed stages, for --policy"
    )
    parser.add_argument("--cheap", metavar="MODEL", help="cheap tier (instead of --routing)")
    parser.add_argument("--strong", metavar="MODEL", help="strong tier (instead of --routing)")
    parser.add_argument("--limit", type=int, metavar="N", help="score the first N tasks only")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=4,
        metavar="N",
        help="tasks in flight per configuration (default 4)",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=512,
        metavar="N",
        help="max tokens of -m single-model calls (default 512)",
    )
    parser.add_argument("--seed", type=int, default=0, help="base seed (task i gets seed+i)")
    parser.add_argument("--json", action="store_true", help="print one JSON object with the rows")


def _file_data(source: str) -> dict[str, Any] | None:
    """The parsed file behind a `-c`/`--routing` value, or None for a preset name."""
    from moa.config import PRESETS, read_file

    return None if source in PRESETS else read_file(source)


def _registry(sources: list[dict[str, Any]]) -> Registry:
    """Built-in prefixes plus every `[providers.*]` table of the given files."""
    registry = Registry(default_registry.specs())
    for data in sources:
        for prefix, spec in (data.get("providers") or {}).items():
            registry.register(ProviderSpec.model_validate({"prefix": prefix, **spec}))
    return registry


def _routing_source(args: argparse.Namespace, files: dict[str, dict[str, Any]]) -> Any:
    if args.routing:
        return files[args.routing]
    if args.cheap or args.strong:
        if not (args.cheap and args.strong):
            raise ConfigError("--cheap and --strong go together.")
        from moa.bench.routing import routed_config

        return routed_config(args.cheap, args.strong, proposers=3, max_tokens=512, name="routed")
    for source in args.config:
        if _routed(files.get(source, {})):
            return files[source]
    return None


def _routed(data: dict[str, Any]) -> bool:
    """The raw config has an agent with a `strong` tier."""
    layers = data.get("layers") if isinstance(data.get("layers"), list) else []
    agents = [a for layer in layers if isinstance(layer, dict) for a in layer.get("agents") or []]
    debate = data.get("debate") if isinstance(data.get("debate"), dict) else {}
    agents += debate.get("agents") if isinstance(debate.get("agents"), list) else []
    return any(isinstance(a, dict) and a.get("strong") for a in [*agents, data.get("aggregator")])


def _runner(target: Any) -> Any:
    """A `moa.routing.evaluate.Runner` over anything with `await run(question, seed=...)`."""
    from moa.routing.evaluate import outcome_of

    async def run(question: str, seed: int) -> Any:
        return outcome_of(await target.run(question, seed=seed))

    return run


def _counted(runner: Runner, bar: Bar) -> Runner:
    """`runner`, advancing `bar` after each task (done or failed)."""

    async def run(question: str, seed: int) -> Outcome:
        try:
            return await runner(question, seed)
        finally:
            bar.advance()

    return run


async def _run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from moa.mixture import Mixture
    from moa.routing.evaluate import evaluate, load_tasks, single_model
    from moa.routing.router import COMMON_KEYS, parse_policy

    tasks = load_tasks(args.taskfile, args.limit)
    if args.routing and not args.policy:  # a routed mixture under its own router
        args.config = [*args.config, args.routing]
    sources = [*args.config, *filter(None, [args.routing])]
    files = {s: d for s in sources if (d := _file_data(s)) is not None}
    registry = _registry(list(files.values()))
    routing = _routing_source(args, files)
    if args.policy and routing is None:
        raise ConfigError(
            "--policy needs a routed mixture: --routing FILE, --cheap/--strong, "
            "or a -c file with a `strong` tier on an agent."
        )
    runners: list[tuple[str, Any]] = []
    refs: list[str] = [*args.model]
    for source in args.config:
        if source in files and not {"layers", "debate", "preset"} & set(files[source]):
            continue  # a routing file only, scored under --policy
        mixture = Mixture(source, registry=registry)
        refs += [ref for _, ref in mixture.config.model_refs()]
        runners.append((f"mixture {mixture.config.name}", _runner(mixture)))
    prices = next((d.get("prices") for d in files.values() if d.get("prices")), None)
    for ref in args.model:
        runner = single_model(registry, ref, max_tokens=args.max_tokens, prices=prices)
        runners.append((f"model {ref}", runner))
    if routing is not None and args.policy:
        config = from_dict(routing, registry=registry)
        refs += [ref for _, ref in config.model_refs()]
        base = config.router.model_dump() if config.router else None
        for policy in args.policy:
            spec = parse_policy(policy, base)
            routed = Mixture({**routing, "router": spec}, registry=registry)
            given = {k: v for k, v in spec.items() if k not in ("policy", *COMMON_KEYS)}
            label = spec["policy"] + (
                ":" + ",".join(f"{k}={v}" for k, v in given.items()) if given else ""
            )
            runners.append((f"{config.name} {label}", _runner(routed)))
    if not runners:
        raise ConfigError("Nothing to score: give -c, -m or --policy.")
    check_model_keys(registry, refs)
    rows = []
    try:
        for name, runner in runners:
            counted = _counted(runner, Bar(name, len(tasks)))
            rows.append(
                await evaluate(name, counted, tasks, concurrency=args.concurrency, seed=args.seed)
            )
    finally:
        await registry.aclose()
    return rows


def run(args: argparse.Namespace) -> int:
    with shown(not args.json):
        rows = asyncio.run(_run(args))
    if args.json:
        json.dump({"rows": rows}, sys.stdout)
        sys.stdout.write("\n")
    else:
        _print_table(rows)
    for row in rows:
        for reason, count in row["failures"].items():
            print(f"moa: {row['config']}: {count} of {row['tasks']} tasks failed: {reason}",
                  file=sys.stderr)
    dead = [row["config"] for row in rows if row["errors"] == row["tasks"]]
    if dead:
        print(f"moa: every task failed for {', '.join(dead)}.", file=sys.stderr)
        return 1
    return 0


def _print_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"moa eval ({rows[0]['tasks']} tasks)")
    columns = ["config", "accuracy", "calls", "tokens", "cost_usd", "latency_s", "errors"]
    for col in columns:
        table.add_column(col, justify="left" if col == "config" else "right")
    for r in rows:
        cost = "?" if r["cost_usd"] is None else f"{r['cost_usd']:.6f}"
        tokens = r["prompt_tokens"] + r["completion_tokens"]
        table.add_row(
            r["config"],
            f"{r['accuracy']:.1%}",
            str(r["calls"]),
            str(tokens),
            cost,
            f"{r['latency_s']:.3f}",
            str(r["errors"]),
        )
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    console.print(table)
