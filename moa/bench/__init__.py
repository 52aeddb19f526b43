"""Benchmarks behind `moa bench NAME`.

Each module `moa.bench.NAME` exposes `add_arguments(parser)` and `run(args) -> list[dict]`;
the rows are printed as one table, or with `--json` as one object `{"bench": NAME, "rows": [...]}`.
"""

from __future__ import annotations

import json
import sys
from typing import Any

BENCHES: dict[str, str] = {
    "overhead": "orchestration overhead against the critical path (loopback server)",
    "staircase": "layered vs staircase TTFT and end-to-end time",
    "local": "CPU engine tokens/s alone vs self-MoA, sequential vs concurrent",
    "serve": "concurrent streaming clients through `moa serve`",
    "routing": "cost and accuracy of routing policies on a simulated two-tier task",
    "quality": "accuracy of one model alone vs mixtures of it on the shipped task set",
    "debate": "multi-agent debate layered vs staircase, and the consensus stop (loopback)",
}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def print_rows(
    name: str, rows: list[dict[str, Any]], *, as_json: bool, notes: list[str] | tuple[str, ...] = ()
) -> None:
    """Print benchmark rows as a table (columns = union of keys, first-seen order) or JSON."""
    if as_json:
        json.dump({"bench": name, "rows": rows, "notes": list(notes)}, sys.stdout, default=str)
        sys.stdout.write("\n")
        return
    from rich.console import Console
    from rich.table import Table

    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    table = Table(title=f"moa bench {name}")
    for col in columns:
        text = bool(rows) and isinstance(rows[0].get(col), str)
        table.add_column(col, justify="left" if text else "right")
    for row in rows:
        table.add_row(*(_fmt(row.get(c)) for c in columns))
    console = Console() if sys.stdout.isatty() else Console(width=200)
    console.print(table)
    for note in notes:
        console.print(note)
