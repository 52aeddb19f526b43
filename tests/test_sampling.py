"""`n` syntheses and the final aggregator's logprobs, through the library, `moa serve` (official
SDK) and the `moa.OpenAI` wrapper, over a real loopback upstream."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import anyio
import openai
import pytest

import moa
from moa.config import MixtureConfig
from moa.errors import ConfigError, UnsupportedRequest
from moa.events import FinalDelta, Notice, RunFinished
from moa.openai.server import ServerThread, create_app
from moa.providers.registry import Limits
from moa.runtime.budget import Budget, BudgetGuard
from moa.testing import LoopbackServer, ModelBehavior

ASK = [{"role": "user", "content": "Why is the sky blue?"}]
ANSWER = "Air scatters blue light more than red light."


def config(
    mode: str = "layered", aggregator: str = "loop/agg", prefix: str = "loop"
) -> MixtureConfig:
    return MixtureConfig.model_validate({
        "name": "team", "mode": mode,
        "layers": [{"agents": [{"model": f"{prefix}/a"}, {"model": f"{prefix}/b"}]}],
        "aggregator": {"model": aggregator},
    })


@pytest.fixture
def upstream() -> Iterator[LoopbackServer]:
    behaviors = {
        "a": ModelBehavior(reply="Rayleigh scattering favours short wavelengths."),
        "b": ModelBehavior(reply="Blue light scatters off air molecules."),
        "agg": ModelBehavior(reply=ANSWER, logprob=lambda i: -0.1 * (i + 1)),
    }
    with LoopbackServer(behaviors) as server:
        yield server


def bodies(upstream: LoopbackServer, model: str) -> list[dict[str, Any]]:
    return [r.body or {} for r in upstream.requests if r.model == model]


def test_n_syntheses_share_one_set_of_references(upstream: LoopbackServer) -> None:
    mixture = moa.Mixture(config(), registry=upstream.registry())
    result = mixture.run_sync(ASK, n=3)
    assert [c.index for c in result.choices] == [0, 1, 2]
    assert all(c.text == ANSWER and c.finish_reason == "stop" for c in result.choices)
    assert result.text == ANSWER
    assert len(bodies(upstream, "a")) == len(bodies(upstream, "b")) == 1, "advisors run once"
    (final,) = bodies(upstream, "agg")
    assert final["n"] == 3, "one request: the backend samples n times on one prefill"
    single = mixture.run_sync(ASK)

    def final_tokens(r: Any) -> int:
        return next(o.usage.completion_tokens for o in r.outputs if o.agent.final)

    assert final_tokens(result) == 3 * final_tokens(single) > 0, "every sample is counted"
    assert [c["finish_reason"] for c in result.to_dict()["choices"]] == ["stop"] * 3


def test_a_backend_without_n_is_sent_one_call_per_sample(upstream: LoopbackServer) -> None:
    """An Anthropic aggregator has no `n`: n calls of one sample each, merged by index."""
    registry = upstream.registry(anthropic_prefix="claude")
    replies = itertools.cycle(["Scattering.", "Rayleigh.", "Short waves."])
    upstream.set_behavior("judge", ModelBehavior(reply=lambda body: next(replies)))
    mixture = moa.Mixture(config(aggregator="claude/judge"), registry=registry)

    async def run() -> list[Any]:
        return [e async for e in mixture.stream(ASK, n=3)]

    events = anyio.run(run)
    result = events[-1].result
    assert sorted(c.text for c in result.choices) == ["Rayleigh.", "Scattering.", "Short waves."]
    assert len(bodies(upstream, "judge")) == 3 and all("n" not in b for b in bodies(upstream,
                                                                                     "judge"))
    streamed: dict[int, str] = {}
    for e in events:
        if isinstance(e, FinalDelta):
            streamed[e.index] = streamed.get(e.index, "") + e.text
    assert streamed == {c.index: c.text for c in result.choices}


def test_staircase_with_n_waits_for_complete_references(upstream: LoopbackServer) -> None:
    mixture = moa.Mixture(config("staircase"), registry=upstream.registry())

    async def run() -> list[Any]:
        return [e async for e in mixture.stream(ASK, n=2)]

    events = anyio.run(run)
    assert any("samples n > 1" in e.message for e in events if isinstance(e, Notice))
    (final,) = bodies(upstream, "agg")
    assert "continue_final_message" not in final and final["n"] == 2
    assert len(events[-1].result.choices) == 2


def test_logprobs_are_the_final_aggregators(upstream: LoopbackServer) -> None:
    mixture = moa.Mixture(config(), registry=upstream.registry())

    async def run() -> list[Any]:
        return [e async for e in mixture.stream(ASK, logprobs=True, top_logprobs=2)]

    events = anyio.run(run)
    result = events[-1].result
    (choice,) = result.choices
    assert choice.logprobs and "".join(lp.token for lp in choice.logprobs) == ANSWER
    assert [round(lp.logprob, 2) for lp in choice.logprobs[:2]] == [-0.1, -0.2]
    assert all(len(lp.top) == 2 for lp in choice.logprobs)
    streamed = [lp for e in events if isinstance(e, FinalDelta) for lp in e.logprobs or []]
    assert [lp.token for lp in streamed] == [lp.token for lp in choice.logprobs]
    assert "logprobs" not in bodies(upstream, "a")[0], "advisors are not asked"
    assert bodies(upstream, "agg")[0]["top_logprobs"] == 2
    assert mixture.run_sync(ASK).choices[0].logprobs is None, "only when asked"


def test_logprobs_from_a_backend_without_them_is_refused_before_any_call(
    upstream: LoopbackServer,
) -> None:
    registry = upstream.registry(anthropic_prefix="claude")
    mixture = moa.Mixture(config(aggregator="claude/judge"), registry=registry)
    with pytest.raises(UnsupportedRequest, match="claude/judge does not give them"):
        mixture.run_sync(ASK, logprobs=True)
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"n": 0}, "n must be from 1 to 128"), ({"top_logprobs": 3}, "needs logprobs=True"),
     ({"logprobs": True, "top_logprobs": 21}, "top_logprobs must be from 0 to 20")],
)
def test_bad_sampling_arguments_are_one_sentence(
    upstream: LoopbackServer, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        moa.Mixture(config(), registry=upstream.registry()).run_sync(ASK, **kwargs)
    assert upstream.requests == []


def test_the_budget_reserves_every_sample() -> None:
    guard = BudgetGuard(lambda model, usage: None, Budget(tokens=10_000))
    one = guard.worst_case("m", ASK, 100)[1]
    assert guard.worst_case("m", ASK, 100, samples=4)[1] == 4 * one


# ---- the OpenAI surfaces ------------------------------------------------------------------


def serving(upstream: LoopbackServer) -> ServerThread:
    return ServerThread(create_app({"team": config()}, registry=upstream.registry()))


def check_surface(client: Any) -> None:
    many = client.chat.completions.create(model="team", messages=ASK, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert all(c.message.content == ANSWER for c in many.choices)
    assert many.usage.completion_tokens >= 3 * len(ANSWER.split())
    chunks = list(client.chat.completions.create(model="team", messages=ASK, n=2, stream=True,
                                                 logprobs=True, top_logprobs=1))
    texts: dict[int, str] = {}
    tokens: dict[int, list[str]] = {}
    finished = {}
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            tokens.setdefault(c.index, []).extend(t.token for t in (c.logprobs.content
                                                                    if c.logprobs else []))
            if c.finish_reason:
                finished[c.index] = c.finish_reason
    assert texts == {0: ANSWER, 1: ANSWER} and finished == {0: "stop", 1: "stop"}
    assert "".join(tokens[0]) == ANSWER == "".join(tokens[1])
    scored = client.chat.completions.create(model="team", messages=ASK, logprobs=True,
                                            top_logprobs=2)
    content = scored.choices[0].logprobs.content
    assert "".join(t.token for t in content) == ANSWER
    assert content[0].logprob == pytest.approx(-0.1) and len(content[0].top_logprobs) == 2
    assert content[0].bytes == list(content[0].token.encode())


def test_sdk_n_and_logprobs_against_moa_serve(upstream: LoopbackServer) -> None:
    with serving(upstream) as server:
        check_surface(openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0))


def test_wrapper_n_and_logprobs(upstream: LoopbackServer) -> None:
    client = moa.OpenAI(base_url=upstream.base_url, api_key="unused", max_retries=0,
                        mixtures={"team": config(aggregator="client/agg", prefix="client")})
    check_surface(client)


def test_many_concurrent_sampled_requests_on_one_server_with_faults(
    upstream: LoopbackServer,
) -> None:
    """16 concurrent n=2 requests (half streamed) while one advisor fails half of its calls."""
    upstream.set_behavior("b", ModelBehavior(reply="Scattering.", fail_status=500, fail_times=8))
    registry = upstream.registry(limits=Limits(max_retries=0, read_timeout=30.0))
    with ServerThread(create_app({"team": config()}, registry=registry)) as server:
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0)

        async def one(i: int, out: list[list[str]]) -> None:
            if i % 2:
                texts = ["", ""]
                async for chunk in await client.chat.completions.create(
                        model="team", messages=ASK, n=2, stream=True):
                    for c in chunk.choices:
                        texts[c.index] += c.delta.content or ""
                out.append(texts)
            else:
                done = await client.chat.completions.create(model="team", messages=ASK, n=2)
                out.append([c.message.content for c in done.choices])

        async def main() -> list[list[str]]:
            out: list[list[str]] = []
            async with anyio.create_task_group() as tg:
                for i in range(16):
                    tg.start_soon(one, i, out)
            await client.close()
            return out

        results = anyio.run(main)
    assert results == [[ANSWER, ANSWER]] * 16
    assert len(bodies(upstream, "agg")) == 16 and all(b["n"] == 2 for b in bodies(upstream,
                                                                                   "agg"))


def test_run_finished_carries_every_choice(upstream: LoopbackServer) -> None:
    mixture = moa.Mixture(config(), registry=upstream.registry())
    events = list(mixture.stream_sync(ASK, n=2))
    assert isinstance(events[-1], RunFinished) and len(events[-1].result.choices) == 2
