"""Per-request and per-session budgets in tokens or US dollars.

A call is checked *before* it starts: its worst case is the prompt (counted offline with
`moa.tokens`) plus `max_tokens` of output at the model's price. If that worst case would take
the spend (settled calls plus calls in flight) over a hard limit, `BudgetExceeded` is raised
and nothing is sent. When the call ends its reservation is replaced by the reported usage.

A ledger is in-process (`Ledger`, checked and reserved synchronously) or shared (`shared` True,
e.g. `moa.state.redis.RedisLedger`): a shared ledger checks and reserves in one atomic step of
its store (`take`) and settles there (`give`); its fields mirror the store's totals as last seen.
The runtime uses the async `areserve` / `asettle` / `arelease`, which drive both kinds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import anyio
from pydantic import BaseModel, ConfigDict, Field

from moa.errors import BudgetExceeded, ConfigError, QuotaExceeded
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
    scope: str = "session"
    """How a refusal names this ledger ("request", "session", "key 'alice'")."""
    quota: bool = False
    """A client key's quota: a refusal raises `QuotaExceeded` (the run stops)."""
    shared: ClassVar[bool] = False
    """Checked in a shared store (`take` / `give`), not in this process."""

    async def take(self, model: str, usd: float | None, tokens: int) -> tuple[str | None, str]:
        """A shared ledger's atomic check-and-reserve: (None, why not) or (ticket, "")."""
        raise NotImplementedError

    async def give(
        self, ticket: str | None, usd: float | None, usage: Usage | None
    ) -> None:
        """A shared ledger's settlement: free `ticket`'s reservation, add `usage` at `usd`."""
        raise NotImplementedError

    async def refresh(self) -> None:
        """Read the current totals (a shared ledger; an in-process one is always current)."""

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
    tickets: list[tuple[Ledger, str]] = field(default_factory=list)
    """Reservations held in shared ledgers."""


class BudgetGuard:
    """Checks every call of one request against the request budget, a session ledger and any
    further ledgers (a client key's), in process or in a shared store."""

    def __init__(
        self,
        price: PriceFn,
        request: Budget | None = None,
        session: Ledger | None = None,
        extra: Sequence[Ledger] = (),
    ) -> None:
        """`extra`: further ledgers every call is also charged to (e.g. a client key's)."""
        self.price = price
        self.request = Ledger(limit=request or Budget(), scope="request")
        self.session = session
        self._ledgers = [self.request, *([session] if session is not None else []), *extra]
        self._local = [ledger for ledger in self._ledgers if not ledger.shared]
        self._shared = [ledger for ledger in self._ledgers if ledger.shared]
        self._open: list[Reservation] = []

    def worst_case(
        self, model: str, messages: list[Message], max_tokens: int, samples: int = 1
    ) -> tuple[float | None, int]:
        """(US dollars or None, tokens) if the call used all of `max_tokens` in each of its
        `samples` (each billed for the prompt: a backend without `n` is sent it each time).
        No cache hit is assumed: the whole prompt costs the input rate, or the cache-write
        rate where that is higher (a backend may write the whole prompt to its cache)."""
        usage = Usage(count_messages(messages) * samples, max_tokens * samples)
        usd = self.price(model, usage)
        written = self.price(model, Usage(usage.prompt_tokens, usage.completion_tokens,
                                          cache_write_tokens=usage.prompt_tokens))
        if usd is not None and written is not None:
            usd = max(usd, written)
        return usd, usage.total_tokens

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
        for ledger in self._ledgers:  # a shared ledger: as last seen (the store decides)
            reason = ledger.overflow(usd, tokens)
            if reason:
                return f"{ledger.scope} budget: {reason}"
        return None

    def _refuse(self, model: str, reason: str, quota: bool) -> BudgetExceeded:
        for ledger in self._local:
            ledger.refused += 1
        return (QuotaExceeded if quota else BudgetExceeded)(f"Call to {model} refused: {reason}.")

    def reserve(
        self, model: str, messages: list[Message], max_tokens: int, samples: int = 1
    ) -> Reservation:
        """Reserve the call's worst case in the in-process ledgers, or raise `BudgetExceeded`
        without starting it (shared ledgers: `areserve`).

        Without any limit nothing is counted: the reservation only carries the model.
        """
        usd, tokens = None, 0
        if not self.unlimited:
            usd, tokens = self.worst_case(model, messages, max_tokens, samples)
            if usd is None and self._needs_price():
                raise ConfigError(
                    f"A dollar budget needs a price for {model!r}; "
                    "add it under [prices] in the config."
                )
            for ledger in self._local:
                reason = ledger.overflow(usd, tokens)
                if reason:
                    raise self._refuse(model, f"{ledger.scope} budget: {reason}", ledger.quota)
            for ledger in self._local:
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
        for ledger in self._local:
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

    async def areserve(
        self, model: str, messages: list[Message], max_tokens: int, samples: int = 1
    ) -> Reservation:
        """`reserve`, then the same worst case in each shared ledger with a limit (one atomic
        check-and-reserve each); a refusal anywhere gives back what was taken."""
        reservation = self.reserve(model, messages, max_tokens, samples)
        try:
            for ledger in self._shared:
                if ledger.limit.unlimited:
                    continue
                ticket, reason = await ledger.take(model, reservation.usd, reservation.tokens)
                if ticket is None:
                    raise self._refuse(model, f"{ledger.scope} budget: {reason}", ledger.quota)
                reservation.tickets.append((ledger, ticket))
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.asettle(reservation, None)
            raise
        return reservation

    async def asettle(self, reservation: Reservation, usage: Usage | None) -> float | None:
        """`settle`, then in the shared ledgers (shielded: a cancelled call still settles)."""
        was_open = reservation.open
        cost = self.settle(reservation, usage)
        if was_open and self._shared:
            tickets = reservation.tickets
            with anyio.CancelScope(shield=True):
                for ledger in self._shared:
                    ticket = next((t for held, t in tickets if held is ledger), None)
                    if ticket is not None or usage is not None:
                        await ledger.give(ticket, cost, usage)
        return cost

    async def arelease(self) -> None:
        """`release` for shared ledgers too."""
        for reservation in list(self._open):
            await self.asettle(reservation, None)

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
