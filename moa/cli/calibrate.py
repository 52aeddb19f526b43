"""`moa calibrate LABELLED -c CONFIG`: fit router thresholds and store them in the config.

    moa calibrate labelled.jsonl -c routed.toml --policy marginal --strong-share 0.3 --write

Runs the mixture of CONFIG (a mixture file whose aggregator has a `strong` tier) on every
labelled question twice — the routed aggregation skipped, and strong — then fits the policy so
that the target share of questions (or the target cost per question) goes to the strong tier
(RouteLLM-style). `--write` replaces the policy in the file's `[router]` table (its other keys
stay). Keys are checked before the first call; a failed run names every distinct reason. On a
terminal, a progress bar (one step per labelled item) is drawn on stderr (not with `--json`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tomllib
from pathlib import Path
from typing import Any

from moa.cli.progress import Bar, shown
from moa.errors import ConfigError, MixtureError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("labelled", metavar="LABELLED", help="JSONL with 'question' and 'answer'")
    parser.add_argument(
        "-c",
        "--config",
        required=True,
        metavar="FILE",
        help="mixture config file (.toml or .json) to fit and update",
    )
    parser.add_argument("--policy", choices=["threshold", "marginal"], default="marginal")
    parser.add_argument(
        "--signal",
        default="agreement",
        choices=["agreement", "confidence", "min_confidence", "similarity"],
        help="signal of the threshold policy (default agreement)",
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--strong-share",
        type=float,
        metavar="SHARE",
        help="largest share of questions sent to the strong tier, e.g. 0.3",
    )
    target.add_argument(
        "--target-cost",
        type=float,
        metavar="USD",
        help="largest mean cost per question in US dollars",
    )
    parser.add_argument("--limit", type=int, metavar="N", help="use the first N items only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", action="store_true", help="store the fit in the config file")
    parser.add_argument("--json", action="store_true", help="print the fit as JSON")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def write_router(path: Path, router: dict[str, Any]) -> None:
    """Replace the policy of a mixture file's `[router]` table by `router`."""
    from moa.routing.router import COMMON_KEYS

    text = path.read_text()
    is_json = path.suffix.lower() == ".json"
    old = (json.loads(text) if is_json else tomllib.loads(text)).get("router") or {}
    kept_keys = {k: v for k, v in old.items() if k in COMMON_KEYS}
    if is_json:
        data = json.loads(text)
        data["router"] = {**router, **kept_keys}
        path.write_text(json.dumps(data, indent=2) + "\n")
        return
    router = {**router, **{k: v for k, v in kept_keys.items() if not isinstance(v, dict)}}
    header = "[router]"
    kept, skipping = [], False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            skipping = stripped == header
        if not skipping:
            kept.append(line)
    body = "\n".join(f"{k} = {_toml_value(v)}" for k, v in router.items() if v is not None)
    new = "\n".join(kept).rstrip() + f"\n\n{header}\n{body}\n"
    try:
        tomllib.loads(new)
    except tomllib.TOMLDecodeError:
        raise ConfigError(
            f"Cannot update {str(path)!r}: write its router as a {header} table, not inline."
        ) from None
    path.write_text(new)


async def _fit(args: argparse.Namespace) -> Any:
    from moa.cli.options import check_model_keys
    from moa.config import load_file
    from moa.routing.calibration import collect, fit_marginal, fit_threshold
    from moa.routing.evaluate import failure_reason, load_tasks

    config = load_file(args.config)
    tasks = load_tasks(args.labelled, args.limit)
    check_model_keys(config.registry(), [ref for _, ref in config.model_refs()])
    try:
        items = [(t.question, t.answer) for t in tasks]
        bar = Bar("calibrate", len(items))
        samples = await collect(config, items, seed=args.seed, on_item=bar.advance)
    except MixtureError as err:
        raise MixtureError(f"Calibration stopped: {failure_reason(err)}") from err
    target = {"strong_share": args.strong_share, "target_cost": args.target_cost}
    if args.policy == "threshold":
        return fit_threshold(samples, args.signal, **target), len(samples)
    return fit_marginal(samples, **target), len(samples)


def run(args: argparse.Namespace) -> int:
    with shown(not args.json):
        fit, n = asyncio.run(_fit(args))
    if args.write:
        write_router(Path(args.config), fit.router)
    if args.json:
        print(
            json.dumps(
                {
                    "router": fit.router,
                    "strong_share": fit.strong_share,
                    "accuracy": fit.accuracy,
                    "cost_usd": fit.cost_usd,
                    "items": n,
                }
            )
        )
        return 0
    print(f"Fitted on {n} labelled items: {json.dumps(fit.router)}")
    print(
        f"Expected on this set: accuracy {fit.accuracy:.1%}, strong share "
        f"{fit.strong_share:.1%}, mean cost ${fit.cost_usd:.6f} per question."
    )
    print(f"Stored in {args.config}." if args.write else "Use --write to store it in the config.")
    return 0
