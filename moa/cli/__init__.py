"""The `moa` command line."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from moa.cli.main import run

    return run(argv)
