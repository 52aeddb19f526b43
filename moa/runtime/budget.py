"""Per-request and per-session budgets in tokens or US dollars.

A call is checked *before* it starts: its worst case is the prompt (counted offline with
`moa.tokens`) plus `max_tokens` of output at the model's price. If that worst case would take
the spend (settled calls plus calls in flight) over a hard limit, `BudgetExceeded` is raised
and nothing is sent. When the call ends its reservation is replaced by the reported usage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from moa.errors import BudgetExceeded, ConfigError
from moa.providers.base import Message, Usage
from moa.tokens import count_messages

PriceFn = Callable[[str, Usage], "float | None"]
"""(model reference, usage) -> US dollars, or None when the model has no known price."""


class Budget(BaseModel):
    """Hard limits; None means unlimited."""

    model_config = ConfigDict(extra="forbid")

    usd: float | None = Field(None, gt=0, description="US dollars.")
    tokens: int | None = Field(None, gt=0, description="Prompt plus completion tokens.")

    @property
    def unlimited(self) -> bool:
        return self.usd is None and self.tokens is None


@dataclass
class Ledger:
    """Spend against one `Budget`: settled calls plus reservations of calls in flight."""

    limit: Budget = field(default_factory=Budget)
    spent_usd: float = 0.0
    spent_tokens: int = 0
    reserved_usd: float = 0.0
    reserved_tokens: int = 0
    calls: int = 0
    refused: int = 0
    unpriced: int = 0
    """Settled calls whose model has no known price (their dollars are not in `spent_usd`)."""

    def remaining_fraction(self) -> float | None:
        """Smallest share of a limit still free (reservations count as spent), or None."""
        shares = []
        if self.limit.usd is not None:
            shares.append(1 - (self.spent_usd + self.reserved_usd) / self.limit.usd)
        if self.limit.tokens is not None:
            shares.append(1 - (self.spent_tokens + self.reserved_tokens) / self.limit.tokens)
        return max(0.0, min(shares)) if shares else None

    def overflow(self, usd: float | None, tokens: int) -> str | None:
        """Why a call of this worst case would exceed the limit, or None if it fits."""
        if self.limit.tokens is not None:
            total = self.spent_tokens + self.reserved_tokens + tokens
            if total > self.limit.tokens:
                return f"{total} tokens would exceed the limit of {self.limit.tokens}"
        if self.limit.usd is not None and usd is not None:
            total_usd = self.spent_usd + self.reserved_usd + usd
            if total_usd > self.limit.usd:
                return f"${total_usd:.6f} would exceed the limit of ${self.limit.usd:.6f}"
        return None

    def report(self) -> dict[str, Any]:
        return {
            "spent_usd": round(self.spent_usd, 8),
            "spent_tokens": self.spent_tokens,
            "limit_usd": self.limit.usd,
            "limit_tokens": self.limit.tokens,
            "calls": self.calls,
            "refused": self.refused,
            "unpriced_calls": self.unpriced,
        }


class SessionBudget(Ledger):
    """A ledger shared by many requests (pass the same object to every run)."""

    def __init__(self, usd: float | None = None, tokens: int | None = None) -> None:
        super().__init__(limit=Budget(usd=usd, tokens=tokens))


@dataclass(eq=False)
class Reservation:
    """The worst case reserved for one call until it settles."""

    model: str
    usd: float | None
    tokens: int
    open: bool = True


class BudgetGuard:
    """Checks every call of one request against the request budget and a session ledger."""

    def __init__(
        self, price: PriceFn, request: Budget | None = None, session: Ledger | None = None
    ) -> None:
        self.price = price
        self.request = Ledger(limit=request or Budget())
        self.session = session
        self._ledgers = [self.request] + ([session] if session is not None else [])
        self._open: list[Reservation] = []

    def worst_case(
        self, model: str, messages: list[Message], max_tokens: int, samples: int = 1
    ) -> tuple[float | None, int]:
        """(US dollars or None, tokens) if the call used all of `max_tokens` in each of its
        `samples` (each billed for the prompt: a backend without `n` is sent it each time)."""
        usage = Usage(count_messages(messages) * samples, max_tokens * samples)
        return self.price(model, usage), usage.total_tokens

    @property
    def unlimited(self) -> bool:
        return all(ledger.limit.unlimited for ledger in self._ledgers)

    def _needs_price(self) -> bool:
        return any(ledger.limit.usd is not None for ledger in self._ledgers)

    def why_not(
        self, model: str, messages: list[Message], max_tokens: int, samples: int = 1
    ) -> str | None:
        """Why this call would exceed a budget, or None when it fits."""
        usd, tokens = self.worst_case(model, messages, max_tokens, samples)
        if usd is None and self._needs_price():
            raise ConfigError(
                f"A dollar budget needs a price for {model!r}; add it under [prices] in the config."
            )
        for ledger, scope in zip(self._ledgers, ("request", "session"), strict=False):
            reason = ledger.overflow(usd, tokens)
            if reason:
                return f"{scope} budget: {reason}"
        return None

    def reserve(
        self, model: str, messages: list[Message], max_tokens: int, samples: int = 1
    ) -> Reservation:
        """Reserve the call's worst case, or raise `BudgetExceeded` without starting it.

        Without any limit nothing is counted: the reservation only carries the model.
        """
        usd, tokens = None, 0
        if not self.unlimited:
            reason = self.why_not(model, messages, max_tokens, samples)
            if reason:
                for ledger in self._ledgers:
                    ledger.refused += 1
                raise BudgetExceeded(f"Call to {model} refused: {reason}.")
            usd, tokens = self.worst_case(model, messages, max_tokens, samples)
            for ledger in self._ledgers:
                ledger.reserved_usd += usd or 0.0
                ledger.reserved_tokens += tokens
        reservation = Reservation(model=model, usd=usd, tokens=tokens)
        self._open.append(reservation)
        return reservation

    def settle(self, reservation: Reservation, usage: Usage | None) -> float | None:
        """Replace the reservation by the reported usage; return the call's cost."""
        if not reservation.open:
            return None
        reservation.open = False
        self._open.remove(reservation)
        cost = self.price(reservation.model, usage) if usage is not None else None
        for ledger in self._ledgers:
            ledger.reserved_usd -= reservation.usd or 0.0
            ledger.reserved_tokens -= reservation.tokens
            if usage is not None:
                ledger.spent_usd += cost or 0.0
                ledger.spent_tokens += usage.total_tokens
                ledger.calls += 1
                ledger.unpriced += cost is None
        return cost

    def release(self) -> None:
        """Give back every reservation still open (calls that never ran): the run is over."""
        for reservation in list(self._open):
            self.settle(reservation, None)

    def remaining_fraction(self) -> float | None:
        """Smallest free share over the request and session limits, or None when unlimited."""
        shares = [
            s for s in (ledger.remaining_fraction() for ledger in self._ledgers) if s is not None
        ]
        return min(shares) if shares else None

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"request": self.request.report()}
        if self.session is not None:
            out["session"] = self.session.report()
        return out
