"""Mixtures and the wrapper share connection pools safely: concurrent calls on one wrapped
client or one `Mixture` all succeed, and pools close when their owner closes, not when one call
ends. Also: a result's `calls` counts retried attempts."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import anyio
import pytest

import moa
from moa.errors import MoaError
from moa.mixture import Mixture
from moa.providers.base import ChatRequest
from moa.providers.registry import Limits
from moa.testing import LoopbackServer, ModelBehavior

AGG = "All three agree: it is blue."
HI = [{"role": "user", "content": "Sky colour?"}]
TEAM = {
    "mode": "layered",
    "layers": [{"agents": [{"model": "client/a"}, {"model": "client/b"}]}],
    "aggregator": {"model": "client/agg"},
}


@pytest.fixture
def upstream() -> Iterator[LoopbackServer]:
    behaviors = {
        "a": ModelBehavior(reply="Blue " * 8, tokens_per_s=80),
        "b": ModelBehavior(reply="Blue, by Rayleigh scattering."),
        "agg": ModelBehavior(reply=AGG, tokens_per_s=80),
    }
    with LoopbackServer(behaviors) as server:
        yield server


def test_concurrent_calls_on_one_async_wrapped_client(upstream: LoopbackServer) -> None:
    async def main() -> list[str]:
        client = moa.AsyncOpenAI(base_url=upstream.base_url, api_key="k", max_retries=0,
                                 mixtures={"team": TEAM})
        answers: list[str] = []

        async def one(stream: bool) -> None:
            reply = await client.chat.completions.create(model="team", messages=HI, stream=stream)  # type: ignore[call-overload]
            if stream:
                answers.append("".join([c.choices[0].delta.content or "" async for c in reply
                                        if c.choices]))
            else:
                answers.append(reply.choices[0].message.content)

        async with client:
            async with anyio.create_task_group() as tg:
                for i in range(6):
                    tg.start_soon(one, i % 2 == 0)
            await one(False)  # the pools outlive the calls: a later call reuses them
            pools = client.registry.resolve("client/a")[0].transport._loop_state().pools
            assert len(pools) == 1 and not pools[0].is_closed
        assert pools[0].is_closed, "closing the client closes its mixtures' pools"
        return answers

    assert anyio.run(main) == [AGG] * 7


def test_concurrent_calls_on_one_sync_wrapped_client_from_threads(
    upstream: LoopbackServer,
) -> None:
    client = moa.OpenAI(base_url=upstream.base_url, api_key="k", max_retries=0,
                        mixtures={"team": TEAM})
    answers: list[str] = []
    errors: list[BaseException] = []

    def one(stream: bool) -> None:
        try:
            reply = client.chat.completions.create(model="team", messages=HI, stream=stream)  # type: ignore[call-overload]
            if stream:
                with reply:
                    answers.append("".join(c.choices[0].delta.content or "" for c in reply
                                           if c.choices))
            else:
                answers.append(reply.choices[0].message.content)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=one, args=(i % 2 == 0,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    with client:
        assert not errors and answers == [AGG] * 6


@pytest.mark.anyio
async def test_closing_a_mixture_lets_running_calls_finish(upstream: LoopbackServer) -> None:
    mixture = Mixture(TEAM, registry=upstream.registry("client"))
    results = []

    async def one() -> None:
        results.append(await mixture.run(HI))

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(one)
        while not upstream.active_streams:
            await anyio.sleep(0.005)
        await mixture.aclose()  # the owner closes while four runs are streaming
    assert [r.text for r in results] == [AGG] * 4
    assert (await mixture.run(HI)).text == AGG, "a closed mixture opens new connections"
    await mixture.aclose()


@pytest.mark.anyio
async def test_a_call_waiting_for_its_slot_survives_the_close(upstream: LoopbackServer) -> None:
    registry = upstream.registry("client", limits=Limits(max_concurrency=1))
    provider, model = registry.resolve("client/a")
    texts: list[str] = []

    async def one() -> None:
        [done] = await provider.complete(ChatRequest(model=model, messages=HI))
        texts.append(done.text)

    async with anyio.create_task_group() as tg:
        tg.start_soon(one)
        tg.start_soon(one)  # waits for the only slot
        while not upstream.active_streams:
            await anyio.sleep(0.005)
        await registry.aclose()
    assert texts == ["Blue Blue Blue Blue Blue Blue Blue Blue"] * 2


def test_concurrent_run_sync_on_one_mixture(upstream: LoopbackServer) -> None:
    mixture = Mixture(TEAM, registry=upstream.registry("client"))
    texts: list[str] = []
    threads = [threading.Thread(target=lambda: texts.append(mixture.run_sync(HI).text))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert texts == [AGG] * 4


@pytest.mark.anyio
async def test_calls_count_retried_attempts_and_usage_counts_the_success(
    upstream: LoopbackServer,
) -> None:
    upstream.set_behavior("b", ModelBehavior(reply="Blue.", fail_status=503, fail_times=2))
    limits = Limits(backoff_initial=0.001, backoff_max=0.002, max_retries=3)
    mixture = Mixture(TEAM, registry=upstream.registry("client", limits=limits))
    result = await mixture.run(HI)
    await mixture.aclose()
    calls = {o.agent.key: o.calls for o in result.outputs}
    assert calls == {"L1.1": 1, "L1.2": 3, "final": 1} and result.calls == 5
    retried = next(o for o in result.outputs if o.agent.key == "L1.2")
    assert retried.usage.completion_tokens == 1, "usage of the one successful attempt"


def test_a_wrapped_clients_mixture_keeps_its_session_budget_across_calls(
    upstream: LoopbackServer,
) -> None:
    def client(session_tokens: int | None) -> moa.openai.client.WrappedClient:
        small = {"max_tokens": 20}  # small worst-case reservations
        team = {"mode": "layered", "session_budget": {"tokens": session_tokens},
                "layers": [{"agents": [{"model": "client/a", **small},
                                       {"model": "client/b", **small}]}],
                "aggregator": {"model": "client/agg", **small}}
        return moa.OpenAI(base_url=upstream.base_url, api_key="k", max_retries=0,
                          mixtures={"team": team})

    with client(None) as probe:
        usage = probe.chat.completions.create(model="team", messages=HI).usage  # type: ignore[arg-type]
    assert usage is not None
    with client(usage.total_tokens * 3 // 2) as limited:
        limited.chat.completions.create(model="team", messages=HI)  # type: ignore[arg-type]
        with pytest.raises(MoaError, match="session budget"):
            limited.chat.completions.create(model="team", messages=HI)  # type: ignore[arg-type]
