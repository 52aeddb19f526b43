"""Staircase streaming: what an aggregating agent is shown of references still being written.

`ReferenceView` keeps, per aggregating agent, the numbering of its references (slot order for
those present at its start, arrival order after), the chunks already fed and, for the
`prefix_cache` layout, the rounds in which they were fed. `start_wait` is the start condition.
The step loop itself lives in `moa.runtime.executor`; docs/staircase.md describes the design.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from moa.runtime.feed import Feed
from moa.runtime.prompts import (
    Reference,
    mark_duplicates,
    near_identical,
    readable_block,
    rounds_block,
)


@dataclass(frozen=True)
class _Entry:
    """Text of one reference fed in one round (prefix_cache layout)."""

    source: int
    text: str
    truncated: bool = False
    same_as: int | None = None
    """Source index whose identical chunks were fed instead."""
    continued: bool = False


class ReferenceView:
    """One aggregating agent's view of its references, updated between steps."""

    def __init__(self, feeds: list[Feed], layout: Literal["readable", "prefix_cache"]) -> None:
        self.feeds = feeds
        self.layout = layout
        self.order: list[int] = []
        self._fed: dict[int, int] = {}
        self._roots: dict[int, list[int]] = {}
        self._labelled: set[int] = set()
        self._rounds: list[list[_Entry]] = []
        self._seen: tuple[tuple[int, str], ...] = ()

    def signature(self) -> tuple[tuple[int, str], ...]:
        """Changes whenever a chunk arrives or a reference finishes or fails."""
        return tuple((len(f.chunks), f.state) for f in self.feeds)

    def has_news(self) -> bool:
        return self.signature() != self._seen

    @property
    def streaming(self) -> bool:
        """Some reference shown (or still to come) is unfinished."""
        return any(not f.resolved for f in self.feeds)

    def update(self, *, complete_only: bool = False) -> None:
        """Take in what arrived: number new references, drop failed ones, add a round."""
        self._seen = self.signature()
        self.order = [u for u in self.order if self.feeds[u].usable]
        self.order += [
            u
            for u, feed in enumerate(self.feeds)
            if u not in self.order and feed.usable and (feed.resolved or not complete_only)
        ]
        if self.layout == "prefix_cache":
            entries = [e for u in self.order if (e := self._new_entry(u)) is not None]
            if entries:
                self._rounds.append(entries)

    def references(self) -> list[Reference]:
        """Every shown reference in full, numbered by position (the readable layout)."""
        refs = [
            Reference(text=f.text, complete=f.resolved, truncated=f.truncated)
            for f in (self.feeds[u] for u in self.order)
        ]
        return mark_duplicates(refs)

    def block(self, instruction: str) -> str:
        """The references block of the next step's system message."""
        if self.layout == "readable":
            return readable_block(self.references(), instruction)
        number = {u: i for i, u in enumerate(self.order, 1)}
        rounds = [
            [(number[e.source], self._reference(e, number)) for e in entries if e.source in number]
            for entries in self._rounds
        ]
        return rounds_block([r for r in rounds if r], self.streaming, instruction)

    def _reference(self, entry: _Entry, number: dict[int, int]) -> Reference:
        if entry.same_as is not None and entry.same_as in number:
            return Reference(text=entry.text, same_as=number[entry.same_as])
        return Reference(text=entry.text, truncated=entry.truncated, continued=entry.continued)

    def _new_entry(self, u: int) -> _Entry | None:
        feed = self.feeds[u]
        start, end = self._fed.get(u, 0), len(feed.chunks)
        label = feed.truncated and u not in self._labelled
        if start == end and not label:
            return None
        self._fed[u] = end
        if label:
            self._labelled.add(u)
        text = "".join(feed.chunks[start:end])
        root = self._duplicate_root(u, start, end, text) if start < end else None
        self._roots.setdefault(u, []).extend([u if root is None else root] * (end - start))
        return _Entry(u, text, truncated=label, same_as=root, continued=start > 0)

    def _duplicate_root(self, u: int, start: int, end: int, text: str) -> int | None:
        """An earlier reference whose chunks start..end were fed and say the same."""
        for other in self.order:
            if other == u:
                return None
            roots = self._roots.get(other, [])
            if len(roots) >= end and near_identical(
                text, "".join(self.feeds[other].chunks[start:end])
            ):
                return roots[start]
        return None


def start_wait(
    feeds: list[Feed], k: int, grace_s: float, *, complete: bool = False, now: float | None = None
) -> float | None:
    """Seconds until an aggregator may start (0: now; None: wait for the next change).

    Staircase: it starts when every live reference has delivered its first chunk, or once `k`
    have and `grace_s` passed since the k-th did, so a reference that never speaks cannot hold
    it back. With `complete` (quorum start, no continuation) "delivered" means "finished".
    """
    now = time.monotonic() if now is None else now
    if complete:
        marks = [f.done_at for f in feeds if f.state == "done"]
        ready = all(f.resolved for f in feeds)
    else:
        marks = [f.first_chunk_at for f in feeds if f.first_chunk_at is not None]
        ready = all(f.resolved or f.first_chunk_at is not None for f in feeds)
    if ready:
        return 0.0
    if len(marks) < k:
        return None
    return max(0.0, sorted(marks)[k - 1] + grace_s - now)
