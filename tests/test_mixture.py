"""Layered mixtures end to end against the loopback server over real sockets."""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from moa.config import MixtureConfig, preset
from moa.errors import AggregatorFailed, DeadlineExceeded, NotEnoughProposers
from moa.events import (
    AgentFailed,
    AgentFinished,
    AgentStarted,
    FinalDelta,
    RunFailed,
    RunFinished,
    RunStarted,
    UsageReport,
)
from moa.mixture import Mixture
from moa.providers.registry import Limits, Registry
from moa.runtime.prompts import AGGREGATE_PROMPT, TRIMMED_LABEL, Reference, readable_block
from moa.testing import LoopbackServer, ModelBehavior
from moa.tokens import count_messages

pytestmark = pytest.mark.anyio


def loopback_config(
    config: MixtureConfig | str, prefix: str = "loop", **changes: Any
) -> MixtureConfig:
    """A preset (or config) with every model ref moved to the loopback prefix."""
    config = preset(config) if isinstance(config, str) else config
    data = config.model_dump()
    for agent in [*(a for layer in data["layers"] for a in layer["agents"]), data["aggregator"]]:
        agent["model"] = f"{prefix}/{agent['model'].partition('/')[2]}"
    return MixtureConfig.model_validate({**data, **changes})


def is_aggregation(body: dict[str, Any]) -> bool:
    return AGGREGATE_PROMPT in str(body["messages"][0].get("content"))


def counting_reply() -> ModelBehavior:
    """Proposals and syntheses that differ call by call, so no reference repeats another."""
    counter = itertools.count(1)

    def reply(body: dict[str, Any]) -> str:
        kind = "synthesis" if is_aggregation(body) else "proposal"
        return f"{kind} {next(counter)} from {body['model']}"

    return ModelBehavior(reply=reply, tokens_per_s=2000)


@pytest.fixture
def srv() -> Iterator[LoopbackServer]:
    with LoopbackServer(default=counting_reply()) as server:
        yield server


def fast_registry(srv: LoopbackServer, **limits: Any) -> Registry:
    return srv.registry(
        prefix="loop",
        limits=Limits(max_retries=0, backoff_initial=0.001, read_timeout=5.0, **limits),
    )


def aggregator_bodies(srv: LoopbackServer) -> list[dict[str, Any]]:
    return [r.body for r in srv.requests if r.body and is_aggregation(r.body)]


@pytest.mark.parametrize(
    ("name", "calls"), [("moa", 13), ("moa-lite", 7), ("self-moa", 7), ("local", 4)]
)
async def test_preset_shapes_end_to_end(srv: LoopbackServer, name: str, calls: int) -> None:
    m = Mixture(loopback_config(name, mode="layered"), registry=srv.registry())
    result = await m.run("What is MoA?")
    await m.aclose()
    assert result.calls == calls == len(srv.requests)
    assert all(o.ok for o in result.outputs) and result.text.startswith("synthesis")
    layers = preset(name).layers
    sent = aggregator_bodies(srv)
    assert len(sent) == calls - sum(a.n for a in layers[0].agents)
    for layer in range(len(layers)):
        expected = readable_block([Reference(o.text) for o in result.proposals(layer)])
        # The block ends the system message (after the aggregator's own system prompt, if any).
        receivers = [b for b in sent if b["messages"][0]["content"].endswith(expected)]
        assert len(receivers) == (
            1 if layer == len(layers) - 1 else len(result.proposals(layer + 1))
        )
        for body in receivers:
            assert body["messages"][1:] == [{"role": "user", "content": "What is MoA?"}]
    final = sent[-1]["messages"][0]["content"]
    assert final.count("\n") >= len(result.proposals(len(layers) - 1))
    assert final.rstrip().split("\n")[-1].startswith(f"{len(result.proposals(len(layers) - 1))}. ")


async def test_system_prompt_merge_and_multi_turn_history(srv: LoopbackServer) -> None:
    config = loopback_config("moa-lite", mode="layered")
    config.layers[0].agents = config.layers[0].agents[:2]
    config.aggregator.system = "Answer in French."
    history = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And times 3?"},
    ]
    async with Mixture(config, registry=srv.registry()) as m:
        result = await m.run(history)
    proposer_bodies = [r.body for r in srv.requests if r.body and not is_aggregation(r.body)]
    assert all(b["messages"] == history for b in proposer_bodies)
    (final,) = aggregator_bodies(srv)
    refs = readable_block([Reference(o.text) for o in result.proposals()])
    assert final["messages"][0] == {
        "role": "system",
        "content": f"Answer in French.\n\nYou are terse.\n\n{refs}",
    }
    assert final["messages"][1:] == history[1:]


async def test_events_order_and_final_deltas(srv: LoopbackServer) -> None:
    m = Mixture(loopback_config("moa-lite", mode="layered"), registry=srv.registry())
    events = [e async for e in m.stream("Hi there")]
    assert isinstance(events[0], RunStarted) and isinstance(events[-1], RunFinished)
    result = events[-1].result
    assert "".join(e.text for e in events if isinstance(e, FinalDelta)) == result.text
    assert len([e for e in events if isinstance(e, UsageReport)]) == result.calls == 7
    final_start = next(
        i for i, e in enumerate(events) if isinstance(e, AgentStarted) and e.agent.final
    )
    finished = [
        i for i, e in enumerate(events) if isinstance(e, AgentFinished) and not e.agent.final
    ]
    assert len(finished) == 6 and max(finished) < final_start
    assert result.ttft_s is not None and 0 < result.ttft_s <= result.latency_s
    assert all(o.usage.completion_tokens > 0 and o.latency_s is not None for o in result.outputs)
    await m.aclose()


async def test_usage_and_cost_from_prices(srv: LoopbackServer) -> None:
    config = loopback_config(
        "moa-lite", mode="layered", prices={"loop/Qwen/Qwen2.5-72B-Instruct-Turbo": (1.0, 2.0)}
    )
    async with Mixture(config, registry=srv.registry()) as m:
        result = await m.run("price?")
    final = result.outputs[-1]
    assert final.cost_usd == pytest.approx(
        (final.usage.prompt_tokens * 1.0 + final.usage.completion_tokens * 2.0) / 1e6
    )
    assert result.outputs[1].cost_usd is None  # no price for the Llama slot
    assert result.to_dict()["cost_usd"] == result.cost_usd


async def test_partial_failure_is_reported_not_raised(srv: LoopbackServer) -> None:
    config = loopback_config("moa-lite", mode="layered")
    srv.set_behavior("meta-llama/Llama-3.3-70B-Instruct-Turbo", ModelBehavior(fail_status=500))
    srv.set_behavior("google/gemma-2-27b-it", ModelBehavior(reply="half of it here", drop_after=2))
    m = Mixture(config, registry=fast_registry(srv))
    events = [e async for e in m.stream("q")]
    result = events[-1].result
    failed = {o.agent.key: o for o in result.failed}
    assert set(failed) == {"L1.2", "L1.5"}
    assert failed["L1.5"].truncated and failed["L1.5"].text == "half of"
    assert {e.agent.key for e in events if isinstance(e, AgentFailed)} == {"L1.2", "L1.5"}
    (final,) = aggregator_bodies(srv)
    content = final["messages"][0]["content"]
    assert content.split("Responses from models:")[1].count("\n") == 5
    assert "\n4. half of [truncated" in content
    await m.aclose()


async def test_min_proposers_and_dropped_truncated(srv: LoopbackServer) -> None:
    config = loopback_config("moa-lite", mode="layered")
    config.layers[0].agents = config.layers[0].agents[:3]
    config.layers[0].min_proposers = 2
    config.aggregator.model = "loop/agg"
    config.staircase.keep_truncated = False
    for model in ("Qwen/Qwen2.5-72B-Instruct-Turbo", "meta-llama/Llama-3.3-70B-Instruct-Turbo"):
        srv.set_behavior(model, ModelBehavior(reply="a b c", drop_after=1, fail_times=None))
    m = Mixture(config, registry=fast_registry(srv))
    with pytest.raises(NotEnoughProposers,
                       match=r"Only 1 of the 3 agents of layer 1 can answer") as err:
        await m.run("q")
    failures = [o for o in err.value.partial.failed if "cancelled" not in (o.error or "")]
    assert [o.agent.index for o in failures] == [0, 1] and all(o.truncated for o in failures)
    message = str(err.value)
    assert message.startswith("The connection was lost mid-stream"), "the cause leads"
    assert message.count("connection was lost") == 1, "a shared cause is said once"
    assert "(L1.1 on loop/Qwen/Qwen2.5-72B-Instruct-Turbo; L1.2 on loop/meta-llama" in message
    assert not aggregator_bodies(srv)
    config.layers[0].min_proposers = 1
    result = await Mixture(config, registry=fast_registry(srv)).run("q")
    (final,) = aggregator_bodies(srv)
    assert final["messages"][0]["content"].endswith(f"\n1. {result.proposals()[2].text}")


async def test_aggregator_failure_keeps_the_proposals(srv: LoopbackServer) -> None:
    config = loopback_config("moa-lite", mode="layered")
    srv.set_behavior("Qwen/Qwen2.5-72B-Instruct-Turbo", ModelBehavior(fail_status=400))
    config.layers[0].agents = config.layers[0].agents[1:]
    m = Mixture(config, registry=fast_registry(srv))
    events: list[Any] = []
    with pytest.raises(AggregatorFailed, match=r"final aggregator failed: .*400") as err:
        async for event in m.stream("q"):
            events.append(event)
    assert isinstance(events[-1], RunFailed) and events[-1].result is err.value.partial
    assert [o.ok for o in err.value.partial.proposals()] == [True] * 5
    assert all(o.text.startswith("proposal") for o in err.value.partial.proposals())


async def test_deadline_stops_every_call(srv: LoopbackServer) -> None:
    config = loopback_config("moa-lite", mode="layered", deadline_s=0.3)
    srv.set_behavior("google/gemma-2-27b-it", ModelBehavior(reply="slow", ttft_s=30))
    m = Mixture(config, registry=fast_registry(srv))
    with anyio.fail_after(10):
        with pytest.raises(DeadlineExceeded, match=r"deadline of 0\.3 s") as err:
            await m.run("q")
    assert sum(o.ok for o in err.value.partial.outputs) == 5
    await _no_streams(srv)
    await m.aclose()


async def _no_streams(srv: LoopbackServer) -> None:
    with anyio.fail_after(5):
        while srv.active_streams:
            await anyio.sleep(0.01)


async def test_cancellation_leaves_no_task_or_stream(srv: LoopbackServer) -> None:
    srv.set_behavior("google/gemma-2-27b-it", ModelBehavior(reply="never " * 50, tokens_per_s=5))
    m = Mixture(loopback_config("moa-lite", mode="layered"), registry=fast_registry(srv))
    before = set(asyncio.all_tasks())
    async with anyio.create_task_group() as tg:
        tg.start_soon(m.run, "q")
        with anyio.fail_after(5):
            while srv.active_streams < 1 or len(srv.requests) < 6:
                await anyio.sleep(0.005)
        tg.cancel_scope.cancel()
    assert set(asyncio.all_tasks()) == before
    await _no_streams(srv)
    await m.aclose()
    assert not aggregator_bodies(srv)


async def test_closing_the_stream_cancels_the_run(srv: LoopbackServer) -> None:
    srv.set_behavior("google/gemma-2-27b-it", ModelBehavior(reply="never " * 50, tokens_per_s=5))
    m = Mixture(loopback_config("moa-lite", mode="layered"), registry=fast_registry(srv))
    before = set(asyncio.all_tasks())
    events = m.stream("q")
    async for event in events:
        if isinstance(event, AgentFinished):
            break
    await events.aclose()
    with pytest.raises(StopAsyncIteration):  # a closed stream yields nothing more
        await events.__anext__()
    await _no_streams(srv)
    assert srv.active_streams == 0
    assert set(asyncio.all_tasks()) == before  # the run's tasks are gone
    assert not aggregator_bodies(srv)  # the slow proposer never finished: nothing aggregated
    await m.aclose()


async def test_sync_api_inside_a_running_loop(srv: LoopbackServer) -> None:
    m = Mixture(loopback_config("self-moa", mode="layered"), registry=srv.registry())
    result = m.run_sync("hello")
    assert result.calls == 7 and result.text.startswith("synthesis")
    kinds = [type(e).__name__ for e in m.stream_sync("hello")]
    assert kinds[0] == "RunStarted" and kinds[-1] == "RunFinished"


def test_sync_api_from_plain_code(srv: LoopbackServer) -> None:
    m = Mixture(loopback_config("local", mode="layered"), registry=srv.registry())
    assert m.run_sync("hello").calls == 4
    for event in m.stream_sync("hello"):
        if isinstance(event, FinalDelta):
            break
    assert m.run_sync("again").text.startswith("synthesis")


async def test_long_references_are_trimmed_to_fit(srv: LoopbackServer) -> None:
    srv.set_behavior("Qwen/Qwen2.5-7B-Instruct-Turbo", ModelBehavior(reply="word " * 1200))
    config = loopback_config("moa-lite", mode="layered", aggregator_context_tokens=600)
    config.aggregator.max_tokens = 100
    result = await Mixture(config, registry=srv.registry()).run("q")
    (final,) = aggregator_bodies(srv)
    assert TRIMMED_LABEL in final["messages"][0]["content"]
    assert count_messages(final["messages"]) + final["max_tokens"] <= 600
    assert result.text.startswith("synthesis") and result.outputs[5].text.count("word") == 512


async def test_long_references_aggregated_in_windows(srv: LoopbackServer) -> None:
    for i, model in enumerate(["a", "b", "c", "d"]):
        srv.set_behavior(model, ModelBehavior(reply=f"{model} " * 150 + str(i)))
    config = MixtureConfig.model_validate(
        {
            "layers": [{"agents": [{"model": f"loop/{m}"} for m in "abcd"]}],
            "aggregator": {"model": "loop/agg", "max_tokens": 64},
            "aggregator_context_tokens": 560,
            "long_references": "window",
            "mode": "layered",
        }
    )
    events = [e async for e in Mixture(config, registry=srv.registry()).stream("q")]
    result = events[-1].result
    sent = aggregator_bodies(srv)
    assert len(sent) >= 2 and result.outputs[-1].calls == len(sent)
    assert all(count_messages(b["messages"]) + 64 <= 560 for b in sent)
    assert "synthesis" in sent[-1]["messages"][0]["content"].split("\n1. ")[1]
    assert "".join(e.text for e in events if isinstance(e, FinalDelta)) == result.text
    assert not math.isnan(result.latency_s)
