"""Client API keys of `moa serve --keys FILE`: who may call, which mixtures, how fast, how much.

    [keys.alice]
    sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    mixtures = ["mixture"]                                  # omitted: every served mixture
    rpm = 60                                                # requests per minute
    budget = { usd = 5.0, tokens = 200000, per = "day" }    # per "day" (UTC) or "total"
    admin = false                                           # true: may read every key's usage

Only the SHA-256 of each key is stored (`printf %s "$KEY" | sha256sum`, or `hash_key`). Limits
and spend live in the server's state (`moa.state`): with Redis they hold across replicas and
survive restarts. Answers: 401 unknown key, 403 a mixture the key may not use, 429 with
`Retry-After` when its rate is spent, 429 `insufficient_quota` when its budget is (OpenAI's
status and code for a spent quota; the official SDKs are told not to retry it).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import math
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moa.errors import ConfigError, StateUnavailable
from moa.openai.wire import QUOTA, Refused
from moa.runtime.budget import Budget, Ledger

if TYPE_CHECKING:
    from starlette.requests import Request

    from moa.state import State

DAY_KEEP_S = 3 * 86_400.0
"""How long a shared store keeps a per-day ledger after its last use."""


def hash_key(key: str) -> str:
    """The hex SHA-256 of a client key, as the keys file stores it."""
    return hashlib.sha256(key.encode()).hexdigest()


class KeyBudget(Budget):
    """A key's budget: dollars and/or tokens, per UTC day or in total."""

    per: Literal["day", "total"] = "total"


class ClientKey(BaseModel):
    """One client key of the keys file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", repr=False)
    mixtures: list[str] | None = None
    rpm: int | None = Field(None, ge=1)
    budget: KeyBudget | None = None
    admin: bool = False

    def ledger_name(self, today: dt.date | None = None) -> str:
        """The ledger of the current budget period: `key:NAME` or `key:NAME:YYYY-MM-DD`."""
        if self.budget is None or self.budget.per == "total":
            return f"key:{self.name}"
        return f"key:{self.name}:{(today or dt.datetime.now(dt.UTC).date()).isoformat()}"


class KeyRing:
    """The keys of a keys file, found by the hash of the bearer token."""

    def __init__(self, keys: Iterable[ClientKey]) -> None:
        self.by_name: dict[str, ClientKey] = {}
        self.by_hash: dict[str, ClientKey] = {}
        for key in keys:
            if key.name in self.by_name or key.sha256 in self.by_hash:
                raise ConfigError(f"The keys file lists the key {key.name!r} (or its hash) twice.")
            self.by_name[key.name] = key
            self.by_hash[key.sha256] = key

    @classmethod
    def load(cls, path: str | Path) -> KeyRing:
        """Read a keys file; a bad one is a `ConfigError` naming the key and field."""
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ConfigError(f"Cannot read the keys file {str(path)!r}: {err}.") from None
        tables = data.get("keys")
        if not isinstance(tables, dict) or not tables or set(data) != {"keys"}:
            raise ConfigError(f"The keys file {str(path)!r} must hold [keys.NAME] tables only.")
        keys = []
        for name, table in tables.items():
            try:
                keys.append(ClientKey.model_validate({"name": name, **table}))
            except (ValidationError, TypeError) as err:
                where = ""
                if isinstance(err, ValidationError):
                    where = ".".join(str(p) for p in err.errors()[0]["loc"])
                raise ConfigError(
                    f"Key {name!r} in {str(path)!r}: field {where or '(table)'!r} is invalid."
                ) from None
        return cls(keys)

    def find(self, token: str) -> ClientKey | None:
        key = self.by_hash.get(hash_key(token))
        # The dict lookup found it by hash; compare once more in constant time.
        return key if key is not None and hmac.compare_digest(key.sha256, hash_key(token)) else None


class Access:
    """The per-request checks of client keys against the server's state."""

    def __init__(self, keys: KeyRing, state: State) -> None:
        self.keys, self.state = keys, state

    def authorize(self, request: Request) -> ClientKey:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        key = self.keys.find(token) if scheme.lower() == "bearer" and token else None
        if key is None:
            raise Refused(401, "Invalid or missing API key.", "authentication_error",
                          "invalid_api_key")
        return key

    def ledger(self, key: ClientKey) -> Ledger:
        per_day = key.budget is not None and key.budget.per == "day"
        limit = Budget(usd=key.budget.usd, tokens=key.budget.tokens) if key.budget else Budget()
        return self.state.ledger(key.ledger_name(), limit, scope=f"key {key.name!r}",
                                 quota=True, keep_s=DAY_KEEP_S if per_day else None)

    async def admit(self, key: ClientKey, mixture: str) -> list[Ledger]:
        """The ledgers a request of `key` for `mixture` is charged to, or the refusal."""
        if key.mixtures is not None and mixture not in key.mixtures:
            raise Refused(403, f"The key {key.name!r} may not use the model {mixture!r}.",
                          "permission_error", "model_not_allowed", param="model")
        if key.rpm is not None:
            wait = await self.state.hit(f"key:{key.name}", key.rpm)
            if wait > 0:
                raise Refused(429, f"The key {key.name!r} is over its rate limit of {key.rpm} "
                              "requests per minute.", "rate_limit_error",
                              "rate_limit_exceeded", retry_after=max(1, math.ceil(wait)))
        ledger = self.ledger(key)
        if not ledger.limit.unlimited:
            try:
                await ledger.refresh()
            except StateUnavailable as err:
                raise Refused(503, str(err), "server_error", "state_unavailable",
                              retry_after=1) from None
            if _spent(ledger):
                assert key.budget is not None
                period = "today's" if key.budget.per == "day" else "its"
                raise Refused(429, f"The key {key.name!r} has spent {period} budget.", QUOTA,
                              QUOTA)
        return [ledger]

    async def usage(self, key: ClientKey, name: str) -> dict[str, Any]:
        """`GET /v1/moa/keys/{name}/usage`: a key reads its own; an admin key any."""
        if name != key.name and not key.admin:
            raise Refused(403, "A key may read only its own usage.", "permission_error",
                          "not_allowed")
        target = self.keys.by_name.get(name)
        if target is None:
            raise Refused(404, f"No key is named {name!r}.", code="key_not_found")
        ledger = self.ledger(target)
        try:
            await ledger.refresh()
        except StateUnavailable as err:
            raise Refused(503, str(err), "server_error", "state_unavailable",
                          retry_after=1) from None
        per = target.budget.per if target.budget else "total"
        return {
            "object": "moa.key_usage",
            "name": name,
            "period": per,
            "day": ledger_day(target) if per == "day" else None,
            "spent_usd": round(ledger.spent_usd, 8),
            "spent_tokens": ledger.spent_tokens,
            "reserved_usd": round(ledger.reserved_usd, 8),
            "reserved_tokens": ledger.reserved_tokens,
            "calls": ledger.calls,
            "refused": ledger.refused,
            "limit_usd": ledger.limit.usd,
            "limit_tokens": ledger.limit.tokens,
            "rpm": target.rpm,
            "mixtures": target.mixtures,
        }


def ledger_day(key: ClientKey) -> str:
    return key.ledger_name().rpartition(":")[2]


def _spent(ledger: Ledger) -> bool:
    """Settled spend has reached a limit (reservations still in flight do not count here)."""
    limit = ledger.limit
    return (limit.tokens is not None and ledger.spent_tokens >= limit.tokens) or (
        limit.usd is not None and ledger.spent_usd >= limit.usd
    )
