"""Staircase streaming against the loopback server: start, pacing, every step's prompt, faults.

The proposers are paced explicitly with `moa.testing.Gate`s opened step by step (never by
sleeping), so each test sends the same requests on an idle and on a fully loaded machine.
Every reply word is one tiktoken token, so words and tokens count alike.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest

from moa.bench.staircase_coverage import coverage, shown_prefix
from moa.config import MixtureConfig
from moa.events import (
    AgentDelta,
    AgentFinished,
    AgentStarted,
    Event,
    FinalDelta,
    Notice,
    RunFinished,
    StaircaseStep,
)
from moa.mixture import Mixture
from moa.providers.base import ChatRequest
from moa.runtime.feed import Board, Feed
from moa.runtime.prompts import (
    AGGREGATE_PROMPT,
    IN_PROGRESS_LABEL,
    STREAMING_NOTE,
    TRUNCATED_LABEL,
    Reference,
    cache_messages,
    readable_block,
)
from moa.runtime.staircase import Pacer, ReferenceView, settle_wait, start_wait
from moa.testing import Gate, LoopbackServer, ModelBehavior
from moa.tokens import count_tokens

pytestmark = pytest.mark.anyio

WORDS = [
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "red",
    "blue",
    "green",
]
P1 = " ".join(WORDS)
P2 = " ".join(reversed(WORDS))
AGG = " ".join(["cat", "dog", "sun", "moon", "sky", "tree", "rock", "fish", "bird", "king"] * 4)
CHUNKS = [2, 4]


def config(models: list[str], agg: str = "loop/agg", **staircase: Any) -> MixtureConfig:
    return MixtureConfig.model_validate(
        {
            "layers": [{"agents": [{"model": m} for m in models]}],
            "aggregator": {"model": agg, "max_tokens": 64},
            "mode": "staircase",
            "staircase": {
                "chunk_tokens": CHUNKS,
                "step_tokens": CHUNKS,
                "grace_s": 30,
                "stall_s": 30,
                **staircase,
            },
        }
    )


@pytest.fixture
def srv() -> Iterator[LoopbackServer]:
    models = {
        "p1": ModelBehavior(reply=P1, tokens_per_s=300),
        "p2": ModelBehavior(reply=P2, tokens_per_s=200),
        "agg": ModelBehavior(reply=AGG),
    }
    with LoopbackServer(models) as server:
        yield server


def gated(srv: LoopbackServer, model: str, reply: str, gate: Gate | None = None) -> Gate:
    gate = gate or Gate()
    srv.set_behavior(model, ModelBehavior(reply=reply, gate=gate))
    return gate


def bodies(srv: LoopbackServer, model: str = "agg") -> list[dict[str, Any]]:
    return [r.body for r in srv.requests if r.body and r.model == model]


def chunk_prefixes(reply: str, sizes: list[int]) -> list[str]:
    """Every text a reference may show: the reply cut at the feed's chunk boundaries."""
    feed = Feed(Board(), lambda i: sizes[min(i, len(sizes) - 1)])
    for token in re.findall(r"\s*\S+", reply):
        feed.push(token)
    feed.finish()
    return ["".join(feed.chunks[:n]) for n in range(1, len(feed.chunks) + 1)]


def shown(system: str) -> list[tuple[str, bool]]:
    """(text, complete) of every reference listed in a readable-layout system message."""
    block = system.split("Responses from models:")[1].split(STREAMING_NOTE)[0]
    out = []
    for line in block.strip("\n").split("\n"):
        text = line.split(". ", 1)[1]
        out.append((text.removesuffix(IN_PROGRESS_LABEL), not text.endswith(IN_PROGRESS_LABEL)))
    return out


def references(system: str) -> list[str]:
    return [text for text, _ in shown(system)]


def assert_paced(body: dict[str, Any]) -> None:
    """Lockstep: every unfinished reference shows at least as many tokens as the aggregator
    will have written at the end of this request."""
    messages = body["messages"]
    own = messages[-1]["content"] if messages[-1]["role"] == "assistant" else ""
    after = count_tokens(own) + body["max_tokens"]
    refs = shown(messages[0]["content"])
    for text, complete in refs:
        pointer = re.match(r"\(same as response (\d+)\)(?: then …(.*))?$", text)
        if pointer:  # an exact repeat of an earlier reference (plus what it adds)
            text = refs[int(pointer[1]) - 1][0] + (pointer[2] or "")
        # Trailing whitespace is no token of content (the next word's token takes the space).
        assert complete or count_tokens(text.rstrip()) >= after, (text, own, body["max_tokens"])


async def run(
    m: Mixture, on_event: Callable[[Event], None] | None = None
) -> tuple[list[Event], Any]:
    with anyio.fail_after(20):
        events = []
        async for event in m.stream("Spell it"):
            events.append(event)
            if on_event:
                on_event(event)
    await m.aclose()
    return events, events[-1].result


async def run_stepped(
    m: Mixture, srv: LoopbackServer, gates: list[Gate], opens: list[int]
) -> tuple[list[Event], Any]:
    """Run `m` while opening `gates` to each count of `opens` in turn, the next one only once
    the aggregator has sent one more request; then open them fully (the last of `opens` must
    be the last chunk boundary before the end, so that no step can fall in between)."""
    out: list[tuple[list[Event], Any]] = []

    async def go() -> None:
        out.append(await run(m))

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(go)
            await srv.open_in_steps(gates, opens, "agg")
    return out[0]


async def test_references_far_ahead_get_one_large_step(srv: LoopbackServer) -> None:
    """Step 2 is due once the references are 4 tokens ahead, but their second chunk (8
    tokens) puts them 8 ahead at once: one step writes all 8 (one prompt), where a fixed
    step size would have sent two (4 and 4)."""
    gates = [gated(srv, "p1", P1), gated(srv, "p2", P2)]
    cfg = config(["loop/p1", "loop/p2"], chunk_tokens=[2, 8], step_tokens=[2, 4])
    m = Mixture(cfg, registry=srv.registry())
    events, result = await run_stepped(m, srv, gates, [2, 10])
    assert result.text == AGG
    steps = bodies(srv)
    assert [b["max_tokens"] for b in steps] == [2, 8, 64 - 10]
    for body in steps:
        assert_paced(body)
    assert [e.max_tokens for e in events if isinstance(e, StaircaseStep)] == [2, 8, 64 - 10]


async def test_each_step_prompt_in_the_readable_layout(srv: LoopbackServer) -> None:
    gates = [gated(srv, "p1", P1), gated(srv, "p2", P2)]
    m = Mixture(config(["loop/p1", "loop/p2"]), registry=srv.registry())
    events, result = await run_stepped(m, srv, gates, [2, 6, 10])
    assert result.mode == "staircase" and result.text == AGG
    assert "".join(e.text for e in events if isinstance(e, FinalDelta)) == AGG
    steps = bodies(srv)
    assert len(steps) == 4 and result.outputs[-1].calls == 4
    assert [b["max_tokens"] for b in steps] == [2, 4, 4, 64 - 10]
    words = AGG.split()
    for i, (body, seen) in enumerate(zip(steps, [2, 6, 10, 13], strict=True)):
        messages = body["messages"]
        assert messages[0]["content"].startswith(AGGREGATE_PROMPT)
        assert messages[1] == {"role": "user", "content": "Spell it"}
        if i == 0:
            assert len(messages) == 2 and not body.get("continue_final_message")
        else:
            written = " ".join(words[: [0, 2, 6, 10][i]])
            assert messages[2] == {"role": "assistant", "content": written}
            assert body["continue_final_message"] is True
        expected = [" ".join(WORDS[:seen]), " ".join(list(reversed(WORDS))[:seen])]
        assert references(messages[0]["content"]) == expected
        assert_paced(body)
    last = steps[-1]["messages"][0]["content"]
    assert STREAMING_NOTE not in last, "the last call is free: every reference is complete"


@pytest.mark.parametrize("layout", ["paper", "cache"])
async def test_finished_references_reduce_exactly_to_the_layered_prompt(
    srv: LoopbackServer, layout: str
) -> None:
    cfg = config(["loop/p1", "loop/p2"], chunk_tokens=[500], layout=layout)
    await run(Mixture(cfg, registry=srv.registry()))
    (staircase,) = bodies(srv)
    srv.requests.clear()
    await run(Mixture(cfg, registry=srv.registry(), mode="layered"))
    (layered,) = bodies(srv)
    assert staircase == layered
    where = 0 if layout == "paper" else -1  # the system message, or the turn after the chat
    assert layered["messages"][where]["content"] == f"{AGGREGATE_PROMPT}\n1. {P1}\n2. {P2}"


def flat(messages: list[dict[str, Any]]) -> str:
    """A prompt as the text a prefix cache sees, up to the aggregator's own text (each turn
    opened by its role)."""
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return "".join(f"<{m['role']}>{m['content']}" for m in messages)


async def test_cache_layout_only_appends_and_starts_with_the_advisors_prompt(
    srv: LoopbackServer,
) -> None:
    gates = [gated(srv, "p1", P1), gated(srv, "p2", P2)]
    cfg = config(["loop/p1", "loop/p2"], layout="cache")
    m = Mixture(cfg, registry=srv.registry())
    _, result = await run_stepped(m, srv, gates, [2, 6, 10])
    steps = [b["messages"] for b in bodies(srv)]
    assert len(steps) == 4 and result.text == AGG
    for before, after in itertools.pairwise(steps):
        assert flat(after).startswith(flat(before)), "every step only appends references"
        own = [m["content"] for m in (before[-1], after[-1]) if m["role"] == "assistant"]
        assert own == sorted(own, key=len) and all(own[-1].startswith(o) for o in own)
    (advice,) = bodies(srv, "p1")
    assert steps[0][: len(advice["messages"])] == advice["messages"]
    rounds = [m["content"] for m in steps[-1] if m["role"] == "user"][1:]
    assert rounds[0].startswith(AGGREGATE_PROMPT) and len(rounds) == 4
    assert "[More of the responses, part 4]" in rounds[-1]
    fed = re.findall(r"\n1\. …?(.*?)(?: …)?$", "\n".join(rounds), re.MULTILINE)
    assert "".join(fed) == P1
    assert steps[-1][-1]["role"] == "assistant" and AGG.startswith(steps[-1][-1]["content"])


async def test_the_aggregator_waits_for_every_first_chunk(srv: LoopbackServer) -> None:
    g1, g2 = gated(srv, "p1", P1), gated(srv, "p2", P2)

    def on_event(event: Event) -> None:
        # p2 speaks only once p1's first two chunks are in: a start on p1 alone would show here
        agent = event.agent if isinstance(event, AgentDelta) else None
        if agent and (agent.layer, agent.index) == (0, 0) and event.text.strip() == WORDS[5]:
            g2.open(2)

    g1.open(6)
    m = Mixture(config(["loop/p1", "loop/p2"]), registry=srv.registry())
    async with anyio.create_task_group() as tg:

        async def finish() -> None:
            await anyio.to_thread.run_sync(srv.wait_requests, "agg", 1)
            g1.open()
            g2.open()

        tg.start_soon(finish)
        await run(m, on_event)
    first = bodies(srv)[0]
    assert references(first["messages"][0]["content"]) == [" ".join(WORDS[:6]), "green blue"]
    assert first["max_tokens"] == 2, "paced by the slower reference"


async def test_after_the_grace_a_straggler_joins_as_it_arrives(srv: LoopbackServer) -> None:
    g1, g2 = gated(srv, "p1", P1), gated(srv, "p2", P2)
    cfg = config(["loop/p1", "loop/p2"], grace_s=0.05, start_k=1)
    m = Mixture(cfg, registry=srv.registry())
    g1.open(2)

    def on_event(event: Event) -> None:
        # p1 goes on only once the straggler has joined (its sixth word is in)
        agent = event.agent if isinstance(event, AgentDelta) else None
        if agent and (agent.layer, agent.index) == (0, 1) and event.text.strip() == P2.split()[5]:
            g1.open(6)

    async def drive() -> None:
        await anyio.to_thread.run_sync(srv.wait_requests, "agg", 1)
        g2.open(6)
        await anyio.to_thread.run_sync(srv.wait_requests, "agg", 2)
        g1.open()
        g2.open()

    async with anyio.create_task_group() as tg:
        tg.start_soon(drive)
        _, result = await run(m, on_event)
    first, second = bodies(srv)[:2]
    assert references(first["messages"][0]["content"]) == ["one two"]
    assert references(second["messages"][0]["content"]) == [
        " ".join(WORDS[:6]),
        " ".join(list(reversed(WORDS))[:6]),
    ]
    assert [first["max_tokens"], second["max_tokens"]] == [2, 4]
    assert result.text == AGG


async def test_pacing_holds_on_every_request_at_any_speed(srv: LoopbackServer) -> None:
    long = " ".join(WORDS * 2)
    srv.set_behavior("p1", ModelBehavior(reply=long, tokens_per_s=400))
    srv.set_behavior("p2", ModelBehavior(reply=" ".join(reversed(long.split())), tokens_per_s=90))
    srv.set_behavior("p3", ModelBehavior(reply=long, tokens_per_s=150, ttft_s=0.05))
    cfg = config(["loop/p1", "loop/p2", "loop/p3"], chunk_tokens=[3, 5, 8], step_tokens=[3, 5, 8])
    _, result = await run(Mixture(cfg, registry=srv.registry()))
    steps = bodies(srv)
    assert result.text == AGG and len(steps) >= 2
    for body in steps:
        assert_paced(body)
    assert all(complete for _, complete in shown(steps[-1]["messages"][0]["content"]))


async def test_eager_pacing_writes_ahead_of_what_it_read(srv: LoopbackServer) -> None:
    gates = [gated(srv, "p1", P1), gated(srv, "p2", P2)]
    cfg = config(["loop/p1", "loop/p2"], pacing="eager", step_tokens=[3])
    _, result = await run_stepped(Mixture(cfg, registry=srv.registry()), srv, gates, [2])
    first = bodies(srv)[0]
    assert references(first["messages"][0]["content"]) == ["one two", "green blue"]
    assert first["max_tokens"] == 3 and result.text == AGG


@pytest.mark.parametrize("mode", ["staircase", "layered"])
async def test_a_stalled_proposer_is_left_behind_with_its_text_labelled(
    srv: LoopbackServer, mode: str
) -> None:
    srv.set_behavior("p3", ModelBehavior(reply="never says anything more", stall_after=3))
    cfg = config(["loop/p1", "loop/p3"], stall_s=0.3)
    _, result = await run(Mixture(cfg, registry=srv.registry(), mode=mode))
    assert result.text == AGG and result.mode == mode
    stalled = result.outputs[1]
    assert stalled.truncated and stalled.finish_reason == "cancelled"
    last = bodies(srv)[-1]["messages"][0]["content"]
    assert references(last) == [P1, "never says anything" + TRUNCATED_LABEL]
    assert srv.wait_idle()


@pytest.mark.parametrize("mode", ["staircase", "layered"])
async def test_on_a_queued_backend_a_silent_proposer_is_busy_not_stalled(
    srv: LoopbackServer, mode: str
) -> None:
    """An embedded engine serves requests in turn: a request waiting for its turn (or in a long
    prompt evaluation) writes nothing for longer than `stall_s`, yet is not left behind."""
    gate = gated(srv, "p3", P2)  # p3 silent, as if queued behind the others
    registry = srv.registry()
    provider, _ = registry.resolve("loop/p3")
    provider.capabilities = dataclasses.replace(provider.capabilities, queued=True)

    async def release() -> None:
        await anyio.to_thread.run_sync(srv.wait_requests, "p3", 1)
        await anyio.sleep(0.5)  # ten stall periods: time for a wrong stall rule to misfire
        gate.open()

    async with anyio.create_task_group() as tg:
        tg.start_soon(release)
        _, result = await run(
            Mixture(config(["loop/p1", "loop/p3"], stall_s=0.05), registry=registry, mode=mode)
        )
    assert result.text == AGG and not result.outputs[1].truncated
    assert references(bodies(srv)[-1]["messages"][0]["content"]) == [P1, P2]


async def test_a_silent_proposer_does_not_block(srv: LoopbackServer) -> None:
    srv.set_behavior("p3", ModelBehavior(reply="never says anything", stall_after=0))
    _, result = await run(
        Mixture(config(["loop/p1", "loop/p3"], stall_s=0.3), registry=srv.registry())
    )
    assert result.text == AGG
    assert all("never" not in b["messages"][0]["content"] for b in bodies(srv))
    assert srv.wait_idle()


async def test_fallback_notice_when_a_backend_cannot_continue(srv: LoopbackServer) -> None:
    gated(srv, "p2", P2)  # never opened: the quorum start must not wait for it
    registry = srv.registry(prefix="plain", continuation=None)
    events, result = await run(
        Mixture(
            config(["plain/p1", "plain/p2"], agg="plain/agg", start_k=1, grace_s=0.01),
            registry=registry,
            mode="auto",
        )
    )
    (notice,) = [e for e in events if isinstance(e, Notice)]
    assert "plain/agg cannot" in notice.message and "quorum start" in notice.message
    assert notice.kind == "auto" and result.notices == [], "auto's choice is traced, not flagged"
    assert result.mode == "layered" and result.text == AGG
    (body,) = bodies(srv)
    assert "continue_final_message" not in body and body["messages"][-1]["role"] == "user"
    assert references(body["messages"][0]["content"]) == [P1]


async def test_asked_for_staircase_reports_its_fallback(srv: LoopbackServer) -> None:
    registry = srv.registry(prefix="plain", continuation=None)
    cfg = config(["plain/p1", "plain/p2"], agg="plain/agg")
    events, result = await run(Mixture(cfg, registry=registry, mode="staircase"))
    (notice,) = [e for e in events if isinstance(e, Notice)]
    assert notice.kind == "fallback" and "layered mode" in notice.message
    assert result.mode == "layered" and result.notices == [notice.message]
    (body,) = bodies(srv)
    assert references(body["messages"][0]["content"]) == [P1, P2]


@pytest.mark.parametrize("layout", ["paper", "cache"])
async def test_exact_duplicates_are_fed_once_and_labelled(srv: LoopbackServer, layout: str) -> None:
    gate = Gate()
    for name in ("p1", "p2", "p3"):
        gated(srv, name, P1, gate)
    cfg = config(["loop/p1", "loop/p2", "loop/p3"], layout=layout)
    await run_stepped(Mixture(cfg, registry=srv.registry()), srv, [gate], [2, 6, 10])
    steps = bodies(srv)
    assert len(steps) == 4
    for body in steps:
        system = body["messages"][0]["content"]
        if layout == "cache":  # the rounds so far, after the conversation
            system = "".join(m["content"] for m in body["messages"][1:] if m["role"] == "user")
        assert system.count("one") == 1
        assert "\n2. (same as response 1)" in system and "\n3. (same as response 1)" in system


@pytest.mark.parametrize("mode", ["staircase", "layered"])
async def test_near_duplicate_references_are_both_shown(srv: LoopbackServer, mode: str) -> None:
    base = "we checked the ladder and the load and the wall and the floor " * 6
    safe, unsafe = base + "so it is safe", base + "so it is not safe"
    srv.set_behavior("p1", ModelBehavior(reply=safe))
    srv.set_behavior("p2", ModelBehavior(reply=unsafe))
    cfg = config(["loop/p1", "loop/p2"], chunk_tokens=[500])
    await run(Mixture(cfg, registry=srv.registry(), mode=mode))
    (body,) = bodies(srv)
    system = body["messages"][0]["content"]
    assert references(system) == [safe, unsafe] and "same as" not in system


@pytest.mark.parametrize("keep", [True, False])
async def test_mid_stream_failure_is_kept_or_dropped(srv: LoopbackServer, keep: bool) -> None:
    srv.set_behavior("p3", ModelBehavior(reply="broken reply that stops", drop_after=2))
    cfg = config(["loop/p1", "loop/p3"], keep_truncated=keep)
    _, result = await run(Mixture(cfg, registry=srv.registry()))
    assert result.outputs[1].truncated and result.outputs[1].text == "broken reply"
    last = bodies(srv)[-1]["messages"][0]["content"]
    if keep:
        assert references(last) == [P1, "broken reply" + TRUNCATED_LABEL]
    else:
        assert references(last) == [P1] and "broken" not in last


async def test_three_layer_staircase(srv: LoopbackServer) -> None:
    mid = " ".join(WORDS + WORDS[:7])
    gate = gated(srv, "mid", mid)
    cfg = MixtureConfig.model_validate(
        {
            "layers": [
                {"agents": [{"model": "loop/p1"}, {"model": "loop/p2"}]},
                {"agents": [{"model": "loop/mid", "n": 2}]},
            ],
            "aggregator": {"model": "loop/agg", "max_tokens": 64},
            "staircase": {"chunk_tokens": CHUNKS, "step_tokens": CHUNKS, "stall_s": 30},
        }
    )

    async def release_mids() -> None:
        gate.open(2)
        await anyio.to_thread.run_sync(srv.wait_requests, "agg", 1)
        gate.open()

    async with anyio.create_task_group() as tg:
        tg.start_soon(release_mids)
        events, result = await run(Mixture(cfg, registry=srv.registry()))
    assert result.mode == "staircase" and result.text == AGG
    assert any(b.get("continue_final_message") for b in bodies(srv, "mid"))
    started = next(e.t for e in events if isinstance(e, AgentStarted) and e.agent.final)
    mids_done = [e.t for e in events if isinstance(e, AgentFinished) and e.agent.layer == 1]
    assert len(mids_done) == 2 and started < min(mids_done)
    final_refs = references(bodies(srv)[0]["messages"][0]["content"])
    assert final_refs == ["one two", "(same as response 1)"]
    for body in bodies(srv):
        assert_paced(body)
    assert isinstance(events[-1], RunFinished)


def _feed(board: Board, words: int, *, done: bool = False) -> Feed:
    feed = Feed(board, lambda i: 2)
    for word in WORDS[:words]:
        feed.push(f" {word}")
    if done:
        feed.finish()
    return feed


def test_pacer_bounds_a_step_by_the_slowest_live_reference() -> None:
    board = Board()
    fast, slow = _feed(board, 10), _feed(board, 4)
    pacer = Pacer([fast, slow], "lockstep", stall_s=2.0)
    assert pacer.limit(8, written=2, room=64) == 2 and pacer.wait(8, written=2) > 0
    assert pacer.limit(8, written=4, room=64) == 0
    later = time.monotonic() + 5  # the slow one has been silent for longer than stall_s
    assert pacer.lead(4, now=later) is None, "every reference silent: nothing bounds it"
    slow.hold(True)
    assert pacer.lead(4, now=later) == 0, "waiting for its own references is not silence"
    slow.hold(False)
    slow.finish()
    assert pacer.limit(8, written=4, room=64) == 6 and pacer.wait(6, written=4) == 0
    assert Pacer([fast, slow], "eager", stall_s=2.0).limit(8, written=10, room=64) == 8


def test_a_lockstep_step_is_as_large_as_the_references_are_ahead() -> None:
    """The schedule says when a step is worth taking; the step then writes the whole lead:
    references far ahead get one large step (one prompt) instead of several small ones."""
    board = Board()
    fast, slow = _feed(board, 10), _feed(board, 8)
    pacer = Pacer([fast, slow], "lockstep", stall_s=2.0)
    assert pacer.wait(2, written=0) == 0
    assert pacer.limit(2, written=0, room=64) == 8, "the slowest live reference shows 8"
    assert pacer.limit(2, written=0, room=5) == 5, "never past the token budget"
    assert pacer.limit(2, written=7, room=64) == 1, "close: only what it has read"
    assert Pacer([fast, slow], "eager", stall_s=2.0).limit(2, written=0, room=64) == 2


def test_a_chunk_that_ends_on_a_space_does_not_count_the_space_as_a_token() -> None:
    """Streamed text often arrives as "word " pieces: a chunk then ends on a space, which
    tiktoken counts as a token of its own until the next word takes it. The lead used to count
    it, so a first step wrote one token more than the reference showed (margin -1)."""
    board = Board()
    trailing = Feed(board, lambda i: 2)
    trailing.push("one ")
    assert trailing.chunks == ["one "] and count_tokens("one ") == 2  # "one", " "
    pacer = Pacer([trailing], "lockstep", stall_s=2.0)
    assert pacer.shown(0) == 1 and pacer.limit(8, written=0, room=64) == 1  # the first step
    for word in WORDS[1:4]:
        trailing.push(f"{word} ")
    assert trailing.text == "one two three four "
    assert pacer.shown(0) == count_tokens("one two three four") == 4
    assert pacer.limit(8, written=1, room=64) == 3 and pacer.limit(8, written=4, room=64) == 0
    trailing.finish()
    assert Pacer([trailing], "lockstep", stall_s=2.0).limit(8, written=4, room=64) == 8  # not live


def test_coverage_counts_only_a_references_own_pieces() -> None:
    """`moa bench staircase` finds in each prompt what it showed of every reference. In the
    cache layout another response's continued piece ("2. … three four") may begin with the
    words this one says next: they used to count as shown, and once only the space before
    the next word matched ("… "), the search never ended (the bench hung at 512 tokens)."""
    board = Board()
    first, second = Feed(board, lambda i: 2), Feed(board, lambda i: 2)
    view = ReferenceView([first, second], "cache")
    for word in ("one", "two"):
        first.push(f" {word}")
    for word in ("red", "blue"):
        second.push(f" {word}")
    view.update(instruction=AGGREGATE_PROMPT)
    for word in ("three", "four"):
        second.push(f" {word}")  # what the first says next, but it has not said it yet
    view.update()
    messages = cache_messages([{"role": "user", "content": "Q"}], view.rounds, own=" x")
    prompt = "\n".join(str(m["content"]) for m in messages if m["role"] != "assistant")
    assert "\n2. … three four" in prompt
    assert shown_prefix(" one two three", prompt) == " one two"
    assert shown_prefix(" one two three nine", prompt) == " one two"  # used to hang
    assert shown_prefix(" red blue three four five", prompt) == " red blue three four"
    # A duplicate's tail (paper layout) is a piece of the response it extends.
    block = readable_block(
        [Reference(" one two", complete=False),
         Reference(" one two three", complete=False, same_as=1, tail=" three")]
    )
    assert shown_prefix(" one two three four", block) == " one two three"


def test_margin_binds_references_once_shown_and_unread_counts_the_others() -> None:
    """The start rule may let an aggregator begin before a reference spoke (on the embedded
    engine the third proposer waits its turn behind the other two): pacing binds a reference
    once it has shown a chunk, so the margin counts the ones shown and `unread` the rest (it
    was reported as margin -16 in `moa bench staircase --backend local`)."""
    question = {"role": "user", "content": "Q"}

    def call(block: str, own: str | None = None) -> ChatRequest:
        messages = [{"role": "system", "content": block}, question]
        return ChatRequest("m", messages + ([{"role": "assistant", "content": own}] if own
                                            else []))

    first = readable_block([Reference(" a b c d", complete=False)])
    last = readable_block([Reference(" a b c d e f", complete=True),
                           Reference(" p q r", complete=True)])
    cover = coverage([call(first), call(last, own=" x y")],
                     [(" a b c d e f", True, 6), (" p q r", True, 3)], " x y z")
    assert (cover.margin, cover.unread, cover.share) == (2, 1, 1.0)
    behind = coverage([call(first), call(last, own=" x y z w v")],
                      [(" a b c d e f", True, 6), (" p q r", True, 3)], " x y z w v u")
    assert behind.margin == -1, "writing past what a shown reference showed still counts"


def test_start_and_settle_rules() -> None:
    board = Board()
    spoke, silent = _feed(board, 2), _feed(board, 0)
    now = time.monotonic()
    assert start_wait([spoke, silent], 1, grace_s=3.0, stall_s=10.0, now=now) == pytest.approx(
        3.0, abs=0.5
    )
    assert start_wait([spoke, silent], 2, grace_s=3.0, stall_s=10.0, now=now) == pytest.approx(
        10.0, abs=0.5
    ), "no grace before k first chunks; a silent reference stops counting after stall_s"
    assert start_wait([spoke, silent], 2, 3.0, 10.0, now=now + 11) == 0.0
    silent.push(" word")
    silent.push(" more")
    assert start_wait([spoke, silent], 2, 3.0, 10.0, now=now) == 0.0, "every first chunk is in"
    assert settle_wait([spoke, silent], 1, 2.0, now=now) is None, "quorum not done"
    spoke.finish()
    assert settle_wait([spoke, silent], 1, 2.0, now=now) == pytest.approx(2.0, abs=0.5)
    assert settle_wait([spoke, silent], 1, 2.0, now=now + 3) == 0.0, "the rest went silent"
    silent.finish()
    assert settle_wait([spoke, silent], 2, 2.0, now=now) == 0.0
