"""The optional verifier signal: a judge model scores an answer (pointwise) or prefers one of
two answers (pairwise).

It is the one routing signal that costs a call: off by default, it is turned on with a
`[router.verifier]` table. The executor asks the judge before each routed aggregation and
refinement round; the reply is parsed robustly (`Score: 8`, `8/10`, `[[7]]`, `0.8`, `85%`;
`Preference: A`, `[[B]]`, `tie`) into `signals["verifier"]`, a number in [0, 1]: the score
divided by its scale, or 1 / 0 / 0.5 when the judge prefers the candidate / the rival / neither.
An unreadable reply, a failed call or a call the budget refuses leaves the signal `None`.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from moa.providers.base import Message

VerifierMode = Literal["pointwise", "pairwise"]

POINTWISE_PROMPT = (
    "You are a strict grader. Judge whether the candidate answer below correctly and "
    "completely answers the conversation's last request. Reply with one line, 'Score: N', "
    "where N is an integer from 0 (certainly wrong) to 10 (certainly right)."
)
PAIRWISE_PROMPT = (
    "You are a strict grader. Two candidate answers to the conversation's last request follow. "
    "Decide which one is more likely correct and complete. Reply with one line: "
    "'Preference: A', 'Preference: B' or 'Preference: tie'."
)


class VerifierConfig(BaseModel):
    """The judge call of the verifier signal (`[router.verifier]`)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="Judge model reference (default: the cheap tier).")
    mode: VerifierMode = "pointwise"
    """`pointwise` scores the current answer; `pairwise` compares it with the strongest rival
    (a reply holding another final answer), falling back to pointwise when there is none."""
    max_tokens: int = Field(32, gt=0)
    temperature: float = Field(0.0, ge=0, le=2)


def _transcript(messages: list[Message]) -> str:
    lines = []
    for m in messages:
        if m.get("role") == "system":
            continue
        content = m.get("content")
        text = content if isinstance(content, str) else str(content)
        lines.append(f"{str(m.get('role', 'user')).capitalize()}: {text}")
    return "\n\n".join(lines)


def judge_messages(
    messages: list[Message], candidate: str, rival: str | None = None
) -> list[Message]:
    """The judge's prompt: pointwise without a rival, pairwise (candidate = A) with one."""
    conversation = _transcript(messages)
    if rival is None:
        body = f"Conversation:\n{conversation}\n\nCandidate answer:\n{candidate}"
        return [{"role": "system", "content": POINTWISE_PROMPT}, {"role": "user", "content": body}]
    body = (
        f"Conversation:\n{conversation}\n\nAnswer A:\n{candidate}\n\nAnswer B:\n{rival}"
    )
    return [{"role": "system", "content": PAIRWISE_PROMPT}, {"role": "user", "content": body}]


_NUM = r"(\d+(?:\.\d+)?)"
_SCORE_FORMS = (
    re.compile(rf"\[\[\s*{_NUM}\s*\]\]"),
    re.compile(rf"\\boxed\{{\s*{_NUM}\s*\}}"),
    re.compile(
        rf"\b(?:score|rating|grade)\b[^0-9\n]{{0,20}}{_NUM}\s*(%|(?:/|out\s+of)\s*{_NUM})?",
        re.IGNORECASE,
    ),
    re.compile(rf"{_NUM}\s*(%|(?:/|out\s+of)\s*{_NUM})", re.IGNORECASE),
    re.compile(rf"^\W*{_NUM}\b"),
)


def parse_score(text: str) -> float | None:
    """A judge's score as a number in [0, 1], or None when the reply holds none.

    `N/M` and `N out of M` divide by M, `N%` by 100; a bare number is read on the 0–10 scale
    the prompt asks for, except a decimal at most 1 (a probability) and a number above 10
    (a percentage).
    """
    for form in _SCORE_FORMS:
        match = form.search(text)
        if match is None:
            continue
        groups = match.groups()
        value = float(groups[0])
        suffix = groups[1] if len(groups) > 1 else None
        scale = groups[2] if len(groups) > 2 else None
        if scale is not None and float(scale) > 0:
            value /= float(scale)
        elif suffix == "%" or value > 10:
            value /= 100
        elif not ("." in groups[0] and value <= 1):
            value /= 10
        return min(1.0, max(0.0, value))
    return None


_CHOICE = r"\(?([AB]|(?i:tie))\b"
_PREFERENCE_FORMS = (
    re.compile(r"\[\[\s*([ABC]|(?i:tie))\s*\]\]"),
    re.compile(r"(?i:\bprefer(?:ence|red|s)?)\b\W{0,3}(?i:answer\W{0,3})?" + _CHOICE),
    re.compile(
        r"(?i:\b(?:answer|candidate|response))\s+" + _CHOICE + r"\)?\s+(?i:is\s+(?:better|more))"
    ),
    re.compile(r"^\W*" + _CHOICE + r"\W*$"),
)
_TIE = re.compile(r"\b(?:tie|equal(?:ly)?|neither|both)\b", re.IGNORECASE)


def parse_preference(text: str) -> float | None:
    """1.0 when the judge prefers answer A, 0.0 for B, 0.5 for a tie; None when unreadable."""
    for form in _PREFERENCE_FORMS:
        match = form.search(text)
        if match:
            choice = match.group(1).upper()
            return {"A": 1.0, "B": 0.0}.get(choice, 0.5)
    return 0.5 if _TIE.search(text) else None


def verdict(text: str, pairwise: bool) -> float | None:
    """The verifier signal of a judge's reply."""
    return parse_preference(text) if pairwise else parse_score(text)
