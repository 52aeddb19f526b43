"""The package's shape: no module imports itself back at import time (no import circles)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"moa": ROOT / "moa", "moa.providers": ROOT / "providers",
            "moa.local_engine": ROOT / "local_engine"}


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for name, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((name, *parts))] = path
    return found


def _is_type_checking(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def import_time_imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules `path` imports at import time (module level, not TYPE_CHECKING)."""
    out: set[str] = set()
    stack = list(ast.parse(path.read_text()).body)
    while stack:
        node = stack.pop()
        if _is_type_checking(node):
            continue
        if isinstance(node, ast.If | ast.Try):
            stack.extend(node.body + node.orelse + getattr(node, "handlers", []) +
                         getattr(node, "finalbody", []))
        elif isinstance(node, ast.ExceptHandler):
            stack.extend(node.body)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in known else node.module)
    return {m for m in out if m in known}


def test_no_import_circles() -> None:
    known = modules()
    graph = {name: import_time_imports(path, known) for name, path in known.items()}
    assert {"moa.events", "moa.providers.base"} <= graph["moa.result"], "the parse sees imports"
    circles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                circles.append([*trail[trail.index(dep):], dep] if dep in trail else [name, dep])
            elif dep not in state:
                visit(dep, [*trail, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_the_strategies_sit_side_by_side() -> None:
    from moa.runtime.run import Run
    from moa.strategies import strategy

    kinds = {name: strategy(name) for name in ("graph", "evolve", "debate")}
    assert all(issubclass(kind, Run) for kind in kinds.values())
    assert {k.__module__ for k in kinds.values()} == {
        "moa.strategies.graph", "moa.strategies.evolve", "moa.strategies.debate"
    }
