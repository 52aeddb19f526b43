"""Budgets: worst-case refusal before a call, settling, session ledgers, reports."""

from __future__ import annotations

import pytest

from moa.errors import BudgetExceeded, ConfigError
from moa.providers.base import Usage
from moa.runtime.budget import Budget, BudgetGuard, SessionBudget
from moa.tokens import count_messages

PRICES = {"p/cheap": (1.0, 2.0), "p/strong": (10.0, 30.0)}


def price(model: str, usage: Usage) -> float | None:
    if model not in PRICES:
        return None
    inp, out = PRICES[model]
    return (usage.prompt_tokens * inp + usage.completion_tokens * out) / 1e6


MSGS = [{"role": "user", "content": "What is two plus two?"}]


def test_refuses_before_the_call_when_worst_case_exceeds() -> None:
    prompt = count_messages(MSGS)
    worst = (prompt * 10 + 100 * 30) / 1e6
    guard = BudgetGuard(price, Budget(usd=worst * 1.5))
    reservation = guard.reserve("p/strong", MSGS, 100)
    assert guard.request.reserved_usd == pytest.approx(worst)
    with pytest.raises(BudgetExceeded, match="request budget"):
        guard.reserve("p/strong", MSGS, 100)
    assert guard.request.refused == 1
    guard.settle(reservation, Usage(prompt, 10))
    assert guard.request.reserved_usd == pytest.approx(0)
    assert guard.request.spent_usd == pytest.approx((prompt * 10 + 10 * 30) / 1e6)
    guard.reserve("p/strong", MSGS, 100)  # fits again once the first call settled cheaply


def test_token_budget_counts_prompt_plus_max_tokens() -> None:
    prompt = count_messages(MSGS)
    guard = BudgetGuard(price, Budget(tokens=prompt + 50))
    assert guard.why_not("p/cheap", MSGS, 50) is None
    assert "tokens would exceed" in (guard.why_not("p/cheap", MSGS, 51) or "")
    assert guard.worst_case("p/cheap", MSGS, 50) == (
        pytest.approx((prompt + 100) / 1e6),
        prompt + 50,
    )


def test_session_ledger_spans_requests() -> None:
    session = SessionBudget(tokens=300)
    for _ in range(2):
        guard = BudgetGuard(price, None, session)
        guard.settle(guard.reserve("p/cheap", MSGS, 50), Usage(100, 40))
    assert session.spent_tokens == 280 and session.calls == 2
    with pytest.raises(BudgetExceeded, match="session budget"):
        BudgetGuard(price, None, session).reserve("p/cheap", MSGS, 50)
    assert session.remaining_fraction() == pytest.approx(20 / 300)


def test_failed_call_releases_its_reservation() -> None:
    guard = BudgetGuard(price, Budget(usd=1.0))
    reservation = guard.reserve("p/cheap", MSGS, 100)
    assert guard.remaining_fraction() < 1.0
    assert guard.settle(reservation, None) is None
    assert guard.remaining_fraction() == pytest.approx(1.0)
    assert guard.request.calls == 0
    assert guard.settle(reservation, Usage(1, 1)) is None  # settling twice is a no-op


def test_dollar_budget_needs_a_price() -> None:
    with pytest.raises(ConfigError, match="needs a price"):
        BudgetGuard(price, Budget(usd=1.0)).reserve("p/unknown", MSGS, 10)
    BudgetGuard(price, Budget(tokens=1000)).reserve("p/unknown", MSGS, 10)


def test_report_and_unlimited() -> None:
    guard = BudgetGuard(price, None, SessionBudget(usd=2.0))
    assert guard.request.limit.unlimited
    guard.settle(guard.reserve("p/cheap", MSGS, 10), Usage(1000, 500))
    report = guard.report()
    assert report["request"]["spent_usd"] == pytest.approx(0.002)
    assert report["session"]["limit_usd"] == 2.0 and report["session"]["calls"] == 1
    assert guard.remaining_fraction() == pytest.approx(1 - 0.002 / 2.0)
