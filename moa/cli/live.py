"""The rich live view of `moa chat` on a terminal.

While a run goes: one panel per proposer of the layer that is running (the tail of its
stream), a status line per agent (waiting / streaming / done / cut / failed, tokens, seconds)
and the answer as it arrives. An agent is "waiting" until its first token (a queued call on
an embedded engine included); "cut" means it stopped at its max_tokens. Afterwards the status
table, the answer as Markdown (with a truncation mark when it was cut) and a summary line stay
on screen.
"""

from __future__ import annotations

import textwrap
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.markdown import Markdown
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from moa.cli.views import summary_line, truncation_note
from moa.events import (
    AgentDelta,
    AgentFailed,
    AgentFinished,
    AgentId,
    AgentStarted,
    Event,
    FinalDelta,
    Notice,
    RunStarted,
    UsageReport,
)

if TYPE_CHECKING:
    from rich.live import Live

    from moa.result import MixtureResult

_STYLE = {"waiting": "dim", "streaming": "cyan", "done": "green", "cut": "yellow", "failed": "red"}
_PANEL_LINES = 6
_PANELS_PER_ROW = 3


@dataclass
class _AgentState:
    agent: AgentId
    status: str = "waiting"
    text: str = ""
    tokens: int = 0
    started: float | None = None
    seconds: float | None = None
    error: str = ""


class LiveView:
    """Renders the events of one run with `rich.live.Live` (thread-safe updates)."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self._lock = threading.Lock()
        self._agents: dict[AgentId, _AgentState] = {}
        self._answer = ""
        self._notices: list[str] = []
        self._t0 = time.monotonic()
        self._live: Live | None = None

    def start(self) -> None:
        from rich.live import Live

        self._t0 = time.monotonic()
        self._live = Live(
            self, console=self.console, refresh_per_second=8, transient=True,
            vertical_overflow="ellipsis",
        )
        self._live.start()

    def on_event(self, event: Event) -> None:
        with self._lock:
            self._apply(event)

    def finish(self, result: MixtureResult) -> None:
        self._stop()
        for out in result.outputs:
            state = self._agents.setdefault(out.agent, _AgentState(out.agent))
            state.status = _finished(out.finish_reason) if out.ok else "failed"
            state.tokens = out.usage.completion_tokens or state.tokens
            state.seconds = out.latency_s if out.latency_s is not None else state.seconds
            state.error = out.error or ""
        self.console.print(self._status_table(final=True))
        for notice in self._notices:
            self.console.print(f"[yellow]note:[/] {notice}", highlight=False)
        self.console.print(Markdown(result.text or "_(empty answer)_"))
        if (cut := truncation_note(result)) is not None:
            self.console.print(Text(f"[truncated: {cut}]", style="yellow"))
        self.console.print(Text(summary_line(result), style="dim"))

    def abort(self) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def _apply(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self._t0 = time.monotonic() - event.t
            self._agents = {a: _AgentState(a) for a in event.agents}
            return
        if isinstance(event, FinalDelta):
            self._answer += event.text
            return
        if isinstance(event, Notice):
            if event.kind != "auto":  # `auto` chose layered mode as designed: nothing to flag
                self._notices.append(event.message)
            return
        agent = getattr(event, "agent", None)
        if agent is None:
            return
        state = self._agents.setdefault(agent, _AgentState(agent))
        state.agent = agent  # a routed stage's id names its tier once the router decided
        if isinstance(event, AgentStarted):
            state.started = event.t  # still "waiting" until its first token
        elif isinstance(event, AgentDelta):
            state.status = "streaming"
            state.text += event.text
            state.tokens += 1
        elif isinstance(event, AgentFinished):
            state.status, state.seconds = _finished(event.finish_reason), event.latency_s
            state.text = event.text or state.text
        elif isinstance(event, AgentFailed):
            state.status, state.error = "failed", event.error
            state.seconds = None if state.started is None else event.t - state.started
        elif isinstance(event, UsageReport):
            state.tokens = event.usage.completion_tokens or state.tokens

    def _elapsed(self, state: _AgentState) -> float | None:
        if state.seconds is not None:
            return state.seconds
        if state.started is None:
            return None
        return time.monotonic() - self._t0 - state.started

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        with self._lock:
            parts = [self._panels(options.max_width), self._status_table(final=False)]
            if self._answer:
                parts.append(Panel(Markdown(self._answer), title="answer", border_style="green"))
        yield Group(*parts)

    def _panels(self, width: int) -> Table:
        """Panels of the proposers of the latest layer that has started."""
        proposers = [s for s in self._agents.values() if not s.agent.final]
        started = [s.agent.layer for s in proposers if s.started is not None]
        layer = max(started, default=0)
        shown = [s for s in proposers if s.agent.layer == layer]
        columns = max(1, min(len(shown), _PANELS_PER_ROW))
        grid = Table.grid(expand=True, padding=(0, 1))
        for _ in range(columns):
            grid.add_column(ratio=1)
        inner = max(10, width // columns - 5)
        for row in range(0, len(shown), columns):
            cells = [self._panel(s, inner) for s in shown[row : row + columns]]
            grid.add_row(*cells)
        return grid

    def _panel(self, state: _AgentState, width: int) -> Panel:
        lines = [w for line in state.text.splitlines() for w in textwrap.wrap(line, width) or [""]]
        tail = "\n".join(lines[-_PANEL_LINES:]) if lines else state.error or state.status
        return Panel(
            Text(tail, no_wrap=False), title=state.agent.label, title_align="left",
            border_style=_STYLE[state.status], height=_PANEL_LINES + 2,
        )

    def _status_table(self, *, final: bool) -> Table:
        table = Table(box=None, show_header=not final, pad_edge=False)
        for name, justify in (("agent", "left"), ("status", "left"), ("tokens", "right"),
                              ("seconds", "right"), ("", "left")):
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
        for state in self._agents.values():
            seconds = self._elapsed(state)
            table.add_row(
                state.agent.label,
                Text(state.status, style=_STYLE[state.status]),
                str(state.tokens),
                "" if seconds is None else f"{seconds:.1f}",
                Text(state.error, style="red"),
            )
        return table


def _finished(finish_reason: str | None) -> str:
    return "cut" if finish_reason == "length" else "done"
