"""Multi-agent debate against the loopback server over real sockets: round prompts, append-only
histories, the vote, consensus, staircase pacing, faults, budgets, routing and every surface.

Each loopback debater answers "<model> round <n> <words> The answer is <X>." where n is the
number of user turns it was sent (its round) and X comes from the test, so every round's text
differs and the vote is the test's to decide. Every word is one tiktoken token.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import openai
import pytest

import moa
from moa.config import MixtureConfig, preset
from moa.errors import ConfigError, DeadlineExceeded, NotEnoughProposers
from moa.events import AgentFinished, AgentStarted, Event, Notice, RouteDecision, RunFinished
from moa.mixture import Mixture
from moa.openai.server import ServerThread, create_app
from moa.providers.registry import Limits
from moa.runtime.prompts import (
    AGGREGATE_PROMPT,
    DEBATE_PROMPT,
    IN_PROGRESS_LABEL,
    TRUNCATED_LABEL,
)
from moa.testing import Gate, LoopbackServer, ModelBehavior
from moa.tokens import count_tokens

pytestmark = pytest.mark.anyio

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "theta", "kappa", "sigma"]
QUESTION = "What is three plus four?"
JUDGE = "The judge settles it. The answer is 7."
LIMITS = Limits(max_retries=0, backoff_initial=0.001, read_timeout=10.0)


def debater(model: str, answer: Callable[[int], object], **kw: Any) -> ModelBehavior:
    """A debater whose answer in round n is `answer(n)`."""

    def reply(body: dict[str, Any]) -> str:
        n = sum(m["role"] == "user" for m in body["messages"])
        return f"{model} round {n} {' '.join(WORDS)} The answer is {answer(n)}."

    return ModelBehavior(reply=reply, **kw)


def config(models: str = "abc", rounds: int = 2, **changes: Any) -> MixtureConfig:
    debate = {"agents": [{"model": f"loop/{m}"} for m in models], "rounds": rounds}
    return MixtureConfig.model_validate(
        {
            "name": "debate-test",
            "strategy": "debate",
            "mode": "layered",
            "debate": {**debate, **changes.pop("debate", {})},
            "aggregator": {"model": "loop/judge"},
            **changes,
        }
    )


@pytest.fixture
def srv() -> Iterator[LoopbackServer]:
    with LoopbackServer({"judge": ModelBehavior(reply=JUDGE)}) as server:
        yield server


def debaters(srv: LoopbackServer, answers: dict[str, Callable[[int], object]], **kw: Any) -> None:
    for model, answer in answers.items():
        srv.set_behavior(model, debater(model, answer, **kw))


def requests(srv: LoopbackServer, model: str) -> list[list[dict[str, Any]]]:
    return [r.body["messages"] for r in srv.requests if r.body and r.model == model]


async def run(m: Mixture, question: str = QUESTION) -> tuple[list[Event], Any]:
    events: list[Event] = []
    with anyio.fail_after(30):
        async with m:
            async for event in m.stream(question):
                events.append(event)
    return events, events[-1].result  # type: ignore[attr-defined]


def solutions(turn: str) -> list[str]:
    """The solutions listed in a revision turn."""
    return re.findall(r"One agent solution: ```(.*?)```", turn, re.DOTALL)


def text_of(model: str, round_: int, answer: object) -> str:
    return f"{model} round {round_} {' '.join(WORDS)} The answer is {answer}."


# ---- rounds, prompts, histories -------------------------------------------------------------


async def test_each_round_shows_every_peer_previous_answer_and_extends_the_history(
    srv: LoopbackServer,
) -> None:
    answers = {"a": lambda n: 1, "b": lambda n: 2, "c": lambda n: 3}  # never agree
    debaters(srv, answers)
    events, result = await run(Mixture(config(rounds=3), registry=srv.registry(limits=LIMITS)))
    assert result.text == JUDGE and result.saved_calls == 0
    assert [o.agent.key for o in result.outputs] == [
        f"R{r}.{i}" for r in (1, 2, 3) for i in (1, 2, 3)
    ] + ["final"]
    for model in answers:
        rounds = requests(srv, model)
        assert len(rounds) == 3
        assert rounds[0] == [{"role": "user", "content": QUESTION}]
        for r in (1, 2):
            prompt, earlier = rounds[r], rounds[r - 1]
            # append-only: the previous round's prompt, its own answer, then the others' answers
            assert prompt[: len(earlier)] == earlier and len(prompt) == len(earlier) + 2
            mine = text_of(model, r, answers[model](r))
            assert prompt[-2] == {"role": "assistant", "content": mine}
            turn = prompt[-1]["content"]
            assert turn.startswith(DEBATE_PROMPT.split("{solutions}")[0])
            others = [m for m in answers if m != model]
            assert solutions(turn) == [text_of(o, r, answers[o](r)) for o in others]
    judge = requests(srv, "judge")[0]
    assert AGGREGATE_PROMPT in judge[0]["content"]
    for model, answer in answers.items():
        assert text_of(model, 3, answer(3)) in judge[0]["content"]
    notices = [e.message for e in events if isinstance(e, Notice)]
    assert any("tie (1, 2, 3)" in n for n in notices)


async def test_the_debate_stops_when_the_debaters_agree(srv: LoopbackServer) -> None:
    debaters(srv, {"a": lambda n: 7, "b": lambda n: 8 if n == 1 else 7, "c": lambda n: 7})
    _, result = await run(Mixture(config(rounds=4), registry=srv.registry(limits=LIMITS)))
    assert result.text == text_of("a", 2, 7), "the first supporter's answer of round 2"
    assert result.finish_reason == "stop" and result.saved_calls == 6
    assert [len(requests(srv, m)) for m in "abc"] == [2, 2, 2] and not requests(srv, "judge")
    stopped = [o for o in result.outputs if o.finish_reason == "consensus"]
    assert len(stopped) == 6 and all(o.calls == 0 and o.ok for o in stopped)
    assert "agreed after round 2 of 4" in result.notices[0] and "6 calls saved" in result.notices[0]
    assert "Vote: 3 of 3 debaters answered 7." in result.notices


async def test_under_staircase_one_round_at_most_runs_ahead_of_a_consensus(
    srv: LoopbackServer,
) -> None:
    for m, speed in (("a", 400), ("b", 400), ("c", 40)):  # c's round 1 is still being written
        srv.set_behavior(m, debater(m, lambda n: 7, tokens_per_s=speed))  # when round 2 speaks
    cfg = config(rounds=3, mode="staircase",
                 staircase={"chunk_tokens": [3], "step_tokens": [3], "stall_s": 30})
    _, result = await run(Mixture(cfg, registry=srv.registry(limits=LIMITS)))
    assert result.text == text_of("a", 1, 7) and result.saved_calls == 3
    rounds = [sum(m["role"] == "user" for m in body) for x in "abc" for body in requests(srv, x)]
    assert set(rounds) <= {1, 2}, "round 3 never started: round 1 agreed before it could"
    assert "3 calls saved" in result.notices[0]


async def test_without_the_consensus_stop_every_round_runs(srv: LoopbackServer) -> None:
    debaters(srv, {m: (lambda n: 7) for m in "abc"})
    cfg = config(rounds=3, debate={"stop_at_consensus": False})
    _, result = await run(Mixture(cfg, registry=srv.registry(limits=LIMITS)))
    assert [len(requests(srv, m)) for m in "abc"] == [3, 3, 3] and result.saved_calls == 0
    assert result.text == text_of("a", 3, 7)


@pytest.mark.parametrize(
    ("answers", "with_judge", "expect", "said"),
    [
        ({"a": 8, "b": 7, "c": 7}, True, ("b", 7), "Vote: 2 of 3 debaters answered 7."),
        ({"a": 1, "b": 2, "c": 3, "d": 2, "e": 1}, True, None, "a tie (1, 2)"),
        ({"a": 1, "b": 2, "c": 3, "d": 2, "e": 1}, False, ("a", 1), "a tie (1, 2)"),
    ],
)
async def test_the_vote_and_its_ties(
    srv: LoopbackServer,
    answers: dict[str, int],
    with_judge: bool,
    expect: tuple[str, int] | None,
    said: str,
) -> None:
    debaters(srv, {m: (lambda n, a=a: a) for m, a in answers.items()})
    cfg = config("".join(answers), rounds=1)
    if not with_judge:
        cfg.aggregator = None
    _, result = await run(Mixture(cfg, registry=srv.registry(limits=LIMITS)))
    if expect is None:
        assert result.text == JUDGE and len(requests(srv, "judge")) == 1
    else:
        assert result.text == text_of(expect[0], 1, expect[1])
        assert not requests(srv, "judge")
    assert any(said in n for n in result.notices), result.notices


async def test_open_ended_answers_take_the_reply_closest_to_the_others(
    srv: LoopbackServer,
) -> None:
    srv.set_behavior("a", ModelBehavior(reply="Blue light scatters more in the air."))
    srv.set_behavior("b", ModelBehavior(reply="Blue light scatters more in the air above."))
    srv.set_behavior("c", ModelBehavior(reply="Because of oceans."))
    cfg = config(rounds=1)
    cfg.aggregator = None
    _, result = await run(Mixture(cfg, registry=srv.registry(limits=LIMITS)))
    assert result.text == "Blue light scatters more in the air."
    assert "open-ended" in result.notices[-1]


async def test_a_custom_round_prompt_may_hold_braces(srv: LoopbackServer) -> None:
    debaters(srv, {"a": lambda n: 1, "b": lambda n: 2})
    prompt = 'Peers said:\n{solutions}\nAnswer as JSON {"answer": ...}.'
    cfg = config("ab", rounds=2, debate={"prompt": prompt})
    await run(Mixture(cfg, registry=srv.registry(limits=LIMITS)))
    turn = requests(srv, "a")[1][-1]["content"]
    solution = f"One agent solution: ```{text_of('b', 1, 2)}```"
    assert turn == prompt.replace("{solutions}", solution)


async def test_final_aggregate_always_asks_the_aggregator(srv: LoopbackServer) -> None:
    debaters(srv, {m: (lambda n: 7) for m in "abc"})
    cfg = config(rounds=2, debate={"final": "aggregate"})
    _, result = await run(Mixture(cfg, registry=srv.registry(limits=LIMITS)))
    assert result.text == JUDGE
    (judge,) = requests(srv, "judge")
    assert text_of("b", 1, 7) in judge[0]["content"], "consensus after round 1"


# ---- faults, budgets, deadline ----------------------------------------------------------------


async def test_a_failed_debater_leaves_and_the_rest_go_on(srv: LoopbackServer) -> None:
    debaters(srv, {"a": lambda n: 1, "c": lambda n: 3})
    srv.set_behavior("b", ModelBehavior(fail_status=500))
    _, result = await run(Mixture(config(rounds=2), registry=srv.registry(limits=LIMITS)))
    out = {o.agent.key: o for o in result.outputs}
    assert not out["R1.2"].ok and "500" in (out["R1.2"].error or "")
    assert out["R2.2"].error == "left the debate: its round 1 answer failed"
    assert out["R2.2"].calls == 0 and len(requests(srv, "b")) == 1
    for model, other in (("a", "c"), ("c", "a")):
        turn = requests(srv, model)[1][-1]["content"]
        assert solutions(turn) == [text_of(other, 1, 1 if other == "a" else 3)]
    assert result.text == JUDGE


async def test_a_debater_cut_mid_stream_is_labelled_and_keeps_debating(
    srv: LoopbackServer,
) -> None:
    debaters(srv, {"a": lambda n: 1, "c": lambda n: 3})
    srv.set_behavior("b", debater("b", lambda n: 2, drop_after=4, fail_times=1))
    _, result = await run(Mixture(config(rounds=2), registry=srv.registry(limits=LIMITS)))
    turn = requests(srv, "a")[1][-1]["content"]
    assert "b round 1 alpha" in turn and TRUNCATED_LABEL in turn
    b_round_2 = requests(srv, "b")[1]
    assert b_round_2[1]["role"] == "assistant" and b_round_2[1]["content"].startswith("b round 1")
    assert {o.agent.key: o.ok for o in result.outputs}["R2.2"]


async def test_when_every_debater_fails_the_cause_is_said_once(srv: LoopbackServer) -> None:
    for m in "abc":
        srv.set_behavior(m, ModelBehavior(fail_status=401))
    with pytest.raises(NotEnoughProposers, match=r"^HTTP 401: [^(]*\(check LOOP_API_KEY\) "
                       r"\(R1\.1 on loop/a; R1\.2 on loop/b; R1\.3 on loop/c\)\.$"):
        await Mixture(config(), registry=srv.registry(limits=LIMITS)).run(QUESTION)


async def test_a_stalled_debater_is_cut_and_the_debate_goes_on(srv: LoopbackServer) -> None:
    debaters(srv, {"a": lambda n: 1, "c": lambda n: 1})
    srv.set_behavior("b", debater("b", lambda n: 2, stall_after=3))
    cfg = config(rounds=2, staircase={"stall_s": 1.0})
    _, result = await run(Mixture(cfg, registry=srv.registry(limits=LIMITS)))
    out = {o.agent.key: o for o in result.outputs}
    assert "stalled" in (out["R1.2"].error or "")
    assert result.text.endswith("The answer is 1."), "the rest agreed and answered"


async def test_the_budget_bounds_a_debate(srv: LoopbackServer) -> None:
    debaters(srv, {m: (lambda n, m=m: ord(m)) for m in "abc"})
    cfg = config(rounds=3, budget={"tokens": 200})  # round 1 fits, round 2 cannot
    for agent in cfg.agents():
        agent.max_tokens = 40
    with pytest.raises(NotEnoughProposers) as caught:
        await Mixture(cfg, registry=srv.registry(limits=LIMITS)).run(QUESTION)
    said = str(caught.value)
    assert said.startswith("Call to loop/a refused: request budget:") and "(R2.1 on loop/a)" in said
    assert caught.value.partial is not None and caught.value.partial.outputs[0].ok
    assert [len(requests(srv, m)) for m in "abc"] == [1, 1, 1], "round 2 was refused"


async def test_the_deadline_ends_a_debate(srv: LoopbackServer) -> None:
    debaters(srv, {"a": lambda n: 1, "b": lambda n: 2})
    srv.set_behavior("c", ModelBehavior(reply="slow", gate=Gate()))  # never opened
    cfg = config(deadline_s=0.5, staircase={"stall_s": 30})
    with pytest.raises(DeadlineExceeded):
        await Mixture(cfg, registry=srv.registry(limits=LIMITS)).run(QUESTION)


# ---- staircase ----------------------------------------------------------------------------


def assert_paced(messages: list[dict[str, Any]], max_tokens: int, full: dict[str, str]) -> None:
    """Lockstep: every unfinished peer of the previous round shows at least as many tokens
    as this debater will have written at the end of this request."""
    own = messages[-1]["content"] if messages[-1]["role"] == "assistant" else ""
    turn = messages[-2 if own else -1]["content"]
    mine = messages[-3 if own else -2]["content"]
    after = count_tokens(own) + max_tokens
    peers = [mine, *(s.removesuffix(IN_PROGRESS_LABEL) for s in solutions(turn))]
    for text in peers:
        if text not in full.values():
            assert count_tokens(text.rstrip()) >= after, (text, own, max_tokens)


async def test_staircase_rounds_start_on_partial_answers_and_stay_paced(
    srv: LoopbackServer,
) -> None:
    speeds = {"a": 400, "b": 150, "c": 90}
    debaters(srv, {"a": lambda n: 1, "b": lambda n: 2, "c": lambda n: 3})
    for m, speed in speeds.items():
        srv.set_behavior(m, debater(m, lambda n, m=m: "123"["abc".index(m)], tokens_per_s=speed))
    cfg = config(
        rounds=2,
        mode="staircase",
        staircase={"chunk_tokens": [3, 5], "step_tokens": [3, 5], "grace_s": 30, "stall_s": 30},
    )
    _, result = await run(Mixture(cfg, registry=srv.registry(limits=LIMITS)))
    assert result.mode == "staircase" and result.text == JUDGE
    full = {m: text_of(m, 1, "123"["abc".index(m)]) for m in "abc"}
    bodies = [r.body for r in srv.requests if r.body and r.model in "abc"]
    steps = [b for b in bodies if sum(m["role"] == "user" for m in b["messages"]) == 2]
    assert len(steps) > 3, "round 2 was taken in steps"
    for body in steps:
        assert_paced(body["messages"], body["max_tokens"], full)
    assert any(IN_PROGRESS_LABEL in b["messages"][2]["content"] for b in steps)


async def test_staircase_round_two_starts_before_round_one_ends(srv: LoopbackServer) -> None:
    gates = {m: Gate() for m in "ab"}
    for m, gate in gates.items():
        srv.set_behavior(m, debater(m, lambda n, m=m: "12"["ab".index(m)], gate=gate))
    cfg = config(
        "ab",
        rounds=2,
        mode="staircase",
        staircase={"chunk_tokens": [3], "step_tokens": [3], "grace_s": 30, "stall_s": 30},
    )
    m = Mixture(cfg, registry=srv.registry(limits=LIMITS))
    out: list[Any] = []

    async def go() -> None:
        out.append(await run(m))

    async with anyio.create_task_group() as tg:
        tg.start_soon(go)
        for gate in gates.values():
            gate.open(6)
        await anyio.to_thread.run_sync(srv.wait_requests, "a", 2)
        first_round_two = requests(srv, "a")[1]
        for gate in gates.values():
            gate.open()
    assert first_round_two[1]["role"] == "assistant"
    (shown,) = solutions(first_round_two[2]["content"])
    assert text_of("b", 1, 2).startswith(shown) and len(shown) < len(text_of("b", 1, 2))
    assert f"```{shown}```{IN_PROGRESS_LABEL}" in first_round_two[2]["content"]
    assert out[0][1].text == JUDGE


async def test_a_debater_that_cannot_continue_runs_layered_with_a_notice(
    srv: LoopbackServer,
) -> None:
    debaters(srv, {"a": lambda n: 1, "b": lambda n: 2})
    registry = srv.registry(limits=LIMITS)
    plain = srv.registry(prefix="plain", continuation=None, limits=LIMITS)
    registry = registry.extended([plain.spec("plain")])
    cfg = MixtureConfig.model_validate({
        **config("ab", mode="staircase").model_dump(),
        "debate": {"agents": [{"model": "loop/a"}, {"model": "plain/b"}], "rounds": 2},
    })
    events, result = await run(Mixture(cfg, registry=registry))
    (notice,) = [e for e in events if isinstance(e, Notice) and "continue" in e.message]
    assert "plain/b cannot" in notice.message and "layered" in notice.message
    (_, b2) = requests(srv, "b")
    assert b2[-1]["role"] == "user", "its round 2 was one call on complete answers"
    assert solutions(b2[-1]["content"]) == [text_of("a", 1, 1)]
    assert result.text == JUDGE


# ---- routing, config, presets ---------------------------------------------------------------


async def test_routed_debaters_record_a_decision_per_round(srv: LoopbackServer) -> None:
    debaters(srv, {"a": lambda n: 1, "b": lambda n: 2, "big": lambda n: 2})
    cfg = MixtureConfig.model_validate({
        **config("ab").model_dump(exclude_none=True),
        "debate": {"agents": [{"model": "loop/a", "strong": "loop/big"}, {"model": "loop/b"}],
                   "rounds": 2},
        "router": {"policy": "threshold", "signal": "agreement", "threshold": 0.9},
    })
    events, result = await run(Mixture(cfg, registry=srv.registry(limits=LIMITS)))
    decisions = [e for e in events if isinstance(e, RouteDecision)]
    assert [d.agent.key for d in decisions if d.agent] == ["R1.1", "R2.1"]
    assert decisions[1].choice == "strong", "round 1 disagreed"
    assert len(requests(srv, "big")) == 1 and result.decisions == decisions


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ({"strategy": "debate", "aggregator": {"model": "x/y"}}, "[debate] table"),
        ({"debate": {"agents": [{"model": "x/a"}, {"model": "x/b"}]},
          "aggregator": {"model": "x/y"}, "layers": [{"agents": [{"model": "x/a"}]}]},
         'needs strategy = "debate"'),
        ({"strategy": "debate", "debate": {"agents": [{"model": "x/a"}]}}, "two debaters"),
        ({"strategy": "debate", "debate": {"agents": [{"model": "x/a", "n": 2}],
                                           "final": "aggregate"}}, "needs an [aggregator]"),
        ({"strategy": "debate", "debate": {"agents": [{"model": "x/a", "n": 2}],
                                           "prompt": "Revise."}}, "{solutions}"),
        ({"layers": [{"agents": [{"model": "x/a"}]}]},
         "field 'aggregator': Value error, the graph strategy needs an [aggregator]"),
        ({"strategy": "debate", "layers": [{"agents": [{"model": "x/a"}]}],
          "debate": {"agents": [{"model": "x/a", "n": 2}]}}, "field 'layers'"),
    ],
)
def test_bad_debate_configs_say_what_is_wrong(data: dict[str, Any], says: str) -> None:
    from moa.config import from_dict

    with pytest.raises(ConfigError, match=re.escape(says)):
        from_dict(data)


def test_a_file_may_turn_a_preset_into_a_debate_and_back() -> None:
    from moa.config import from_dict

    two = {"agents": [{"model": "local/smollm2", "n": 2}]}
    debate = from_dict({"preset": "local", "strategy": "debate", "debate": two})
    assert debate.layers == [] and debate.debate and debate.debate.debaters == 2
    graph = from_dict({"preset": "local-debate", "strategy": "graph",
                       "layers": [{"agents": [{"model": "local/smollm2"}]}]})
    assert graph.debate is None and graph.call_count == 2


def test_the_debate_presets() -> None:
    remote, local = preset("debate"), preset("local-debate")
    assert remote.strategy == local.strategy == "debate"
    assert remote.debate and remote.debate.debaters == 3 and remote.debate.rounds == 2
    assert remote.call_count == 7 and remote.mode == "auto"
    assert local.debate and {a.model for a in local.agents()} == {"local/smollm2"}
    assert local.mode == "layered" and local.call_count == 7


def test_a_debate_request_with_tools_is_refused(srv: LoopbackServer) -> None:
    from moa.errors import UnsupportedRequest

    m = Mixture(config(), registry=srv.registry(limits=LIMITS))
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(UnsupportedRequest, match="debate strategy cannot"):
        m.run_sync(QUESTION, tools=[tool])


# ---- shared and surfaces ------------------------------------------------------------------


async def test_many_concurrent_debates_on_one_mixture_with_faults(srv: LoopbackServer) -> None:
    """16 concurrent debates on one `Mixture`; debater b fails its first 8 calls."""
    debaters(srv, {"a": lambda n: 7, "c": lambda n: 7 if n > 1 else 5})
    srv.set_behavior("b", debater("b", lambda n: 7, fail_status=503, fail_times=8))
    m = Mixture(config(rounds=3), registry=srv.registry(limits=LIMITS))
    results: list[Any] = []

    async def one() -> None:
        results.append(await m.run(QUESTION))

    with anyio.fail_after(60):
        async with m, anyio.create_task_group() as tg:
            for _ in range(16):
                tg.start_soon(one)
    assert len(results) == 16
    for result in results:
        assert result.text.endswith("The answer is 7.")
        keys = [o.agent.key for o in result.outputs]
        assert len(keys) == len(set(keys)), "no run saw another's agents"
        assert result.saved_calls == 3, "every debate agreed after round 2"
    failed = sum(not o.ok for r in results for o in r.outputs)
    assert failed == 8 + sum(
        o.error == "left the debate: its round 1 answer failed" for r in results for o in r.outputs
    )


def test_debate_through_moa_serve_and_the_wrapper(srv: LoopbackServer) -> None:
    debaters(srv, {"a": lambda n: 7, "b": lambda n: 7, "c": lambda n: 7})
    with ServerThread(create_app({"debate": config()}, registry=srv.registry(limits=LIMITS))) as s:
        client = openai.OpenAI(base_url=s.base_url, api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="debate", messages=[{"role": "user", "content": QUESTION}]
        )
        streamed = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model="debate", messages=[{"role": "user", "content": QUESTION}], stream=True
            )
            if c.choices
        )
    assert reply.choices[0].message.content == text_of("a", 1, 7) == streamed
    assert reply.choices[0].finish_reason == "stop"
    wrapped_cfg = MixtureConfig.model_validate({
        **config().model_dump(),
        "debate": {"agents": [{"model": f"client/{m}"} for m in "abc"], "rounds": 2},
        "aggregator": {"model": "client/judge"},
    })
    wrapped = moa.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0,
                         mixtures={"debate": wrapped_cfg})
    answer = wrapped.chat.completions.create(
        model="debate", messages=[{"role": "user", "content": QUESTION}]
    )
    assert answer.choices[0].message.content == text_of("a", 1, 7)


async def test_the_event_stream_of_a_debate(srv: LoopbackServer) -> None:
    debaters(srv, {m: (lambda n: 7) for m in "ab"})
    m = Mixture(config("ab", rounds=3), registry=srv.registry(limits=LIMITS))
    events, result = await run(m)
    started = [e.agent.key for e in events if isinstance(e, AgentStarted)]
    assert started == ["R1.1", "R1.2"] or sorted(started) == ["R1.1", "R1.2"]
    finished = {e.agent.key: e.finish_reason for e in events if isinstance(e, AgentFinished)}
    assert finished == {"R1.1": "stop", "R1.2": "stop", "R2.1": "consensus", "R2.2": "consensus",
                        "R3.1": "consensus", "R3.2": "consensus"}
    assert isinstance(events[-1], RunFinished) and result.to_dict()["saved_calls"] == 4


def test_moa_chat_and_moa_eval_run_a_debate_file(
    srv: LoopbackServer, tmp_path: Any, capsys: Any
) -> None:
    import json

    from moa.cli.main import run as moa_cli

    def reply(body: dict[str, Any]) -> str:
        a, b = map(int, re.findall(r"\d+", body["messages"][0]["content"])[:2])
        n = sum(m["role"] == "user" for m in body["messages"])
        return f"Round {n}: the answer is {a + b + (1 if n == 1 and body['model'] == 'c' else 0)}."

    for model in "abc":
        srv.set_behavior(model, ModelBehavior(reply=reply))
    path = tmp_path / "debate.toml"
    path.write_text(
        'name = "file-debate"\nstrategy = "debate"\nmode = "layered"\n'
        '[debate]\nagents = [{model = "loop/a"}, {model = "loop/b"}, {model = "loop/c"}]\n'
        f'[providers.loop]\nbase_url = "{srv.base_url}"\nkey_required = false\n'
    )
    assert moa_cli(["chat", "-c", str(path), "--json", "What is 2 + 3?"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"] == "Round 2: the answer is 5." and out["saved_calls"] == 0
    assert [a["id"] for a in out["agents"]] == [f"R{r}.{i}" for r in (1, 2) for i in (1, 2, 3)]
    tasks = tmp_path / "tasks.jsonl"
    rows = [{"question": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in ((2, 3), (4, 4))]
    tasks.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert moa_cli(["eval", str(tasks), "-c", str(path), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert row["config"] == "mixture file-debate" and row["accuracy"] == 1.0
    assert row["calls"] == 2 * 6 and row["errors"] == 0


def test_the_live_view_shows_the_rounds_and_the_stopped_ones(srv: LoopbackServer) -> None:
    from rich.console import Console

    from moa.cli.live import LiveView

    debaters(srv, {m: (lambda n: 7) for m in "ab"})
    view = LiveView(Console(width=120, record=True, force_terminal=False))
    m = Mixture(config("ab", rounds=3), registry=srv.registry(limits=LIMITS))

    async def go() -> Any:
        async with m:
            async for event in m.stream(QUESTION):
                view.on_event(event)
        return event.result  # type: ignore[attr-defined]

    result = anyio.run(go)
    with view.console.capture() as capture:
        view.console.print(view)
    screen = capture.get()
    assert re.search(r"R1\.1 loop/a\s+done", screen)
    assert re.search(r"R3\.2 loop/b\s+stopped", screen)
    view.finish(result)
    assert "Vote: 2 of 2 debaters answered 7." in view.console.export_text()
