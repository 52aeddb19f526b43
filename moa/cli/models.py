"""`moa models`: the configured providers (and whether each key is set) and the presets.

Keys are never printed: only the name of the variable and whether it is set. Each preset lists
its models and an estimated cost per request from the price table (`moa.pricing`) for a typical
question: a 50-token question and 300-token answers (or each agent's `max_tokens`, if lower),
every aggregating call reading the previous layer's answers after the aggregation prompt.
Every prompt token is billed at the input rate: the prefix such calls share (the question) is
far below the 1,024 tokens OpenAI and Anthropic cache from, so no cached-input rate applies.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from pydantic import ValidationError

from moa.cli.options import config_data
from moa.config import PRESETS, MixtureConfig, preset
from moa.errors import ConfigError
from moa.pricing import price_of, with_overrides
from moa.providers.registry import ProviderSpec, Registry, default_registry
from moa.providers.secrets import mask_url

_PIPE_WIDTH = 140
"""Table width when stdout is not a terminal and $COLUMNS is unset."""
QUESTION_TOKENS = 50
ANSWER_TOKENS = 300
"""The typical question the preset cost estimate assumes (tokens)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c", "--config", metavar="FILE", help="also list the providers this config file adds"
    )
    parser.add_argument("--json", action="store_true", help="print providers and presets as JSON")


def run(args: argparse.Namespace) -> int:
    providers = [_provider_row(spec) for spec in _registry_specs(args.config)]
    presets = [_preset_row(name, text) for name, text in PRESETS.items()]
    if args.json:
        json.dump({"providers": providers, "presets": presets}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    _print_tables(providers, presets)
    return 0


def _registry_specs(config_path: str | None) -> list[ProviderSpec]:
    """Built-in providers plus those a config file adds or overrides."""
    registry = Registry(default_registry.specs())
    tables = config_data(config_path).get("providers") or {}
    for prefix, table in tables.items():
        try:
            registry.register(ProviderSpec.model_validate({**table, "prefix": prefix}))
        except (TypeError, ValidationError) as err:
            detail = err.errors()[0] if isinstance(err, ValidationError) else {"msg": str(err)}
            where = ".".join(str(p) for p in detail.get("loc", ()))
            raise ConfigError(
                f"Invalid config {config_path!r}: field 'providers.{prefix}"
                f"{'.' + where if where else ''}': {detail['msg']}."
            ) from None
    return registry.specs()


def _provider_row(spec: ProviderSpec) -> dict[str, Any]:
    if spec.kind in ("llamacpp", "vllm"):
        key = "not needed"
    elif spec.api_key() is not None:
        key = "set"
    else:
        key = "missing" if spec.key_required else "optional"
    return {
        "prefix": spec.prefix,
        "kind": spec.kind,
        "base_url": mask_url(spec.resolved_base_url() or "(embedded)"),
        "key_variable": spec.key_variable,
        "key": key,
    }


def _preset_row(name: str, description: str) -> dict[str, Any]:
    config = preset(name)
    return {
        "name": name,
        "calls": config.call_count,
        "models": _model_counts(config),
        "usd_per_request": estimate_usd(config),
        "description": description,
    }


def _model_counts(config: MixtureConfig) -> dict[str, int]:
    """Model reference -> calls per request, proposers first, the aggregator last."""
    counts: dict[str, int] = {}
    for agent in (a for step in config.call_plan() for a in step):
        counts[agent.model] = counts.get(agent.model, 0) + agent.n
    return counts


def estimate_usd(config: MixtureConfig) -> float | None:
    """US dollars of one typical request (see the module docstring); None if a price is unknown."""
    from moa.runtime.prompts import AGGREGATE_PROMPT
    from moa.tokens import count_tokens

    instructions = count_tokens(AGGREGATE_PROMPT)
    table = with_overrides(config.prices)
    total, references = 0.0, 0
    for agents in config.call_plan():
        prompt = QUESTION_TOKENS + (instructions + references if references else 0)
        references = 0
        for agent in agents:
            price = price_of(agent.model, table)
            if price is None:
                return None
            answer = min(ANSWER_TOKENS, agent.max_tokens)
            total += agent.n * (prompt * price[0] + answer * price[1]) / 1_000_000
            references += agent.n * answer
    return total


def _print_tables(providers: list[dict[str, Any]], presets: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    wide = sys.stdout.isatty() or os.environ.get("COLUMNS", "").isdigit()
    console = Console() if wide else Console(width=_PIPE_WIDTH)
    table = Table(title="providers (use as PREFIX/model)", title_justify="left")
    table.add_column("prefix", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("base URL", overflow="fold")
    # Variable names are copied into shells: never cut them, let the URL column give way.
    table.add_column("key variable", no_wrap=True,
                     min_width=max(len(r["key_variable"]) for r in providers))
    table.add_column("key", no_wrap=True)
    for row in providers:
        style = {"set": "green", "missing": "red"}.get(row["key"], "dim")
        table.add_row(row["prefix"], row["kind"], row["base_url"], row["key_variable"],
                      f"[{style}]{row['key']}[/]")
    console.print(table)
    table = Table(title="presets (moa chat --preset NAME)", title_justify="left", show_lines=True)
    table.add_column("name", no_wrap=True)
    table.add_column("calls", justify="right")
    table.add_column("models (calls each)", overflow="fold")
    table.add_column("$ / request", justify="right", no_wrap=True)
    for row in presets:
        models = "\n".join(f"{m} ×{n}" for m, n in row["models"].items())
        usd = row["usd_per_request"]
        table.add_row(row["name"], str(row["calls"]), models,
                      "unknown" if usd is None else f"{usd:.4f}")
    console.print(table)
    console.print(
        f"$ / request: estimated from the price table for a {QUESTION_TOKENS}-token question "
        f"and {ANSWER_TOKENS}-token answers; local engines cost nothing.",
        style="dim",
    )
