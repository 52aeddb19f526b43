"""The loopback server itself, spoken to by the official `openai` client and raw httpx."""

from __future__ import annotations

import time

import anyio
import httpx
import pytest

from moa.providers.base import ChatRequest
from moa.testing import LoopbackServer, ModelBehavior

openai = pytest.importorskip("openai")

HI = [{"role": "user", "content": "Say something nice."}]


def client(srv: LoopbackServer, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url, api_key=key, max_retries=0)


def test_models_lists_configured_names() -> None:
    with LoopbackServer({"b": ModelBehavior(), "a": ModelBehavior()}) as srv:
        assert [m.id for m in client(srv).models.list()] == ["a", "b"]


def test_openai_client_non_streaming_with_usage(loopback: LoopbackServer) -> None:
    loopback.set_behavior("nice", ModelBehavior(reply="You are great.", prompt_tokens=42))
    reply = client(loopback).chat.completions.create(model="nice", messages=HI)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == "You are great."
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (42, 3)
    [request] = loopback.requests
    assert (request.path, request.model, request.method) == ("/v1/chat/completions", "nice", "POST")
    assert request.body is not None and request.body["messages"] == HI
    assert request.headers["authorization"] == "Bearer unused"


def test_openai_client_streaming_with_usage_chunk(loopback: LoopbackServer) -> None:
    loopback.set_behavior("nice", ModelBehavior(reply="You are really great.", tokens_per_s=1000))
    chunks = list(client(loopback).chat.completions.create(
        model="nice", messages=HI, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "You are really great."
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4
    assert loopback.wait_idle()


def test_echo_is_the_default_and_a_callable_reply_sees_the_body() -> None:
    shout = ModelBehavior(reply=lambda body: body["messages"][-1]["content"].upper())
    with LoopbackServer({"shout": shout}) as srv:
        c = client(srv)
        echo = c.chat.completions.create(model="anything", messages=HI)  # type: ignore[arg-type]
        assert echo.choices[0].message.content == "Say something nice."
        loud = c.chat.completions.create(model="shout", messages=HI)  # type: ignore[arg-type]
        assert loud.choices[0].message.content == "SAY SOMETHING NICE."


def test_unknown_model_without_default_is_404() -> None:
    with LoopbackServer({"known": ModelBehavior()}, default=None) as srv, \
            pytest.raises(openai.NotFoundError):
        client(srv).chat.completions.create(model="other", messages=HI)  # type: ignore[arg-type]


def test_max_tokens_stop_and_n(loopback: LoopbackServer) -> None:
    loopback.set_behavior("m", ModelBehavior(reply="one two three. four five"))
    c = client(loopback)
    cut = c.chat.completions.create(model="m", messages=HI, max_tokens=2)  # type: ignore[arg-type]
    assert (cut.choices[0].message.content, cut.choices[0].finish_reason) == ("one two", "length")
    stop = c.chat.completions.create(model="m", messages=HI, stop=["."])  # type: ignore[arg-type]
    assert stop.choices[0].message.content == "one two three"
    many = c.chat.completions.create(model="m", messages=HI, n=2)  # type: ignore[arg-type]
    assert [ch.index for ch in many.choices] == [0, 1]


def test_logprobs_follow_the_request(loopback: LoopbackServer) -> None:
    loopback.set_behavior("m", ModelBehavior(reply="a b", logprob=-0.25))
    c = client(loopback)
    plain = c.chat.completions.create(model="m", messages=HI)  # type: ignore[arg-type]
    assert plain.choices[0].logprobs is None
    rich = c.chat.completions.create(model="m", messages=HI, logprobs=True,  # type: ignore[arg-type]
                                     top_logprobs=2)
    content = rich.choices[0].logprobs.content  # type: ignore[union-attr]
    assert [(t.token, t.logprob) for t in content] == [("a", -0.25), (" b", -0.25)]
    assert len(content[0].top_logprobs) == 2


def test_continuation_only_when_asked(loopback: LoopbackServer) -> None:
    loopback.set_behavior("m", ModelBehavior(reply="Hello there friend"))
    messages = [*HI, {"role": "assistant", "content": "Hello there"}]
    c = client(loopback)
    plain = c.chat.completions.create(model="m", messages=messages)  # type: ignore[arg-type]
    assert plain.choices[0].message.content == "Hello there friend"
    rest = c.chat.completions.create(
        model="m", messages=messages, extra_body={"continue_final_message": True},  # type: ignore[arg-type]
    )
    assert rest.choices[0].message.content == " friend"


def test_fail_status_sends_retry_headers_then_recovers(loopback: LoopbackServer) -> None:
    loopback.set_behavior("m", ModelBehavior(reply="ok", fail_status=429, fail_times=2,
                                             retry_after=1.5))
    body = {"model": "m", "messages": HI}
    with httpx.Client(base_url=loopback.base_url) as http:
        first = http.post("/chat/completions", json=body)
        assert first.status_code == 429
        assert first.headers["retry-after"] == "1.5"
        assert first.headers["retry-after-ms"] == "1500"
        assert first.json()["error"]["type"] == "rate_limit_error"
        assert http.post("/chat/completions", json=body).status_code == 429
        assert http.post("/chat/completions", json=body).status_code == 200
        loopback.set_behavior("m", ModelBehavior(reply="ok", fail_status=500, fail_times=1))
        assert http.post("/chat/completions", json=body).status_code == 500


def test_ttft_delays_the_first_token(loopback: LoopbackServer) -> None:
    loopback.set_behavior("m", ModelBehavior(reply="late reply", ttft_s=0.05))
    body = {"model": "m", "messages": HI, "stream": True}
    with httpx.Client(base_url=loopback.base_url) as http:
        start = time.monotonic()
        with http.stream("POST", "/chat/completions", json=body) as response:
            assert response.status_code == 200  # headers go out at once
            assert '"late"' in response.read().decode()
        assert time.monotonic() - start >= 0.05


def test_stall_keeps_a_stream_open_until_the_client_leaves(loopback: LoopbackServer) -> None:
    loopback.set_behavior("m", ModelBehavior(reply="a b c d", stall_after=1))
    body = {"model": "m", "messages": HI, "stream": True}
    with httpx.Client(base_url=loopback.base_url, timeout=0.2) as http, \
            pytest.raises(httpx.ReadTimeout), \
            http.stream("POST", "/chat/completions", json=body) as response:
        for _ in response.iter_bytes():
            assert loopback.active_streams == 1
    assert loopback.wait_idle()


def test_drop_breaks_the_chunked_body(loopback: LoopbackServer) -> None:
    loopback.set_behavior("m", ModelBehavior(reply="a b c d", drop_after=2))
    body = {"model": "m", "messages": HI, "stream": True}
    with httpx.Client(base_url=loopback.base_url) as http, \
            pytest.raises(httpx.RemoteProtocolError), \
            http.stream("POST", "/chat/completions", json=body) as response:
        response.read()


def test_api_key_is_checked_when_set() -> None:
    with LoopbackServer(api_key="k-123") as srv:
        with pytest.raises(openai.AuthenticationError):
            client(srv, key="wrong").chat.completions.create(model="m", messages=HI)  # type: ignore[arg-type]
        ok = client(srv, key="k-123").chat.completions.create(model="m", messages=HI)  # type: ignore[arg-type]
        assert ok.choices[0].message.content == "Say something nice."


def test_anthropic_messages_document(loopback: LoopbackServer) -> None:
    loopback.set_behavior("c", ModelBehavior(reply="Bonjour à tous"))
    body = {"model": "c", "max_tokens": 2, "system": "Be French.",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}
    reply = httpx.post(f"{loopback.anthropic_base_url}/v1/messages", json=body).json()
    assert reply["type"] == "message" and reply["role"] == "assistant"
    assert reply["content"] == [{"type": "text", "text": "Bonjour à"}]
    assert reply["stop_reason"] == "max_tokens"
    assert reply["usage"] == {"input_tokens": 3, "cache_creation_input_tokens": 0,
                              "cache_read_input_tokens": 0, "output_tokens": 2}


def test_anthropic_stream_event_order(loopback: LoopbackServer) -> None:
    loopback.set_behavior("c", ModelBehavior(reply="x y"))
    body = {"model": "c", "max_tokens": 9, "stream": True, "messages": HI}
    raw = httpx.post(f"{loopback.anthropic_base_url}/v1/messages", json=body).text
    events = [line[7:] for line in raw.splitlines() if line.startswith("event: ")]
    assert events == ["message_start", "content_block_start", "ping", "content_block_delta",
                      "content_block_delta", "content_block_stop", "message_delta",
                      "message_stop"]


def test_unknown_route_is_404(loopback: LoopbackServer) -> None:
    response = httpx.get(f"{loopback.base_url}/nothing")
    assert response.status_code == 404
    assert "No route" in response.json()["error"]["message"]


@pytest.mark.anyio
async def test_async_context_manager_and_registry() -> None:
    async with LoopbackServer({"fast": ModelBehavior(reply="4")}) as srv:
        registry = srv.registry(prefix="loop", anthropic_prefix="loopa")
        provider, model = registry.resolve("loop/fast")
        assert model == "fast" and provider.capabilities.continuation
        with anyio.fail_after(10):
            [done] = await provider.complete(ChatRequest(model=model, messages=HI))
            assert done.text == "4"
            claude, name = registry.resolve("loopa/fast")
            [again] = await claude.complete(ChatRequest(model=name, messages=HI))
        assert again.text == "4"
        assert [r.path for r in srv.requests] == ["/v1/chat/completions", "/v1/messages"]
        await registry.aclose()


def _request(model: str):
    from moa.providers.base import ChatRequest

    return ChatRequest(model=model, messages=HI)


TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
         for n in ("get_weather", "add")]
CALLS = [{"name": "get_weather", "arguments": {"city": "Paris"}},
         {"name": "add", "arguments": {"a": 1, "b": 2}, "id": "call_fixed"}]


def test_tool_calls_honour_tool_choice_parallel_and_tool_results(
    loopback: LoopbackServer,
) -> None:
    loopback.set_behavior("agent", ModelBehavior(reply="Done.", tool_calls=CALLS))
    c = client(loopback)

    def ask(messages: list = HI, **fields: object):  # type: ignore[type-arg]
        reply = c.chat.completions.create(model="agent", messages=messages, **fields)  # type: ignore[call-overload]
        return reply.choices[0]

    both = ask(tools=TOOLS)
    assert (both.finish_reason, both.message.content) == ("tool_calls", "Done.")
    calls = both.message.tool_calls
    assert [(t.function.name, t.function.arguments) for t in calls] == [
        ("get_weather", '{"city": "Paris"}'), ("add", '{"a": 1, "b": 2}')]
    assert calls[0].id.startswith("call_") and calls[1].id == "call_fixed"
    named = ask(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}})
    assert [t.function.name for t in named.message.tool_calls] == ["add"]
    assert named.message.content is None  # a forced call comes without text
    first = ask(tools=TOOLS, parallel_tool_calls=False)
    assert [t.function.name for t in first.message.tool_calls] == ["get_weather"]
    for none in (ask(tools=TOOLS, tool_choice="none"), ask()):
        assert (none.finish_reason, none.message.content, none.message.tool_calls) == (
            "stop", "Done.", None)
    answered = ask([*HI, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "3"}], tools=TOOLS)
    assert (answered.finish_reason, answered.message.content) == ("stop", "Done.")


def test_streamed_tool_calls_and_structured_output_through_the_sdk(
    loopback: LoopbackServer,
) -> None:
    loopback.set_behavior("agent", ModelBehavior(reply="", tool_calls=CALLS[:1],
                                                 structured={"ok": True}))
    chunks = list(client(loopback).chat.completions.create(
        model="agent", messages=HI, tools=TOOLS, stream=True,  # type: ignore[arg-type]
    ))
    pieces = [t for ch in chunks if ch.choices for t in ch.choices[0].delta.tool_calls or []]
    assert pieces[0].id and pieces[0].function.name == "get_weather"
    assert len(pieces) > 2 and all(p.id is None for p in pieces[1:])  # arguments in pieces
    assert "".join(p.function.arguments or "" for p in pieces) == '{"city": "Paris"}'
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    reply = client(loopback).chat.completions.create(
        model="agent", messages=HI, response_format={"type": "json_object"})  # type: ignore[arg-type]
    assert reply.choices[0].message.content == '{"ok": true}'


def test_anthropic_tool_use_and_forced_format_tool(loopback: LoopbackServer) -> None:
    loopback.set_behavior("c", ModelBehavior(reply="Checking.", tool_calls=CALLS,
                                             structured={"ok": True}))
    url = f"{loopback.anthropic_base_url}/v1/messages"
    tools = [{"name": "get_weather", "input_schema": {"type": "object"}},
             {"name": "add", "input_schema": {"type": "object"}}]
    body = {"model": "c", "max_tokens": 50, "messages": HI, "tools": tools,
            "tool_choice": {"type": "auto", "disable_parallel_tool_use": True}}
    reply = httpx.post(url, json=body).json()
    assert reply["stop_reason"] == "tool_use"
    assert reply["content"][0] == {"type": "text", "text": "Checking."}
    [use] = reply["content"][1:]
    assert (use["type"], use["name"], use["input"]) == ("tool_use", "get_weather",
                                                        {"city": "Paris"})
    assert use["id"].startswith("toolu_")
    body["tool_choice"] = {"type": "tool", "name": "report"}  # not a call it makes: the format
    body["tools"] = [*tools, {"name": "report", "input_schema": {"type": "object"}}]
    forced = httpx.post(url, json=body).json()
    assert [(b["type"], b["name"], b["input"]) for b in forced["content"]] == [
        ("tool_use", "report", {"ok": True})]
    body["tool_choice"] = {"type": "auto"}
    body["messages"] = [*HI, {"role": "assistant", "content": [use]},
                        {"role": "user", "content": [
                            {"type": "tool_result", "tool_use_id": use["id"], "content": "18"}]}]
    answered = httpx.post(url, json=body).json()
    assert (answered["stop_reason"], answered["content"]) == (
        "end_turn", [{"type": "text", "text": "Checking."}])
