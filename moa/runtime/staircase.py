"""Staircase streaming: what an aggregating agent is shown, when it starts, how far it writes.

`ReferenceView` keeps, per aggregating agent, the numbering of its references (slot order for
those present at its start, arrival order after), the chunks already fed and, for the `cache`
layout, the rounds in which they were fed (each rendered once, never rewritten).
`start_wait` is the start rule, `settle_wait` the straggler rule (every mode) and `Pacer` the
pacing rule. The step loop itself lives in `moa.strategies.graph`; docs/staircase.md
describes the design.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from moa.runtime.feed import Feed
from moa.runtime.prompts import (
    FAILED_LABEL,
    Layout,
    Reference,
    entry,
    mark_duplicates,
    readable_block,
    round_text,
    same_text,
)
from moa.tokens import count_tokens

Pacing = Literal["lockstep", "eager"]


@dataclass(frozen=True)
class _Entry:
    """Text of one reference fed in one round (cache layout)."""

    source: int
    text: str
    truncated: bool = False
    same_as: int | None = None
    """Source index whose identical chunks were fed instead."""
    continued: bool = False


class ReferenceView:
    """One aggregating agent's view of its references, updated between steps."""

    def __init__(self, feeds: list[Feed], layout: Layout) -> None:
        self.feeds = feeds
        self.layout = layout
        self.order: list[int] = []
        self._fed: dict[int, int] = {}
        self._roots: dict[int, list[int]] = {}
        self._labelled: set[int] = set()
        self._number: dict[int, int] = {}
        """Cache layout: each reference's number, fixed when it is first fed."""
        self.rounds: list[str] = []
        """Cache layout: each round's text, as sent (never rewritten)."""
        self._seen: tuple[tuple[int, str], ...] = ()
        self.given_up: frozenset[int] = frozenset()

    def signature(self) -> tuple[tuple[int, str], ...]:
        """Changes whenever a chunk arrives or a reference finishes or fails."""
        return tuple((len(f.chunks), f.state) for f in self.feeds)

    def has_news(self) -> bool:
        return self.signature() != self._seen

    @property
    def streaming(self) -> bool:
        """Some reference shown (or still to come) is unfinished."""
        return any(not f.resolved for f in self.feeds)

    def update(
        self,
        *,
        complete_only: bool = False,
        given_up: frozenset[int] = frozenset(),
        instruction: str = "",
    ) -> None:
        """Take in what arrived: number new references, drop failed ones, add a round.

        `given_up`: unfinished references shown with all they wrote so far, labelled as stopped
        before finishing (stragglers left behind by the last call). Cache layout: the news is
        rendered as a new round (the first one opened by `instruction`).
        """
        self._seen = self.signature()
        self.given_up = frozenset(u for u in given_up if self.feeds[u].partial.strip())

        def shown(u: int, feed: Feed) -> bool:
            return u in self.given_up or (
                feed.usable and (feed.resolved or not complete_only)
            )

        self.order = [u for u in self.order if shown(u, self.feeds[u])]
        self.order += [
            u for u, feed in enumerate(self.feeds) if u not in self.order and shown(u, feed)
        ]
        if self.layout == "cache":
            self._add_round(instruction)

    def references(self) -> list[Reference]:
        """Every shown reference in full, numbered by position (the readable layout)."""
        refs = [
            Reference(text=f.partial, truncated=True)
            if u in self.given_up
            else Reference(text=f.text, complete=f.resolved, truncated=f.truncated)
            for u, f in ((u, self.feeds[u]) for u in self.order)
        ]
        return mark_duplicates(refs)

    def block(self, instruction: str) -> str:
        """The references block of the paper layout (every reference contiguous)."""
        return readable_block(self.references(), instruction)

    def _add_round(self, instruction: str) -> None:
        """Cache layout: the chunks fed since the last round (numbers fixed at first feed), a
        line for each numbered reference that has failed since, as one new round's text."""
        lines = []
        for u in self.order:
            e = self._new_entry(u)
            if e is None:
                continue
            number = self._number.setdefault(u, len(self._number) + 1)
            same = self._number.get(e.source if e.same_as is None else e.same_as)
            complete = self.feeds[u].resolved
            ref = (Reference(text=e.text, same_as=same, complete=complete)
                   if e.same_as is not None and same
                   else Reference(text=e.text, complete=complete, truncated=e.truncated,
                                  continued=e.continued))
            lines.append(entry(number, ref))
        for u, number in self._number.items():
            if u not in self.order and u not in self._labelled:
                self._labelled.add(u)
                lines.append(f"\n{number}.{FAILED_LABEL}")
        if lines:
            self.rounds.append(
                round_text(instruction, lines, len(self.rounds) + 1, streaming=self.streaming)
            )

    def _new_entry(self, u: int) -> _Entry | None:
        feed = self.feeds[u]
        start, end = self._fed.get(u, 0), len(feed.chunks)
        given_up = u in self.given_up
        label = (feed.truncated or given_up) and u not in self._labelled
        if start == end and not label:
            return None
        self._fed[u] = end
        if label:
            self._labelled.add(u)
        text = "".join(feed.chunks[start:end]) + (feed.pending if given_up else "")
        root = self._duplicate_root(u, start, end, text) if start < end else None
        self._roots.setdefault(u, []).extend([u if root is None else root] * (end - start))
        return _Entry(u, text, truncated=label, same_as=root, continued=start > 0)

    def _duplicate_root(self, u: int, start: int, end: int, text: str) -> int | None:
        """An earlier reference whose chunks start..end were fed and say the same."""
        for other in self.order:
            if other == u:
                return None
            roots = self._roots.get(other, [])
            if len(roots) >= end and same_text(
                text, "".join(self.feeds[other].chunks[start:end])
            ):
                return roots[start]
        return None


def _live(feed: Feed, stall_s: float, now: float) -> bool:
    """Unfinished and not silent for `stall_s` (a reference that holds aggregators back)."""
    return not feed.resolved and feed.quiet_for(now) < stall_s


def start_wait(
    feeds: list[Feed],
    k: int,
    grace_s: float,
    stall_s: float = float("inf"),
    *,
    complete: bool = False,
    now: float | None = None,
) -> float | None:
    """Seconds until an aggregator may start (0: now; None: wait for the next change).

    Staircase: it starts when every live reference has delivered its first chunk, or once `k`
    have and `grace_s` passed since the k-th did; a reference silent for `stall_s` is not
    live, so one that never speaks cannot hold it back. With `complete` (quorum start, no
    continuation) "delivered" means "finished".
    """
    now = time.monotonic() if now is None else now
    if complete:
        marks = [f.done_at for f in feeds if f.state == "done"]
        ready = all(f.resolved for f in feeds)
    else:
        marks = [f.first_chunk_at for f in feeds if f.first_chunk_at is not None]
        ready = bool(marks) and all(
            f.first_chunk_at is not None or not _live(f, stall_s, now) for f in feeds
        )
    if ready or all(f.resolved for f in feeds):
        return 0.0
    waits = [
        stall_s - f.quiet_for(now)
        for f in feeds
        if not complete and f.first_chunk_at is None and _live(f, stall_s, now)
    ]
    if len(marks) >= k:
        waits.append(sorted(marks)[k - 1] + grace_s - now)
    return max(0.0, min(waits)) if waits and min(waits) < float("inf") else None


def settle_wait(
    feeds: list[Feed], quorum: int, stall_s: float, *, now: float | None = None
) -> float | None:
    """Seconds until an aggregator may make its last call (0: now; None: wait for a change).

    It may once every reference is finished or failed, or once `quorum` are done and the rest
    have been silent for `stall_s` (stragglers are then left behind).
    """
    now = time.monotonic() if now is None else now
    open_ = [f for f in feeds if not f.resolved]
    if not open_:
        return 0.0
    if sum(f.state == "done" for f in feeds) < quorum:
        return None
    return max(0.0, stall_s - min(f.quiet_for(now) for f in open_))


class Pacer:
    """The pacing rule: how many tokens an aggregator may write in its next step.

    `lockstep` (default): the aggregator's n-th token comes after every live reference has
    shown at least n tokens (counted with tiktoken) or finished, so a step writes as many
    tokens as the slowest live reference is ahead, and it is taken once that lead covers the
    schedule's next step (with the default schedules: once each has delivered its next chunk).
    `eager`: a step is taken on any news and writes its full `step_tokens`, however far the
    aggregator is ahead of what it has read (lower latency, less read before writing).
    A reference counts as live once it has shown a chunk, until it finishes, fails or has been
    silent for `stall_s` (an aggregating reference waiting for its own references is not
    silent).
    """

    def __init__(self, feeds: list[Feed], pacing: Pacing, stall_s: float) -> None:
        self.feeds = feeds
        self.pacing = pacing
        self.stall_s = stall_s
        self._counted: dict[int, tuple[int, int]] = {}

    def shown(self, u: int) -> int:
        """Tokens of reference `u` an aggregator can see (its released chunks). Trailing
        whitespace is no token of content: a chunk that ends "blue " counts as "blue" (the
        space goes with the next word's token, " sky"), or the lead would be one too many."""
        feed = self.feeds[u]
        n, tokens = self._counted.get(u, (0, 0))
        if n != len(feed.chunks):
            tokens = count_tokens(feed.text.rstrip())
            self._counted[u] = (len(feed.chunks), tokens)
        return tokens

    def lead(self, written: int, *, now: float | None = None) -> int | None:
        """Tokens the aggregator may write now (None: no live reference bounds it)."""
        now = time.monotonic() if now is None else now
        leads = [
            self.shown(u) - written
            for u, f in enumerate(self.feeds)
            if f.chunks and _live(f, self.stall_s, now)
        ]
        return min(leads) if leads else None

    def limit(self, want: int, written: int, room: int) -> int:
        """Tokens the next step may write, `room` at most. Eager: `want` (the schedule's
        step). Lockstep: the whole lead, so a step is as large as the references are ahead —
        the schedule's size where they are close, one large step (one prompt sent instead of
        several) where they are far ahead; `want` when no live reference bounds it."""
        lead = None if self.pacing == "eager" else self.lead(written)
        return min(want if lead is None else max(0, lead), room)

    def wait(self, want: int, written: int, *, now: float | None = None) -> float | None:
        """Seconds until the next step of `want` tokens may be taken (0: now; None: at the
        next change upstream). Lockstep only; the eager rule waits for any news."""
        now = time.monotonic() if now is None else now
        lead = self.lead(written, now=now)
        if lead is None or lead >= want:
            return 0.0
        silent = [
            self.stall_s - f.quiet_for(now)
            for f in self.feeds
            if f.chunks and _live(f, self.stall_s, now)
        ]
        return max(0.0, min(silent))
