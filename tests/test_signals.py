"""Answer extraction, agreement, free-text similarity and DeepConf confidence."""

from __future__ import annotations

import pytest

from moa.providers.base import TokenLogprob
from moa.routing.signals import (
    agreement,
    confidence,
    extract_answer,
    group_signals,
    is_correct,
    jaccard,
    ngram_cosine,
    normalize_answer,
    token_confidence,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Let me think. The answer is 42.", "42"),
        ("So the total is \\boxed{\\frac{3}{4}}.", "0.75"),
        ("\\boxed{x+1}", "x 1"),
        ("Final answer: (C) because the others fail", "C"),
        ("The answer is b.", "B"),
        ("We sold 1,250 apples", "1250"),
        ("answer = -3.50", "-3.5"),
        ("```output\nfirst\nHello, World!\n```", "hello world"),
        ("It prints:\nOutput: 17", "17"),
        ("The answer is Paris.", "paris"),
        ("I have no idea", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_normalize_and_is_correct() -> None:
    assert normalize_answer(" $1,000 ") == "1000"
    assert normalize_answer("(d)") == "D"
    assert normalize_answer("12 apples") == "12"
    assert is_correct("so it is \\boxed{12}", "12")
    assert not is_correct("so it is \\boxed{13}", "12")
    assert not is_correct("no answer here", "12")


def test_agreement_votes_and_majority() -> None:
    votes = agreement(["The answer is 4.", "answer: 4.0", "It is 5", "no idea"])
    assert votes.answers == ["4", "4", "5", None]
    assert votes.majority == "4"
    assert votes.share == pytest.approx(0.5)
    assert votes.supporters() == [0, 1]
    assert not votes.unanimous
    assert votes.similarity is None
    assert agreement(["answer: 7"] * 3).unanimous


def test_free_text_falls_back_to_similarity() -> None:
    close = agreement(["the cat sat on the mat", "the cat sat on a mat"])
    far = agreement(["the cat sat on the mat", "quantum chromodynamics lecture"])
    assert close.majority is None and far.majority is None
    assert close.similarity is not None and far.similarity is not None
    assert close.similarity > 0.6 > far.similarity
    assert jaccard("a b c", "a b d") == pytest.approx(0.5)
    assert ngram_cosine("same text", "same text") == pytest.approx(1.0)


def _lp(top: list[float]) -> TokenLogprob:
    return TokenLogprob(token="t", logprob=top[0], top=[(f"t{i}", v) for i, v in enumerate(top)])


def test_token_confidence_is_minus_mean_topk() -> None:
    assert token_confidence(_lp([-0.1, -3.0, -5.0])) == pytest.approx(8.1 / 3)
    assert token_confidence(_lp([-0.1, -3.0, -5.0]), k=2) == pytest.approx(3.1 / 2)
    assert token_confidence(TokenLogprob("t", -0.4)) == pytest.approx(-0.4)


def test_confidence_windows_find_the_weak_spot() -> None:
    peaked, flat = _lp([-0.01, -6.0, -7.0]), _lp([-0.7, -0.8, -0.9])
    steady = confidence([peaked] * 40, window=8)
    dip = confidence([peaked] * 20 + [flat] * 8 + [peaked] * 12, window=8)
    assert steady is not None and dip is not None
    assert steady.source == "topk" and steady.tokens == 40
    assert dip.lowest_window == pytest.approx(0.8)
    assert dip.lowest_window < dip.bottom10 <= dip.mean < steady.mean
    assert confidence(None) is None and confidence([]) is None
    chosen = confidence([TokenLogprob("a", -0.2)] * 3)
    assert chosen is not None and chosen.source == "chosen"


def test_group_signals_degrade_without_logprobs() -> None:
    texts = ["The answer is 9.", "The answer is 9.", "The answer is 8."]
    plain = group_signals(texts)
    assert plain["agreement"] == pytest.approx(0.6667, abs=1e-3)
    assert plain["majority"] == "9"
    assert plain["confidence"] is None and plain["confidence_source"] is None
    rich = group_signals(texts, [[_lp([-0.1, -4.0])] * 5, None, [_lp([-0.5, -1.0])] * 5])
    assert rich["confidence"] == pytest.approx((2.05 + 0.75) / 2)
    assert rich["min_confidence"] == pytest.approx(0.75)
