"""The OpenAI-compatible provider against the loopback server, over real sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from moa.errors import (
    ConfigError,
    ProviderError,
    ProviderTimeout,
    StreamInterrupted,
    StreamTimeout,
)
from moa.providers.base import ChatRequest, Delta
from moa.providers.http import retry_after_seconds
from moa.providers.openai_compat import OpenAICompatProvider
from moa.providers.registry import Limits, ProviderSpec
from moa.testing import Gate, LoopbackServer, ModelBehavior

pytestmark = pytest.mark.anyio

REPLY = "The answer is 4 because two plus two is four."
HI = [{"role": "user", "content": "What is two plus two?"}]


def make(srv: LoopbackServer, continuation: str | None = "vllm", **limits: object):
    """A provider for `srv` with tiny backoffs (overridable)."""
    settings: dict[str, object] = {"backoff_initial": 0.001, "backoff_max": 0.005, **limits}
    options: dict[str, object] = {"continuation": continuation} if continuation else {}
    spec = ProviderSpec(prefix="loop", base_url=srv.base_url, key_required=False,
                        limits=Limits(**settings), options=options)  # type: ignore[arg-type]
    return OpenAICompatProvider(spec, None)


async def collect(stream: AsyncIterator[Delta]) -> list[Delta]:
    with anyio.fail_after(10):
        return [delta async for delta in stream]


def text(deltas: list[Delta], index: int = 0) -> str:
    return "".join(d.text for d in deltas if d.index == index)


# -- happy paths ---------------------------------------------------------------------


async def test_stream_delivers_text_finish_and_usage_once(loopback: LoopbackServer) -> None:
    loopback.set_behavior("m", ModelBehavior(reply=REPLY, tokens_per_s=2000))
    provider = make(loopback)
    deltas = await collect(provider.stream(ChatRequest(model="m", messages=HI, max_tokens=50)))
    assert text(deltas) == REPLY
    assert [d.finish_reason for d in deltas if d.finish_reason] == ["stop"]
    usages = [d.usage for d in deltas if d.usage]
    assert len(usages) == 1
    assert (usages[0].prompt_tokens, usages[0].completion_tokens) == (5, 10)
    body = loopback.requests[-1].body
    assert body is not None
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 50
    assert "n" not in body and "continue_final_message" not in body
    await provider.aclose()


async def test_complete_and_max_tokens_length(loopback: LoopbackServer) -> None:
    loopback.set_behavior("m", ModelBehavior(reply=REPLY))
    provider = make(loopback)
    [done] = await provider.complete(ChatRequest(model="m", messages=HI, max_tokens=3))
    assert done.text == "The answer is"
    assert done.finish_reason == "length"
    assert done.usage.completion_tokens == 3
    await provider.aclose()


async def test_logprobs_with_top_alternatives(loopback: LoopbackServer) -> None:
    loopback.set_behavior("m", ModelBehavior(reply="a b c", logprob=lambda i: -0.5 * i))
    provider = make(loopback)
    [done] = await provider.complete(
        ChatRequest(model="m", messages=HI, logprobs=True, top_logprobs=3)
    )
    assert done.logprobs is not None
    assert [t.token for t in done.logprobs] == ["a", " b", " c"]
    assert [t.logprob for t in done.logprobs] == [0.0, -0.5, -1.0]
    assert len(done.logprobs[1].top) == 3
    assert done.logprobs[1].top[0] == (" b", -0.5)
    assert loopback.requests[-1].body["top_logprobs"] == 3  # type: ignore[index]
    await provider.aclose()


async def test_n_choices_keep_their_indexes(loopback: LoopbackServer) -> None:
    loopback.set_behavior("m", ModelBehavior(reply="one two"))
    provider = make(loopback)
    done = await provider.complete(ChatRequest(model="m", messages=HI, n=3))
    assert [c.text for c in done] == ["one two"] * 3
    assert all(c.finish_reason == "stop" for c in done)
    assert loopback.requests[-1].body["n"] == 3  # type: ignore[index]
    await provider.aclose()


async def test_vllm_continuation_sends_flags_and_gets_the_rest(loopback: LoopbackServer) -> None:
    loopback.set_behavior("m", ModelBehavior(reply=REPLY))
    provider = make(loopback, continuation="vllm")
    assert provider.capabilities.continuation
    messages = [*HI, {"role": "assistant", "content": "The answer is 4"}]
    [done] = await provider.complete(ChatRequest(model="m", messages=messages,
                                                 continue_final=True))
    assert done.text == " because two plus two is four."
    body = loopback.requests[-1].body
    assert body is not None
    assert body["continue_final_message"] is True
    assert body["add_generation_prompt"] is False
    await provider.aclose()


async def test_prefill_continuation_sends_the_message_as_is(loopback: LoopbackServer) -> None:
    loopback.set_behavior("m", ModelBehavior(reply=REPLY, prefill=True))
    provider = make(loopback, continuation="prefill")
    messages = [*HI, {"role": "assistant", "content": "The answer"}]
    [done] = await provider.complete(ChatRequest(model="m", messages=messages,
                                                 continue_final=True))
    assert done.text == " is 4 because two plus two is four."
    assert "continue_final_message" not in loopback.requests[-1].body  # type: ignore[operator]
    await provider.aclose()


async def test_continuation_unsupported_is_refused(loopback: LoopbackServer) -> None:
    provider = make(loopback, continuation=None)
    assert not provider.capabilities.continuation
    messages = [*HI, {"role": "assistant", "content": "The"}]
    with pytest.raises(ProviderError, match="cannot continue"):
        await provider.complete(ChatRequest(model="m", messages=messages, continue_final=True))
    assert loopback.requests == []


async def test_sse_quirks_crlf_comments_multiline_null_content(loopback: LoopbackServer) -> None:
    loopback.set_behavior("m", ModelBehavior(reply=REPLY, sse_quirks=True))
    provider = make(loopback)
    deltas = await collect(provider.stream(ChatRequest(model="m", messages=HI)))
    assert text(deltas) == REPLY
    assert any(d.usage for d in deltas)
    await provider.aclose()


RAW_OK = (
    b": hello\r\n\r\n"
    b'data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": null}}]}\r\r'
    b'data: {"choices": [{"index": 0,\ndata: "delta": {"content": "Hel"}}]}\n\n'
    b'data: {"choices": [{"index": 0, "delta": {"content": "lo"}}]}\n\n'
    b'data: {"choices": []}\n\n'
    b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n'
    b'data: {"choices": [], "x_groq": {"usage": {"prompt_tokens": 7, "completion_tokens": 2}}}'
    b"\n\n"
)


async def test_raw_framing_without_done(loopback: LoopbackServer) -> None:
    """Bare CR line ends, a data field split over lines, no [DONE], usage under x_groq."""
    loopback.set_behavior("m", ModelBehavior(raw_sse=RAW_OK))
    provider = make(loopback)
    deltas = await collect(provider.stream(ChatRequest(model="m", messages=HI)))
    assert text(deltas) == "Hello"
    assert deltas[-1].usage is not None and deltas[-1].usage.prompt_tokens == 7
    await provider.aclose()


async def test_stream_ending_without_finish_is_an_error(loopback: LoopbackServer) -> None:
    raw = b'data: {"choices": [{"index": 0, "delta": {"content": "Hel"}}]}\n\n'
    loopback.set_behavior("m", ModelBehavior(raw_sse=raw))
    provider = make(loopback)
    with pytest.raises(StreamInterrupted, match="ended before") as info:
        await collect(provider.stream(ChatRequest(model="m", messages=HI)))
    assert info.value.received == "Hel"
    await provider.aclose()


async def test_empty_stream_is_retried_then_reported(loopback: LoopbackServer) -> None:
    loopback.set_behavior("m", ModelBehavior(raw_sse=b": nothing but a comment\n\n"))
    provider = make(loopback, max_retries=2)
    with pytest.raises(ProviderError, match="ended before any reply"):
        await provider.complete(ChatRequest(model="m", messages=HI))
    assert len(loopback.requests) == 3
    await provider.aclose()


async def test_extra_headers_option(loopback: LoopbackServer) -> None:
    spec = ProviderSpec(prefix="loop", base_url=loopback.base_url, key_required=False,
                        options={"headers": {"HTTP-Referer": "https://example.org"}})
    provider = OpenAICompatProvider(spec, None)
    await provider.complete(ChatRequest(model="m", messages=HI))
    assert loopback.requests[-1].headers["http-referer"] == "https://example.org"
    assert "authorization" not in loopback.requests[-1].headers
    await provider.aclose()


# -- retries -------------------------------------------------------------------------


async def test_429_honours_retry_after_then_succeeds(loopback: LoopbackServer) -> None:
    loopback.set_behavior(
        "m", ModelBehavior(reply=REPLY, fail_status=429, fail_times=2, retry_after=0.03)
    )
    provider = make(loopback)
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        await anyio.sleep(seconds)

    provider.transport.sleep = sleep
    [done] = await provider.complete(ChatRequest(model="m", messages=HI))
    assert done.text == REPLY
    assert slept == [0.03, 0.03]  # the server's hint, not the 1 ms backoff
    times = [r.time for r in loopback.requests]
    assert len(times) == 3
    assert times[1] - times[0] >= 0.025
    await provider.aclose()


async def test_500_is_retried_with_backoff(loopback: LoopbackServer) -> None:
    loopback.set_behavior("m", ModelBehavior(reply=REPLY, fail_status=500, fail_times=2))
    provider = make(loopback)
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    provider.transport.sleep = sleep
    [done] = await provider.complete(ChatRequest(model="m", messages=HI))
    assert done.text == REPLY
    assert len(loopback.requests) == 3
    assert len(slept) == 2 and all(0 <= s <= 0.005 for s in slept)
    await provider.aclose()


async def test_retries_are_bounded(loopback: LoopbackServer) -> None:
    loopback.set_behavior("m", ModelBehavior(fail_status=503))
    provider = make(loopback, max_retries=2)
    with pytest.raises(ProviderError) as info:
        await provider.complete(ChatRequest(model="m", messages=HI))
    assert info.value.status == 503 and info.value.retryable
    assert "loop/m" in str(info.value) and "503" in str(info.value)
    assert len(loopback.requests) == 3
    await provider.aclose()


@pytest.mark.parametrize("status", [400, 404, 422])
async def test_other_4xx_is_not_retried(loopback: LoopbackServer, status: int) -> None:
    loopback.set_behavior("m", ModelBehavior(fail_status=status))
    provider = make(loopback)
    with pytest.raises(ProviderError) as info:
        await provider.complete(ChatRequest(model="m", messages=HI))
    assert info.value.status == status and not info.value.retryable
    assert "loopback injected failure" in str(info.value)
    assert len(loopback.requests) == 1
    await provider.aclose()


async def test_drop_before_first_token_is_retried(loopback: LoopbackServer) -> None:
    loopback.set_behavior("m", ModelBehavior(reply=REPLY, drop_after=0, fail_times=1))
    provider = make(loopback)
    [done] = await provider.complete(ChatRequest(model="m", messages=HI))
    assert done.text == REPLY
    assert len(loopback.requests) == 2
    await provider.aclose()


async def test_connection_refused_is_a_provider_error() -> None:
    with LoopbackServer() as srv:
        provider = make(srv, max_retries=1)
    with pytest.raises(ProviderError, match=r"connection to http://127\.0\.0\.1:\d+ failed") as e:
        await provider.complete(ChatRequest(model="m", messages=HI))
    assert e.value.retryable
    await provider.aclose()


# -- faults after the first token ----------------------------------------------------


async def test_drop_mid_stream_raises_with_received_text(loopback: LoopbackServer) -> None:
    loopback.set_behavior("m", ModelBehavior(reply=REPLY, drop_after=3))
    provider = make(loopback)
    seen: list[str] = []
    with pytest.raises(StreamInterrupted) as info:
        async for delta in provider.stream(ChatRequest(model="m", messages=HI)):
            seen.append(delta.text)
    assert info.value.received == "The answer is" == "".join(seen)
    assert "not restarted" in str(info.value)
    assert len(loopback.requests) == 1  # never silently restarted
    await provider.aclose()


async def test_malformed_sse_is_a_clear_error(loopback: LoopbackServer) -> None:
    loopback.set_behavior("m", ModelBehavior(reply=REPLY, malformed_after=0))
    provider = make(loopback)
    with pytest.raises(ProviderError, match="malformed stream data") as info:
        await provider.complete(ChatRequest(model="m", messages=HI))
    assert not isinstance(info.value, StreamInterrupted)
    assert len(loopback.requests) == 1
    loopback.set_behavior("m", ModelBehavior(reply=REPLY, malformed_after=2))
    with pytest.raises(StreamInterrupted, match="malformed stream data") as info2:
        await provider.complete(ChatRequest(model="m", messages=HI))
    assert info2.value.received == "The answer"
    await provider.aclose()


async def test_stall_before_first_token_times_out(loopback: LoopbackServer) -> None:
    loopback.set_behavior("m", ModelBehavior(reply=REPLY, stall_after=0))
    provider = make(loopback, read_timeout=0.05, max_retries=1)
    with pytest.raises(ProviderTimeout, match="stalled") as info:
        await provider.complete(ChatRequest(model="m", messages=HI))
    assert not isinstance(info.value, StreamInterrupted)
    assert len(loopback.requests) == 2  # a stall before any text is retried
    await provider.aclose()


async def test_stall_mid_stream_times_out_with_received_text(loopback: LoopbackServer) -> None:
    loopback.set_behavior("m", ModelBehavior(reply=REPLY, stall_after=2))
    provider = make(loopback, read_timeout=0.2)
    with pytest.raises(StreamTimeout) as info:
        await provider.complete(ChatRequest(model="m", messages=HI))
    assert isinstance(info.value, ProviderTimeout) and isinstance(info.value, StreamInterrupted)
    assert info.value.received == "The answer"
    assert len(loopback.requests) == 1
    await provider.aclose()


async def test_whole_call_deadline(loopback: LoopbackServer) -> None:
    loopback.set_behavior("m", ModelBehavior(reply=REPLY, tokens_per_s=10))
    provider = make(loopback, total_timeout=0.3)
    with pytest.raises(StreamTimeout, match="whole-call deadline") as info:
        await provider.complete(ChatRequest(model="m", messages=HI))
    assert info.value.received.startswith("The")
    await provider.aclose()


async def test_whole_call_deadline_longer_than_the_read_timeout(
    loopback: LoopbackServer,
) -> None:
    """Reads far from the deadline run without a cancel scope of their own (the read timeout
    ends them first); the deadline still cuts a stream that never stalls."""
    slow = " ".join(f"w{i}" for i in range(200))  # 10 s at 20 tokens/s
    loopback.set_behavior("m", ModelBehavior(reply=slow, tokens_per_s=20))
    provider = make(loopback, total_timeout=1.5, read_timeout=1.0)
    with pytest.raises(StreamTimeout, match=r"whole-call deadline of 1\.5 s") as info:
        await provider.complete(ChatRequest(model="m", messages=HI))
    assert slow.startswith(info.value.received) and info.value.received.startswith("w0 w1")
    assert len(loopback.requests) == 1
    await provider.aclose()


async def test_error_object_inside_the_stream(loopback: LoopbackServer) -> None:
    loopback.set_behavior("m", ModelBehavior(reply=REPLY, error_after=2))
    provider = make(loopback)
    with pytest.raises(StreamInterrupted, match="loopback injected error") as info:
        await provider.complete(ChatRequest(model="m", messages=HI))
    assert info.value.received == "The answer"
    loopback.set_behavior("m", ModelBehavior(reply=REPLY, error_after=0, fail_times=1))
    [done] = await provider.complete(ChatRequest(model="m", messages=HI))
    assert done.text == REPLY  # before any text, a server error in the stream is retried
    await provider.aclose()


async def test_top_level_error_object_of_older_vllm(loopback: LoopbackServer) -> None:
    raw = (b'data: {"object": "error", "message": "prompt too long", "type": "BadRequestError",'
           b' "code": 400}\n\n')
    loopback.set_behavior("m", ModelBehavior(raw_sse=raw))
    provider = make(loopback)
    with pytest.raises(ProviderError, match="prompt too long") as info:
        await provider.complete(ChatRequest(model="m", messages=HI))
    assert info.value.status == 400 and not info.value.retryable
    assert len(loopback.requests) == 1
    await provider.aclose()


def test_retry_after_header_forms() -> None:
    assert retry_after_seconds({"retry-after-ms": "250", "Retry-After": "9"}) == 0.25
    assert retry_after_seconds({"Retry-After": "2"}) == 2.0
    assert retry_after_seconds({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
    assert retry_after_seconds({"Retry-After": "soon"}) is None
    assert retry_after_seconds({}) is None


# -- limits, cancellation, configuration ---------------------------------------------


async def _peak_streams(
    srv: LoopbackServer, calls: list[tuple[OpenAICompatProvider, str]], expect: int, gate: Gate
) -> int:
    """Peak of open streams while `calls` run against models paced by `gate`: replies are held
    until `expect` streams are open, so the peak does not depend on the machine's speed."""
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, srv.active_streams)
            if peak >= expect:
                gate.open()
            await anyio.sleep(0.002)

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        with anyio.fail_after(60):
            async with anyio.create_task_group() as calls_group:
                for provider, model in calls:
                    calls_group.start_soon(provider.complete, ChatRequest(model=model, messages=HI))
        tg.cancel_scope.cancel()
    return peak


def _gated(srv: LoopbackServer, *models: str) -> Gate:
    gate = Gate()
    for model in models:
        srv.set_behavior(model, ModelBehavior(reply="ok", gate=gate))
    return gate


async def test_per_provider_concurrency_limit(loopback: LoopbackServer) -> None:
    limited = make(loopback, max_concurrency=2)
    assert await _peak_streams(loopback, [(limited, "m")] * 6, 2, _gated(loopback, "m")) == 2
    free = make(loopback)
    assert await _peak_streams(loopback, [(free, "m")] * 4, 4, _gated(loopback, "m")) == 4
    await limited.aclose()
    await free.aclose()


async def test_per_model_concurrency_limit(loopback: LoopbackServer) -> None:
    gate = _gated(loopback, "a", "b")
    provider = make(loopback, max_concurrency_per_model=1)
    calls = [(provider, "a")] * 3 + [(provider, "b")] * 3
    assert await _peak_streams(loopback, calls, 2, gate) == 2
    await provider.aclose()


async def test_many_open_calls_spread_over_small_pools(loopback: LoopbackServer) -> None:
    loopback.set_behavior("m", ModelBehavior(reply="ok"))
    provider = make(loopback, max_concurrency=40, pool_size=16)
    await provider.complete(ChatRequest(model="m", messages=HI))
    await provider.complete(ChatRequest(model="m", messages=HI))
    state = provider.transport._loop_state()
    assert len(state.pools) == 1, "sequential calls share one pool"
    gate = _gated(loopback, "m")
    assert await _peak_streams(loopback, [(provider, "m")] * 40, 40, gate) == 40
    assert len(state.pools) == 3 and state.leases == [0] * len(state.pools)
    await provider.aclose()


async def test_closing_the_stream_closes_the_socket(loopback: LoopbackServer) -> None:
    loopback.set_behavior("m", ModelBehavior(reply=REPLY * 20, tokens_per_s=200))
    provider = make(loopback)
    stream = provider.stream(ChatRequest(model="m", messages=HI))
    first = await anext(stream)  # type: ignore[arg-type]
    assert first.text == "The"
    assert loopback.active_streams == 1
    await stream.aclose()  # type: ignore[attr-defined]
    with anyio.fail_after(5):
        while loopback.active_streams:
            await anyio.sleep(0.005)
    await provider.aclose()


def test_missing_base_url_and_bad_continuation_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="WIDGET_BASE_URL"):
        OpenAICompatProvider(ProviderSpec(prefix="widget", key_required=False), None)
    spec = ProviderSpec(prefix="x", base_url="http://h/v1", options={"continuation": "magic"})
    with pytest.raises(ConfigError, match="continuation"):
        OpenAICompatProvider(spec, None)


async def test_unauthorized_names_the_key_variable() -> None:
    with LoopbackServer(api_key="right-key") as srv:
        spec = ProviderSpec(prefix="loop", base_url=srv.base_url, key_env="LOOP_TEST_KEY")
        from pydantic import SecretStr

        provider = OpenAICompatProvider(spec, SecretStr("wrong-key"))
        with pytest.raises(ProviderError, match="LOOP_TEST_KEY") as info:
            await provider.complete(ChatRequest(model="m", messages=HI))
        assert info.value.status == 401 and not info.value.retryable
        assert srv.requests[-1].headers["authorization"] == "Bearer wrong-key"
        good = OpenAICompatProvider(spec, SecretStr("right-key"))
        [done] = await good.complete(ChatRequest(model="m", messages=HI))
        assert done.text == HI[0]["content"]
        await provider.aclose()
        await good.aclose()


def test_tool_call_pieces_assemble_in_index_order_and_usage_sums_cache_fields() -> None:
    from moa.providers.base import ToolCallDelta, Usage, assemble_tool_calls

    pieces = [
        ToolCallDelta(1, id="call_b", name="lookup", arguments='{"q":'),
        ToolCallDelta(0, id="call_a", name="add", arguments='{"a": 1'),
        ToolCallDelta(1, arguments=' "x"}'),
        ToolCallDelta(0, arguments=', "b": 2}'),
    ]
    calls = assemble_tool_calls(pieces)
    assert [(c.id, c.name, c.arguments) for c in calls] == [
        ("call_a", "add", '{"a": 1, "b": 2}'),
        ("call_b", "lookup", '{"q": "x"}'),
    ]
    assert calls[0].as_message_part()["function"] == {
        "name": "add", "arguments": '{"a": 1, "b": 2}'}
    total = Usage(10, 2, cached_tokens=6) + Usage(5, 1, cached_tokens=1, cache_write_tokens=4)
    assert (total.prompt_tokens, total.cached_tokens, total.cache_write_tokens) == (15, 7, 4)
    assert total.uncached_prompt_tokens == 8


def test_plain_http_providers_skip_the_ca_bundle() -> None:
    """A local server over http needs no CA bundle (its load is ~40 ms of a cold start); an
    https provider verifies with the system's."""
    plain = OpenAICompatProvider(ProviderSpec(prefix="loop", base_url="http://127.0.0.1:1/v1",
                                              key_required=False), None)
    tls = OpenAICompatProvider(ProviderSpec(prefix="loop", base_url="HTTPS://api.example/v1",
                                            key_required=False), None)
    assert not plain.transport.secure and tls.transport.secure
