"""Entry point of the `moa` command: a table of subcommands, one module each.

Each subcommand module exposes `add_arguments(parser)` and `run(args) -> int`. Only the
chosen command's module is imported, so one missing or broken module never breaks the others
or `moa --help`. Errors a user can hit end with one line on stderr and a non-zero status;
`--debug` (before or after the command) shows the traceback (and debug logs) instead.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from types import ModuleType

COMMANDS: dict[str, tuple[str, str]] = {
    "chat": ("moa.cli.chat", "ask a mixture once, or open a multi-turn chat"),
    "models": ("moa.cli.models", "list providers, presets and which keys are set"),
    "serve": ("moa.cli.serve", "serve mixtures over an OpenAI-compatible HTTP API"),
    "bench": ("moa.cli.bench", "run a benchmark and print a table"),
    "eval": ("moa.cli.eval", "score mixtures or routing policies on a task file"),
    "calibrate": ("moa.cli.calibrate", "fit router thresholds from a labelled set"),
}

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


class CommandUnavailable(Exception):
    """The module of a subcommand cannot be imported."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `moa` parser; only `command`'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(prog="moa", description="Mixture-of-Agents inference.")
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument(
        "--debug", action="store_true", dest="debug_first", help="show tracebacks and debug logs"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
        p.set_defaults(_module=module)
        if name == command:
            load_command(name).add_arguments(p)
    return parser


def load_command(name: str) -> ModuleType:
    """Import a subcommand's module, or raise `CommandUnavailable` with one clear line."""
    module = COMMANDS[name][0]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        missing = getattr(err, "name", None)
        what = "is not part of this build" if missing == module else f"needs {missing or err}"
        raise CommandUnavailable(f"Command 'moa {name}' {what}.") from err


def _version() -> str:
    from moa import __version__

    return f"moa {__version__}"


def _chosen(argv: list[str]) -> str | None:
    """The subcommand named in argv (top-level options take no values)."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in COMMANDS else None


def run(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]), run the subcommand and return the exit status."""
    from moa.errors import MoaError

    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    command = _chosen(argv)
    try:
        parser = build_parser(command)
    except CommandUnavailable as err:
        if debug:
            raise
        return _fail(str(err))
    args = parser.parse_args(argv)
    args.debug = args.debug or args.debug_first
    if args.debug:
        logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
        logging.getLogger("moa").setLevel(logging.DEBUG)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("moa: interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MoaError as err:
        if args.debug:
            raise
        return _fail(str(err))
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_ERROR
    except Exception as err:
        if args.debug:
            raise
        return _fail(f"unexpected {type(err).__name__}: {err} (rerun with --debug for details)")


def _silence_stdout() -> None:
    """The reader of stdout went away (e.g. `| head`): drop what is left, quietly."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _fail(message: str) -> int:
    print(f"moa: {message}", file=sys.stderr)
    return EXIT_ERROR
