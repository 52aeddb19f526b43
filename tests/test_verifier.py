"""The optional verifier signal: reply parsing, and the judge call of a routed aggregator on the
loopback server (a judge model whose reply is a fixed score or preference)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from moa.config import load
from moa.errors import ConfigError
from moa.events import RouteDecision
from moa.mixture import Mixture
from moa.result import MixtureResult
from moa.routing.router import MarginalUtilityRouter, Stage
from moa.routing.verifier import PAIRWISE_PROMPT, POINTWISE_PROMPT, parse_preference, parse_score
from moa.runtime.run import stage_seed
from moa.testing import LoopbackServer, ModelBehavior

PRICES = {"loop/cheap": (1.0, 2.0), "loop/strong": (10.0, 30.0), "loop/judge": (5.0, 5.0)}
CHEAP = "Adding them up carefully. The answer is 4."


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ("Score: 9/10", 0.9),
        ("Score: 8", 0.8),
        ("**Rating:** 7 out of 10", 0.7),
        ("[[6]]", 0.6),
        ("\\boxed{3}", 0.3),
        ("0.85", 0.85),
        ("85%", 0.85),
        ("Score - 10. The answer checks out.", 1.0),
        ("9\nThe arithmetic is right.", 0.9),
        ("Score: 42", 0.42),
        ("I cannot tell.", None),
    ],
)
def test_parse_score(reply: str, score: float | None) -> None:
    assert parse_score(reply) == (None if score is None else pytest.approx(score))


@pytest.mark.parametrize(
    ("reply", "preference"),
    [
        ("Preference: A", 1.0),
        ("Preference: B", 0.0),
        ("[[B]]", 0.0),
        ("[[C]]", 0.5),
        ("Preferred answer: (A)", 1.0),
        ("Answer B is better because it carries the one.", 0.0),
        ("B", 0.0),
        ("tie", 0.5),
        ("Neither is better.", 0.5),
        ("I prefer a longer proof.", None),
        ("no idea", None),
    ],
)
def test_parse_preference(reply: str, preference: float | None) -> None:
    assert parse_preference(reply) == preference


def test_marginal_router_weighs_the_verifier() -> None:
    router = MarginalUtilityRouter()
    base = {"agreement": 0.67}
    assert router.p_correct({**base, "verifier": 1.0}) > router.p_correct(base)
    assert router.p_correct({**base, "verifier": 0.0}) < router.p_correct(base)
    assert router.p_correct({**base, "verifier": None}) == router.p_correct(base)
    costs = {"cheap": 0.1, "strong": 1.0}
    low = Stage("aggregate", "aggregate", {**base, "verifier": 0.0}, costs, can_skip=True)
    high = Stage("aggregate", "aggregate", {**base, "verifier": 1.0}, costs, can_skip=True)
    assert (router.decide(low).choice, router.decide(high).choice) == ("strong", "skip")


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    behaviors = {
        "cheap": ModelBehavior(reply=CHEAP, logprob=-0.1),
        "strong": ModelBehavior(reply="Checked twice. The answer is 4."),
        "judge": ModelBehavior(reply="Score: 9/10"),
    }
    with LoopbackServer(behaviors) as srv:
        yield srv


def config_of(
    verifier: dict[str, Any] | None = None, router: dict[str, Any] | None = None, **kw: Any
) -> dict[str, Any]:
    """Three cheap proposers and an aggregator routed by the judge's verdict."""
    router = router or {"policy": "threshold", "signal": "verifier", "threshold": 0.5,
                        "skip_above": 0.85}
    return {
        "layers": [{"agents": [{"model": "loop/cheap", "n": 3, "max_tokens": 64}]}],
        "aggregator": {"model": "loop/cheap", "strong": "loop/strong", "max_tokens": 64},
        "mode": "layered",
        "prices": PRICES,
        "router": {**router, "verifier": verifier or {"model": "loop/judge"}},
        **kw,
    }


def routed(server: LoopbackServer, **kw: Any) -> Mixture:
    return Mixture(config_of(**kw), registry=server.registry())


def run(mixture: Mixture, seed: int = 1) -> MixtureResult:
    return anyio.run(lambda: mixture.run("What is 2 + 2?", seed=seed))


def models(server: LoopbackServer) -> list[str]:
    return [r.model for r in server.requests if r.model]


def aggregate(result: MixtureResult) -> RouteDecision:
    return next(d for d in result.decisions if d.stage.startswith("aggregate"))


def test_a_high_pointwise_score_skips_the_aggregation(server: LoopbackServer) -> None:
    result = run(routed(server))
    decision = aggregate(result)
    assert decision.choice == "skip" and "verifier 0.9 >= skip 0.85" in decision.reason
    assert decision.signals["verifier"] == pytest.approx(0.9)
    assert decision.signals["verifier_mode"] == "pointwise"
    assert models(server) == ["cheap"] * 3 + ["judge"]
    judge = server.requests[-1].body
    assert judge["messages"][0] == {"role": "system", "content": POINTWISE_PROMPT}
    assert "What is 2 + 2?" in judge["messages"][1]["content"]
    assert f"Candidate answer:\n{CHEAP}" in judge["messages"][1]["content"]
    assert judge["max_tokens"] == 32 and judge["temperature"] == 0 and not judge.get("logprobs")
    # The judge call counts in calls, cost and the budget report.
    [verifier] = [o for o in result.outputs if o.agent.name == "verifier"]
    assert verifier.ok and verifier.agent.model == "loop/judge" and verifier.cost_usd
    assert result.calls == 4 and result.budget["request"]["calls"] == 4
    assert result.cost_usd == pytest.approx(sum(o.cost_usd or 0 for o in result.outputs))
    assert result.text == CHEAP


def test_a_low_score_sends_the_aggregation_to_the_strong_tier(server: LoopbackServer) -> None:
    server.set_behavior("judge", ModelBehavior(reply="The answer looks doubtful. Score: 2"))
    result = run(routed(server))
    decision = aggregate(result)
    assert decision.choice == "strong" and decision.signals["verifier"] == pytest.approx(0.2)
    assert models(server) == ["cheap"] * 3 + ["judge", "strong"]
    assert result.text == "Checked twice. The answer is 4." and result.calls == 5


def test_pairwise_compares_the_majority_with_its_rival(server: LoopbackServer) -> None:
    answers = {stage_seed(7, 0): "4", stage_seed(7, 1): "4", stage_seed(7, 2): "5"}

    def reply(body: dict[str, Any]) -> str:
        return f"Adding them up carefully. The answer is {answers.get(body.get('seed'), '4')}."

    server.set_behavior("cheap", ModelBehavior(reply=reply, logprob=-0.1))
    server.set_behavior("judge", ModelBehavior(reply="[[B]]"))
    result = run(routed(server, verifier={"model": "loop/judge", "mode": "pairwise"}), seed=7)
    decision = aggregate(result)
    assert decision.signals["verifier_mode"] == "pairwise"
    assert decision.signals["verifier"] == 0.0 and decision.choice == "strong"
    judge = next(r.body for r in server.requests if r.model == "judge")
    assert judge["messages"][0]["content"] == PAIRWISE_PROMPT
    prompt = judge["messages"][1]["content"]
    assert "Answer A:\nAdding them up carefully. The answer is 4." in prompt
    assert "Answer B:\nAdding them up carefully. The answer is 5." in prompt


def test_pairwise_without_a_rival_scores_pointwise(server: LoopbackServer) -> None:
    result = run(routed(server, verifier={"model": "loop/judge", "mode": "pairwise"}))
    assert aggregate(result).signals["verifier_mode"] == "pointwise"
    assert aggregate(result).choice == "skip"


def test_the_verifier_judges_each_refinement_loop(server: LoopbackServer) -> None:
    router = {"policy": "threshold", "signal": "verifier", "threshold": 0.5, "skip_above": 0.95}
    result = run(routed(server, router={**router, "refine_loops": 1}))
    stages = [(d.stage, d.choice) for d in result.decisions]
    assert stages == [("aggregate.L2.1", "cheap"), ("refine.final", "cheap")]
    assert models(server) == ["cheap"] * 3 + ["judge", "cheap", "judge", "cheap"]
    assert result.calls == 7


def test_a_judge_call_over_budget_leaves_the_signal_empty(server: LoopbackServer) -> None:
    verifier = {"model": "loop/judge", "max_tokens": 100_000}
    result = run(routed(server, verifier=verifier, budget={"tokens": 5_000}))
    decision = aggregate(result)
    assert decision.signals["verifier"] is None
    assert "refused: request budget" in decision.signals["verifier_error"]
    assert decision.choice == "strong" and "no verifier signal" in decision.reason
    assert "judge" not in models(server)
    assert result.budget["request"]["refused"] == 1


def test_off_by_default_and_checked_at_load(server: LoopbackServer) -> None:
    config = config_of()
    config["router"] = {"policy": "marginal"}
    loaded = load(config, registry=server.registry())
    assert loaded.router is not None and loaded.router.verifier is None
    result = anyio.run(lambda: Mixture(config, registry=server.registry()).run("What is 2 + 2?"))
    assert "verifier" not in aggregate(result).signals
    assert "judge" not in models(server)
    bad = config_of(verifier={"model": "nowhere/judge"})
    with pytest.raises(ConfigError, match=r"router\.verifier\.model.*'nowhere'"):
        load(bad, registry=server.registry())


@pytest.mark.parametrize(
    ("judge", "error"),
    [
        (ModelBehavior(reply="I cannot say."), "the judge's reply holds no score"),
        (ModelBehavior(reply="x", fail_status=400), "HTTP 400"),
    ],
    ids=["no score", "failed call"],
)
def test_an_unusable_judge_reply_says_why_in_verifier_error(
    server: LoopbackServer, judge: ModelBehavior, error: str
) -> None:
    server.set_behavior("judge", judge)
    decision = aggregate(run(routed(server, verifier={"model": "loop/judge", "max_tokens": 32})))
    assert decision.signals["verifier"] is None
    assert error in decision.signals["verifier_error"]
    assert decision.choice == "strong"


def test_a_dollar_budget_needs_a_price_for_the_judge(server: LoopbackServer) -> None:
    config = config_of(verifier={"model": "loop/unpriced-judge"}, budget={"usd": 1.0})
    with pytest.raises(ConfigError, match="price for 'loop/unpriced-judge'"):
        Mixture(config, registry=server.registry())
