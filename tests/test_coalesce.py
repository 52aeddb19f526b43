"""`Mixture.stream(coalesce=...)`: agents' tokens gathered into fewer `AgentDelta`s for
consumers that ask, against the loopback server. The answer's `FinalDelta`s and every other
event are the same as without it; only consecutive deltas of an agent are merged."""

from __future__ import annotations

import math
from typing import Any

import pytest

from moa.config import MixtureConfig
from moa.events import AgentDelta, AgentFinished, AgentStarted, Event, FinalDelta
from moa.mixture import Mixture
from moa.testing import LoopbackServer, ModelBehavior

pytestmark = pytest.mark.anyio

REPLY = " ".join(f"w{i}" for i in range(30))


def mixture(srv: LoopbackServer) -> Mixture:
    config = MixtureConfig.model_validate({
        "name": "coalesce", "mode": "layered",
        "layers": [{"agents": [{"model": f"loop/p{i}"} for i in range(3)]}],
        "aggregator": {"model": "loop/agg"},
    })
    for model in ("p0", "p1", "p2", "agg"):
        srv.set_behavior(model, ModelBehavior(reply=REPLY, tokens_per_s=3000))
    return Mixture(config, registry=srv.registry())


async def events_of(m: Mixture, **kw: Any) -> list[Event]:
    return [event async for event in m.stream("Coalesce?", **kw)]


def skeleton(events: list[Event]) -> list[tuple[str, str]]:
    """Every event but the agents' deltas, as (type, agent key)."""
    return [(type(e).__name__, getattr(getattr(e, "agent", None), "key", ""))
            for e in events if not isinstance(e, AgentDelta)]


def texts(events: list[Event]) -> dict[str, str]:
    out: dict[str, str] = {}
    for e in events:
        if isinstance(e, AgentDelta):
            out[e.agent.key] = out.get(e.agent.key, "") + e.text
    return out


@pytest.mark.parametrize("coalesce", [math.inf, 3600.0])
async def test_gathered_deltas_carry_the_same_text_and_keep_every_other_event(
    loopback: LoopbackServer, coalesce: float
) -> None:
    m = mixture(loopback)
    each = await events_of(m)
    gathered = await events_of(m, coalesce=coalesce)
    assert sum(isinstance(e, AgentDelta) for e in each) == 4 * 30  # one per token by default
    assert texts(gathered) == texts(each) == {k: REPLY for k in ("L1.1", "L1.2", "L1.3", "final")}
    # The agents run concurrently: their events interleave as they come, run by run.
    assert sorted(skeleton(gathered)) == sorted(skeleton(each))
    finals = [e.text for e in gathered if isinstance(e, FinalDelta)]
    assert finals == [e.text for e in each if isinstance(e, FinalDelta)]  # never gathered
    assert len(finals) == 30
    # An agent's deltas come between its start and its end, and two of them are never
    # neighbours: only an event of another kind (not the answer's) separates them.
    last: dict[str, int] = {}
    started: dict[str, float] = {}
    for i, e in enumerate(gathered):
        if isinstance(e, AgentStarted):
            started[e.agent.key] = e.t
        elif isinstance(e, AgentDelta):
            key = e.agent.key
            assert started[key] <= e.t
            if key in last:
                between = gathered[last[key] + 1:i]
                assert any(not isinstance(b, AgentDelta | FinalDelta) for b in between)
            last[key] = i
        elif isinstance(e, AgentFinished):
            assert e.agent.key in last and last[e.agent.key] < i


async def test_run_gathers_and_returns_the_same_result(loopback: LoopbackServer) -> None:
    m = mixture(loopback)
    result = await m.run("Coalesce?")
    assert result.text == REPLY and [o.text for o in result.outputs] == [REPLY] * 4
