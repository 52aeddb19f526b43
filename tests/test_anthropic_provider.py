"""The Anthropic Messages provider against the loopback server's `/v1/messages`."""

from __future__ import annotations

import anyio
import pytest
from pydantic import SecretStr

from moa.errors import ProviderError, StreamInterrupted
from moa.providers.anthropic import AnthropicProvider
from moa.providers.base import ChatRequest
from moa.providers.registry import Limits, ProviderSpec
from moa.testing import LoopbackServer, ModelBehavior

pytestmark = pytest.mark.anyio

REPLY = "Paris is the capital of France."
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
]


def make(srv: LoopbackServer, key: str | None = None, **limits: object) -> AnthropicProvider:
    settings: dict[str, object] = {"backoff_initial": 0.001, "backoff_max": 0.005, **limits}
    spec = ProviderSpec(prefix="claude", kind="anthropic", base_url=srv.anthropic_base_url,
                        key_required=False, limits=Limits(**settings))  # type: ignore[arg-type]
    return AnthropicProvider(spec, SecretStr(key) if key else None)


async def test_stream_text_usage_and_stop_reason(loopback: LoopbackServer) -> None:
    loopback.set_behavior("claude-x", ModelBehavior(reply=REPLY, tokens_per_s=2000))
    provider = make(loopback, key="sk-ant-test")
    with anyio.fail_after(10):
        deltas = [d async for d in provider.stream(
            ChatRequest(model="claude-x", messages=CHAT, temperature=0.3, stop=["##"])
        )]
    assert "".join(d.text for d in deltas) == REPLY
    [last] = [d for d in deltas if d.finish_reason]
    assert last.finish_reason == "stop"
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (5, 6)
    request = loopback.requests[-1]
    assert request.path == "/v1/messages"
    assert request.headers["x-api-key"] == "sk-ant-test"
    assert request.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in request.headers
    body = request.body
    assert body is not None
    assert body["system"] == [{"type": "text", "text": "Be brief.",
                               "cache_control": {"type": "ephemeral"}}]
    assert [m["role"] for m in body["messages"]] == ["user"]
    assert body["max_tokens"] == 4096 and body["stream"] is True
    assert body["temperature"] == 0.3 and body["stop_sequences"] == ["##"]
    await provider.aclose()


async def test_max_tokens_maps_to_length(loopback: LoopbackServer) -> None:
    loopback.set_behavior("c", ModelBehavior(reply=REPLY))
    provider = make(loopback)
    [done] = await provider.complete(ChatRequest(model="c", messages=CHAT, max_tokens=2))
    assert (done.text, done.finish_reason) == ("Paris is", "length")
    assert done.usage.completion_tokens == 2
    await provider.aclose()


async def test_prefill_continues_natively(loopback: LoopbackServer) -> None:
    loopback.set_behavior("c", ModelBehavior(reply=REPLY))
    provider = make(loopback)
    assert provider.capabilities.continuation
    messages = [*CHAT, {"role": "assistant", "content": "Paris is the "}]
    [done] = await provider.complete(ChatRequest(model="c", messages=messages,
                                                 continue_final=True))
    assert done.text == "capital of France."  # the space cut from the prefill is not repeated
    sent = loopback.requests[-1].body["messages"][-1]  # type: ignore[index]
    assert sent == {"role": "assistant", "content": "Paris is the"}
    await provider.aclose()


async def test_overloaded_is_retried(loopback: LoopbackServer) -> None:
    loopback.set_behavior("c", ModelBehavior(reply=REPLY, fail_status=529, fail_times=1,
                                             retry_after=0.01))
    provider = make(loopback)
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    provider.transport.sleep = sleep
    [done] = await provider.complete(ChatRequest(model="c", messages=CHAT))
    assert done.text == REPLY
    assert len(loopback.requests) == 2
    assert slept == [0.01]  # the 529 answer's retry-after-ms was read
    await provider.aclose()


async def test_invalid_request_is_not_retried(loopback: LoopbackServer) -> None:
    loopback.set_behavior("c", ModelBehavior(fail_status=400))
    provider = make(loopback)
    with pytest.raises(ProviderError, match="HTTP 400") as info:
        await provider.complete(ChatRequest(model="c", messages=CHAT))
    assert not info.value.retryable
    assert len(loopback.requests) == 1
    await provider.aclose()


async def test_error_event_mid_stream(loopback: LoopbackServer) -> None:
    loopback.set_behavior("c", ModelBehavior(reply=REPLY, error_after=2))
    provider = make(loopback)
    with pytest.raises(StreamInterrupted, match="injected error") as info:
        await provider.complete(ChatRequest(model="c", messages=CHAT))
    assert info.value.received == "Paris is"
    loopback.set_behavior("c", ModelBehavior(reply=REPLY, error_after=0, fail_times=1))
    [done] = await provider.complete(ChatRequest(model="c", messages=CHAT))
    assert done.text == REPLY  # overloaded_error before any text is retried
    await provider.aclose()


async def test_drop_and_malformed(loopback: LoopbackServer) -> None:
    provider = make(loopback)
    loopback.set_behavior("c", ModelBehavior(reply=REPLY, drop_after=1))
    with pytest.raises(StreamInterrupted) as info:
        await provider.complete(ChatRequest(model="c", messages=CHAT))
    assert info.value.received == "Paris"
    loopback.set_behavior("c", ModelBehavior(reply=REPLY, malformed_after=0))
    with pytest.raises(ProviderError, match="malformed"):
        await provider.complete(ChatRequest(model="c", messages=CHAT))
    await provider.aclose()


async def test_sse_quirks(loopback: LoopbackServer) -> None:
    loopback.set_behavior("c", ModelBehavior(reply=REPLY, sse_quirks=True))
    provider = make(loopback)
    [done] = await provider.complete(ChatRequest(model="c", messages=CHAT))
    assert (done.text, done.finish_reason) == (REPLY, "stop")
    await provider.aclose()


async def test_n_above_one_is_n_calls_of_one_sample(loopback: LoopbackServer) -> None:
    provider = make(loopback)
    assert not provider.capabilities.multi_sample
    with pytest.raises(ProviderError, match="n must be 1"):
        await anext(provider.stream(ChatRequest(model="c", messages=CHAT, n=2)))
    assert loopback.requests == []
    replies = iter(["First sample.", "Second sample.", "Third sample."])
    loopback.set_behavior("c", ModelBehavior(reply=lambda body: next(replies)))
    done = await provider.complete(ChatRequest(model="c", messages=CHAT, n=3, seed=7))
    assert len(loopback.requests) == 3, "one call per sample"
    assert sorted(c.text for c in done) == ["First sample.", "Second sample.", "Third sample."]
    assert sum(c.usage.completion_tokens for c in done) == 6, "every sample's usage counts"
    await provider.aclose()
