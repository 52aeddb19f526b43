"""`moa bench NAME [--json] ...`: run the benchmark module `moa.bench.NAME`.

A bench module exposes `add_arguments(parser)` and `run(args)` returning rows, or
`(rows, notes)`; its own flags follow NAME (`moa bench NAME --help` lists them). Only the
chosen module is imported, so a missing bench is one clear line, never a traceback. On a
terminal, a bench's progress bars (`moa.cli.progress`) are drawn on stderr unless `--json`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from types import ModuleType

from moa.bench import BENCHES, print_rows
from moa.cli.progress import shown
from moa.errors import MoaError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "name", nargs="?", metavar="NAME", help="the bench to run; omit to list them"
    )
    parser.add_argument(
        "bench_args", nargs=argparse.REMAINDER, metavar="...",
        help="the bench's own flags (see `moa bench NAME --help`)",
    )
    parser.epilog = "benches: " + ", ".join(BENCHES)


def run(args: argparse.Namespace) -> int:
    if args.name is None:
        for name, text in BENCHES.items():
            print(f"{name:10} {text}{'' if _built(name) else '  (not part of this build yet)'}")
        return 0
    if args.name not in BENCHES:
        raise MoaError(f"Unknown bench {args.name!r}; benches: {', '.join(BENCHES)}.")
    module = _load(args.name)
    parser = argparse.ArgumentParser(
        prog=f"moa bench {args.name}", description=BENCHES[args.name],
        conflict_handler="resolve",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object with the rows")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    module.add_arguments(parser)
    bench_args = parser.parse_args(args.bench_args)
    args.debug = args.debug or bench_args.debug
    with shown(not bench_args.json):
        out = module.run(bench_args)
    rows, notes = out if isinstance(out, tuple) else (out, [])
    print_rows(args.name, rows, as_json=bench_args.json, notes=notes)
    return 0


def _built(name: str) -> bool:
    """Whether the bench's module exists (found without importing it)."""
    module = f"moa.bench.{name}"
    return module in sys.modules or importlib.util.find_spec(module) is not None


def _load(name: str) -> ModuleType:
    module = f"moa.bench.{name}"
    try:
        return importlib.import_module(module)
    except ImportError as err:
        if getattr(err, "name", None) == module:
            raise MoaError(f"Bench {name!r} is not part of this build yet.") from None
        raise MoaError(f"Bench {name!r} needs {getattr(err, 'name', None) or err}.") from None
