"""Routed mixture and Squeeze Evolve end to end on the loopback server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from moa.errors import BudgetExceeded
from moa.events import (
    AgentFinished,
    AgentStarted,
    FinalDelta,
    RouteDecision,
    RunFailed,
    RunFinished,
    RunStarted,
    UsageReport,
)
from moa.routing.strategy import RoutedMixture, stage_seed
from moa.runtime.budget import SessionBudget
from moa.testing import LoopbackServer, ModelBehavior

PRICES = {"loop/cheap": (1.0, 2.0), "loop/strong": (10.0, 30.0)}


def _by_seed(answers: dict[int, str], default: str) -> Any:
    """A reply that depends on the request's seed, so proposer slots can disagree."""

    def reply(body: dict[str, Any]) -> str:
        return f"Adding them up carefully. The answer is {answers.get(body.get('seed'), default)}."

    return reply


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    behaviors = {
        "cheap": ModelBehavior(reply="Adding them up carefully. The answer is 4.", logprob=-0.1),
        "strong": ModelBehavior(reply="Checked twice. The answer is 4.", logprob=-0.05),
    }
    with LoopbackServer(behaviors) as srv:
        yield srv


def _config(**kw: Any) -> dict[str, Any]:
    return {
        "cheap": "loop/cheap",
        "strong": "loop/strong",
        "proposers": 3,
        "max_tokens": 64,
        "prices": PRICES,
        **kw,
    }


async def _events(mixture: RoutedMixture, question: str, seed: int = 1) -> list[Any]:
    out = []
    async for event in mixture.stream(question, seed=seed):
        out.append(event)
    return out


def _models(srv: LoopbackServer) -> list[str]:
    return [r.body["model"] for r in srv.requests if r.body]


def test_unanimous_confident_proposers_skip_the_aggregator(server: LoopbackServer) -> None:
    router = {"policy": "threshold", "signal": "agreement", "threshold": 0.6, "skip_above": 1.0}
    mixture = RoutedMixture(_config(router=router), registry=server.registry())
    events = anyio.run(_events, mixture, "What is 2 + 2?")
    assert isinstance(events[0], RunStarted) and isinstance(events[-1], RunFinished)
    decisions = [e for e in events if isinstance(e, RouteDecision)]
    assert [d.stage for d in decisions] == ["propose.1", "propose.2", "propose.3", "aggregate"]
    assert decisions[-1].choice == "skip"
    assert decisions[-1].signals["agreement"] == 1.0
    # The loopback server reports top-5 alternatives at lp, lp-1, ..., lp-4: DeepConf = 2 - lp.
    assert decisions[-1].signals["confidence_source"] == "topk"
    assert decisions[-1].signals["min_confidence"] == pytest.approx(2.1)
    result = events[-1].result
    assert result.text.endswith("The answer is 4.")
    assert "".join(e.text for e in events if isinstance(e, FinalDelta)) == result.text
    assert _models(server) == ["cheap"] * 3
    assert all(r.body["logprobs"] for r in server.requests)
    assert result.calls == 3 and result.tiers()["skip"] == 1
    assert result.cost_usd == pytest.approx(sum(o.cost_usd for o in result.outputs))
    assert result.to_dict()["routing"]["decisions"][-1]["choice"] == "skip"


def test_disagreement_goes_to_the_strong_aggregator(server: LoopbackServer) -> None:
    mixture = RoutedMixture(
        _config(router={"policy": "threshold", "signal": "agreement", "threshold": 0.9}),
        registry=server.registry(),
    )
    seeds = {stage_seed(7, 1): "4", stage_seed(7, 2): "5", stage_seed(7, 3): "6"}
    server.set_behavior("cheap", ModelBehavior(reply=_by_seed(seeds, "4"), logprob=-0.1))
    events = anyio.run(_events, mixture, "What is 2 + 2?", 7)
    aggregate = next(e for e in events if isinstance(e, RouteDecision) and e.stage == "aggregate")
    assert aggregate.choice == "strong"
    assert aggregate.signals["agreement"] == pytest.approx(0.3333, abs=1e-3)
    assert "< 0.9" in aggregate.reason
    assert _models(server) == ["cheap"] * 3 + ["strong"]
    system = server.requests[-1].body["messages"][0]["content"]
    assert "Responses from models:" in system
    assert all(f"The answer is {n}." in system for n in "456")
    final = [e for e in events if isinstance(e, AgentStarted) and e.agent.final]
    assert len(final) == 1 and final[0].agent.model == "loop/strong"
    result = events[-1].result
    assert result.text == "Checked twice. The answer is 4."
    assert len([e for e in events if isinstance(e, UsageReport)]) == 4
    assert result.budget["request"]["calls"] == 4


def test_refinement_loop_stops_when_the_answer_is_backed(server: LoopbackServer) -> None:
    router = {"policy": "threshold", "signal": "agreement", "threshold": 0.5, "skip_above": 0.99}
    mixture = RoutedMixture(
        _config(router=router, refine_loops=2, proposers=2), registry=server.registry()
    )
    server.set_behavior("cheap", ModelBehavior(reply=_by_seed({}, "4"), logprob=-0.1))
    events = anyio.run(_events, mixture, "What is 2 + 2?")
    stages = [(e.stage, e.choice) for e in events if isinstance(e, RouteDecision)]
    assert stages[-2:] == [("aggregate", "skip"), ("refine.1", "skip")]
    assert events[-1].result.text.endswith("The answer is 4.")


def test_hard_budget_refuses_before_any_call(server: LoopbackServer) -> None:
    mixture = RoutedMixture(_config(budget={"usd": 1e-6}), registry=server.registry())
    events: list[Any] = []

    async def main() -> None:
        async for event in mixture.stream("What is 2 + 2?"):
            events.append(event)

    with pytest.raises(BudgetExceeded, match="request budget"):
        anyio.run(main)
    assert server.requests == []
    assert isinstance(events[-1], RunFailed) and "refused" in events[-1].error


def test_budget_downgrades_the_strong_aggregator(server: LoopbackServer) -> None:
    seeds = {stage_seed(3, 1): "4", stage_seed(3, 2): "5", stage_seed(3, 3): "6"}
    server.set_behavior("cheap", ModelBehavior(reply=_by_seed(seeds, "4"), logprob=-0.1))
    # Room for three cheap proposers and a cheap aggregator, not for the strong one.
    mixture = RoutedMixture(
        _config(router={"policy": "fixed", "tier": "strong"}, budget={"usd": 0.0015}),
        registry=server.registry(),
    )
    mixture.router.proposer_tier = "cheap"
    result = anyio.run(lambda: mixture.run("What is 2 + 2?", seed=3))
    aggregate = next(d for d in result.decisions if d.stage == "aggregate")
    assert aggregate.choice == "cheap" and "strong over budget" in aggregate.reason
    assert _models(server)[-1] == "cheap"
    assert result.budget["request"]["spent_usd"] <= 0.0015


def test_session_budget_spans_runs(server: LoopbackServer) -> None:
    session = SessionBudget(tokens=700)
    router = {"policy": "threshold", "signal": "agreement", "threshold": 0.6, "skip_above": 1.0}
    mixture = RoutedMixture(_config(router=router), registry=server.registry(), session=session)

    async def main() -> int:
        runs = 0
        with pytest.raises(BudgetExceeded, match="session budget"):
            for _ in range(20):
                await mixture.run("What is 2 + 2?")
                runs += 1
        return runs

    runs = anyio.run(main)
    assert 1 <= runs < 20
    assert session.calls == 3 * runs and session.spent_tokens <= 700


def test_evolve_end_to_end(server: LoopbackServer) -> None:
    seeds = {stage_seed(5, 1000 + i): answer for i, answer in enumerate("4454")}
    server.set_behavior("strong", ModelBehavior(reply=_by_seed(seeds, "4")))
    evolve = {"population": 4, "group_size": 2, "loops": 3, "strong_percentile": 25}
    config = _config(strategy="evolve", logprobs=False, evolve=evolve)
    mixture = RoutedMixture(config, registry=server.registry())
    events = anyio.run(_events, mixture, "What is 2 + 2?", 5)
    decisions = [e for e in events if isinstance(e, RouteDecision)]
    assert decisions[0].stage == "evolve.seed" and decisions[0].choice == "strong"
    loop1 = [d for d in decisions if d.stage.startswith("evolve.1.")]
    assert len(loop1) == 4
    # Without logprobs a candidate scores the vote share of its answer (diversity fallback);
    # ceil(4 * 25 %) = 1 group, the least confident, goes to the strong tier.
    assert all(d.signals["source"] == "diversity" for d in loop1)
    strong = [d for d in loop1 if d.choice == "strong"]
    assert len(strong) == 1 and 2 in strong[0].signals["members"]
    assert strong[0].signals["group_score"] == min(d.signals["group_score"] for d in loop1)
    # Every recombiner answers 4, so the population agrees and loop 2 stops early.
    assert (decisions[-1].stage, decisions[-1].choice) == ("evolve.2", "skip")
    models = _models(server)
    assert models[:4] == ["strong"] * 4 and sorted(models[4:]) == ["cheap"] * 3 + ["strong"]
    result = events[-1].result
    assert result.text.endswith("The answer is 4.") and result.mode == "routed-evolve"
    assert sum(isinstance(e, AgentFinished) for e in events) == 8
    assert "Candidate solutions:" in server.requests[-1].body["messages"][0]["content"]


def test_run_sync_and_config_file(tmp_path: Any, server: LoopbackServer) -> None:
    path = tmp_path / "routed.toml"
    path.write_text(
        'name = "file"\n[[layers]]\nagents = [{model = "loop/cheap", n = 2}]\n'
        '[aggregator]\nmodel = "loop/strong"\n'
        f'[providers.loop]\nbase_url = "{server.base_url}"\nkey_required = false\n'
        '[prices]\n"loop/cheap" = [1.0, 2.0]\n"loop/strong" = [10.0, 30.0]\n'
        '[routing]\nproposers = 2\n[routing.router]\npolicy = "fixed"\ntier = "cheap"\n'
    )
    mixture = RoutedMixture(path)
    assert (mixture.config.cheap, mixture.config.strong) == ("loop/cheap", "loop/strong")
    result = mixture.run_sync("What is 2 + 2?")
    assert result.calls == 3 and result.cost_usd and result.cost_usd > 0
    assert _models(server) == ["cheap", "cheap", "cheap"]


def test_a_proposer_dropped_mid_stream_is_charged_for_what_it_sent(
    server: LoopbackServer,
) -> None:
    server.set_behavior(
        "strong", ModelBehavior(reply="One two three four five.", drop_after=3, fail_times=1)
    )
    mixture = RoutedMixture(_config(router={"policy": "fixed", "tier": "cheap"}),
                            registry=server.registry())
    mixture.router.proposer_tier = "strong"
    events = anyio.run(_events, mixture, "What is 2 + 2?")
    result = events[-1].result
    failed = [o for o in result.outputs if not o.ok]
    assert len(failed) == 1 and all(o.truncated and o.usage.completion_tokens > 0 for o in failed)
    assert all(o.cost_usd and o.cost_usd > 0 for o in failed)
    charged = [e for e in events if isinstance(e, UsageReport)]
    assert len(charged) == len(result.outputs), "every call, failed ones too, reports its usage"


def test_refused_and_cancelled_runs_give_their_reservations_back(server: LoopbackServer) -> None:
    session = SessionBudget(tokens=10_000)
    # The third proposer's reservation does not fit: the first two must be given back.
    tight = RoutedMixture(_config(budget={"tokens": 200}), registry=server.registry(),
                          session=session)
    with pytest.raises(BudgetExceeded):
        anyio.run(lambda: tight.run("What is 2 + 2?"))
    assert session.reserved_tokens == 0 and session.spent_tokens == 0

    server.set_behavior("cheap", ModelBehavior(reply="word " * 200, tokens_per_s=50))
    slow = RoutedMixture(_config(), registry=server.registry(), session=session)

    async def cancel_midway() -> None:
        with anyio.move_on_after(0.3):
            await slow.run("What is 2 + 2?")

    anyio.run(cancel_midway)
    assert server.wait_idle()
    assert session.reserved_tokens == 0 and session.reserved_usd == pytest.approx(0, abs=1e-12)
    assert 0 < session.spent_tokens < 10_000, "what the cancelled calls streamed is charged"
