"""Tool calls and structured output on the embedded engines.

The text convention (`moa.local_engine.tools`) is tested as plain functions; the llama.cpp
engine runs the real bundled SmolLM2-135M greedily (temperature 0), constrained by grammars.
"""

from __future__ import annotations

import importlib.util
import json

import anyio
import pytest

from moa.errors import ConfigError
from moa.local_engine.llamacpp import JSON_CHAR, LlamaCppEngine, reply_grammar
from moa.local_engine.tools import (
    ToolCallSplitter,
    ToolPlan,
    call_schema,
    parse_tool_calls,
    render_tool_turns,
    tool_plan,
)
from moa.providers.base import ChatRequest, Delta, TokenLogprob

jsonschema = pytest.importorskip("jsonschema")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two numbers",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"],
        },
    },
}
TOOLS = [WEATHER, ADD]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def request(**kw) -> ChatRequest:
    kw.setdefault("messages", QUESTION)
    kw.setdefault("max_tokens", 64)
    kw.setdefault("temperature", 0.0)
    return ChatRequest(model="smollm2", **kw)


# --- the text convention --------------------------------------------------------------------


def test_tool_plan_reads_tool_choice() -> None:
    assert tool_plan(request()) == ToolPlan()
    auto = tool_plan(request(tools=TOOLS))
    assert auto.callable == TOOLS and not auto.forced and not auto.parallel
    assert tool_plan(request(tools=TOOLS, tool_choice="none")).callable == []
    assert tool_plan(request(tools=TOOLS, tool_choice="required")).forced
    named = tool_plan(request(tools=TOOLS, tool_choice={"type": "function",
                                                        "function": {"name": "add"}}))
    assert named.callable == [ADD] and named.offered == TOOLS and named.forced
    assert tool_plan(request(tools=TOOLS, parallel_tool_calls=True)).parallel
    with pytest.raises(ConfigError, match="'nope', which is not in tools"):
        tool_plan(request(tools=TOOLS, tool_choice={"type": "function",
                                                    "function": {"name": "nope"}}))
    with pytest.raises(ConfigError, match="tool_choice must be"):
        tool_plan(request(tools=TOOLS, tool_choice="always"))
    with pytest.raises(ConfigError, match="needs at least one tool"):
        tool_plan(request(tool_choice="required"))
    with pytest.raises(ConfigError, match="Each tool must be"):
        tool_plan(request(tools=[{"type": "function", "function": {}}]))


def test_tool_turns_render_as_plain_chat() -> None:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [
        {"role": "system", "content": "Be brief."},
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call, {**call, "id": "call_2"}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "Still sunny"},
    ]
    out = render_tool_turns(messages, tool_plan(request(tools=TOOLS)))
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\nYou can use these tools")
    assert '"name": "add"' in out[0]["content"] and "<tool_call>" in out[0]["content"]
    assert out[2]["content"] == "\n".join(
        ['<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'] * 2
    )
    assert "tool_calls" not in out[2]
    assert out[3]["content"] == (
        "The tool get_weather (call call_1) returned: Sunny\n\n"
        "The tool get_weather (call call_2) returned: Still sunny"
    )
    described = render_tool_turns(QUESTION, tool_plan(request(tools=TOOLS, tool_choice="none")))
    assert described[0]["role"] == "system" and "Do not call a tool now" in described[0]["content"]
    assert render_tool_turns(QUESTION, ToolPlan()) == QUESTION, "no tools: unchanged"


def test_parse_tool_calls_accepts_only_calls_to_listed_tools() -> None:
    (call,) = parse_tool_calls('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
                               "</tool_call>", TOOLS)
    assert call.name == "add" and json.loads(call.arguments) == {"a": 1, "b": 2}
    assert call.id.startswith("call_") and len(call.id) > 10
    bare = parse_tool_calls('{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}',
                            TOOLS)
    assert [json.loads(c.arguments) for c in bare] == [{"city": "Oslo"}]
    assert parse_tool_calls('<tool_call>{"name": "rm", "arguments": {}}</tool_call>', TOOLS) == []
    assert parse_tool_calls('<tool_call>{"name": "add", "argum', TOOLS) == []
    assert parse_tool_calls("The weather is fine.", TOOLS) == []


def test_call_schema_keeps_each_tools_references() -> None:
    ref_tool = {"type": "function", "function": {"name": "order", "parameters": {
        "type": "object", "properties": {"item": {"$ref": "#/$defs/Item"}}, "required": ["item"],
        "$defs": {"Item": {"type": "object", "properties": {"sku": {"type": "string"}},
                           "required": ["sku"]}}}}}
    schema = call_schema([ADD, ref_tool])
    jsonschema.validate({"name": "order", "arguments": {"item": {"sku": "x1"}}}, schema)
    jsonschema.validate({"name": "add", "arguments": {"a": 1, "b": 2}}, schema)
    for wrong in ({"name": "order", "arguments": {"item": {}}}, {"name": "rm", "arguments": {}},
                  {"name": "add", "arguments": {"a": 1, "b": 2}, "extra": 1}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)


def deltas(*texts: str, finish: str = "stop") -> list[Delta]:
    out = [Delta(text=t, logprobs=[TokenLogprob(t, -0.1)]) for t in texts]
    out[-1].finish_reason = finish
    return out


def split(plan: ToolPlan, pieces: list[Delta], **kw) -> list[Delta]:
    splitter = ToolCallSplitter(plan, **kw)
    return [out for d in pieces for out in splitter.feed(d)] + splitter.flush()


def test_splitter_streams_text_and_holds_back_calls() -> None:
    plan = tool_plan(request(tools=TOOLS))
    text = split(plan, deltas("It", " is", " sunny."))
    assert [d.text for d in text] == ["It", " is", " sunny."], "plain text streams as it comes"
    pieces = ["<tool", '_call>{"name": "add", ', '"arguments": {"a": 1, "b": 2}}', "</tool_call>"]
    (call,) = split(plan, deltas(*pieces))
    assert call.finish_reason == "tool_calls" and not call.text
    assert [(p.index, p.name) for p in call.tool_calls or []] == [(0, "add")]
    assert call.logprobs and len(call.logprobs) == 4, "the held tokens' logprobs are kept"
    cut = split(plan, deltas("<tool_call>", '{"name": "ad', finish="length"))
    assert "".join(d.text for d in cut) == '<tool_call>{"name": "ad'
    assert cut[-1].finish_reason == "length", "an unfinished call is returned as text"
    continued = split(plan, deltas('d", "arguments": {"a": 1, "b": 2}}</tool_call>'),
                      prefix='<tool_call>{"name": "ad')
    assert continued[0].tool_calls and continued[0].tool_calls[0].name == "add"
    two = "<tool_call>" + json.dumps({"name": "add", "arguments": {}}) + "</tool_call>"
    assert len(split(plan, deltas(two + "\n" + two))[0].tool_calls or []) == 1
    parallel = tool_plan(request(tools=TOOLS, parallel_tool_calls=True))
    assert len(split(parallel, deltas(two + "\n" + two))[0].tool_calls or []) == 2
    none = tool_plan(request(tools=TOOLS, tool_choice="none"))
    assert [d.text for d in split(none, deltas(two))] == [two], "never a call under 'none'"


# --- the llama.cpp engine with the real bundled model ---------------------------------------

needs_llama = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python (moa-stack[local]) missing",
)


@pytest.fixture(scope="module")
def engine():
    from moa.providers.registry import Registry

    provider, model = Registry().resolve("local/smollm2")
    assert model == "smollm2" and isinstance(provider, LlamaCppEngine)
    assert provider.capabilities.tools and provider.capabilities.response_format
    return provider


def complete(engine, **kw):
    return anyio.run(engine.complete, request(**kw))


@needs_llama
def test_grammar_rules_per_tool_choice() -> None:
    assert reply_grammar(ToolPlan(), None) is None
    forced = reply_grammar(tool_plan(request(tools=TOOLS, tool_choice="required")), None)
    assert forced and 'root ::= "<tool_call>" call "</tool_call>"' in forced
    assert JSON_CHAR in forced, "JSON strings without raw control characters"
    auto = reply_grammar(tool_plan(request(tools=TOOLS)), None)
    assert auto and "| ([^<\\x00] [^\\x00]*)" in auto
    fmt = {"type": "json_object"}
    only_json = reply_grammar(ToolPlan(), fmt) or ""
    assert "root ::= answer" in only_json and "answer ::= object" in only_json
    parallel = reply_grammar(tool_plan(request(tools=TOOLS, parallel_tool_calls=True)), fmt)
    assert parallel and '("\\n" "<tool_call>" call "</tool_call>")*' in parallel
    assert parallel.rstrip().endswith("| answer")
    with pytest.raises(ConfigError, match="cannot turn the JSON schema"):
        reply_grammar(ToolPlan(), {"type": "json_schema",
                                   "json_schema": {"name": "x", "schema": {"type": "tuple"}}})


@needs_llama
def test_json_schema_output_validates(engine) -> None:
    schema = {"type": "object", "properties": {"colour": {"type": "string"},
                                               "count": {"type": "integer"}},
              "required": ["colour", "count"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "pick", "schema": schema,
                                                  "strict": True}}
    messages = [{"role": "user", "content": "Name a colour and a number."}]
    (out,) = complete(engine, messages=messages, response_format=fmt)
    assert out.finish_reason == "stop" and not out.tool_calls
    jsonschema.validate(json.loads(out.text), schema)
    (obj,) = complete(engine, messages=messages, response_format={"type": "json_object"})
    assert isinstance(json.loads(obj.text), dict)
    # continuation: the grammar resumes after the assistant's text so far
    head = '{"colour": "bl'
    (cont,) = complete(engine, messages=[*messages, {"role": "assistant", "content": head}],
                       continue_final=True, response_format=fmt)
    jsonschema.validate(json.loads(head + cont.text), schema)
    with pytest.raises(ConfigError, match="does not fit"):
        complete(engine, messages=[*messages, {"role": "assistant", "content": "Well"}],
                 continue_final=True, response_format=fmt)


@needs_llama
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_forced_tool_call(engine, choice) -> None:
    (out,) = complete(engine, tools=TOOLS, tool_choice=choice)
    assert out.finish_reason == "tool_calls" and out.text == ""
    (call,) = out.tool_calls
    assert call.name in PARAMS and call.id.startswith("call_")
    if isinstance(choice, dict):
        assert call.name == "add"
    jsonschema.validate(json.loads(call.arguments), PARAMS[call.name])
    assert out.usage.prompt_tokens > 100 and out.usage.completion_tokens > 5


@needs_llama
def test_tool_call_streams_as_one_piece_with_usage(engine) -> None:
    async def main():
        return [d async for d in engine.stream(request(tools=TOOLS, tool_choice="required",
                                                       n=2, seed=3))]

    got = anyio.run(main)
    calls = [d for d in got if d.tool_calls]
    assert [d.index for d in calls] == [0, 1] and not any(d.text for d in got)
    assert all(d.finish_reason == "tool_calls" for d in calls)
    ids = {d.tool_calls[0].id for d in calls}
    assert len(ids) == 2, "each call has its own id"
    assert [d.index for d in got if d.usage] == [0, 1]


@needs_llama
def test_a_tool_loop_ends_in_a_text_answer(engine) -> None:
    (first,) = complete(engine, tools=TOOLS, tool_choice="required")
    (call,) = first.tool_calls
    result = {"get_weather": "Sunny, 24 C", "add": "5"}[call.name]
    messages = [*QUESTION, {"role": "assistant", "content": None,
                            "tool_calls": [call.as_message_part()]},
                {"role": "tool", "tool_call_id": call.id, "content": result}]
    (answer,) = complete(engine, messages=messages, tools=TOOLS)  # tool_choice "auto"
    assert answer.finish_reason == "stop" and not answer.tool_calls
    assert answer.text.strip() and "<tool_call>" not in answer.text


@needs_llama
def test_auto_and_none_answer_in_streamed_text(engine) -> None:
    async def main(choice):
        return [d async for d in engine.stream(request(tools=TOOLS, tool_choice=choice,
                                                       max_tokens=16))]

    for choice in ("auto", "none"):
        got = anyio.run(main, choice)
        assert len([d for d in got if d.text]) >= 3, "text arrives token by token"
        assert not any(d.tool_calls for d in got)


@needs_llama
def test_cancelling_a_constrained_call_frees_the_model(engine) -> None:
    from moa.local_engine.llamacpp import model_pool
    from moa.local_engine.model_files import bundled_model_path

    async def main():
        stream = engine.stream(request(tools=TOOLS, max_tokens=200, temperature=0.7))
        async for _ in stream:
            break
        await stream.aclose()
        pool = model_pool(bundled_model_path(), False, {})
        assert not any(m.busy.locked() for m in pool.instances)
        return await engine.complete(request(max_tokens=4))

    after = anyio.run(main)
    assert after[0].text and not after[0].tool_calls
