"""Routers: per stage, send the call to a model tier ("cheap" or "strong") or skip the stage.

A stage is an agent of the graph whose config names a `strong` tier beside its model: a
proposer (`propose`), an aggregator (`aggregate`), a refinement loop of the final aggregator
(`refine`) or an evolve recombination (`recombine`). The router sees the signals computed so
far (`moa.routing.signals.group_signals`), the estimated cost of each tier for this stage and
the share of the budget still free, and returns a `Decision` whose reason and signals become a
`moa.events.RouteDecision` event. `RouterConfig` is the `[router]` table of a mixture.

Policies: `FixedRouter` (always one tier), `ThresholdRouter` (one signal against thresholds),
`MarginalUtilityRouter` (strong when estimated gain / extra cost exceeds a multiplier that
grows as the budget runs out) and `RandomRouter` (a baseline at a chosen strong share).
"""

from __future__ import annotations

import abc
import math
import random
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from moa.errors import ConfigError
from moa.events import AgentId, RouteDecision
from moa.routing.verifier import VerifierConfig

Choice = Literal["cheap", "strong", "skip"]
TIERS: tuple[str, str] = ("cheap", "strong")
SIGNALS: tuple[str, ...] = (
    "agreement", "confidence", "min_confidence", "similarity", "verifier", "rank"
)
"""`rank` (evolve only): the share of this loop's groups that are less confident than this one."""


@dataclass
class Stage:
    """What the router knows when it decides one stage."""

    name: str
    kind: Literal["propose", "aggregate", "refine", "recombine"]
    signals: dict[str, Any] = field(default_factory=dict)
    costs: dict[str, float | None] = field(default_factory=dict)
    """Estimated US dollars of this stage per tier (None when a price is unknown)."""
    remaining: float | None = None
    """Share of the tightest budget still free, or None without a budget."""
    can_skip: bool = False


@dataclass
class Decision:
    choice: Choice
    reason: str
    signals: dict[str, Any] = field(default_factory=dict)

    def event(self, stage: str, t: float, agent: AgentId | None = None) -> RouteDecision:
        return RouteDecision(
            t=t,
            stage=stage,
            choice=self.choice,
            reason=self.reason,
            signals=self.signals,
            agent=agent,
        )


class Router(abc.ABC):
    """Decides the tier of each stage."""

    name: str = "router"
    proposer_tier: Literal["cheap", "strong"] = "cheap"

    def decide(self, stage: Stage) -> Decision:
        if stage.kind == "propose" and not stage.signals:
            return Decision(self.proposer_tier, "proposer slots start on the proposer tier", {})
        return self.decide_stage(stage)

    @abc.abstractmethod
    def decide_stage(self, stage: Stage) -> Decision:
        """Decide a stage that has signals (aggregation, refinement, recombination)."""


class FixedRouter(Router):
    """Every stage on one tier; never skips."""

    def __init__(self, tier: Literal["cheap", "strong"]) -> None:
        self.tier = tier
        self.proposer_tier = tier
        self.name = f"always-{tier}"

    def decide_stage(self, stage: Stage) -> Decision:
        return Decision(self.tier, f"fixed policy: always {self.tier}", dict(stage.signals))


class ThresholdRouter(Router):
    """One signal against thresholds: >= `skip_above` skips, >= `threshold` cheap, else strong.

    A missing signal (e.g. no logprobs) counts as low, so the stage goes to the strong tier.
    """

    def __init__(
        self, signal: str = "agreement", threshold: float = 0.67, skip_above: float | None = None
    ) -> None:
        if signal not in SIGNALS:
            raise ConfigError(f"Unknown routing signal {signal!r}; signals: {', '.join(SIGNALS)}.")
        self.signal = signal
        self.threshold = threshold
        self.skip_above = skip_above
        self.name = f"threshold:{signal}"

    def decide_stage(self, stage: Stage) -> Decision:
        value = stage.signals.get(self.signal)
        signals = dict(stage.signals)
        if value is None:
            return Decision("strong", f"no {self.signal} signal", signals)
        if stage.can_skip and self.skip_above is not None and value >= self.skip_above:
            return Decision(
                "skip", f"{self.signal} {value:.3g} >= skip {self.skip_above:.3g}", signals
            )
        if value >= self.threshold:
            return Decision("cheap", f"{self.signal} {value:.3g} >= {self.threshold:.3g}", signals)
        return Decision("strong", f"{self.signal} {value:.3g} < {self.threshold:.3g}", signals)


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-max(-60.0, min(60.0, x))))


class MarginalUtilityRouter(Router):
    """Pick the option with the best estimated quality minus λ × cost.

    p = sigmoid(bias + w_agreement·agreement + w_confidence·min_confidence
    + w_verifier·(verifier − 0.5)) estimates the chance that the current best answer (the
    proposers' majority, or the last aggregate) is right; min_confidence is the least confident
    reply's DeepConf score, verifier the judge's score in [0, 1] (only when the optional
    verifier is on; a missing signal adds nothing). Skipping keeps
    p; a cheap call reaches p + cheap_lift·(1 − p); a strong call p + strong_lift·(1 − p).
    Costs are in units of the strong call of this stage, and λ = multiplier / remaining budget
    share, so the strong tier is chosen when gain / extra cost > λ and gets rarer as the budget
    runs out.
    """

    def __init__(
        self,
        *,
        bias: float = -3.0,
        w_agreement: float = 5.0,
        w_confidence: float = 0.0,
        w_verifier: float = 4.0,
        cheap_lift: float = 0.1,
        strong_lift: float = 0.5,
        multiplier: float = 0.1,
    ) -> None:
        self.bias = bias
        self.w_agreement = w_agreement
        self.w_confidence = w_confidence
        self.w_verifier = w_verifier
        self.cheap_lift = cheap_lift
        self.strong_lift = strong_lift
        self.multiplier = multiplier
        self.name = "marginal"

    def p_correct(self, signals: dict[str, Any]) -> float:
        """Estimated probability that the current best answer is right."""
        x = self.bias + self.w_agreement * float(signals.get("agreement") or 0.0)
        if self.w_confidence and signals.get("min_confidence") is not None:
            x += self.w_confidence * float(signals["min_confidence"])
        if self.w_verifier and signals.get("verifier") is not None:
            x += self.w_verifier * (float(signals["verifier"]) - 0.5)
        return _sigmoid(x)

    def decide_stage(self, stage: Stage) -> Decision:
        p = self.p_correct(stage.signals)
        strong_cost = stage.costs.get("strong") or 1.0
        rel = {
            t: (stage.costs.get(t) or (1.0 if t == "strong" else 0.1)) / strong_cost for t in TIERS
        }
        quality = {
            "skip": p,
            "cheap": p + self.cheap_lift * (1 - p),
            "strong": p + self.strong_lift * (1 - p),
        }
        cost = {"skip": 0.0, **rel}
        remaining = stage.remaining if stage.remaining is not None else 1.0
        lam = self.multiplier / max(remaining, 1e-6)
        options = ["skip", "cheap", "strong"] if stage.can_skip else ["cheap", "strong"]
        best = max(options, key=lambda o: (quality[o] - lam * cost[o], -cost[o]))
        base = min(options, key=lambda o: cost[o])
        gain = quality["strong"] - quality[base]
        extra = cost["strong"] - cost[base]
        ratio = gain / extra if extra > 0 else math.inf
        signals = {
            **stage.signals,
            "p_correct": round(p, 4),
            "gain": round(gain, 4),
            "extra_cost": round(extra, 4),
            "lambda": round(lam, 4),
        }
        verb = ">" if ratio > lam else "<="
        reason = f"gain/extra cost {ratio:.3g} {verb} λ {lam:.3g}; best utility: {best}"
        return Decision(best, reason, signals)  # type: ignore[arg-type]


class RandomRouter(Router):
    """Baseline: strong with probability `p_strong`, else skip (cheap where skip is not allowed)."""

    def __init__(self, p_strong: float = 0.3, seed: int = 0) -> None:
        self.p_strong = p_strong
        self.rng = random.Random(seed)
        self.name = f"random:{p_strong:.2f}"

    def decide_stage(self, stage: Stage) -> Decision:
        draw = self.rng.random()
        if draw < self.p_strong:
            return Decision(
                "strong", f"random draw {draw:.3f} < {self.p_strong:.3f}", dict(stage.signals)
            )
        other: Choice = "skip" if stage.can_skip else "cheap"
        return Decision(
            other, f"random draw {draw:.3f} >= {self.p_strong:.3f}", dict(stage.signals)
        )


class _Common(BaseModel):
    """Keys of the `[router]` table shared by every policy."""

    model_config = ConfigDict(extra="forbid")
    logprobs: bool = True
    """Ask the references of routed stages for logprobs (where the backend gives them)."""
    top_logprobs: int = Field(5, ge=0, le=20)
    refine_loops: int = Field(0, ge=0)
    """Extra rounds of the final aggregator (it must be routed), each one a routed stage:
    skip ends the loop, a tier runs one more aggregation over the last answer and the proposals."""
    verifier: VerifierConfig | None = None
    """A judge call that scores the candidate answer of each routed aggregation and refinement
    (signal `verifier`); None (the default) makes no such call."""


class _Fixed(_Common):
    policy: Literal["fixed"]
    tier: Literal["cheap", "strong"] = "strong"


class _Threshold(_Common):
    policy: Literal["threshold"]
    signal: Literal[
        "agreement", "confidence", "min_confidence", "similarity", "verifier", "rank"
    ] = "agreement"
    threshold: float = 0.67
    skip_above: float | None = None


class _Marginal(_Common):
    policy: Literal["marginal"]
    bias: float = -3.0
    w_agreement: float = 5.0
    w_confidence: float = 0.0
    w_verifier: float = 4.0
    cheap_lift: float = Field(0.1, ge=0, le=1)
    strong_lift: float = Field(0.5, ge=0, le=1)
    multiplier: float = Field(0.1, ge=0)


class _Random(_Common):
    policy: Literal["random"]
    p_strong: float = Field(0.3, ge=0, le=1)
    seed: int = 0


RouterConfig = Annotated[_Fixed | _Threshold | _Marginal | _Random, Field(discriminator="policy")]
"""The `[router]` table: a policy with its parameters, plus the keys of `_Common`."""
_ADAPTER: TypeAdapter[Any] = TypeAdapter(RouterConfig)
COMMON_KEYS: tuple[str, ...] = tuple(_Common.model_fields)
"""Keys of the `[router]` table that are not the policy's."""
_ALIASES: dict[str, dict[str, Any]] = {
    "always-cheap": {"policy": "fixed", "tier": "cheap"},
    "always-strong": {"policy": "fixed", "tier": "strong"},
    "cheap": {"policy": "fixed", "tier": "cheap"},
    "strong": {"policy": "fixed", "tier": "strong"},
    "mu": {"policy": "marginal"},
}


def router_from_config(data: dict[str, Any] | BaseModel) -> Router:
    """Build a router from a `[router]` table, e.g. {"policy": "threshold", ...}."""
    try:
        cfg = _ADAPTER.validate_python(
            data.model_dump() if isinstance(data, BaseModel) else data
        )
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "policy"
        raise ConfigError(f"Invalid router config: field '{where}': {first['msg']}.") from None
    params = cfg.model_dump(exclude={"policy", *COMMON_KEYS})
    if isinstance(cfg, _Fixed):
        return FixedRouter(cfg.tier)
    if isinstance(cfg, _Threshold):
        return ThresholdRouter(**params)
    if isinstance(cfg, _Marginal):
        return MarginalUtilityRouter(**params)
    return RandomRouter(**params)


def parse_policy(spec: str, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """`NAME[:key=value,...]` -> a router config dict; `base` (a calibrated config of the same
    policy) supplies defaults. Names: fixed, threshold, marginal, random, always-cheap,
    always-strong, mu."""
    name, _, rest = spec.partition(":")
    data = dict(_ALIASES.get(name, {"policy": name}))
    if base:
        shared = {k: v for k, v in base.items() if k in COMMON_KEYS}
        data = {**base, **data} if base.get("policy") == data["policy"] else {**shared, **data}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"Policy option {item!r} in {spec!r} must look like key=value.")
        data[key.strip()] = _scalar(value.strip())
    router_from_config(data)
    return data


def _scalar(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"none": None, "true": True, "false": False}.get(value.lower(), value)
