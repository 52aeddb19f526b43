"""How `moa chat` shows a run: plain text for pipes and `--quiet`, JSON, or the rich live view.

A view gets every event of a run (`on_event`, called from the event-loop thread), then
`finish(result)` or `abort()` from the main thread.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any, Protocol

from moa.events import Event, FinalDelta

if TYPE_CHECKING:
    from moa.result import MixtureResult


class View(Protocol):
    def start(self) -> None: ...
    def on_event(self, event: Event) -> None: ...
    def finish(self, result: MixtureResult) -> None: ...
    def abort(self) -> None: ...


def summary_line(result: MixtureResult) -> str:
    """Calls, tokens (the cached prompt tokens when there are any), cost, spend against the
    budgets, TTFT and total time, on one line."""
    usage = result.usage
    unpriced = sorted({o.agent.model for o in result.outputs if o.usage.total_tokens and
                       o.cost_usd is None})
    if unpriced:
        cost = f"cost unknown (no price for {', '.join(unpriced)})"
    else:
        cost = "cost unknown" if result.cost_usd is None else f"${result.cost_usd:.4f}"
    ttft = "n/a" if result.ttft_s is None else f"{result.ttft_s:.2f} s"
    spend = "".join(f" · {part}" for part in budget_parts(result.budget))
    cached = f", {usage.cached_tokens:,} cached" if usage.cached_tokens else ""
    return (
        f"{result.calls} calls · {usage.total_tokens:,} tokens "
        f"({usage.prompt_tokens:,} in{cached} / {usage.completion_tokens:,} out) · "
        f"{cost}{spend} · "
        f"TTFT {ttft} · total {result.latency_s:.2f} s"
    )


def truncation_note(result: MixtureResult) -> str | None:
    """A warning when the final answer stopped at its `max_tokens` (finish reason `length`)."""
    final = next((o for o in result.outputs if o.agent.final), None)
    if final is None or final.finish_reason != "length":
        return None
    return "the answer was cut at its max_tokens limit (raise --max-tokens for a full answer)"


def budget_parts(report: dict[str, Any]) -> list[str]:
    """'request budget $0.0012 of $0.0100', ... for every limited ledger of a budget report."""
    parts = []
    for scope in ("request", "session"):
        ledger = report.get(scope) or {}
        spent = []
        if ledger.get("limit_usd") is not None:
            spent.append(f"${ledger['spent_usd']:.4f} of ${ledger['limit_usd']:.4f}")
        if ledger.get("limit_tokens") is not None:
            spent.append(f"{ledger['spent_tokens']:,} of {ledger['limit_tokens']:,} tokens")
        if spent:
            refused = f", {ledger['refused']} refused" if ledger.get("refused") else ""
            parts.append(f"{scope} budget {' and '.join(spent)}{refused}")
    return parts


class PlainView:
    """Streams the answer as plain text to stdout; after it, failed agents, notices and the
    summary go to stderr. No control codes, so it suits pipes and files. `quiet` keeps
    stderr silent. A failed run adds nothing: the caller prints its one error line.
    """

    def __init__(self, *, quiet: bool = False) -> None:
        self.quiet = quiet
        self._last = "\n"

    def start(self) -> None:
        self._last = "\n"

    def on_event(self, event: Event) -> None:
        if isinstance(event, FinalDelta) and event.text:
            sys.stdout.write(event.text)
            sys.stdout.flush()
            self._last = event.text[-1]

    def finish(self, result: MixtureResult) -> None:
        self._end_line()
        if self.quiet:
            return
        if (cut := truncation_note(result)) is not None:
            _note(cut)
        for out in result.failed:
            _note(f"{out.agent.label} failed: {out.error}")
        for notice in result.notices:
            _note(notice)
        for d in result.decisions:
            _note(f"routed {d.stage}: {d.choice} ({d.reason})")
        _note(summary_line(result))

    def abort(self) -> None:
        self._end_line()

    def _end_line(self) -> None:
        if self._last != "\n":
            sys.stdout.write("\n")
            sys.stdout.flush()
            self._last = "\n"


class JsonView:
    """Prints `result.to_dict()` as one JSON object once the run is done."""

    def start(self) -> None: ...

    def on_event(self, event: Event) -> None: ...

    def finish(self, result: MixtureResult) -> None:
        json.dump(result.to_dict(), sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
        sys.stdout.flush()

    def abort(self) -> None: ...


def _note(text: str) -> None:
    print(f"moa: {text}", file=sys.stderr, flush=True)
