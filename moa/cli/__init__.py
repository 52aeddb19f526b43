"""The `moa` command line; the entry point is `moa.cli.main.run`."""
