"""Budgets in the plain `Mixture` (layered and staircase) and `moa chat --budget-*`, against the
loopback server over real sockets."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from moa.cli.main import build_parser, run
from moa.cli.options import mixture_from_args
from moa.config import MixtureConfig
from moa.errors import (
    AggregatorFailed,
    AggregatorOverBudget,
    BudgetExceeded,
    ConfigError,
    NotEnoughProposers,
)
from moa.events import AgentFailed, RunFailed
from moa.mixture import Mixture
from moa.providers.registry import Limits, Registry
from moa.runtime.budget import SessionBudget
from moa.testing import LoopbackServer, ModelBehavior

pytestmark = pytest.mark.anyio

REPLIES = {"a": "Alpha thinks it is four.", "b": "Beta says 4.", "agg": "The answer is **4**."}
PRICES = {"loop/a": (1.0, 2.0), "loop/b": (1.0, 2.0), "loop/agg": (10.0, 30.0)}
QUESTION = "What is 2+2?"


@pytest.fixture
def srv() -> Iterator[LoopbackServer]:
    behaviors = {name: ModelBehavior(reply=text) for name, text in REPLIES.items()}
    with LoopbackServer(behaviors) as server:
        yield server


def registry(srv: LoopbackServer) -> Registry:
    return srv.registry(prefix="loop", limits=Limits(max_retries=0))


def config(*, agg_max_tokens: int = 64, mode: str = "layered", **extra: Any) -> MixtureConfig:
    """Proposers a and b (8 tokens each at most), then the aggregator agg."""
    return MixtureConfig.model_validate(
        {
            "name": "budgeted",
            "mode": mode,
            "layers": [
                {
                    "agents": [
                        {"model": "loop/a", "max_tokens": 8},
                        {"model": "loop/b", "max_tokens": 8},
                    ]
                }
            ],
            "aggregator": {"model": "loop/agg", "max_tokens": agg_max_tokens},
            "prices": PRICES,
            **extra,
        }
    )


def models(srv: LoopbackServer) -> list[str]:
    return sorted(r.model for r in srv.requests if r.model)


async def test_budget_allowing_the_proposers_but_not_the_aggregator(srv: LoopbackServer) -> None:
    # Proposers need ~2 x (12 + 8) tokens; the aggregator reserves its prompt + 5000.
    mixture = Mixture(config(agg_max_tokens=5000), registry=registry(srv), budget={"tokens": 1000})
    events: list[Any] = []
    with pytest.raises(AggregatorOverBudget) as caught:
        async for event in mixture.stream(QUESTION):
            events.append(event)
    await mixture.aclose()
    err = caught.value
    assert isinstance(err, BudgetExceeded) and isinstance(err, AggregatorFailed)
    message = str(err)
    assert message.startswith("Call to loop/agg refused: request budget: ")
    assert message.endswith("would exceed the limit of 1000.") and "\n" not in message
    assert models(srv) == ["a", "b"]  # the aggregator was never sent
    partial = err.partial
    assert [o.ok for o in partial.proposals()] == [True, True]
    report = partial.budget["request"]
    assert report["refused"] == 1 and report["calls"] == 2
    assert report["spent_tokens"] == partial.usage.total_tokens > 0
    assert isinstance(events[-1], RunFailed) and events[-1].error == message


async def test_a_refused_proposer_fails_alone_while_the_quorum_holds(srv: LoopbackServer) -> None:
    data = config().model_dump()
    data["layers"][0]["agents"].append({"model": "loop/b", "max_tokens": 4000, "name": "big"})
    async with Mixture(data, registry=registry(srv), budget={"tokens": 1500}) as mixture:
        events = [e async for e in mixture.stream(QUESTION)]
    result = events[-1].result
    assert result.text == REPLIES["agg"]
    [failed] = result.failed
    assert failed.agent.name == "big" and "refused: request budget" in (failed.error or "")
    assert any(isinstance(e, AgentFailed) and e.agent.name == "big" for e in events)
    assert models(srv) == ["a", "agg", "b"]
    assert result.budget["request"]["refused"] == 1
    assert result.calls == 3

    data["layers"][0]["min_proposers"] = 3
    async with Mixture(data, registry=registry(srv), budget={"tokens": 1500}) as mixture:
        with pytest.raises(NotEnoughProposers, match="min_proposers is 3"):
            await mixture.run(QUESTION)


async def test_session_budget_shared_by_two_requests_of_two_mixtures(
    srv: LoopbackServer,
) -> None:
    probe = SessionBudget()  # no limit: measures what one request spends
    async with Mixture(config(agg_max_tokens=8), registry=registry(srv), session=probe) as m:
        await m.run(QUESTION)
    one = probe.spent_tokens
    assert probe.calls == 3 and one > 0

    # Twice one request's spend: the second request's proposers still fit, but not the
    # worst case its aggregator reserves (its prompt counted offline plus max_tokens).
    session = SessionBudget(tokens=2 * one)
    first = Mixture(config(agg_max_tokens=8), registry=registry(srv), session=session)
    second = Mixture(
        config(agg_max_tokens=8, name="other"), registry=registry(srv), session=session
    )
    result = await first.run(QUESTION)
    assert result.budget["session"]["spent_tokens"] == one
    assert result.budget["request"]["limit_tokens"] is None
    with pytest.raises(AggregatorOverBudget, match="session budget"):
        await second.run(QUESTION)
    assert session.calls == 5 and session.refused == 1
    assert session.spent_tokens <= session.limit.tokens
    await first.aclose()
    await second.aclose()


async def test_spend_in_to_dict_and_budget_sources(srv: LoopbackServer) -> None:
    async with Mixture(config(budget={"usd": 0.5}), registry=registry(srv)) as mixture:
        result = await mixture.run(QUESTION)
        overridden = await mixture.run(QUESTION, budget={"tokens": 100_000})
    out = json.loads(json.dumps(result.to_dict()))
    report = out["budget"]["request"]
    assert report["limit_usd"] == 0.5 and report["limit_tokens"] is None
    assert report["spent_usd"] == pytest.approx(result.cost_usd)
    assert report["spent_tokens"] == result.usage.total_tokens
    assert report["calls"] == result.calls == 3 and report["refused"] == 0
    assert report["unpriced_calls"] == 0
    assert overridden.budget["request"]["limit_tokens"] == 100_000
    assert overridden.budget["request"]["limit_usd"] is None
    with pytest.raises(ConfigError, match="Invalid budget: field 'usd'"):
        Mixture(config(), registry=registry(srv), budget={"usd": -1})


async def test_staircase_steps_are_budgeted_too(srv: LoopbackServer) -> None:
    async with Mixture(
        config(mode="staircase"), registry=registry(srv), budget={"usd": 0.5}
    ) as mixture:
        result = await mixture.run(QUESTION)
    assert result.mode == "staircase" and result.text == REPLIES["agg"]
    assert result.budget["request"]["calls"] == result.calls
    assert result.budget["request"]["spent_usd"] == pytest.approx(result.cost_usd)


async def test_a_staircase_budget_runs_out_at_the_aggregator(srv: LoopbackServer) -> None:
    # b streams a little, then stalls: the aggregator steps on what it has (16-token steps fit
    # the budget; its long reply needs more than one) until b has been silent for stall_s and
    # the unbounded last call reserves 5000 tokens: refused.
    srv.set_behavior("b", ModelBehavior(reply="word " * 40, stall_after=20))
    srv.set_behavior("agg", ModelBehavior(reply="step " * 300))
    data = config(mode="staircase", agg_max_tokens=5000).model_dump()
    data["layers"][0]["agents"][1]["max_tokens"] = 64
    data["staircase"] = {"stall_s": 0.5}
    async with Mixture(data, registry=registry(srv), budget={"tokens": 3000}) as mixture:
        with pytest.raises(AggregatorOverBudget, match="request budget") as caught:
            await mixture.run(QUESTION)
    partial = caught.value.partial
    report = partial.budget["request"]
    assert report["refused"] == 1 and report["spent_tokens"] <= 3000
    # Every call that went out was settled against the budget (proposers and any steps).
    assert report["calls"] == partial.calls == len([r for r in srv.requests if r.model])
    final = next(o for o in partial.outputs if o.agent.final)
    assert not final.ok and "refused" in (final.error or "")
    assert final.calls >= 1 and final.text.startswith("step")  # the steps that fitted ran


async def test_dollar_budget_needs_prices(srv: LoopbackServer) -> None:
    with pytest.raises(ConfigError, match="needs a price for 'loop/a'"):
        Mixture(config(prices={}), registry=registry(srv), budget={"usd": 1.0})
    with pytest.raises(ConfigError, match="needs a price for 'loop/a'"):
        Mixture(config(prices={}), registry=registry(srv), session=SessionBudget(usd=1.0))
    async with Mixture(config(prices={}), registry=registry(srv)) as mixture:
        with pytest.raises(ConfigError, match="needs a price for 'loop/a'"):
            await mixture.run(QUESTION, budget={"usd": 1.0})
        result = await mixture.run(QUESTION, budget={"tokens": 10_000})
    assert result.budget["request"]["unpriced_calls"] == 3
    assert result.cost_usd is None


# ---------------------------------------------------------------- moa chat --budget-*


@pytest.fixture
def cli_config(srv: LoopbackServer, tmp_path: Path) -> str:
    """Proposers a and b (8 tokens at most) and an aggregator that may write 4000 tokens."""
    path = tmp_path / "budget.toml"
    path.write_text(f"""
mode = "layered"
budget = {{ tokens = 100000 }}

[[layers]]
agents = [{{ model = "loop/a", max_tokens = 8 }}, {{ model = "loop/b", max_tokens = 8 }}]

[aggregator]
model = "loop/agg"
max_tokens = 4000

[providers.loop]
kind = "openai"
base_url = "{srv.base_url}"
key_required = false
[providers.loop.limits]
max_retries = 0

[prices]
"loop/a" = [1.0, 2.0]
"loop/b" = [1.0, 2.0]
"loop/agg" = [10.0, 30.0]
""")
    return str(path)


def test_budget_flags_merge_into_the_config(cli_config: str) -> None:
    args = build_parser("chat").parse_args(["chat", "-c", cli_config, "--budget-usd", "0.25"])
    budget = mixture_from_args(args).budget
    assert (budget.usd, budget.tokens) == (0.25, 100000)
    args = build_parser("chat").parse_args(["chat", "-c", cli_config, "--budget-tokens", "50"])
    assert mixture_from_args(args).budget.tokens == 50


def test_chat_budget_usd_end_to_end(
    srv: LoopbackServer, cli_config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["chat", "-c", cli_config, "--budget-usd", "1", QUESTION]) == 0
    out, err = capsys.readouterr()
    assert out == REPLIES["agg"] + "\n"
    assert "3 calls" in err and "request budget $0.00" in err and "of $1.0000" in err
    assert "of 100,000 tokens" in err

    assert run(["chat", "-c", cli_config, "--budget-usd", "1", "--json", QUESTION]) == 0
    report = json.loads(capsys.readouterr().out)["budget"]["request"]
    assert report["limit_usd"] == 1.0 and report["spent_usd"] > 0

    # The aggregator's worst case (4000 tokens at $30 / M = $0.12) does not fit $0.05.
    srv.requests.clear()
    assert run(["chat", "-c", cli_config, "--budget-usd", "0.05", QUESTION]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("moa: Call to loop/agg refused: request budget: $")
    assert err.endswith("would exceed the limit of $0.050000.\n") and err.count("\n") == 1
    assert models(srv) == ["a", "b"]
