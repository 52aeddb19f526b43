"""Mixture options shared by `moa chat` and `moa serve`, and how they build a `MixtureConfig`.

Precedence, lowest first: the preset (`--preset`, else a `preset` key in the config file,
else `$MOA_PRESET`, else `local` — unless proposers come from the file or `-p`), then the
config file (`-c`), then the command-line flags, which always win.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from moa.config import (
    MAX_LAYERS,
    MAX_TOKENS,
    MixtureConfig,
    from_dict,
    preset,
    read_file,
    with_preset,
)
from moa.errors import ConfigError, MissingKeyError
from moa.providers.registry import Registry, split_ref

DEFAULT_PRESET = "local"
PRESET_ENV = "MOA_PRESET"


def add_mixture_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags that select and shape a mixture."""
    group = parser.add_argument_group("mixture")
    group.add_argument(
        "-p", "--proposer", metavar="MODEL", action="append", default=None,
        help="proposer model 'provider/model'; repeat for several (replaces the preset's)",
    )
    group.add_argument(
        "-a", "--aggregator", metavar="MODEL",
        help="final aggregator model (default: the preset's, else the first -p)",
    )
    group.add_argument(
        "-l", "--layers", metavar="N", type=int,
        help="total layers including the final aggregator (MoA = 3, MoA-Lite = 2)",
    )
    group.add_argument(
        "--preset", metavar="NAME",
        help=f"preset mixture (default: ${PRESET_ENV}, else '{DEFAULT_PRESET}'); see `moa models`",
    )
    group.add_argument(
        "-c", "--config", metavar="FILE", help="mixture config file (.toml or .json)"
    )
    group.add_argument(
        "--temperature", type=float, metavar="T", help="sampling temperature of every agent"
    )
    group.add_argument(
        "--max-tokens", type=int, metavar="N",
        help="max tokens of the final answer, like run(max_tokens=...) (proposers keep theirs)",
    )
    group.add_argument(
        "--mode", choices=["layered", "staircase", "auto"],
        help="execution mode (default: the config's, else auto)",
    )
    group.add_argument("--deadline", type=float, metavar="SECONDS", help="whole-request deadline")
    group.add_argument(
        "--budget-usd", type=float, metavar="USD",
        help="hard per-request budget in US dollars: a call that could pass it is not started",
    )
    group.add_argument(
        "--budget-tokens", type=int, metavar="N",
        help="hard per-request budget in tokens (prompt + completion, every call)",
    )


def config_data(path: str | None) -> dict[str, Any]:
    """The raw (unvalidated) contents of a config file, or {} without one."""
    return dict(read_file(path)) if path else {}


def mixture_from_args(args: argparse.Namespace) -> MixtureConfig:
    """Build the mixture the flags describe; flags override the config file and the preset."""
    file_data = config_data(args.config)
    file_preset = file_data.pop("preset", None)
    proposers: list[str] = args.proposer or []
    for ref in [*proposers, *([args.aggregator] if args.aggregator else [])]:
        split_ref(ref)

    preset_name = args.preset or file_preset
    if preset_name is None and not proposers and not {"layers", "debate"} & set(file_data):
        preset_name = os.environ.get(PRESET_ENV) or DEFAULT_PRESET
    base = preset(preset_name).model_dump() if preset_name else {}
    data = with_preset(base, file_data)

    if proposers:
        data["layers"] = [_layer(proposers, layer) for layer in _dicts(data.get("layers")) or [{}]]
    if args.aggregator:
        data["aggregator"] = {"model": args.aggregator}
    elif proposers and "aggregator" not in data:
        data["aggregator"] = {"model": proposers[0]}
    if args.layers is not None:
        data["layers"] = _resize(data.get("layers") or [], args.layers)
    _set_on_agents(data, "temperature", args.temperature)
    if args.max_tokens is not None and args.max_tokens > MAX_TOKENS:
        raise ConfigError(f"--max-tokens must be at most {MAX_TOKENS}.")
    if args.max_tokens is not None and data.get("strategy") == "debate":
        _set_on_agents(data, "max_tokens", args.max_tokens)  # any debater may write the answer
    elif args.max_tokens is not None:
        data["aggregator"] = {**_agent_table(data.get("aggregator")), "max_tokens": args.max_tokens}
    if args.mode:
        data["mode"] = args.mode
    if args.deadline is not None:
        data["deadline_s"] = args.deadline
    for key, value in (("usd", args.budget_usd), ("tokens", args.budget_tokens)):
        if value is not None:
            budget = data.get("budget")
            data["budget"] = {**(budget if isinstance(budget, dict) else {}), key: value}
    if proposers or args.aggregator or args.layers is not None:
        data["name"] = file_data.get("name", "custom")
    source = f"{args.config!r} with the flags" if args.config else "from the command line"
    return from_dict(data, source=source)


def check_keys(config: MixtureConfig, registry: Registry | None = None) -> None:
    """Fail before any call when a provider the mixture uses needs a key that is not set."""
    check_model_keys(config.registry(registry), [agent.model for agent in config.agents()])


def check_model_keys(registry: Registry, refs: list[str]) -> None:
    """Fail before any call when the provider of one of `refs` needs a key that is not set."""
    for ref in refs:
        spec, _ = registry.check(ref)
        if spec.key_required and spec.api_key() is None:
            raise MissingKeyError(spec.prefix, spec.key_variable)


def _layer(models: list[str], base: dict[str, Any]) -> dict[str, Any]:
    """A layer of fresh agents for `models`, keeping the base layer's quorum where it fits."""
    quorum = base.get("min_proposers", 1)  # not a number: left for validation to report
    if isinstance(quorum, int):
        quorum = min(quorum, len(models))
    return {"agents": [{"model": m} for m in models], "min_proposers": quorum}


def _resize(layers: list[Any], total: int) -> list[Any]:
    """Proposer layers for `total` layers in all (the final aggregator is the last one)."""
    if not 2 <= total <= MAX_LAYERS + 1:
        raise ConfigError(
            f"--layers must be from 2 to {MAX_LAYERS + 1}: proposer layers plus the aggregator."
        )
    if not isinstance(layers, list):
        raise ConfigError("Invalid config: field 'layers' must be a list of layers.")
    if not layers:
        raise ConfigError("--layers needs proposers: give -p MODEL or a preset.")
    wanted = total - 1
    return [layers[min(i, len(layers) - 1)] for i in range(wanted)]


def _set_on_agents(data: dict[str, Any], field: str, value: Any) -> None:
    """Set `field` on every agent (proposers and aggregator) when the flag was given."""
    if value is None:
        return
    layers = [
        dict(layer, agents=_dicts(layer.get("agents"))) for layer in _dicts(data.get("layers"))
    ]
    for layer in layers:
        for agent in layer["agents"]:
            agent[field] = value
    data["layers"] = layers
    if isinstance(data.get("debate"), dict):
        debate = data["debate"]
        data["debate"] = {**debate, "agents": [{**a, field: value}
                                               for a in _dicts(debate.get("agents"))]}
    if isinstance(data.get("aggregator"), dict):
        data["aggregator"] = {**data["aggregator"], field: value}


def _agent_table(agent: Any) -> dict[str, Any]:
    """A copy of an agent table (a bare model reference becomes `{"model": ref}`)."""
    if isinstance(agent, str):
        return {"model": agent}
    return dict(agent) if isinstance(agent, dict) else {}


def _dicts(items: Any) -> list[dict[str, Any]]:
    """Copies of the tables in a list (anything else is left for validation to report)."""
    return [dict(i) for i in items if isinstance(i, dict)] if isinstance(items, list) else []
