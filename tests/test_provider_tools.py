"""Tool calls and structured output through the OpenAI-compatible and Anthropic providers,
against the loopback server over real sockets."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest

from moa.errors import ProviderError
from moa.providers.anthropic import AnthropicProvider
from moa.providers.base import ChatRequest, Completion, Provider
from moa.providers.openai_compat import OpenAICompatProvider
from moa.providers.registry import Limits, ProviderSpec
from moa.testing import LoopbackServer, ModelBehavior

pytestmark = pytest.mark.anyio

ASK = [{"role": "user", "content": "Weather in Paris, and what is 1 + 2?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "number"}, "b": {"type": "number"}}}}}
TOOLS = [WEATHER, ADD]
CALLS = [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
         {"name": "add", "arguments": '{"a": 1, "b": 2}'}]
AGENT = ModelBehavior(reply="Let me check.", tool_calls=CALLS)
REPORT = {"city": "Paris", "temperature": 18, "sky": "clear"}
SCHEMA = {"type": "json_schema", "json_schema": {
    "name": "weather_report", "strict": True,
    "schema": {"type": "object", "properties": {"city": {"type": "string"}}}}}
LIMITS = Limits(backoff_initial=0.001, backoff_max=0.005)


def openai_provider(srv: LoopbackServer, **options: object) -> OpenAICompatProvider:
    spec = ProviderSpec(prefix="loop", base_url=srv.base_url, key_required=False,
                        limits=LIMITS, options=options)
    return OpenAICompatProvider(spec, None)


def anthropic_provider(srv: LoopbackServer) -> AnthropicProvider:
    spec = ProviderSpec(prefix="claude", kind="anthropic", base_url=srv.anthropic_base_url,
                        key_required=False, limits=LIMITS)
    return AnthropicProvider(spec, None)


async def complete(provider: Provider, **fields: Any) -> Completion:
    fields.setdefault("messages", ASK)
    with anyio.fail_after(10):
        [done] = await provider.complete(ChatRequest(model="m", **fields))
    return done


def sent(srv: LoopbackServer) -> dict[str, Any]:
    body = srv.requests[-1].body
    assert body is not None
    return body


def second_turn(first: Completion) -> list[dict[str, Any]]:
    """The conversation after the model's calls: its assistant turn and one result per call."""
    results = ["18 degrees, clear", "3"]
    return [*ASK,
            {"role": "assistant", "content": None,
             "tool_calls": [call.as_message_part() for call in first.tool_calls]},
            *({"role": "tool", "tool_call_id": call.id, "content": result}
              for call, result in zip(first.tool_calls, results, strict=True))]


# -- OpenAI-compatible ------------------------------------------------------------------


async def test_openai_streamed_tool_calls_assemble(loopback: LoopbackServer) -> None:
    loopback.set_behavior("m", AGENT)
    provider = openai_provider(loopback)
    assert provider.capabilities.tools and provider.capabilities.response_format
    done = await complete(provider, tools=TOOLS, tool_choice="auto", parallel_tool_calls=True)
    assert (done.text, done.finish_reason) == ("Let me check.", "tool_calls")
    assert [(c.name, json.loads(c.arguments)) for c in done.tool_calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}), ("add", {"a": 1, "b": 2})]
    assert all(c.id.startswith("call_") for c in done.tool_calls)
    assert len({c.id for c in done.tool_calls}) == 2
    assert done.usage.completion_tokens == 3 + 4 + 4  # the text and the argument pieces
    body = sent(loopback)
    assert body["tools"] == TOOLS
    assert (body["tool_choice"], body["parallel_tool_calls"]) == ("auto", True)
    assert "response_format" not in body
    await complete(provider)
    assert not {"tools", "tool_choice", "parallel_tool_calls"} & set(sent(loopback))
    await provider.aclose()


async def test_openai_second_turn_sends_calls_and_results_verbatim(
    loopback: LoopbackServer,
) -> None:
    loopback.set_behavior("m", ModelBehavior(reply="It is 18 degrees; 1 + 2 = 3.",
                                             tool_calls=CALLS))
    provider = openai_provider(loopback)
    first = await complete(provider, tools=TOOLS)
    messages = second_turn(first)
    done = await complete(provider, tools=TOOLS, messages=messages)
    assert (done.text, done.finish_reason, done.tool_calls) == (
        "It is 18 degrees; 1 + 2 = 3.", "stop", [])
    assert sent(loopback)["messages"] == messages  # ids and the null content preserved
    await provider.aclose()


async def test_openai_response_format_passes_through(loopback: LoopbackServer) -> None:
    loopback.set_behavior("m", ModelBehavior(reply="Sunny.", structured=REPORT))
    provider = openai_provider(loopback)
    done = await complete(provider, response_format=SCHEMA)
    assert (json.loads(done.text), done.finish_reason) == (REPORT, "stop")
    assert sent(loopback)["response_format"] == SCHEMA
    cut = await complete(provider, response_format={"type": "json_object"}, max_tokens=2)
    assert (cut.text, cut.finish_reason) == ('{"city": "Paris",', "length")
    assert (await complete(provider)).text == "Sunny."  # no format asked: the plain reply
    loopback.set_behavior("m", ModelBehavior(reply="Let me check.", tool_calls=CALLS,
                                             structured=REPORT))
    first = await complete(provider, tools=TOOLS, response_format=SCHEMA)
    assert (first.text, len(first.tool_calls)) == ("Let me check.", 2)  # calls, then the format
    done = await complete(provider, tools=TOOLS, response_format=SCHEMA,
                          messages=second_turn(first))
    assert (json.loads(done.text), done.finish_reason) == (REPORT, "stop")
    await provider.aclose()


async def test_openai_malformed_tool_call_is_one_clear_error(loopback: LoopbackServer) -> None:
    loopback.set_behavior("m", ModelBehavior(reply="", tool_calls=CALLS,
                                             malformed_tool_call=True))
    provider = openai_provider(loopback)
    with pytest.raises(ProviderError, match=r"^loop/m: .*malformed tool-call stream") as info:
        await complete(provider, tools=TOOLS)
    assert info.value.__cause__ is None and info.value.__context__ is None
    chunk = {"choices": [{"index": 0, "delta": {"tool_calls": ["oops"]}}]}
    loopback.set_behavior("m", ModelBehavior(raw_sse=f"data: {json.dumps(chunk)}\n\n".encode()))
    with pytest.raises(ProviderError, match="malformed tool-call stream"):
        await complete(provider, tools=TOOLS)
    await provider.aclose()


async def test_openai_arguments_sent_as_an_object_become_text(loopback: LoopbackServer) -> None:
    call = {"index": 0, "id": "c1", "function": {"name": "add", "arguments": {"a": 1}}}
    chunks = [{"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]},
              {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}]
    raw = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    loopback.set_behavior("m", ModelBehavior(raw_sse=raw.encode()))
    provider = openai_provider(loopback)
    done = await complete(provider, tools=TOOLS)
    assert [(c.id, c.name, c.arguments) for c in done.tool_calls] == [("c1", "add", '{"a": 1}')]
    await provider.aclose()


async def test_openai_options_switch_tools_and_formats_off(loopback: LoopbackServer) -> None:
    provider = openai_provider(loopback, tools=False, response_format=False)
    assert not provider.capabilities.tools and not provider.capabilities.response_format
    with pytest.raises(ProviderError, match="does not support tools"):
        await complete(provider, tools=TOOLS)
    with pytest.raises(ProviderError, match="does not support response_format"):
        await complete(provider, response_format=SCHEMA)
    assert loopback.requests == []
    await provider.aclose()


# -- Anthropic --------------------------------------------------------------------------


async def test_anthropic_tools_and_tool_choice_shapes(loopback: LoopbackServer) -> None:
    loopback.set_behavior("m", ModelBehavior(reply="No tools needed."))
    provider = anthropic_provider(loopback)
    assert provider.capabilities.tools and provider.capabilities.response_format
    named = {"type": "function", "function": {"name": "add"}}
    choices: list[tuple[Any, bool | None, dict[str, Any] | None]] = [
        (None, None, None),
        ("auto", None, {"type": "auto"}),
        ("required", None, {"type": "any"}),
        ("none", None, {"type": "none"}),
        (named, None, {"type": "tool", "name": "add"}),
        ("auto", False, {"type": "auto", "disable_parallel_tool_use": True}),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
    ]
    for choice, parallel, expected in choices:
        await complete(provider, tools=TOOLS, tool_choice=choice, parallel_tool_calls=parallel)
        body = sent(loopback)
        assert body.get("tool_choice") == expected, choice
    assert body["tools"] == [
        {"name": "get_weather", "description": "Current weather of a city.",
         "input_schema": WEATHER["function"]["parameters"]},
        {"name": "add", "input_schema": ADD["function"]["parameters"]},
    ]
    await provider.aclose()


async def test_anthropic_streamed_tool_use_assembles(loopback: LoopbackServer) -> None:
    loopback.set_behavior("m", AGENT)
    provider = anthropic_provider(loopback)
    done = await complete(provider, tools=TOOLS)
    assert (done.text, done.finish_reason) == ("Let me check.", "tool_calls")
    assert [(c.name, json.loads(c.arguments)) for c in done.tool_calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}), ("add", {"a": 1, "b": 2})]
    assert all(c.id.startswith("toolu_") for c in done.tool_calls)
    assert done.usage.completion_tokens == 3 + 4 + 4
    await provider.aclose()


async def test_anthropic_second_turn_becomes_tool_use_and_tool_result_blocks(
    loopback: LoopbackServer,
) -> None:
    loopback.set_behavior("m", ModelBehavior(reply="It is 18 degrees; 1 + 2 = 3.",
                                             tool_calls=CALLS))
    provider = anthropic_provider(loopback)
    first = await complete(provider, tools=TOOLS)
    messages = second_turn(first)
    messages[1]["content"] = "Let me check."
    done = await complete(provider, tools=TOOLS, messages=messages)
    assert (done.text, done.finish_reason, done.tool_calls) == (
        "It is 18 degrees; 1 + 2 = 3.", "stop", [])
    [ask, assistant, results] = sent(loopback)["messages"]
    assert ask == ASK[0]
    ids = [c.id for c in first.tool_calls]
    assert assistant == {"role": "assistant", "content": [
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": ids[0], "name": "get_weather",
         "input": {"city": "Paris", "unit": "celsius"}},
        {"type": "tool_use", "id": ids[1], "name": "add", "input": {"a": 1, "b": 2},
         "cache_control": {"type": "ephemeral"}},  # the prefix before the final user turn
    ]}
    assert results == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": ids[0], "content": "18 degrees, clear"},
        {"type": "tool_result", "tool_use_id": ids[1], "content": "3"},
    ]}
    await provider.aclose()


async def test_anthropic_response_format_is_a_forced_tool_read_as_text(
    loopback: LoopbackServer,
) -> None:
    loopback.set_behavior("m", ModelBehavior(reply="Sunny.", structured=REPORT,
                                             tool_calls=CALLS))
    provider = anthropic_provider(loopback)
    done = await complete(provider, response_format=SCHEMA)
    assert (json.loads(done.text), done.finish_reason, done.tool_calls) == (REPORT, "stop", [])
    body = sent(loopback)
    assert body["tools"] == [{"name": "weather_report", "description": body["tools"][0][
        "description"], "input_schema": SCHEMA["json_schema"]["schema"]}]
    assert body["tool_choice"] == {"type": "tool", "name": "weather_report"}
    cut = await complete(provider, response_format={"type": "json_object"}, max_tokens=2)
    assert (cut.text, cut.finish_reason) == ('{"city": "Paris",', "length")
    assert sent(loopback)["tools"][0]["input_schema"] == {"type": "object"}
    # with tools: offered beside them under "auto", forced under "none", left out when forced
    await complete(provider, tools=TOOLS, response_format=SCHEMA)
    body = sent(loopback)
    assert [t["name"] for t in body["tools"]] == ["get_weather", "add", "weather_report"]
    assert "tool_choice" not in body
    done = await complete(provider, tools=TOOLS, tool_choice="none", response_format=SCHEMA)
    assert json.loads(done.text) == REPORT
    assert sent(loopback)["tool_choice"] == {"type": "tool", "name": "weather_report"}
    await complete(provider, tools=TOOLS, tool_choice="required", response_format=SCHEMA)
    assert [t["name"] for t in sent(loopback)["tools"]] == ["get_weather", "add"]
    await provider.aclose()


async def test_anthropic_malformed_tool_use_is_one_clear_error(loopback: LoopbackServer) -> None:
    loopback.set_behavior("m", ModelBehavior(reply="", tool_calls=CALLS,
                                             malformed_tool_call=True))
    provider = anthropic_provider(loopback)
    with pytest.raises(ProviderError, match=r"^claude/m: .*malformed tool-call stream") as info:
        await complete(provider, tools=TOOLS)
    assert info.value.__cause__ is None and info.value.__context__ is None
    await provider.aclose()


async def test_anthropic_refuses_what_it_cannot_send(loopback: LoopbackServer) -> None:
    provider = anthropic_provider(loopback)
    bad_call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "[1, 2]"}}]}
    with pytest.raises(ProviderError, match="not a JSON object"):
        await complete(provider, tools=TOOLS, messages=[*ASK, bad_call])
    clash = {"type": "json_schema", "json_schema": {"name": "add", "schema": {}}}
    with pytest.raises(ProviderError, match="has the name of a tool"):
        await complete(provider, tools=TOOLS, response_format=clash)
    assert loopback.requests == []
    await provider.aclose()
