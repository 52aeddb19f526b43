"""Routed stages in the one executor (layered, staircase) and Squeeze Evolve, on the loopback
server over real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from moa.errors import DeadlineExceeded, MixtureError, NotEnoughProposers
from moa.events import (
    AgentFinished,
    AgentStarted,
    FinalDelta,
    Notice,
    RouteDecision,
    RunFailed,
    RunFinished,
    RunStarted,
    UsageReport,
)
from moa.mixture import Mixture
from moa.providers.registry import Limits
from moa.runtime.budget import SessionBudget
from moa.runtime.run import stage_seed
from moa.testing import LoopbackServer, ModelBehavior

PRICES = {"loop/cheap": (1.0, 2.0), "loop/strong": (10.0, 30.0)}
AGREE = {"policy": "threshold", "signal": "agreement", "threshold": 0.9}


def _by_seed(answers: dict[int | None, str], default: str, **kw: Any) -> ModelBehavior:
    """A reply that depends on the request's seed, so proposers can disagree."""

    def reply(body: dict[str, Any]) -> str:
        return f"Adding them up carefully. The answer is {answers.get(body.get('seed'), default)}."

    return ModelBehavior(reply=reply, logprob=-0.1, **kw)


def _disagree(seed: int) -> dict[int | None, str]:
    return {stage_seed(seed, i): answer for i, answer in enumerate("456")}


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    behaviors = {
        "cheap": ModelBehavior(reply="Adding them up carefully. The answer is 4.", logprob=-0.1),
        "strong": ModelBehavior(reply="Checked twice. The answer is 4.", logprob=-0.05),
    }
    with LoopbackServer(behaviors) as srv:
        yield srv


def _config(router: dict[str, Any] | None = AGREE, **kw: Any) -> dict[str, Any]:
    """Three cheap proposers and an aggregator routed between the cheap and strong tiers."""
    config: dict[str, Any] = {
        "layers": [{"agents": [{"model": "loop/cheap", "n": 3, "max_tokens": 64}]}],
        "aggregator": {"model": "loop/cheap", "strong": "loop/strong", "max_tokens": 64},
        "mode": "layered",
        "prices": PRICES,
        **kw,
    }
    if router is not None:
        config["router"] = router
    return config


def _mixture(server: LoopbackServer, config: dict[str, Any], **kw: Any) -> Mixture:
    registry = server.registry(limits=Limits(max_retries=0, read_timeout=5.0))
    return Mixture(config, registry=registry, **kw)


def _events(mixture: Mixture, question: str = "What is 2 + 2?", seed: int = 1) -> list[Any]:
    async def collect() -> list[Any]:
        return [event async for event in mixture.stream(question, seed=seed)]

    return anyio.run(collect)


def _models(srv: LoopbackServer) -> list[str]:
    return [r.body["model"] for r in srv.requests if r.body]


def test_agreeing_proposers_keep_the_aggregator_cheap(server: LoopbackServer) -> None:
    events = _events(_mixture(server, _config()))
    assert isinstance(events[0], RunStarted) and isinstance(events[-1], RunFinished)
    started = {a.key: a for a in events[0].agents}
    assert started["final"].strong == "loop/strong", "RunStarted names both tiers, undecided"
    (decision,) = [e for e in events if isinstance(e, RouteDecision)]
    assert decision.stage == "aggregate.final" and decision.choice == "cheap"
    assert decision.signals["agreement"] == 1.0 and decision.signals["references_done"] == 3
    # The loopback server reports top-5 alternatives at lp, lp-1, ..., lp-4: DeepConf = 2 - lp.
    assert decision.signals["confidence_source"] == "topk"
    assert decision.signals["min_confidence"] == pytest.approx(2.1)
    assert decision.agent is not None and decision.agent.final
    assert _models(server) == ["cheap"] * 4
    assert all(r.body["logprobs"] for r in server.requests[:3]), "references carry logprobs"
    final = [e for e in events if isinstance(e, AgentStarted) and e.agent.final]
    assert final[0].agent.model == "loop/cheap" and final[0].agent.strong is None
    result = events[-1].result
    assert result.tiers() == {"cheap": 1, "strong": 0, "skip": 0}
    assert result.to_dict()["routing"][0]["choice"] == "cheap"


def test_disagreeing_proposers_go_to_the_strong_aggregator(server: LoopbackServer) -> None:
    server.set_behavior("cheap", _by_seed(_disagree(7), "4"))
    events = _events(_mixture(server, _config()), seed=7)
    (decision,) = [e for e in events if isinstance(e, RouteDecision)]
    assert decision.choice == "strong" and "< 0.9" in decision.reason
    assert decision.signals["agreement"] == pytest.approx(0.3333, abs=1e-3)
    assert _models(server) == ["cheap"] * 3 + ["strong"]
    system = server.requests[-1].body["messages"][0]["content"]
    assert all(f"The answer is {n}." in system for n in "456")
    result = events[-1].result
    assert result.text == "Checked twice. The answer is 4."
    assert [o.agent.model for o in result.outputs if o.agent.final] == ["loop/strong"]
    assert len([e for e in events if isinstance(e, UsageReport)]) == 4
    assert result.budget["request"]["calls"] == 4


def test_unanimous_proposers_skip_the_aggregator(server: LoopbackServer) -> None:
    router = {**AGREE, "threshold": 0.6, "skip_above": 1.0}
    events = _events(_mixture(server, _config(router)))
    (decision,) = [e for e in events if isinstance(e, RouteDecision)]
    assert decision.choice == "skip"
    result = events[-1].result
    assert result.text == "Adding them up carefully. The answer is 4."
    assert "".join(e.text for e in events if isinstance(e, FinalDelta)) == result.text
    assert _models(server) == ["cheap"] * 3 and result.calls == 3
    assert result.tiers()["skip"] == 1


def test_routed_proposers_start_on_the_policy_tier(server: LoopbackServer) -> None:
    config = _config({"policy": "fixed", "tier": "strong"})
    config["layers"][0]["agents"][0]["strong"] = "loop/strong"
    events = _events(_mixture(server, config))
    stages = [(e.stage, e.choice) for e in events if isinstance(e, RouteDecision)]
    assert sorted(stages) == [
        ("aggregate.final", "strong"),
        ("propose.L1.1", "strong"),
        ("propose.L1.2", "strong"),
        ("propose.L1.3", "strong"),
    ]
    assert _models(server) == ["strong"] * 4


def test_refinement_rounds_stop_when_the_answer_is_backed(server: LoopbackServer) -> None:
    router = {**AGREE, "threshold": 0.5, "skip_above": 0.99, "refine_loops": 2}
    events = _events(_mixture(server, _config(router)))
    stages = [(e.stage, e.choice) for e in events if isinstance(e, RouteDecision)]
    assert stages == [("aggregate.L2.1", "skip"), ("refine.L3.1", "skip"), ("refine.final", "skip")]
    assert "stood" in [e for e in events if isinstance(e, RouteDecision)][-1].reason
    result = events[-1].result
    assert result.text.endswith("The answer is 4.") and result.calls == 3
    assert "".join(e.text for e in events if isinstance(e, FinalDelta)) == result.text


def test_a_refinement_round_runs_on_the_chosen_tier(server: LoopbackServer) -> None:
    server.set_behavior("cheap", _by_seed(_disagree(3), "4"))
    router = {**AGREE, "refine_loops": 1}
    events = _events(_mixture(server, _config(router)), seed=3)
    stages = [(e.stage, e.choice) for e in events if isinstance(e, RouteDecision)]
    assert stages[0] == ("aggregate.L2.1", "strong") and stages[1][0] == "refine.final"
    last = server.requests[-1].body["messages"][0]["content"]
    assert "1. Checked twice. The answer is 4." in last, "the last answer is the first reference"


def test_hard_budget_refuses_before_any_call(server: LoopbackServer) -> None:
    mixture = _mixture(server, _config(budget={"usd": 1e-6}))
    with pytest.raises(NotEnoughProposers, match="request budget") as err:
        _events(mixture)
    assert server.requests == [] and err.value.partial is not None


def test_budget_downgrades_the_strong_aggregator(server: LoopbackServer) -> None:
    server.set_behavior("cheap", _by_seed(_disagree(3), "4"))
    # Room for three cheap proposers and a cheap aggregator, not for the strong one.
    config = _config({"policy": "fixed", "tier": "strong"}, budget={"usd": 0.0015})
    mixture = _mixture(server, config)
    result = anyio.run(lambda: mixture.run("What is 2 + 2?", seed=3))
    (decision,) = result.decisions
    assert decision.choice == "cheap" and "strong over budget" in decision.reason
    assert _models(server)[-1] == "cheap"
    assert result.budget["request"]["spent_usd"] <= 0.0015


def test_session_budget_spans_runs(server: LoopbackServer) -> None:
    session = SessionBudget(tokens=500)
    mixture = _mixture(server, _config({**AGREE, "skip_above": 1.0}), session=session)

    async def main() -> int:
        runs = 0
        with pytest.raises(MixtureError, match="session budget"):
            for _ in range(60):
                await mixture.run("What is 2 + 2?")
                runs += 1
        return runs

    runs = anyio.run(main)
    assert 1 <= runs < 60 and session.spent_tokens <= 500
    assert session.reserved_tokens == 0


def test_routed_aggregator_under_staircase_decides_on_partial_traces(
    server: LoopbackServer,
) -> None:
    server.set_behavior("cheap", ModelBehavior(reply="The answer is 4. " + "More words. " * 30,
                                               tokens_per_s=300))
    server.set_behavior("slow", ModelBehavior(reply="The answer is 4. " + "Slowly. " * 40,
                                              tokens_per_s=40))
    config = _config(mode="staircase")
    config["layers"][0]["agents"] = [{"model": "loop/cheap", "n": 2}, {"model": "loop/slow"}]
    events = _events(_mixture(server, config))
    (decision,) = [e for e in events if isinstance(e, RouteDecision)]
    assert decision.signals["references_partial"] >= 1, "it decided before every reference ended"
    assert decision.choice == "cheap" and decision.signals["agreement"] == 1.0
    result = events[-1].result
    assert result.mode == "staircase"
    final = next(o for o in result.outputs if o.agent.final)
    assert final.agent.model == "loop/cheap" and final.calls > 1, "staircase steps on its tier"
    started = next(e for e in events if isinstance(e, AgentStarted) and e.agent.final)
    slow = next(e for e in events if isinstance(e, AgentFinished) and e.agent.model == "loop/slow")
    assert started.t < slow.t


def test_a_tier_that_cannot_continue_falls_back_with_a_notice(server: LoopbackServer) -> None:
    registry = server.registry(limits=Limits(max_retries=0, read_timeout=5.0))
    plain = server.registry(prefix="plain", continuation=None)
    registry.register(plain.check("plain/strong")[0])
    server.set_behavior("cheap", _by_seed(_disagree(5), "4"))
    config = _config(mode="staircase", prices={**PRICES, "plain/strong": (10.0, 30.0)})
    config["aggregator"]["strong"] = "plain/strong"
    mixture = Mixture(config, registry=registry)

    async def collect() -> list[Any]:
        return [e async for e in mixture.stream("What is 2 + 2?", seed=5)]

    events = anyio.run(collect)
    (decision,) = [e for e in events if isinstance(e, RouteDecision)]
    assert decision.choice == "strong"
    (notice,) = [e for e in events if isinstance(e, Notice)]
    assert "plain/strong cannot continue" in notice.message
    final = next(o for o in events[-1].result.outputs if o.agent.final)
    assert final.calls == 1 and final.ok, "one call over the complete references"
    assert notice.message in events[-1].result.notices


def test_deadline_quorum_and_cancellation_of_a_routed_mixture(server: LoopbackServer) -> None:
    server.set_behavior("slow", ModelBehavior(reply="late", ttft_s=30))
    config = _config(deadline_s=0.5)
    config["layers"][0]["agents"].append({"model": "loop/slow"})
    with pytest.raises(DeadlineExceeded) as err:
        _events(_mixture(server, config))
    assert sum(o.ok for o in err.value.partial.outputs) == 3
    assert server.wait_idle()

    server.set_behavior("broken", ModelBehavior(fail_status=500, fail_times=None))
    config = _config()
    config["layers"] = [{"agents": [{"model": "loop/cheap"}, {"model": "loop/broken", "n": 2}],
                         "min_proposers": 2}]
    with pytest.raises(NotEnoughProposers, match="min_proposers is 2"):
        _events(_mixture(server, config))

    server.set_behavior("cheap", ModelBehavior(reply="word " * 400, tokens_per_s=50))
    mixture = _mixture(server, _config())

    async def cancel_midway() -> None:
        before = set(asyncio.all_tasks())
        async with anyio.create_task_group() as tg:
            tg.start_soon(mixture.run, "What is 2 + 2?")
            with anyio.fail_after(5):
                while server.active_streams < 3:
                    await anyio.sleep(0.005)
            tg.cancel_scope.cancel()
        assert set(asyncio.all_tasks()) == before

    anyio.run(cancel_midway)
    assert server.wait_idle()


def test_a_proposer_dropped_mid_stream_is_charged(server: LoopbackServer) -> None:
    server.set_behavior(
        "cheap", ModelBehavior(reply="One two three four five.", drop_after=3, fail_times=1)
    )
    events = _events(_mixture(server, _config()))
    result = events[-1].result
    (failed,) = result.failed
    assert failed.truncated and failed.usage.completion_tokens > 0 and failed.cost_usd
    charged = {e.agent for e in events if isinstance(e, UsageReport)}
    assert failed.agent in charged, "a failed call reports its usage too"


def test_evolve_end_to_end(server: LoopbackServer) -> None:
    seeds = {stage_seed(5, 1000 + i): answer for i, answer in enumerate("4454")}
    server.set_behavior("strong", _by_seed(seeds, "4"))
    config = _config(None, strategy="evolve", evolve={"group_size": 2, "loops": 3})
    config["layers"] = [{"agents": [{"model": "loop/strong", "n": 4}]}]
    events = _events(_mixture(server, config), seed=5)
    decisions = [e for e in events if isinstance(e, RouteDecision)]
    loop1 = [d for d in decisions if d.stage.startswith("evolve.1.")]
    assert len(loop1) == 4
    # Without logprobs... here with them: confidence is DeepConf; the least confident quarter
    # of the groups (rank < 0.25: one of four) goes to the strong tier.
    strong = [d for d in loop1 if d.choice == "strong"]
    assert len(strong) == 1 and strong[0].signals["rank"] == 0.0
    assert all(d.signals["source"] == "confidence" for d in loop1)
    assert (decisions[-1].stage, decisions[-1].choice) == ("evolve.2", "skip")
    models = _models(server)
    assert models[:4] == ["strong"] * 4 and sorted(models[4:]) == ["cheap"] * 3 + ["strong"]
    result = events[-1].result
    assert result.text.endswith("The answer is 4.") and result.mode == "evolve"
    assert sum(isinstance(e, AgentFinished) for e in events) == 8
    assert "".join(e.text for e in events if isinstance(e, FinalDelta)) == result.text
    assert "Candidate solutions:" in server.requests[-1].body["messages"][0]["content"]


def test_evolve_under_a_fixed_cheap_router_never_calls_the_strong_tier(
    server: LoopbackServer,
) -> None:
    seeds = {stage_seed(2, 1000 + i): answer for i, answer in enumerate("4567")}
    server.set_behavior("cheap", _by_seed(seeds, "4"))
    config = _config({"policy": "fixed", "tier": "cheap"}, strategy="evolve",
                     evolve={"group_size": 2, "loops": 2})
    config["layers"] = [{"agents": [{"model": "loop/cheap", "strong": "loop/strong", "n": 4}]}]
    events = _events(_mixture(server, config), seed=2)
    decisions = [e for e in events if isinstance(e, RouteDecision)]
    assert len([d for d in decisions if d.stage.startswith("evolve.")]) >= 4
    assert all(d.choice in ("cheap", "skip") for d in decisions)
    assert set(_models(server)) == {"cheap"} and len(_models(server)) > 4
    assert isinstance(events[-1], RunFinished)


def test_refused_and_cancelled_runs_give_their_reservations_back(server: LoopbackServer) -> None:
    session = SessionBudget(tokens=10_000)
    tight = _mixture(server, _config(budget={"tokens": 200}), session=session)
    result = anyio.run(lambda: tight.run("What is 2 + 2?"))
    # Two proposers fit, the third is refused; no aggregator fits, so the majority stands.
    assert [o.ok for o in result.proposals()] == [True, True, False]
    assert result.decisions[0].choice == "skip" and "over budget" in result.decisions[0].reason
    assert session.reserved_tokens == 0 and session.refused == 1

    server.set_behavior("cheap", ModelBehavior(reply="word " * 200, tokens_per_s=50))
    slow = _mixture(server, _config(), session=session)

    async def cancel_midway() -> None:
        with anyio.move_on_after(0.3):
            await slow.run("What is 2 + 2?")

    anyio.run(cancel_midway)
    assert server.wait_idle()
    assert session.reserved_tokens == 0 and session.reserved_usd == pytest.approx(0, abs=1e-12)
    assert session.spent_tokens > 0, "what the cancelled calls streamed is charged"


def test_run_failed_event_carries_the_partial_result(server: LoopbackServer) -> None:
    server.set_behavior("strong", ModelBehavior(fail_status=500, fail_times=None))
    server.set_behavior("cheap", _by_seed(_disagree(4), "4"))
    events: list[Any] = []

    async def main() -> None:
        async for event in _mixture(server, _config()).stream("What is 2 + 2?", seed=4):
            events.append(event)

    with pytest.raises(Exception, match="final aggregator failed"):
        anyio.run(main)
    assert isinstance(events[-1], RunFailed) and events[-1].result.decisions
