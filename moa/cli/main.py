"""Entry point of the `moa` command: a table of subcommands, one module each.

Each subcommand module exposes `add_arguments(parser)` and `run(args) -> int`.
Errors a user can hit end with one line on stderr and a non-zero status; `--debug`
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "chat": ("moa.cli.chat", "ask a mixture once, or open a multi-turn chat"),
    "models": ("moa.cli.models", "list providers, presets and which keys are set"),
    "serve": ("moa.cli.serve", "serve mixtures over an OpenAI-compatible HTTP API"),
    "bench": ("moa.cli.bench", "run a benchmark and print a table"),
    "eval": ("moa.cli.eval", "score mixtures or routing policies on a task file"),
    "calibrate": ("moa.cli.calibrate", "fit router thresholds from a labelled set"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moa", description="Mixture-of-Agents inference.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def _version() -> str:
    from moa import __version__

    return f"moa {__version__}"


def run(argv: list[str] | None = None) -> int:
    from moa.errors import MoaError

    args = build_parser().parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt:
        print("moa: interrupted.", file=sys.stderr)
        return 130
    except MoaError as err:
        if args.debug:
            raise
        print(f"moa: {err}", file=sys.stderr)
        return 1
