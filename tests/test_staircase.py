"""Staircase streaming against the loopback server: the prompt of every step, start, faults."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from moa.config import MixtureConfig
from moa.events import AgentFinished, AgentStarted, FinalDelta, Notice, RunFinished
from moa.mixture import Mixture
from moa.runtime.feed import Board, Feed
from moa.runtime.prompts import AGGREGATE_PROMPT, STREAMING_NOTE, TRUNCATED_LABEL
from moa.testing import LoopbackServer, ModelBehavior

pytestmark = pytest.mark.anyio

WORDS = [
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
]
P1 = " ".join(WORDS)
P2 = " ".join(reversed(WORDS))
AGG = " ".join(f"final{i}" for i in range(40))


def config(models: list[str], agg: str = "loop/agg", **staircase: Any) -> MixtureConfig:
    return MixtureConfig.model_validate(
        {
            "layers": [{"agents": [{"model": m} for m in models]}],
            "aggregator": {"model": agg, "max_tokens": 64},
            "mode": "staircase",
            "staircase": {
                "chunk_tokens": [2, 4],
                "step_tokens": [3, 5],
                "grace_s": 0.01,
                "stall_s": 0.3,
                **staircase,
            },
        }
    )


@pytest.fixture
def srv() -> Iterator[LoopbackServer]:
    models = {
        "p1": ModelBehavior(reply=P1, tokens_per_s=150),
        "p2": ModelBehavior(reply=P2, tokens_per_s=100, ttft_s=0.02),
        "agg": ModelBehavior(reply=AGG, tokens_per_s=400),
    }
    with LoopbackServer(models) as server:
        yield server


def bodies(srv: LoopbackServer, model: str) -> list[dict[str, Any]]:
    return [r.body for r in srv.requests if r.body and r.model == model]


def chunk_prefixes(reply: str, sizes: list[int]) -> list[str]:
    """Every text a reference may show: the reply cut at the feed's chunk boundaries."""
    feed = Feed(Board(), lambda i: sizes[min(i, len(sizes) - 1)])
    for token in re.findall(r"\s*\S+", reply):
        feed.push(token)
    feed.finish()
    return ["".join(feed.chunks[:n]) for n in range(1, len(feed.chunks) + 1)]


def references(system: str) -> list[str]:
    block = system.split("Responses from models:")[1].split(STREAMING_NOTE)[0]
    return [line.split(". ", 1)[1].removesuffix(" …") for line in block.strip("\n").split("\n")]


async def run(m: Mixture, question: str = "Spell it") -> tuple[list[Any], Any]:
    with anyio.fail_after(20):
        events = [e async for e in m.stream(question)]
    await m.aclose()
    return events, events[-1].result


async def test_each_step_prompt_in_the_readable_layout(srv: LoopbackServer) -> None:
    events, result = await run(Mixture(config(["loop/p1", "loop/p2"]), registry=srv.registry()))
    assert result.mode == "staircase" and result.text == AGG
    assert "".join(e.text for e in events if isinstance(e, FinalDelta)) == AGG
    steps = bodies(srv, "agg")
    assert len(steps) >= 3 and result.outputs[-1].calls == len(steps)
    allowed = {P1: chunk_prefixes(P1, [2, 4]), P2: chunk_prefixes(P2, [2, 4])}
    written = ""
    for i, body in enumerate(steps):
        messages = body["messages"]
        assert messages[0]["content"].startswith(AGGREGATE_PROMPT)
        assert messages[1] == {"role": "user", "content": "Spell it"}
        if i == 0:
            assert len(messages) == 2 and not body.get("continue_final_message")
        else:
            assert messages[2] == {"role": "assistant", "content": written}
            assert body["continue_final_message"] is True
        for ref, full in zip(references(messages[0]["content"]), (P1, P2), strict=False):
            assert ref in allowed[full]
        step_limit = [3, 5][min(i, 1)]
        if i < len(steps) - 1:
            assert body["max_tokens"] == step_limit
        words = AGG.split()[len(written.split()) :]
        written += "".join(
            f" {w}" if written or j else w for j, w in enumerate(words[: body["max_tokens"]])
        )
    last = steps[-1]["messages"][0]["content"]
    assert STREAMING_NOTE not in last and references(last) == [P1, P2]
    assert steps[-1]["max_tokens"] == 64 - len(steps[-1]["messages"][2]["content"].split())


@pytest.mark.parametrize("layout", ["readable", "prefix_cache"])
async def test_finished_references_reduce_exactly_to_the_layered_prompt(
    srv: LoopbackServer, layout: str
) -> None:
    cfg = config(["loop/p1", "loop/p2"], chunk_tokens=[500], grace_s=5, layout=layout)
    await run(Mixture(cfg, registry=srv.registry()))
    (staircase,) = bodies(srv, "agg")
    srv.requests.clear()
    await run(Mixture(cfg, registry=srv.registry(), mode="layered"))
    (layered,) = bodies(srv, "agg")
    assert staircase == layered
    assert references(layered["messages"][0]["content"]) == [P1, P2]


async def test_prefix_cache_layout_only_appends(srv: LoopbackServer) -> None:
    cfg = config(["loop/p1", "loop/p2"], layout="prefix_cache")
    _, result = await run(Mixture(cfg, registry=srv.registry()))
    systems = [b["messages"][0]["content"].removesuffix(STREAMING_NOTE) for b in bodies(srv, "agg")]
    assert len(systems) >= 3 and result.text == AGG
    for before, after in itertools.pairwise(systems):
        assert after.startswith(before)
    assert "[More of the responses, part 2]" in systems[-1]
    fed = re.findall(r"\n1\. …?(.*)", systems[-1])
    assert "".join(fed) == P1


async def test_a_stalled_proposer_does_not_block(srv: LoopbackServer) -> None:
    srv.set_behavior("p3", ModelBehavior(reply="never says anything", stall_after=0))
    _, result = await run(Mixture(config(["loop/p1", "loop/p3"]), registry=srv.registry()))
    assert result.text == AGG
    stalled = result.outputs[1]
    assert not stalled.ok and "cancelled" in (stalled.error or "")
    assert all("never" not in b["messages"][0]["content"] for b in bodies(srv, "agg"))
    with anyio.fail_after(5):
        while srv.active_streams:
            await anyio.sleep(0.01)


async def test_fallback_notice_when_a_backend_cannot_continue(srv: LoopbackServer) -> None:
    registry = srv.registry(prefix="plain", continuation=None)
    events, result = await run(
        Mixture(
            config(["plain/p1", "plain/p2"], agg="plain/agg", start_k=1),
            registry=registry,
            mode="auto",
        )
    )
    (notice,) = [e for e in events if isinstance(e, Notice)]
    assert "plain/agg cannot" in notice.message and "quorum start" in notice.message
    assert notice.kind == "auto" and result.notices == [], "auto's choice is traced, not flagged"
    assert result.mode == "layered" and result.text == AGG
    (body,) = bodies(srv, "agg")
    assert "continue_final_message" not in body and body["messages"][-1]["role"] == "user"
    refs = references(body["messages"][0]["content"])
    assert refs == [P1]  # the fastest one finished, the other was not waited for


async def test_asked_for_staircase_reports_its_fallback(srv: LoopbackServer) -> None:
    registry = srv.registry(prefix="plain", continuation=None)
    cfg = config(["plain/p1", "plain/p2"], agg="plain/agg")
    events, result = await run(Mixture(cfg, registry=registry, mode="staircase"))
    (notice,) = [e for e in events if isinstance(e, Notice)]
    assert notice.kind == "fallback" and "layered mode" in notice.message
    assert result.mode == "layered" and result.notices == [notice.message]


async def test_identical_chunks_are_fed_once(srv: LoopbackServer) -> None:
    for layout in ("readable", "prefix_cache"):
        srv.requests.clear()
        cfg = config(["loop/p1", "loop/p1", "loop/p1"], layout=layout)
        await run(Mixture(cfg, registry=srv.registry()))
        for body in bodies(srv, "agg"):
            system = body["messages"][0]["content"]
            assert system.count("alpha") == 1
            assert "2. (same as response 1)" in system and "3. (same as response 1)" in system


@pytest.mark.parametrize("keep", [True, False])
async def test_mid_stream_failure_is_kept_or_dropped(srv: LoopbackServer, keep: bool) -> None:
    srv.set_behavior("p3", ModelBehavior(reply="broken reply that stops", drop_after=2))
    cfg = config(["loop/p1", "loop/p3"], keep_truncated=keep)
    registry = srv.registry()
    _, result = await run(Mixture(cfg, registry=registry))
    assert result.outputs[1].truncated and result.outputs[1].text == "broken reply"
    last = bodies(srv, "agg")[-1]["messages"][0]["content"]
    if keep:
        assert references(last) == [P1, "broken reply" + TRUNCATED_LABEL]
    else:
        assert references(last) == [P1] and "broken" not in last


async def test_three_layer_staircase(srv: LoopbackServer) -> None:
    srv.set_behavior(
        "mid", ModelBehavior(reply=" ".join(f"mid{i}" for i in range(20)), tokens_per_s=150)
    )
    cfg = MixtureConfig.model_validate(
        {
            "layers": [
                {"agents": [{"model": "loop/p1"}, {"model": "loop/p2"}]},
                {"agents": [{"model": "loop/mid", "n": 2}]},
            ],
            "aggregator": {"model": "loop/agg", "max_tokens": 64},
            "staircase": {"chunk_tokens": [2, 4], "step_tokens": [3, 5], "grace_s": 0.01},
        }
    )
    events, result = await run(Mixture(cfg, registry=srv.registry()))
    assert result.mode == "staircase" and result.text == AGG and result.calls > 5
    mids = bodies(srv, "mid")
    assert any(b.get("continue_final_message") for b in mids)
    started = next(e.t for e in events if isinstance(e, AgentStarted) and e.agent.final)
    mids_done = [e.t for e in events if isinstance(e, AgentFinished) and e.agent.layer == 1]
    assert len(mids_done) == 2 and started < max(mids_done)
    final_refs = references(bodies(srv, "agg")[0]["messages"][0]["content"])
    assert final_refs and all(r.startswith("mid0") or r.startswith("(same as") for r in final_refs)
    assert isinstance(events[-1], RunFinished)
