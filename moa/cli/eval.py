"""`moa eval TASKFILE`: score mixtures, single models and router policies on verifiable tasks.

    moa eval tasks.jsonl -c moa-lite -m openai/gpt-4o-mini \\
        --routing routed.toml --policy always-strong --policy marginal

Each `-c` config (preset or file) runs as a layered mixture; each `-m` model runs alone; each
`--policy` runs the routed strategy of `--routing` (a routing file, or a mixture file with a
`[routing]` table; default: the first `-c` file that has one) under that policy. A routing
table with no `--policy` runs under its own router. One table row per configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from moa.cli.options import check_model_keys
from moa.errors import ConfigError
from moa.providers.registry import ProviderSpec, Registry, default_registry


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
    parser.add_argument("--routing", metavar="FILE", help="routing config for --policy")
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
        tables = [data.get("providers"), (data.get("routing") or {}).get("providers")]
        for table in filter(None, tables):
            for prefix, spec in table.items():
                registry.register(ProviderSpec.model_validate({"prefix": prefix, **spec}))
    return registry


def _routing_source(args: argparse.Namespace, files: dict[str, dict[str, Any]]) -> Any:
    if args.routing:
        return files[args.routing]
    if args.cheap or args.strong:
        if not (args.cheap and args.strong):
            raise ConfigError("--cheap and --strong go together.")
        return {"cheap": args.cheap, "strong": args.strong}
    for source in args.config:
        if files.get(source, {}).get("routing") is not None:
            return files[source]
    return None


def _runner(target: Any) -> Any:
    """A `moa.routing.evaluate.Runner` over anything with `await run(question, seed=...)`."""
    from moa.routing.evaluate import outcome_of

    async def run(question: str, seed: int) -> Any:
        return outcome_of(await target.run(question, seed=seed))

    return run


async def _run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from moa.mixture import Mixture
    from moa.routing.evaluate import evaluate, load_tasks, single_model
    from moa.routing.router import parse_policy
    from moa.routing.strategy import RoutedMixture, load_routing

    tasks = load_tasks(args.taskfile, args.limit)
    sources = [*args.config, *filter(None, [args.routing])]
    files = {s: d for s in sources if (d := _file_data(s)) is not None}
    registry = _registry(list(files.values()))
    routing = _routing_source(args, files)
    if args.policy and routing is None:
        raise ConfigError(
            "--policy needs a routing config: --routing FILE, --cheap/--strong, "
            "or a -c file with a [routing] table."
        )
    runners: list[tuple[str, Any]] = []
    refs: list[str] = [*args.model]
    for source in args.config:
        if source in files and "layers" not in files[source]:
            continue
        mixture = Mixture(source, registry=registry)
        refs += [agent.model for agent in mixture.config.agents()]
        runners.append((f"mixture {mixture.config.name}", _runner(mixture)))
    prices = next((d.get("prices") for d in files.values() if d.get("prices")), None)
    for ref in args.model:
        runner = single_model(registry, ref, max_tokens=args.max_tokens, prices=prices)
        runners.append((f"model {ref}", runner))
    if routing is not None:
        config = load_routing(routing, registry=registry)
        judge = config.verifier.model if config.verifier else None
        refs += [config.cheap, config.strong, *filter(None, [judge])]
        specs = [parse_policy(p, config.router) for p in args.policy] or [config.router]
        for spec in specs:
            routed = RoutedMixture(config.model_copy(update={"router": spec}), registry=registry)
            label = spec["policy"] + (
                ""
                if len(spec) == 1
                else ":" + ",".join(f"{k}={v}" for k, v in spec.items() if k != "policy")
            )
            runners.append((f"{config.strategy} {label}", _runner(routed)))
    if not runners:
        raise ConfigError("Nothing to score: give -c, -m or --policy.")
    check_model_keys(registry, refs)
    rows = []
    try:
        for name, runner in runners:
            rows.append(
                await evaluate(name, runner, tasks, concurrency=args.concurrency, seed=args.seed)
            )
    finally:
        await registry.aclose()
    return rows


def run(args: argparse.Namespace) -> int:
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
