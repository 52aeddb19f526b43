"""Router policies: fixed, threshold, marginal utility, random; config parsing."""

from __future__ import annotations

import pytest

from moa.errors import ConfigError
from moa.events import RouteDecision
from moa.routing.router import (
    FixedRouter,
    MarginalUtilityRouter,
    RandomRouter,
    Stage,
    ThresholdRouter,
    parse_policy,
    router_from_config,
)

COSTS = {"cheap": 0.001, "strong": 0.01}


def _agg(agreement: float, confidence: float | None = None, **kw: object) -> Stage:
    signals = {"agreement": agreement, "confidence": confidence}
    return Stage(name="aggregate", kind="aggregate", signals=signals, costs=dict(COSTS), **kw)  # type: ignore[arg-type]


def test_fixed_router_never_skips() -> None:
    router = FixedRouter("strong")
    assert router.decide(Stage(name="propose.1", kind="propose")).choice == "strong"
    assert router.decide(_agg(1.0, can_skip=True)).choice == "strong"
    assert FixedRouter("cheap").decide(_agg(0.0)).choice == "cheap"


def test_threshold_router_skip_cheap_strong() -> None:
    router = ThresholdRouter("agreement", threshold=0.6, skip_above=1.0)
    assert router.decide(Stage(name="propose.1", kind="propose")).choice == "cheap"
    assert router.decide(_agg(1.0, can_skip=True)).choice == "skip"
    assert router.decide(_agg(1.0, can_skip=False)).choice == "cheap"
    assert router.decide(_agg(0.67)).choice == "cheap"
    low = router.decide(_agg(0.34))
    assert low.choice == "strong" and "0.34 < 0.6" in low.reason
    assert low.signals["agreement"] == 0.34


def test_threshold_router_missing_signal_goes_strong() -> None:
    decision = ThresholdRouter("confidence", threshold=1.0).decide(_agg(1.0, None))
    assert decision.choice == "strong" and "no confidence" in decision.reason
    with pytest.raises(ConfigError, match="Unknown routing signal"):
        ThresholdRouter("vibes")


def test_marginal_utility_prefers_strong_when_uncertain() -> None:
    router = MarginalUtilityRouter(multiplier=0.2)
    sure = router.decide(_agg(1.0, can_skip=True))
    unsure = router.decide(_agg(0.34, can_skip=True))
    assert sure.choice == "skip"
    assert unsure.choice == "strong"
    assert unsure.signals["p_correct"] < sure.signals["p_correct"]
    assert {"gain", "extra_cost", "lambda"} <= set(unsure.signals)


def test_marginal_utility_gets_stingy_as_budget_runs_out() -> None:
    router = MarginalUtilityRouter(multiplier=0.2)
    plenty = router.decide(_agg(0.5, can_skip=True, remaining=1.0))
    scarce = router.decide(_agg(0.5, can_skip=True, remaining=0.05))
    assert plenty.choice == "strong"
    assert scarce.choice != "strong"
    assert scarce.signals["lambda"] == pytest.approx(4.0)


def test_confidence_weight_moves_the_estimate() -> None:
    router = MarginalUtilityRouter(w_confidence=2.0)
    assert router.p_correct({"agreement": 0.5, "min_confidence": 2.0}) > router.p_correct(
        {"agreement": 0.5, "min_confidence": 0.5}
    )


def test_random_router_hits_its_share() -> None:
    router = RandomRouter(p_strong=0.3, seed=1)
    choices = [router.decide(_agg(1.0, can_skip=True)).choice for _ in range(2000)]
    assert 0.25 < choices.count("strong") / len(choices) < 0.35
    assert set(choices) == {"strong", "skip"}


def test_decision_becomes_event() -> None:
    decision = ThresholdRouter().decide(_agg(0.2))
    event = decision.event("aggregate", 1.5)
    assert isinstance(event, RouteDecision)
    assert (event.stage, event.choice, event.t) == ("aggregate", "strong", 1.5)
    assert event.signals["agreement"] == 0.2


def test_config_and_policy_specs() -> None:
    assert isinstance(router_from_config({"policy": "fixed", "tier": "cheap"}), FixedRouter)
    spec = parse_policy("threshold:signal=confidence,threshold=1.5,skip_above=none")
    assert spec == {
        "policy": "threshold",
        "signal": "confidence",
        "threshold": 1.5,
        "skip_above": None,
    }
    assert parse_policy("always-strong") == {"policy": "fixed", "tier": "strong"}
    calibrated = {"policy": "marginal", "bias": -2.0, "multiplier": 0.3}
    assert parse_policy("mu:multiplier=0.5", base=calibrated)["bias"] == -2.0
    assert parse_policy("mu:multiplier=0.5", base=calibrated)["multiplier"] == 0.5
    # The [router] table's keys that are not the policy's survive a change of policy.
    table = {"policy": "threshold", "threshold": 0.5, "top_logprobs": 3, "refine_loops": 1}
    assert parse_policy("always-cheap", base=table) == {
        "policy": "fixed", "tier": "cheap", "top_logprobs": 3, "refine_loops": 1
    }
    rank = router_from_config({"policy": "threshold", "signal": "rank", "threshold": 0.25,
                               "refine_loops": 2, "logprobs": False})
    assert isinstance(rank, ThresholdRouter) and rank.signal == "rank"
    with pytest.raises(ConfigError, match=r"field 'threshold\.signal'"):
        router_from_config({"policy": "threshold", "signal": "vibes"})
    with pytest.raises(ConfigError):
        parse_policy("nonsense")
    with pytest.raises(ConfigError, match="key=value"):
        parse_policy("threshold:0.5")


def test_marginal_fit_learns_the_verifier_weight_when_the_verifier_is_on() -> None:
    import random

    from moa.routing.calibration import Sample, fit_marginal
    from moa.routing.router import MarginalUtilityRouter

    rng = random.Random(7)
    samples = []
    for _ in range(200):
        verifier = rng.random()
        samples.append(Sample(
            signals={"agreement": rng.choice([0.5, 1.0]), "verifier": verifier},
            skip_correct=rng.random() < verifier,  # the judge's score is what predicts it
            strong_correct=True, probe_cost=1.0, strong_cost=1.0,
        ))
    fit = fit_marginal(samples, strong_share=0.3)
    assert fit.router["w_verifier"] > 2 > abs(fit.router["w_agreement"])
    router = MarginalUtilityRouter(**{k: v for k, v in fit.router.items() if k != "policy"})
    low, high = (router.p_correct({"agreement": 0.75, "verifier": v}) for v in (0.1, 0.9))
    assert low < 0.3 and high > 0.7, "the fitted p tracks the rate the data were drawn with"

    without = [Sample({"agreement": s.signals["agreement"]}, s.skip_correct, True, 1.0, 1.0)
               for s in samples]
    assert "w_verifier" not in fit_marginal(without, strong_share=0.3).router
