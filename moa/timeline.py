"""Each agent's tokens over time, from a run's events, drawn as a self-contained SVG.

`Timeline` records one run (give it every event; recording is cheap, tokens are counted when
drawn, so a benchmark's timing is not disturbed). `write_svg(path, timelines)` draws one panel
per run, stacked on shared axes (seconds, tokens): a line per agent — proposers, intermediate
aggregators, the final aggregator, whose staircase steps show as stairs — and a dashed vertical
line where the answer's first token arrived. No dependency: the SVG is written by hand.
`TimelineView` wraps a `moa chat` view (`--timeline PATH`); `moa bench staircase --plot PATH`
draws every run of the bench.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import escape, quoteattr

from moa.errors import MoaError
from moa.events import (
    AgentDelta,
    AgentFailed,
    AgentFinished,
    AgentId,
    AgentStarted,
    Event,
    FinalDelta,
    FinalToolCallDelta,
    RunFailed,
    RunFinished,
    RunStarted,
)

if TYPE_CHECKING:
    from moa.cli.views import View
    from moa.result import MixtureResult

PALETTE = ("#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22")
FINAL_COLOR = "#d62728"
_WIDTH, _LEFT, _PLOT_W, _PLOT_H, _TOP, _BOTTOM, _ROW = 940, 64, 600, 240, 34, 42, 16


@dataclass
class Track:
    """One agent's line: (seconds since the run started, tokens written so far)."""

    agent: AgentId
    points: list[tuple[float, int]] = field(default_factory=list)
    failed: bool = False

    @property
    def tokens(self) -> int:
        return self.points[-1][1] if self.points else 0


class Timeline:
    """Records a run's events; `tracks()` and `ttft_s` are what `write_svg` draws."""

    def __init__(self, title: str = "") -> None:
        self.title = title
        """Shown above the panel; by default "<mixture> · <mode>" from `RunStarted`."""
        self.ttft_s: float | None = None
        """When the answer's first token arrived (the result's TTFT once the run finished)."""
        self.end_s = 0.0
        self._agents: dict[str, AgentId] = {}
        self._events: list[tuple[str, float, str]] = []
        self._failed: set[str] = set()

    def on_event(self, event: Event) -> None:
        """Record one event of the run (cheap: no token counting here)."""
        self.end_s = max(self.end_s, event.t)
        if isinstance(event, AgentStarted | AgentDelta | AgentFinished | AgentFailed):
            key = event.agent.key
            self._agents[key] = event.agent
            if isinstance(event, AgentStarted):
                self._events.append((key, event.t, ""))
            elif isinstance(event, AgentDelta):
                self._events.append((key, event.t, event.text))
            elif isinstance(event, AgentFailed):
                self._failed.add(key)
        elif isinstance(event, RunStarted) and not self.title:
            self.title = f"{event.mixture} · {event.mode}"
        elif isinstance(event, FinalDelta | FinalToolCallDelta) and self.ttft_s is None:
            self.ttft_s = event.t
        elif isinstance(event, RunFinished | RunFailed):
            result = event.result
            if result is not None and result.ttft_s is not None:
                self.ttft_s = result.ttft_s

    def tracks(self) -> list[Track]:
        """One track per agent that started, proposers first, the final aggregator last."""
        from moa.tokens import count_tokens

        tracks = {key: Track(agent, failed=key in self._failed)
                  for key, agent in self._agents.items()}
        for key, t, text in self._events:
            track = tracks[key]
            track.points.append((t, track.tokens + (count_tokens(text) if text else 0)))
        return sorted((t for t in tracks.values() if t.points),
                      key=lambda t: (t.agent.final, t.agent.layer, t.agent.index))


class TimelineView:
    """A `moa chat` view that passes every event on to `view` and, when the run ends (or is
    cut short), draws its timeline to `path`."""

    def __init__(self, view: View, path: str | Path, *, quiet: bool = False) -> None:
        self.view, self.path, self.quiet = view, path, quiet
        self.timeline = Timeline()

    def __getattr__(self, name: str) -> Any:
        if name == "view":  # not set yet (e.g. while copying): no recursion
            raise AttributeError(name)
        return getattr(self.view, name)  # anything else a view offers passes through

    def start(self) -> None:
        self.timeline = Timeline()
        self.view.start()

    def on_event(self, event: Event) -> None:
        self.timeline.on_event(event)
        self.view.on_event(event)

    def finish(self, result: MixtureResult) -> None:
        self.view.finish(result)
        self._write()

    def abort(self) -> None:
        """Draw what the run did before it failed or was cut (silently: the error is the one
        line the command ends with)."""
        self.view.abort()
        if self.timeline.tracks():
            write_svg(self.path, [self.timeline])

    def _write(self) -> None:
        write_svg(self.path, [self.timeline])
        if not self.quiet:
            print(f"moa: timeline written to {self.path}", file=sys.stderr, flush=True)


def check_output_path(path: str | Path, flag: str) -> None:
    """Fail before any call when `path` cannot be written: a folder, or in a missing one."""
    target = Path(path)
    if target.is_dir():
        raise MoaError(f"{flag} {str(path)!r} is a folder; give a file name, e.g. run.svg.")
    if not target.parent.is_dir():
        raise MoaError(f"{flag} {str(path)!r}: the folder {str(target.parent)!r} does not exist.")


def write_svg(path: str | Path, timelines: list[Timeline]) -> None:
    """Write the timelines as one SVG file: a panel per run, stacked, on shared axes."""
    Path(path).write_text(render_svg(timelines), encoding="utf-8")


def render_svg(timelines: list[Timeline]) -> str:
    """The SVG text of `write_svg`."""
    drawn = [(tl, tl.tracks()) for tl in timelines]
    t_max = _nice_max(max((tl.end_s for tl in timelines), default=1.0))
    n_max = _nice_max(max([5, *(t.tokens for _, tracks in drawn for t in tracks)]))  # whole ticks
    parts: list[str] = []
    top = 0.0
    for timeline, tracks in drawn:
        panel, height = _panel(timeline, tracks, top, t_max, n_max)
        parts.append(panel)
        top += height
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{top:.0f}" '
            f'viewBox="0 0 {_WIDTH} {top:.0f}" font-family="sans-serif" font-size="12">\n'
            f'<rect width="100%" height="100%" fill="white"/>\n')
    return head + "".join(parts) + "</svg>\n"


def _panel(
    timeline: Timeline, tracks: list[Track], top: float, t_max: float, n_max: float
) -> tuple[str, float]:
    """One run's panel at height `top`; returns its SVG and its height."""
    plot_h = max(_PLOT_H, _ROW * len(tracks) + 8)
    x0, y0 = _LEFT, top + _TOP

    def x(t: float) -> float:
        return x0 + _PLOT_W * t / t_max

    def y(n: float) -> float:
        return y0 + plot_h - plot_h * n / n_max

    ttft = "n/a" if timeline.ttft_s is None else f"{timeline.ttft_s:.2f} s"
    title = f"{timeline.title} — " if timeline.title else ""
    out = [
        f'<g class="panel" data-title={quoteattr(timeline.title)}>\n',
        f'<text x="{x0}" y="{top + 20:.1f}" font-size="14" font-weight="bold">'
        f"{escape(title)}answer starts {ttft} · ends {timeline.end_s:.2f} s</text>\n",
        f'<rect class="plot" x="{x0}" y="{y0:.1f}" width="{_PLOT_W}" height="{plot_h}" '
        f'fill="none" stroke="#999" data-t-max="{t_max:g}" data-tokens-max="{n_max:g}"/>\n',
    ]
    for t in _ticks(t_max):
        out.append(f'<line x1="{x(t):.1f}" y1="{y0 + plot_h:.1f}" x2="{x(t):.1f}" '
                   f'y2="{y0 + plot_h + 4:.1f}" stroke="#999"/>'
                   f'<text x="{x(t):.1f}" y="{y0 + plot_h + 16:.1f}" text-anchor="middle">'
                   f"{t:g}</text>\n")
    for n in _ticks(n_max):
        out.append(f'<line x1="{x0}" y1="{y(n):.1f}" x2="{x0 + _PLOT_W}" y2="{y(n):.1f}" '
                   f'stroke="#eee"/><text x="{x0 - 6}" y="{y(n) + 4:.1f}" text-anchor="end">'
                   f"{n:g}</text>\n")
    out.append(f'<text x="{x0 + _PLOT_W / 2:.0f}" y="{y0 + plot_h + 32:.1f}" '
               'text-anchor="middle">seconds since the request</text>\n'
               f'<text transform="translate({x0 - 44},{y0 + plot_h / 2:.1f}) rotate(-90)" '
               'text-anchor="middle">tokens written</text>\n')
    for i, track in enumerate(tracks):
        color, width = (FINAL_COLOR, 3) if track.agent.final else (PALETTE[i % len(PALETTE)], 1.5)
        dash = ' stroke-dasharray="6 3"' if track.agent.layer > 0 and not track.agent.final else ""
        points = " ".join(f"{px:.1f},{py:.1f}" for px, py in _steps(track, x, y))
        out.append(f'<polyline class="agent" data-agent={quoteattr(track.agent.key)} '
                   f'data-tokens="{track.tokens}" points="{points}" fill="none" '
                   f'stroke="{color}" stroke-width="{width}"{dash}>'
                   f"<title>{escape(track.agent.label)}</title></polyline>\n")
        if track.failed:
            t_end, n_end = track.points[-1]
            out.append(f'<text x="{x(t_end):.1f}" y="{y(n_end) + 4:.1f}" fill="{color}" '
                       'text-anchor="middle" font-weight="bold">×</text>\n')
        legend_y = y0 + 12 + _ROW * i
        status = " (failed)" if track.failed else ""
        out.append(f'<line x1="{x0 + _PLOT_W + 16}" y1="{legend_y - 4:.1f}" '
                   f'x2="{x0 + _PLOT_W + 36}" y2="{legend_y - 4:.1f}" stroke="{color}" '
                   f'stroke-width="{width}"{dash}/><text x="{x0 + _PLOT_W + 42}" '
                   f'y="{legend_y:.1f}">{escape(_short(track.agent.label + status))}</text>\n')
    if timeline.ttft_s is not None:
        at = x(timeline.ttft_s)
        left = at > x0 + 0.7 * _PLOT_W  # label on the side with room
        out.append(f'<line class="answer-start" data-t="{timeline.ttft_s:.6f}" '
                   f'x1="{at:.2f}" y1="{y0:.1f}" x2="{at:.2f}" y2="{y0 + plot_h:.1f}" '
                   f'stroke="{FINAL_COLOR}" stroke-dasharray="4 3"/>'
                   f'<text x="{at - 4 if left else at + 4:.1f}" y="{y0 + 12:.1f}" '
                   f'text-anchor="{"end" if left else "start"}" fill="{FINAL_COLOR}">'
                   f"answer starts {timeline.ttft_s:.2f} s</text>\n")
    out.append("</g>\n")
    return "".join(out), _TOP + plot_h + _BOTTOM


def _steps(
    track: Track, x: Callable[[float], float], y: Callable[[float], float]
) -> list[tuple[float, float]]:
    """The track as a step line in pixels (tokens hold until the next delta), thinned to the
    points that change the drawing: steps under a pixel merge into a slope."""
    pixels: list[tuple[float, float]] = []
    for t, n in track.points:
        if pixels:
            pixels.append((round(x(t), 1), pixels[-1][1]))
        pixels.append((round(x(t), 1), round(y(n), 1)))
    thin: list[tuple[float, float]] = []
    for i, p in enumerate(pixels):
        last = i == len(pixels) - 1
        if thin and not last and max(abs(p[0] - thin[-1][0]), abs(p[1] - thin[-1][1])) < 1:
            continue
        if len(thin) >= 2 and (thin[-2][0] == thin[-1][0] == p[0] or
                               thin[-2][1] == thin[-1][1] == p[1]):
            thin[-1] = p  # the middle point of a straight run adds nothing
        else:
            thin.append(p)
    return thin if len(thin) > 1 else thin * 2


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _nice_max(value: float) -> float:
    """The smallest 1, 2 or 5 × 10^k (or a multiple of it) at or above `value`."""
    if value <= 0:
        return 1.0
    step = _step(value)
    return step * math.ceil(value / step - 1e-9)


def _step(span: float) -> float:
    """A tick step of 1, 2 or 5 × 10^k giving about five ticks over `span`."""
    raw = span / 5
    base = 10 ** math.floor(math.log10(raw))
    return next(m * base for m in (1, 2, 5, 10) if m * base >= raw)


def _ticks(top: float) -> list[float]:
    step = _step(top)
    return [round(i * step, 10) for i in range(int(top / step + 1e-9) + 1)]
