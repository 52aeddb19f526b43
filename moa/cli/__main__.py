"""`python -m moa.cli` runs the `moa` command."""

from moa.cli.main import run

raise SystemExit(run())
