"""Fit router thresholds from a labelled set (RouteLLM-style), for `moa calibrate`.

For each labelled question, `collect()` runs the routed mixture twice with the same seed: a
probe whose routed aggregation is skipped (the proposers' majority answer; its signals and
whether it is right) and a run whose aggregation is strong (whether the strong tier gets it
right, and what it costs). Both go through the one executor with a router of their own. The
fits then choose the policy parameters that send a target share of questions, or spend a
target cost per question, to the strong tier.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from moa.config import MixtureConfig
from moa.errors import ConfigError
from moa.mixture import Mixture
from moa.providers.registry import Registry
from moa.routing.router import Decision, Router, Stage, ThresholdRouter
from moa.routing.signals import is_correct


@dataclass
class Sample:
    """What calibration learns about one labelled question."""

    signals: dict[str, Any]
    skip_correct: bool
    """The proposers' majority answer is right."""
    strong_correct: bool
    probe_cost: float
    """Cost of the proposers alone (US dollars)."""
    strong_cost: float
    """Extra cost of a strong aggregation."""


class _SkipProbe(Router):
    """Skips every stage it can; otherwise the cheap tier."""

    name = "probe"

    def decide_stage(self, stage: Stage) -> Decision:
        return Decision(
            "skip" if stage.can_skip else "cheap", "calibration probe", dict(stage.signals)
        )


async def collect(
    config: MixtureConfig,
    items: Sequence[tuple[str, str]],
    *,
    registry: Registry | None = None,
    seed: int = 0,
    on_item: Callable[[], None] | None = None,
) -> list[Sample]:
    """Run the probe and the strong path on every (question, answer) item (`on_item` is
    called after each).

    The signals are those of the first routed aggregation of the mixture.
    """
    if not any(a.strong for a in config.agents()):
        raise ConfigError("Calibration needs a routed stage: give the aggregator a `strong` model.")
    probe = Mixture(config, router=_SkipProbe(), registry=registry)
    strong = Mixture(config, router=ThresholdRouter("agreement", math.inf), registry=registry)
    samples = []
    try:
        for i, (question, answer) in enumerate(items):
            cheap = await probe.run(question, seed=seed + i)
            best = await strong.run(question, seed=seed + i)
            aggregate = next(d for d in cheap.decisions if d.stage.startswith("aggregate"))
            samples.append(
                Sample(
                    signals=aggregate.signals,
                    skip_correct=aggregate.choice == "skip" and is_correct(cheap.text, answer),
                    strong_correct=is_correct(best.text, answer),
                    probe_cost=cheap.cost_usd or 0.0,
                    strong_cost=max((best.cost_usd or 0.0) - (cheap.cost_usd or 0.0), 0.0),
                )
            )
            if on_item is not None:
                on_item()
    finally:
        await probe.aclose()
        await strong.aclose()
    return samples


@dataclass
class Fit:
    """A fitted router config and what it is expected to give on the labelled set."""

    router: dict[str, Any]
    strong_share: float
    accuracy: float
    cost_usd: float
    """Mean cost per question."""


def _outcome(samples: Sequence[Sample], strong: Sequence[bool]) -> tuple[float, float, float]:
    n = max(len(samples), 1)
    acc = sum(
        s.strong_correct if go else s.skip_correct for s, go in zip(samples, strong, strict=True)
    )
    cost = sum(
        s.probe_cost + (s.strong_cost if go else 0.0) for s, go in zip(samples, strong, strict=True)
    )
    return sum(strong) / n, acc / n, cost / n


def _pick(
    samples: Sequence[Sample],
    scores: Sequence[float],
    strong_share: float | None,
    target_cost: float | None,
) -> tuple[float, list[bool]]:
    """A cut on `scores` (strong when score > cut) meeting the share or the cost target."""
    best_cut, best_mask = math.inf, [False] * len(scores)
    for cut in sorted(set(scores), reverse=True):
        mask = [s > cut for s in scores]
        share, _, cost = _outcome(samples, mask)
        if strong_share is not None and share > strong_share + 1e-9:
            break
        if target_cost is not None and cost > target_cost + 1e-12:
            break
        best_cut, best_mask = cut, mask
    return best_cut, best_mask


def fit_threshold(
    samples: Sequence[Sample],
    signal: str = "agreement",
    *,
    strong_share: float | None = None,
    target_cost: float | None = None,
) -> Fit:
    """Threshold on one signal: below it the stage goes strong, at or above it is skipped."""
    values = [s.signals.get(signal) for s in samples]
    scores = [-(v if v is not None else -math.inf) for v in values]
    cut, mask = _pick(samples, scores, strong_share, target_cost)
    threshold = (
        -cut if math.isfinite(cut) else (min((v for v in values if v is not None), default=0.0))
    )
    share, acc, cost = _outcome(samples, mask)
    router = {
        "policy": "threshold",
        "signal": signal,
        "threshold": round(threshold, 6),
        "skip_above": round(threshold, 6),
    }
    return Fit(router, share, acc, cost)


def _logistic(
    rows: list[list[float]], labels: list[bool], steps: int = 3000, lr: float = 0.5
) -> list[float]:
    """Logistic regression weights (bias first), by gradient descent on standardised features."""
    dims = len(rows[0]) if rows else 0
    mean = [sum(r[j] for r in rows) / len(rows) for j in range(dims)]
    std = [
        math.sqrt(sum((r[j] - mean[j]) ** 2 for r in rows) / len(rows)) or 1.0 for j in range(dims)
    ]
    xs = [[(r[j] - mean[j]) / std[j] for j in range(dims)] for r in rows]
    w = [0.0] * (dims + 1)
    for _ in range(steps):
        grad = [0.0] * (dims + 1)
        for x, y in zip(xs, labels, strict=True):
            z = w[0] + sum(wj * xj for wj, xj in zip(w[1:], x, strict=True))
            err = 1 / (1 + math.exp(-max(-60.0, min(60.0, z)))) - float(y)
            grad[0] += err
            for j, xj in enumerate(x):
                grad[j + 1] += err * xj
        w = [wj - lr * g / len(xs) for wj, g in zip(w, grad, strict=True)]
    weights = [w[j + 1] / std[j] for j in range(dims)]
    bias = w[0] - sum(weights[j] * mean[j] for j in range(dims))
    return [bias, *weights]


def fit_marginal(
    samples: Sequence[Sample],
    *,
    strong_share: float | None = None,
    target_cost: float | None = None,
) -> Fit:
    """Marginal utility: fit p(majority right | agreement, min_confidence, verifier), the strong
    tier's lift, and the multiplier λ that meets the target. A signal some sample lacks (no
    logprobs, verifier off) is left out of the fit."""
    optional = [
        name for name in ("min_confidence", "verifier")
        if all(s.signals.get(name) is not None for s in samples)
    ]
    rows = [
        [float(s.signals.get("agreement") or 0.0)] + [float(s.signals[n]) for n in optional]
        for s in samples
    ]
    weights = _logistic(rows, [s.skip_correct for s in samples])
    fitted = dict(zip(optional, weights[2:], strict=True))
    wrong = [s for s in samples if not s.skip_correct]
    lift = sum(s.strong_correct for s in wrong) / len(wrong) if wrong else 0.5
    router: dict[str, Any] = {
        "policy": "marginal",
        # The router adds w_verifier·(verifier − 0.5); the fit used the raw score.
        "bias": round(weights[0] + 0.5 * fitted.get("verifier", 0.0), 4),
        "w_agreement": round(weights[1], 4),
        "w_confidence": round(fitted.get("min_confidence", 0.0), 4),
        "cheap_lift": 0.0,
        "strong_lift": round(lift, 4),
    }
    if "verifier" in fitted:
        router["w_verifier"] = round(fitted["verifier"], 4)
    gains = []
    for row in rows:
        z = weights[0] + sum(w * x for w, x in zip(weights[1:], row, strict=True))
        gains.append(lift * (1 - 1 / (1 + math.exp(-max(-60.0, min(60.0, z))))))
    cut, mask = _pick(samples, gains, strong_share, target_cost)
    router["multiplier"] = round(cut if math.isfinite(cut) else max(gains, default=1.0), 6)
    share, acc, cost = _outcome(samples, mask)
    return Fit(router, share, acc, cost)
