"""`python -m moa.cli` runs the `moa` command."""

from moa.cli import main

raise SystemExit(main())
