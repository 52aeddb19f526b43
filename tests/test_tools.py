"""Tools and structured outputs through the mixture: advisors and one acting stage.

Everything runs over real sockets: a loopback upstream, the library, `moa serve` with the
official SDK, and the `moa.OpenAI` wrapper.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anyio
import openai
import pytest
from pydantic import BaseModel

import moa
from moa.config import MixtureConfig
from moa.errors import ConfigError, StructuredOutputError, UnsupportedRequest
from moa.events import FinalToolCallDelta, Notice
from moa.openai.server import ServerThread, create_app
from moa.providers.registry import ProviderSpec
from moa.runtime.acting import Acting, advisor_messages
from moa.testing import LoopbackServer, ModelBehavior

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
FINAL = "It is 18 degrees and sunny in Paris."


class Weather(BaseModel):
    city: str
    celsius: int


WEATHER_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "Weather", "schema": Weather.model_json_schema(), "strict": True},
}


def config(mode: str = "layered", **extra: Any) -> MixtureConfig:
    return MixtureConfig.model_validate({
        "name": "team", "mode": mode,
        "layers": [{"agents": [{"model": "loop/a"}, {"model": "loop/b"}]}],
        "aggregator": {"model": "loop/agg"},
        **extra,
    })


@pytest.fixture
def upstream() -> Iterator[LoopbackServer]:
    behaviors = {
        "a": ModelBehavior(reply="Call get_weather for Paris, then report it."),
        "b": ModelBehavior(reply="Use the weather tool with city Paris."),
        "agg": ModelBehavior(
            reply=FINAL,
            tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call_w1"}],
            structured={"city": "Paris", "celsius": 18},
        ),
    }
    with LoopbackServer(behaviors) as server:
        yield server


def second_turn(call_id: str, arguments: str) -> list[dict[str, Any]]:
    """The agent loop's second request: the call made, and the tool's result."""
    return [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": call_id, "type": "function",
            "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "18 C, sunny " + "x" * 3000},
    ]


def bodies(upstream: LoopbackServer, model: str) -> list[dict[str, Any]]:
    return [r.body or {} for r in upstream.requests if r.model == model]


def test_only_the_acting_stage_gets_tools_and_its_calls_come_back(
    upstream: LoopbackServer,
) -> None:
    mixture = moa.Mixture(config(), registry=upstream.registry())
    result = mixture.run_sync(ASK, tools=[WEATHER], tool_choice="auto")
    assert [(c.id, c.name, json.loads(c.arguments)) for c in result.tool_calls] == [
        ("call_w1", "get_weather", {"city": "Paris"})
    ]
    assert result.finish_reason == "tool_calls"
    for advisor in ("a", "b"):
        (body,) = bodies(upstream, advisor)
        assert "tools" not in body and "tool_choice" not in body
        assert "can call these tools: get_weather" in body["messages"][0]["content"]
    (acting,) = bodies(upstream, "agg")
    assert acting["tools"] == [WEATHER] and acting["tool_choice"] == "auto"
    # Advisors and the acting stage are all counted.
    assert result.usage.prompt_tokens == sum(o.usage.prompt_tokens for o in result.outputs)
    assert {o.agent.key for o in result.outputs if o.usage.prompt_tokens} == {
        "L1.1", "L1.2", "final"
    }


def test_second_turn_passes_the_transcript_verbatim_to_the_actor_and_as_text_to_advisors(
    upstream: LoopbackServer,
) -> None:
    mixture = moa.Mixture(config(tool_result_chars=100), registry=upstream.registry())
    result = mixture.run_sync(second_turn("call_w1", '{"city": "Paris"}'), tools=[WEATHER])
    assert result.text == FINAL and not result.tool_calls and result.finish_reason == "stop"
    (acting,) = bodies(upstream, "agg")
    assert acting["messages"][-2]["tool_calls"][0]["id"] == "call_w1"
    assert acting["messages"][-1] == {
        "role": "tool", "tool_call_id": "call_w1", "content": "18 C, sunny " + "x" * 3000
    }
    (advice,) = bodies(upstream, "a")
    roles = [m["role"] for m in advice["messages"]]
    assert roles == ["system", "user", "assistant", "user"] and "tools" not in advice
    text = json.dumps(advice["messages"])
    assert "tool_calls" not in text and "tool_call_id" not in text
    assert '[called tool get_weather with {\\"city\\": \\"Paris\\"}]' in text
    last = advice["messages"][-1]["content"]
    assert last.startswith("[result of tool get_weather: 18 C, sunny") and "chars cut]" in last
    assert len(last) < 200  # trimmed to tool_result_chars, the actor got all 3,000


def test_advisor_view_of_parallel_results_is_one_turn() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        *ASK,
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "a", "arguments": "{}"}},
            {"id": "c2", "type": "function", "function": {"name": "b", "arguments": "{}"}},
        ]},
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
    ]
    view = advisor_messages(messages, Acting(), 50)
    assert [m["role"] for m in view] == ["system", "user", "assistant", "user"]
    assert view[0]["content"] == "Be brief."  # no tools in this request: no note
    assert view[2]["content"] == "Checking.\n[called tool a with {}]\n[called tool b with {}]"
    assert view[3]["content"] == "[result of tool a: one]\n\n[result of tool b: two]"
    assert advisor_messages(ASK, Acting(), 50) == ASK  # a plain chat stays as it is


def test_staircase_acting_stage_waits_for_complete_references(upstream: LoopbackServer) -> None:
    upstream.set_behavior("a", ModelBehavior(reply="word " * 60, tokens_per_s=2000))
    mixture = moa.Mixture(config("staircase"), registry=upstream.registry())

    async def run() -> tuple[list[Any], Any]:
        events = [e async for e in mixture.stream(ASK, tools=[WEATHER])]
        return events, events[-1].result

    events, result = anyio.run(run)
    notices = [e.message for e in events if isinstance(e, Notice)]
    assert any("acts (tools or a response format)" in n for n in notices)
    pieces = [e.call for e in events if isinstance(e, FinalToolCallDelta)]
    assert pieces[0].id == "call_w1" and pieces[0].name == "get_weather"
    assert "".join(p.arguments for p in pieces) == result.tool_calls[0].arguments
    (acting,) = bodies(upstream, "agg")  # one call, after every reference was complete
    assert "continue_final_message" not in acting
    assert ("word " * 60).strip() in acting["messages"][0]["content"]


def test_forced_tool_on_a_backend_without_tools_fails_before_any_call(
    upstream: LoopbackServer,
) -> None:
    registry = upstream.registry()
    registry.register(ProviderSpec(prefix="plain", base_url=upstream.base_url,
                                   key_required=False, options={"tools": False}))
    cfg = config(aggregator={"model": "loop/agg", "strong": "plain/agg"},
                 router={"policy": "threshold", "signal": "agreement", "threshold": 0.5})
    mixture = moa.Mixture(cfg, registry=registry)
    with pytest.raises(UnsupportedRequest, match="plain/agg cannot call tools"):
        mixture.run_sync(ASK, tools=[WEATHER], tool_choice="required")
    assert upstream.requests == []
    # Without tools (or with tool_choice none) the same mixture runs.
    assert mixture.run_sync(ASK, tools=[WEATHER], tool_choice="none").text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tools": [{"type": "function"}]}, "tools must be a list of function tools"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice must be"),
        ({"tool_choice": "required"}, "needs tools"),
        ({"response_format": {"type": "xml"}}, "response_format type must be"),
        ({"response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "nonsense"}}}}, "not a valid JSON Schema"),
    ],
)
def test_bad_tool_and_format_arguments_are_one_sentence(
    upstream: LoopbackServer, kwargs: dict[str, Any], message: str
) -> None:
    mixture = moa.Mixture(config(), registry=upstream.registry())
    with pytest.raises(ConfigError, match=message):
        mixture.run_sync(ASK, **kwargs)
    assert upstream.requests == []


def test_routed_acting_stage_is_never_skipped(upstream: LoopbackServer) -> None:
    for model in ("a", "b"):
        upstream.set_behavior(model, ModelBehavior(reply="The answer is 4."))
    cfg = config(
        aggregator={"model": "loop/agg", "strong": "loop/agg"},
        router={"policy": "threshold", "signal": "agreement", "threshold": 0.5,
                "skip_above": 1.0},
    )
    mixture = moa.Mixture(cfg, registry=upstream.registry())
    assert mixture.run_sync(ASK).text == "The answer is 4."  # agreement: the stage is skipped
    assert bodies(upstream, "agg") == []
    result = mixture.run_sync(ASK, tools=[WEATHER])
    assert result.tool_calls and len(bodies(upstream, "agg")) == 1


def test_structured_answer_validates_and_advisors_are_told_the_shape(
    upstream: LoopbackServer,
) -> None:
    mixture = moa.Mixture(config(), registry=upstream.registry())
    result = mixture.run_sync(ASK, response_format=WEATHER_FORMAT)
    assert Weather.model_validate_json(result.text) == Weather(city="Paris", celsius=18)
    (acting,) = bodies(upstream, "agg")
    assert acting["response_format"] == WEATHER_FORMAT
    (advice,) = bodies(upstream, "a")
    assert "response_format" not in advice
    assert "must be a JSON value matching this schema" in advice["messages"][0]["content"]


def test_an_answer_that_ignores_the_format_is_a_clear_error(upstream: LoopbackServer) -> None:
    upstream.set_behavior("agg", ModelBehavior(reply="Sunny, 18 degrees."))
    mixture = moa.Mixture(config(), registry=upstream.registry())
    with pytest.raises(StructuredOutputError, match="not valid JSON") as caught:
        mixture.run_sync(ASK, response_format={"type": "json_object"})
    assert caught.value.partial.text == "Sunny, 18 degrees."
    upstream.set_behavior("agg", ModelBehavior(structured={"city": "Paris", "celsius": "hot"}))
    with pytest.raises(StructuredOutputError, match="at celsius: 'hot' is not of type 'integer'"):
        mixture.run_sync(ASK, response_format=WEATHER_FORMAT)


def test_a_backend_without_native_formats_gets_the_schema_as_an_instruction(
    upstream: LoopbackServer,
) -> None:
    registry = upstream.registry()
    registry.register(ProviderSpec(prefix="plain", base_url=upstream.base_url,
                                   key_required=False, options={"response_format": False}))
    cfg = config(aggregator={"model": "plain/json"})
    upstream.set_behavior("json", ModelBehavior(reply='{"city": "Paris", "celsius": 18}'))
    result = moa.Mixture(cfg, registry=registry).run_sync(ASK, response_format=WEATHER_FORMAT)
    assert json.loads(result.text)["celsius"] == 18
    (acting,) = bodies(upstream, "json")
    assert "response_format" not in acting
    assert "Reply with one JSON value only" in acting["messages"][0]["content"]


# ---- the OpenAI surfaces ------------------------------------------------------------------


def serving(upstream: LoopbackServer) -> ServerThread:
    return ServerThread(create_app({"team": config()}, registry=upstream.registry()))


def agent_loop(client: Any, stream: bool) -> tuple[Any, str]:
    """Call a tool, send its result back, get the final answer (what every agent does)."""
    if stream:
        pieces = list(client.chat.completions.create(
            model="team", messages=ASK, tools=[WEATHER], stream=True))
        calls = [tc for p in pieces for c in p.choices for tc in c.delta.tool_calls or []]
        assert calls[0].id and calls[0].function.name == "get_weather"
        call_id = calls[0].id
        arguments = "".join(c.function.arguments or "" for c in calls)
        assert [c.finish_reason for p in pieces for c in p.choices][-1] == "tool_calls"
    else:
        first = client.chat.completions.create(model="team", messages=ASK, tools=[WEATHER])
        assert first.choices[0].finish_reason == "tool_calls"
        (call,) = first.choices[0].message.tool_calls
        call_id, arguments = call.id, call.function.arguments
    assert json.loads(arguments) == {"city": "Paris"}
    final = client.chat.completions.create(
        model="team", messages=second_turn(call_id, arguments), tools=[WEATHER])
    return final, call_id


@pytest.mark.parametrize("stream", [False, True])
def test_sdk_agent_loop_against_moa_serve(upstream: LoopbackServer, stream: bool) -> None:
    with serving(upstream) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        final, call_id = agent_loop(client, stream)
    assert final.choices[0].message.content == FINAL
    assert final.choices[0].finish_reason == "stop"
    assert bodies(upstream, "agg")[-1]["messages"][-1]["tool_call_id"] == call_id == "call_w1"
    assert all("tools" not in b for b in bodies(upstream, "a") + bodies(upstream, "b"))


@pytest.mark.parametrize("stream", [False, True])
def test_wrapper_agent_loop(upstream: LoopbackServer, stream: bool) -> None:
    with moa.OpenAI(base_url=upstream.base_url, api_key="unused",
                    mixtures={"team": config()}) as client:
        client.registry.register(ProviderSpec(prefix="loop", base_url=upstream.base_url,
                                              key_required=False))
        final, _ = agent_loop(client, stream)
    assert final.choices[0].message.content == FINAL
    assert not any(r.model == "team" for r in upstream.requests)  # never bypassed


def test_sdk_parse_returns_the_model_through_serve_and_wrapper(upstream: LoopbackServer) -> None:
    with serving(upstream) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        served = client.chat.completions.parse(model="team", messages=ASK,
                                               response_format=Weather)
    with moa.OpenAI(base_url=upstream.base_url, api_key="unused",
                    mixtures={"team": config()}) as wrapped:
        wrapped.registry.register(ProviderSpec(prefix="loop", base_url=upstream.base_url,
                                               key_required=False))
        direct = wrapped.chat.completions.parse(model="team", messages=ASK,
                                                response_format=Weather)
    for parsed in (served, direct):
        assert parsed.choices[0].message.parsed == Weather(city="Paris", celsius=18)
    assert not any(r.model == "team" for r in upstream.requests)
    formats = [b["response_format"] for b in bodies(upstream, "agg")]
    assert all(f["type"] == "json_schema" and f["json_schema"]["name"] == "Weather"
               for f in formats) and len(formats) == 2


def test_sdk_stream_helper_through_serve_and_wrapper(upstream: LoopbackServer) -> None:
    """`chat.completions.stream()`: content events and a parsed final completion (sync, a
    pydantic format), tool-call events (async, a function tool), on moa serve and the wrapper."""

    def typed(client: Any) -> Any:
        with client.chat.completions.stream(model="team", messages=ASK,
                                            response_format=Weather) as stream:
            pieces = [e.delta for e in stream if e.type == "content.delta"]
            final = stream.get_final_completion()
        assert "".join(pieces) == final.choices[0].message.content
        return final.choices[0].message.parsed

    strict = {"type": "function", "function": {**WEATHER["function"], "strict": True}}

    async def acting(client: Any) -> list[Any]:
        async with client.chat.completions.stream(model="team", messages=ASK,
                                                  tools=[strict]) as stream:
            done = [e async for e in stream if e.type == "tool_calls.function.arguments.done"]
        await client.close()
        return [(e.name, json.loads(e.arguments)) for e in done]

    with serving(upstream) as server:
        served = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        assert typed(served) == Weather(city="Paris", celsius=18)
        called = anyio.run(acting, openai.AsyncOpenAI(base_url=server.base_url,
                                                      api_key="unused", max_retries=0))
        assert called == [("get_weather", {"city": "Paris"})]
    for make in (moa.OpenAI, moa.AsyncOpenAI):
        client = make(base_url=upstream.base_url, api_key="unused", mixtures={"team": config()})
        client.registry.register(ProviderSpec(prefix="loop", base_url=upstream.base_url,
                                              key_required=False))
        if make is moa.OpenAI:
            assert typed(client) == Weather(city="Paris", celsius=18)
        else:
            assert anyio.run(acting, client) == [("get_weather", {"city": "Paris"})]
    assert not any(r.model == "team" for r in upstream.requests)
    assert len(bodies(upstream, "agg")) == 4


def test_served_schema_failure_is_a_clear_502_not_invalid_json(upstream: LoopbackServer) -> None:
    upstream.set_behavior("agg", ModelBehavior(reply="Sunny."))
    with serving(upstream) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model="team", messages=ASK,
                                           response_format={"type": "json_object"})
        assert caught.value.status_code == 502
        assert "not valid JSON" in caught.value.message
        with pytest.raises(openai.BadRequestError, match="tool_choice must be"):
            client.chat.completions.create(model="team", messages=ASK, tools=[WEATHER],
                                           tool_choice="sometimes")  # type: ignore[arg-type]


def test_many_concurrent_tool_loops_on_one_mixture_with_faults(upstream: LoopbackServer) -> None:
    """A shared mixture: 24 concurrent first turns, one proposer failing half the time."""
    upstream.set_behavior("b", ModelBehavior(reply="Use the tool.", fail_status=500,
                                             fail_times=12))
    mixture = moa.Mixture(config(), registry=upstream.registry())

    async def one(i: int, out: list[Any]) -> None:
        messages = [{"role": "user", "content": f"Weather in city {i}?"}]
        out.append(await mixture.run(messages, tools=[WEATHER], tool_choice="required"))

    async def main() -> list[Any]:
        out: list[Any] = []
        async with anyio.create_task_group() as tg:
            for i in range(24):
                tg.start_soon(one, i, out)
        await mixture.aclose()
        return out

    results = anyio.run(main)
    assert len(results) == 24
    assert all(r.tool_calls[0].name == "get_weather" for r in results)
    assert all(r.finish_reason == "tool_calls" for r in results)
    assert len(bodies(upstream, "agg")) == 24
    assert all(b["tool_choice"] == "required" for b in bodies(upstream, "agg"))
