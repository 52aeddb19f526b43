"""Coverage of a staircase answer: how much of its references the final aggregator had read.

The final aggregator's calls are recorded on their way to the backend (`Recorder`), and what
each prompt showed of every reference is found in the prompt itself, so the figures describe
what the model was really given. Token counts use `moa.tokens` (tiktoken).
"""

from __future__ import annotations

import itertools
import re
import statistics
from collections.abc import AsyncIterator
from dataclasses import dataclass

from moa.providers.base import ChatRequest, Delta, Provider
from moa.providers.registry import Registry
from moa.tokens import count_tokens

FINAL_PREFIX = "final"
"""Prefix under which the bench's final aggregator is resolved (and recorded)."""


class Recorder(Provider):
    """Pass calls through to `inner`, keeping every request."""

    def __init__(self, inner: Provider, calls: list[ChatRequest]) -> None:
        self.inner, self.calls = inner, calls
        self.name, self.capabilities = inner.name, inner.capabilities

    async def stream(self, request: ChatRequest) -> AsyncIterator[Delta]:  # type: ignore[override]
        self.calls.append(request)
        deltas = self.inner.stream(request)
        try:
            async for delta in deltas:
                yield delta
        finally:
            aclose = getattr(deltas, "aclose", None)
            if aclose is not None:
                await aclose()


class RecordingRegistry(Registry):
    """`base` plus the prefix `final`, a copy of `prefix` whose calls are recorded."""

    def __init__(self, base: Registry, prefix: str) -> None:
        super().__init__(base.specs())
        self.register(base.spec(prefix).model_copy(update={"prefix": FINAL_PREFIX}))
        self.calls: list[ChatRequest] = []

    def resolve(self, ref: str) -> tuple[Provider, str]:
        provider, model = super().resolve(ref)
        if ref.startswith(FINAL_PREFIX + "/"):
            return Recorder(provider, self.calls), model
        return provider, model


@dataclass
class Coverage:
    share: float
    """Least share (0-1) of a reference's tokens shown to the call that wrote the last token."""
    margin: int | None
    """Least (reference tokens shown - answer tokens written by the end of that call) over
    every call and every reference it shows unfinished; None when all were complete. As in
    the pacing rule, a reference binds the aggregator once it has shown a chunk."""
    unread: int = 0
    """Most references a call showed nothing of, unfinished (the start rule let it begin
    without them: `start_k` arrived and `grace_s` passed)."""


_ENTRY = re.compile(r"\n\d+\. ")
"""Where a response's first piece begins (a numbered line, both layouts)."""
_CONTINUED = re.compile("…")
"""Where a later piece begins: `N. …` (cache layout), `then …` (a duplicate's tail)."""
_PIECE_END = re.compile(r"[ \t]*(?:…|\[|\n|\Z)")
"""What follows a piece: the in-progress mark, a label, the next line, the prompt's end."""


def _common(a: str, b: str, at: int) -> int:
    """Length of the common prefix of `a` and `b[at:]`."""
    n = 0
    for x, y in zip(a, b[at : at + len(a)], strict=False):
        if x != y:
            break
        n += 1
    return n


def _piece(text: str, haystack: str, starts: re.Pattern[str]) -> int:
    """Length of the longest prefix of `text` that a piece of `haystack` shows: one that
    starts where `starts` matches and runs to the end of that piece. A match that stops
    inside other text (another response saying the same words) is no piece."""
    best = 0
    for m in starts.finditer(haystack):
        n = _common(text, haystack, m.end())
        for k in (n, len(text[:n].rstrip())):  # the piece may end on the space before " …"
            if k > best and _PIECE_END.match(haystack, m.end() + k):
                best = k
                break
    return best


def shown_prefix(full: str, system: str) -> str:
    """The part of `full` a prompt shows: contiguous (paper layout) or in "…"-continued
    pieces (cache layout), each taken without trailing whitespace (a piece may end on the
    space before " …"). Only whole pieces count, so another response's words are never
    mistaken for this one's, and the search ends when a piece adds nothing."""
    end = len(full[: _piece(full, system, _ENTRY)].rstrip())
    while end and end < len(full):
        grown = len(full[: end + _piece(full[end:], system, _CONTINUED)].rstrip())
        if grown <= end:
            break
        end = grown
    return full[:end]


def coverage(
    calls: list[ChatRequest], references: list[tuple[str, bool, int]], answer: str
) -> Coverage:
    """`references`: (final text, finished normally, planned tokens) of each reference."""
    fulls = [
        (text.rstrip(), done, max(planned, count_tokens(text)))
        for text, done, planned in references
    ]
    margin: int | None = None
    unread = 0
    seen: list[int] = [0] * len(fulls)
    for i, call in enumerate(calls):
        after = calls[i + 1].messages[-1] if i + 1 < len(calls) else None
        own = after["content"] if after and after["role"] == "assistant" else answer
        written = count_tokens(own)
        system = "\n".join(str(m["content"]) for m in call.messages if m["role"] != "assistant")
        missing = 0
        for u, (full, done, _) in enumerate(fulls):
            shown = shown_prefix(full, system) if full else ""
            seen[u] = count_tokens(shown)
            if done and shown == full:
                continue
            if not shown:
                missing += 1
                continue
            lead = seen[u] - written
            margin = lead if margin is None else min(margin, lead)
        unread = max(unread, missing)
    shares = [
        s / planned if planned else 1.0 for s, (_, _, planned) in zip(seen, fulls, strict=True)
    ]
    return Coverage(min(shares), margin, unread)


def flat(messages: list[dict[str, object]]) -> str:
    """A prompt as the text a prefix cache sees (each turn opened by its role)."""
    return "".join(f"<{m['role']}>{m['content']}" for m in messages)


def reuse(calls: list[ChatRequest]) -> float | None:
    """Median share of each call's prompt that is a prefix of the call before it (what a
    prefix cache can reuse between consecutive steps); None with fewer than two calls."""
    shares = []
    for before, after in itertools.pairwise(calls):
        a, b = flat(before.messages), flat(after.messages)
        common = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                      min(len(a), len(b)))
        shares.append(common / len(b))
    return statistics.median(shares) if shares else None
