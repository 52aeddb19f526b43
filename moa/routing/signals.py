"""Routing signals computed from what the calls already return (no extra calls).

- Agreement among proposers: a final answer is extracted from each text (boxed answers,
  "the answer is …", multiple-choice letters, code output lines, else the last number),
  normalised, and voted on; free text falls back to a cheap similarity measure.
- Token confidence from logprobs, DeepConf-style: per-token confidence is minus the mean of
  the top-k logprobs at that position (high when the distribution is peaked), averaged over
  sliding windows; the lowest window and the mean of the bottom 10 % of windows summarise a
  reply. Without logprobs every confidence is None.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations

from moa.providers.base import TokenLogprob

_BOXED = re.compile(r"\\boxed\s*\{")
_ANSWER_PHRASE = re.compile(
    r"(?:final\s+answer|the\s+answer|answer)\s*(?:is|:|=)\s*:?\s*(.+)", re.IGNORECASE
)
_OUTPUT_FENCE = re.compile(r"```(?:output|text|console)?\s*\n(.*?)```", re.DOTALL)
_OUTPUT_LINE = re.compile(
    r"^\s*(?:output|result|prints?)\s*:\s*(.+)$", re.IGNORECASE | re.MULTILINE
)
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?(?:/\d+)?%?")
_CHOICE = re.compile(r"^\(?([A-Ea-e])\)?(?:[.):,]|\s|$)")
_CHOICE_ONLY = re.compile(r"^\(?([A-Ea-e])\)?[.)]?$")
_WORD = re.compile(r"\w+")
_LEADING_NUMBER = re.compile(r"^(-?\$?\d[\d,]*(?:\.\d+)?(?:/\d+)?%?)(?:\s+[A-Za-z]+){0,2}$")
_FRAC = re.compile(r"\\[dt]?frac\{(-?\d+)\}\{(\d+)\}")
_LATEX_TEXT = re.compile(r"\\(?:text|mathrm|textbf)\{([^{}]*)\}")
_LATEX_NOISE = re.compile(r"\\(?:left|right|!|,|;|\s)|\^\\circ|\^\{\\circ\}")


def _boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}`, with nested braces."""
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    start = matches[-1].end()
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
    return None


def _number(token: str) -> str | None:
    """Canonical form of a number token ('1,000.50' -> '1000.5', '3/4' -> '0.75')."""
    raw = token.replace(",", "").replace("$", "").rstrip("%")
    try:
        if "/" in raw:
            num, den = raw.split("/", 1)
            value = float(num) / float(den)
        else:
            value = float(raw)
    except (ValueError, ZeroDivisionError):
        return None
    if value.is_integer():
        return str(int(value))
    return f"{value:.6g}"


def normalize_answer(answer: str) -> str:
    """Normalise an extracted (or reference) answer so equal answers compare equal."""
    text = _LATEX_NOISE.sub("", _LATEX_TEXT.sub(r"\1", answer))
    text = _FRAC.sub(r"\1/\2", text).strip().strip("*`\"' $").rstrip(".!;").strip()
    choice = _CHOICE_ONLY.match(text)
    if choice:
        return choice.group(1).upper()
    leading = _LEADING_NUMBER.match(text)
    if leading:
        canonical = _number(leading.group(1))
        if canonical is not None:
            return canonical
    return " ".join(_WORD.findall(text.lower()))


def extract_answer(text: str) -> str | None:
    """The normalised final answer of a reply, or None when it has none (free text)."""
    boxed = _boxed(text)
    if boxed is not None:
        return normalize_answer(boxed)
    phrases = _ANSWER_PHRASE.findall(text)
    if phrases:
        phrase = phrases[-1].strip().splitlines()[0]
        choice = _CHOICE.match(phrase.strip("*` "))
        if choice:
            return choice.group(1).upper()
        numbers = _NUMBER.findall(phrase)
        if numbers:
            return _number(numbers[0]) or normalize_answer(phrase)
        return normalize_answer(re.split(r"[.!?](?:\s|$)", phrase)[0])
    fences = _OUTPUT_FENCE.findall(text)
    lines = [ln for ln in (fences[-1] if fences else "").splitlines() if ln.strip()]
    if lines:
        return normalize_answer(lines[-1])
    outputs = _OUTPUT_LINE.findall(text)
    if outputs:
        return normalize_answer(outputs[-1])
    numbers = _NUMBER.findall(text)
    if numbers:
        return _number(numbers[-1])
    return None


def is_correct(text: str, reference: str) -> bool:
    """Whether a reply's extracted answer equals the normalised reference answer."""
    answer = extract_answer(text)
    if answer is None:
        return False
    ref = extract_answer(reference) if len(reference) > 40 else normalize_answer(reference)
    return answer == ref


def jaccard(a: str, b: str) -> float:
    """Token-set Jaccard similarity of two texts (lowercased words)."""
    sa, sb = set(_WORD.findall(a.lower())), set(_WORD.findall(b.lower()))
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


def ngram_cosine(a: str, b: str, n: int = 3) -> float:
    """Cosine similarity of character n-gram counts (whitespace collapsed, lowercased)."""
    ca, cb = _ngrams(a, n), _ngrams(b, n)
    if not ca or not cb:
        return 1.0 if ca == cb else 0.0
    dot = sum(v * cb.get(k, 0) for k, v in ca.items())
    norm = math.sqrt(sum(v * v for v in ca.values())) * math.sqrt(sum(v * v for v in cb.values()))
    return dot / norm


def _ngrams(text: str, n: int) -> Counter[str]:
    flat = " ".join(text.lower().split())
    return Counter(flat[i : i + n] for i in range(max(len(flat) - n + 1, 0)))


def mean_similarity(texts: Sequence[str]) -> float | None:
    """Mean pairwise character-trigram cosine; None with fewer than two texts."""
    pairs = list(combinations(texts, 2))
    if not pairs:
        return None
    return sum(ngram_cosine(a, b) for a, b in pairs) / len(pairs)


@dataclass
class Agreement:
    """Votes of a set of replies on their extracted final answers."""

    answers: list[str | None]
    counts: dict[str, int] = field(default_factory=dict)
    majority: str | None = None
    share: float = 0.0
    """Votes for the majority answer / number of replies (replies without an answer count)."""
    similarity: float | None = None
    """Mean pairwise free-text similarity, for replies without extractable answers."""

    @property
    def extracted(self) -> int:
        return sum(a is not None for a in self.answers)

    @property
    def unanimous(self) -> bool:
        return bool(self.answers) and self.share == 1.0

    def supporters(self) -> list[int]:
        """Indices of the replies whose answer is the majority answer."""
        return [i for i, a in enumerate(self.answers) if a is not None and a == self.majority]


def agreement(texts: Sequence[str]) -> Agreement:
    """Extract, normalise and vote; ties go to the answer seen first."""
    answers = [extract_answer(t) for t in texts]
    counts = Counter(a for a in answers if a is not None)
    result = Agreement(answers=answers, counts=dict(counts))
    if counts:
        top = max(counts.values())
        result.majority = next(a for a in answers if a is not None and counts[a] == top)
        result.share = top / len(texts)
    if result.extracted * 2 < len(texts):
        result.similarity = mean_similarity(texts)
    return result


def token_confidence(logprob: TokenLogprob, k: int | None = None) -> float:
    """DeepConf token confidence: -mean of the top-k logprobs (chosen logprob when no top-k)."""
    top = [lp for _, lp in logprob.top[:k]] if logprob.top else []
    if not top:
        return logprob.logprob
    return -sum(top) / len(top)


@dataclass(frozen=True)
class Confidence:
    """Summary of a reply's token confidences."""

    mean: float
    lowest_window: float
    """Lowest mean confidence over sliding windows of `window` tokens (DeepConf's group min)."""
    bottom10: float
    """Mean of the lowest 10 % of window confidences."""
    tokens: int
    source: str
    """'topk' (DeepConf from top-k alternatives) or 'chosen' (the sampled token's logprob only)."""


def confidence(
    logprobs: Sequence[TokenLogprob] | None, *, k: int | None = None, window: int = 16
) -> Confidence | None:
    """DeepConf-style confidence of one reply, or None without logprobs."""
    if not logprobs:
        return None
    source = "topk" if any(lp.top for lp in logprobs) else "chosen"
    scores = [token_confidence(lp, k) for lp in logprobs]
    width = max(1, min(window, len(scores)))
    prefix = [0.0]
    for s in scores:
        prefix.append(prefix[-1] + s)
    windows = sorted(
        (prefix[i + width] - prefix[i]) / width for i in range(len(scores) - width + 1)
    )
    tail = windows[: max(1, math.ceil(len(windows) * 0.1))]
    return Confidence(
        mean=prefix[-1] / len(scores),
        lowest_window=windows[0],
        bottom10=sum(tail) / len(tail),
        tokens=len(scores),
        source=source,
    )


def group_signals(
    texts: Sequence[str], logprobs: Sequence[Sequence[TokenLogprob] | None] | None = None
) -> dict[str, float | int | str | None]:
    """Signals of a set of replies, as a flat dict (the shape `RouteDecision.signals` carries).

    Keys: `agreement` (majority vote share), `answers` (replies with an extractable answer),
    `majority`, `similarity` (free text only), `confidence` (mean of the replies' bottom-10 %
    window confidence; None without logprobs), `min_confidence`, `confidence_source`.
    """
    votes = agreement(texts)
    confs = [confidence(lp) for lp in (logprobs or [])]
    known = [c for c in confs if c is not None]
    return {
        "agreement": round(votes.share, 4),
        "answers": votes.extracted,
        "majority": votes.majority,
        "similarity": None if votes.similarity is None else round(votes.similarity, 4),
        "confidence": round(sum(c.bottom10 for c in known) / len(known), 4) if known else None,
        "min_confidence": round(min(c.bottom10 for c in known), 4) if known else None,
        "confidence_source": known[0].source if known else None,
    }
