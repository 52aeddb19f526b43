"""Progress bars of the long commands: `moa bench`, `moa eval`, `moa calibrate`.

A command runs its work inside `shown(enabled)`; the work makes a `Bar` per stage and advances
it. Bars are drawn by rich on stderr, only when stderr is a terminal and `enabled` (no
`--json`): piped or redirected output gets nothing extra, and every `Bar` is then a no-op.
The display travels in a context variable, so library code needs no extra parameter.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

_display: ContextVar[Progress | None] = ContextVar("moa_progress", default=None)


class Bar:
    """One stage of `total` steps; a no-op outside `shown()` or when no bar is drawn."""

    def __init__(self, description: str, total: int | None) -> None:
        self._progress = _display.get()
        self._task: TaskID | None = None
        if self._progress is not None:
            self._task = self._progress.add_task(description, total=total)

    def advance(self, steps: int = 1) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, steps)


@contextlib.contextmanager
def shown(enabled: bool = True) -> Iterator[None]:
    """Draw the bars made inside the block on stderr, when `enabled` and stderr is a terminal;
    they disappear when the block ends."""
    if not enabled or not sys.stderr.isatty():
        yield
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=True,
    )
    token = _display.set(progress)
    try:
        with progress:
            yield
    finally:
        _display.reset(token)
