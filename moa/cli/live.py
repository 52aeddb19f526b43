"""The rich live view of `moa chat` on a terminal.

While a run goes: one panel per proposer of the layer that is running (the tail of its
stream), a status line per agent (waiting / streaming / done / cut / failed, tokens, seconds,
and why a waiting agent waits: queued for the engine, evaluating the prompt, or retrying with
the attempt number), the time, tokens and cost so far, and the answer as it arrives. The frame
always fits the terminal: when space runs short the proposer panels fold to one line each,
then away, and the answer shows its latest lines. "cut" means an agent stopped at its
max_tokens; "stopped" means a debate ended before that agent's round (its debaters agreed).
A debate's agents are its rounds' debaters (R1.1, R2.1, …): the panels show the round running.
Afterwards the status table, the answer as Markdown (with a truncation mark when
it was cut) and a summary line stay on screen; after Ctrl-C, what was written so far stays.
"""

from __future__ import annotations

import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.markdown import Markdown
from rich.panel import Panel
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

from moa.cli.views import summary_line, truncation_note
from moa.events import (
    AgentDelta,
    AgentFailed,
    AgentFinished,
    AgentId,
    AgentRetrying,
    AgentStarted,
    AgentWaiting,
    Event,
    FinalDelta,
    Notice,
    RunStarted,
    UsageReport,
)

if TYPE_CHECKING:
    from rich.live import Live

    from moa.result import MixtureResult

_STYLE = {"waiting": "dim", "streaming": "cyan", "done": "green", "cut": "yellow", "failed": "red",
          "stopped": "dim"}
_WHY = {"queued": "queued for the engine", "prompt": "evaluating the prompt"}
_PANEL_LINES = 6
_PANELS_PER_ROW = 3
_MIN_ANSWER_LINES = 4
"""Lines of the answer kept visible before the status table is cropped."""

Lines = list[list[Segment]]


@dataclass
class _AgentState:
    agent: AgentId
    status: str = "waiting"
    text: str = ""
    tokens: int = 0
    started: float | None = None
    seconds: float | None = None
    error: str = ""
    why: str = ""
    """Why it streams nothing now (queued, evaluating the prompt, retrying)."""


class LiveView:
    """Renders the events of one run with `rich.live.Live` (thread-safe updates)."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self._lock = threading.Lock()
        self._agents: dict[AgentId, _AgentState] = {}
        self._answer = ""
        self._notices: list[str] = []
        self._cost = 0.0
        self._cached = 0
        """Prompt tokens the backends read from their prompt caches so far."""
        self._priced = False
        self._unpriced: set[str] = set()
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
        """End the live frame. After Ctrl-C (called while KeyboardInterrupt is handled), what
        was written stays: the statuses and the answer so far, or the proposers' panels when
        the answer had not begun. A failed run leaves the screen to its one error line."""
        self._stop()
        if not isinstance(sys.exc_info()[1], KeyboardInterrupt):
            return
        with self._lock:
            if not self._answer:
                self.console.print(self._panels(self.console.width))
            self.console.print(self._status_table(final=True))
            if self._answer:
                self.console.print(Markdown(self._answer))
                self.console.print(Text("[interrupted]", style="yellow"))

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
        elif isinstance(event, AgentWaiting):
            state.why = _WHY[event.why]
        elif isinstance(event, AgentRetrying):
            state.why = f"retrying (attempt {event.attempt}): {event.reason}"
        elif isinstance(event, AgentDelta):
            state.status, state.why = "streaming", ""
            state.text += event.text
            state.tokens += 1
        elif isinstance(event, AgentFinished):
            state.status, state.seconds = _finished(event.finish_reason), event.latency_s
            state.text, state.why = event.text or state.text, ""
        elif isinstance(event, AgentFailed):
            state.status, state.error, state.why = "failed", event.error, ""
            state.seconds = None if state.started is None else event.t - state.started
        elif isinstance(event, UsageReport):
            state.tokens = event.usage.completion_tokens or state.tokens
            self._cached += event.usage.cached_tokens
            self._priced = True
            if event.cost_usd is not None:
                self._cost += event.cost_usd
            elif event.usage.total_tokens:
                self._unpriced.add(agent.model)

    def _elapsed(self, state: _AgentState) -> float | None:
        if state.seconds is not None:
            return state.seconds
        if state.started is None:
            return None
        return time.monotonic() - self._t0 - state.started

    # ---- the live frame --------------------------------------------------------------------

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        with self._lock:
            lines = self._frame(console, options)
        for line in lines:
            yield from line
            yield Segment.line()

    def _frame(self, console: Console, options: ConsoleOptions) -> Lines:
        """Proposers, status table, totals and answer, in at most the terminal's height less
        one line: the answer's latest lines first, then the table, then the proposers."""
        width, height = options.max_width, options.size.height - 1

        def render(renderable: RenderableType, at: int = width) -> Lines:
            return console.render_lines(
                renderable, options.update(width=at, height=None), pad=False
            )

        table = render(Group(self._status_table(final=False), self._totals()))
        answer = render(Markdown(self._answer), width - 4) if self._answer else []
        least = 2 + min(len(answer), _MIN_ANSWER_LINES) if answer else 0
        if len(table) + least > height:  # keep the header and the latest agents
            keep = max(height - least - 1, 0)
            table = table[:1] + table[len(table) - keep :] if keep else []
        room = height - len(table)
        panels, folded = render(self._panels(width)), render(self._folded())
        if not answer or len(panels) + 2 + len(answer) <= room:
            proposers = panels if len(panels) + least <= room else folded
        else:
            proposers = folded
        if len(proposers) + least > room:
            proposers = []
        frame = proposers + table
        shown = room - len(proposers) - 2
        if answer and shown > 0:
            tail = _Lines(answer[-shown:])
            frame += render(Panel(tail, title="answer", border_style="green"))
        return frame

    def _proposers(self) -> list[_AgentState]:
        """The proposers of the latest layer that has started."""
        proposers = [s for s in self._agents.values() if not s.agent.final]
        layer = max((s.agent.layer for s in proposers if s.started is not None), default=0)
        return [s for s in proposers if s.agent.layer == layer]

    def _panels(self, width: int) -> Table:
        """A panel per proposer with the tail of its stream."""
        shown = self._proposers()
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
        tail = "\n".join(lines[-_PANEL_LINES:]) if lines else _note(state) or state.status
        return Panel(
            Text(tail, no_wrap=False), title=state.agent.label, title_align="left",
            border_style=_STYLE[state.status], height=_PANEL_LINES + 2,
        )

    def _folded(self) -> Group:
        """One line per proposer: its label and the last line of its stream."""
        lines = []
        for state in self._proposers():
            last = next((x for x in reversed(state.text.splitlines()) if x.strip()), "")
            line = Text.assemble((state.agent.label, _STYLE[state.status]), "  ",
                                 last.strip() or _note(state) or state.status)
            line.no_wrap, line.overflow = True, "ellipsis"
            lines.append(line)
        return Group(*lines)

    def _status_table(self, *, final: bool) -> Table:
        """A line per agent; live, the last column (why it waits) is cut to fit one line."""
        table = Table(box=None, show_header=not final, pad_edge=False, expand=not final)
        for name, justify in (("agent", "left"), ("status", "left"), ("tokens", "right"),
                              ("seconds", "right")):
            table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
        table.add_column("", no_wrap=not final, overflow="ellipsis", ratio=None if final else 1)
        for state in self._agents.values():
            seconds = self._elapsed(state)
            table.add_row(
                state.agent.label,
                Text(state.status, style=_STYLE[state.status]),
                str(state.tokens),
                "" if seconds is None else f"{seconds:.1f}",
                Text(_note(state), style="red" if state.error else "dim"),
            )
        return table

    def _totals(self) -> Text:
        """Time, tokens, cached prompt tokens (when any) and cost so far (the cost once a call
        has reported its usage)."""
        tokens = sum(s.tokens for s in self._agents.values())
        parts = [f"{time.monotonic() - self._t0:.1f} s", f"{tokens:,} tokens"]
        if self._cached:
            parts.append(f"{self._cached:,} cached prompt tokens")
        if self._unpriced:
            parts.append(f"cost unknown (no price for {', '.join(sorted(self._unpriced))})")
        elif self._priced:
            parts.append(f"${self._cost:.4f} so far")
        return Text(" · ".join(parts), style="dim", no_wrap=True, overflow="ellipsis")


class _Lines:
    """Rendered lines, as a renderable."""

    def __init__(self, lines: Lines) -> None:
        self.lines = lines

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for line in self.lines:
            yield from line
            yield Segment.line()


def _note(state: _AgentState) -> str:
    return state.error or state.why


def _finished(finish_reason: str | None) -> str:
    """"cut" at max_tokens, "stopped" when a debate ended before its round, else "done"."""
    return {"length": "cut", "consensus": "stopped"}.get(finish_reason or "", "done")
