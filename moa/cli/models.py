"""`moa models`: the configured providers (and whether each key is set) and the presets.

Keys are never printed: only the name of the variable and whether it is set.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pydantic import ValidationError

from moa.cli.options import config_data
from moa.config import PRESETS, preset
from moa.errors import ConfigError
from moa.providers.registry import ProviderSpec, Registry, default_registry
from moa.providers.secrets import mask_url

_PIPE_WIDTH = 140
"""Table width when stdout is not a terminal (nothing truncated in pipes and files)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c", "--config", metavar="FILE", help="also list the providers this config file adds"
    )
    parser.add_argument("--json", action="store_true", help="print providers and presets as JSON")


def run(args: argparse.Namespace) -> int:
    providers = [_provider_row(spec) for spec in _registry_specs(args.config)]
    presets = [
        {"name": name, "calls": preset(name).call_count, "description": text}
        for name, text in PRESETS.items()
    ]
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


def _print_tables(providers: list[dict[str, Any]], presets: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console() if sys.stdout.isatty() else Console(width=_PIPE_WIDTH)
    table = Table(title="providers (use as PREFIX/model)", title_justify="left")
    for column in ("prefix", "kind", "base URL", "key variable", "key"):
        table.add_column(column)
    for row in providers:
        style = {"set": "green", "missing": "red"}.get(row["key"], "dim")
        table.add_row(row["prefix"], row["kind"], row["base_url"], row["key_variable"],
                      f"[{style}]{row['key']}[/]")
    console.print(table)
    table = Table(title="presets (moa chat --preset NAME)", title_justify="left")
    for column in ("name", "calls", "description"):
        table.add_column(column, justify="right" if column == "calls" else "left")
    for row in presets:
        table.add_row(row["name"], str(row["calls"]), row["description"])
    console.print(table)
