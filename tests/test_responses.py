"""The Responses API on `moa serve`: the official SDK's `client.responses` over real sockets,
with a loopback upstream behind the server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from moa.config import MixtureConfig
from moa.events import RunFinished
from moa.openai.responses import ResponseEvents, parse_responses
from moa.openai.server import ServerThread, create_app
from moa.openai.wire import RequestError
from moa.result import MixtureResult
from moa.testing import LoopbackServer, ModelBehavior

FINAL = "It is 18 degrees and sunny in Paris."
ASK = "What is the weather in Paris?"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]},
    "strict": False,
}
TEXT_EVENTS = ["response.output_item.added", "response.content_part.added",
               "response.output_text.delta", "response.output_text.done",
               "response.content_part.done", "response.output_item.done"]
CALL_EVENTS = ["response.output_item.added", "response.function_call_arguments.delta",
               "response.function_call_arguments.done", "response.output_item.done"]


class Weather(BaseModel):
    city: str
    celsius: int


@pytest.fixture
def upstream() -> Iterator[LoopbackServer]:
    behaviors = {
        "a": ModelBehavior(reply="Call get_weather for Paris."),
        "b": ModelBehavior(reply="Use the weather tool."),
        "agg": ModelBehavior(
            reply=FINAL,
            tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call_w1"}],
            structured={"city": "Paris", "celsius": 18},
        ),
    }
    with LoopbackServer(behaviors) as server:
        yield server


@pytest.fixture
def client(upstream: LoopbackServer) -> Iterator[openai.OpenAI]:
    config = MixtureConfig.model_validate({
        "name": "team", "mode": "layered",
        "layers": [{"agents": [{"model": "loop/a"}, {"model": "loop/b"}]}],
        "aggregator": {"model": "loop/agg"},
    })
    with ServerThread(create_app({"team": config}, registry=upstream.registry())) as server:
        yield openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def bodies(upstream: LoopbackServer, model: str) -> list[dict[str, Any]]:
    return [r.body or {} for r in upstream.requests if r.model == model]


def collapse(kinds: list[str]) -> list[str]:
    """Event types with runs of the same delta type collapsed to one."""
    return [k for i, k in enumerate(kinds) if not (k.endswith(".delta") and kinds[i - 1] == k)]


def test_text_answer_with_usage_trace_and_instructions_first(
    client: openai.OpenAI, upstream: LoopbackServer
) -> None:
    response = client.responses.create(model="team", input=ASK, instructions="Be brief.",
                                       metadata={"ticket": "7"})
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status == "completed" and response.output_text == FINAL
    (message,) = response.output
    assert message.type == "message" and message.content[0].annotations == []
    assert response.metadata == {"ticket": "7"} and response.instructions == "Be brief."
    usage = response.usage
    assert usage is not None and usage.output_tokens > 6
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0
    trace = (response.model_extra or {})["moa"]
    assert trace["calls"] == 3 and trace["usage"]["prompt_tokens"] == usage.input_tokens
    (acting,) = bodies(upstream, "agg")
    assert acting["messages"][0]["role"] == "system"
    assert acting["messages"][0]["content"].startswith("Be brief.")


def test_stream_events_in_order_and_deltas_join_to_the_text(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model="team", input=ASK, stream=True))
    kinds = [e.type for e in events]
    assert collapse(kinds) == ["response.created", "response.in_progress", *TEXT_EVENTS,
                               "response.completed"]
    assert kinds.count("response.output_text.delta") > 3, "tokens arrive as generated"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    completed = events[-1].response  # type: ignore[union-attr]
    assert deltas == FINAL == completed.output_text
    assert {e.response.id for e in events if hasattr(e, "response")} == {completed.id}
    assert completed.usage is not None and "moa" in (completed.model_extra or {})
    # The SDK's own stream helper assembles the same response.
    with client.responses.stream(model="team", input=ASK) as stream:
        assert stream.get_final_response().output_text == FINAL


@pytest.mark.parametrize("stream", [False, True])
def test_function_tool_round_trip(
    client: openai.OpenAI, upstream: LoopbackServer, stream: bool
) -> None:
    turn: list[Any] = [{"role": "user", "content": ASK}]
    if stream:  # tool_choice auto: the model writes a line, then calls
        with client.responses.stream(model="team", input=turn, tools=[WEATHER]) as events:
            kinds = [e.type for e in events]
            first = events.get_final_response()
        assert collapse(kinds) == ["response.created", "response.in_progress", *TEXT_EVENTS,
                                   *CALL_EVENTS, "response.completed"]
        assert [item.type for item in first.output] == ["message", "function_call"]
    else:
        first = client.responses.create(model="team", input=turn, tools=[WEATHER],
                                        tool_choice="required")
        assert [item.type for item in first.output] == ["function_call"]
        assert bodies(upstream, "agg")[0]["tool_choice"] == "required"
    call = first.output[-1]
    assert call.type == "function_call" and call.id and call.id.startswith("fc_")
    assert (call.call_id, call.name, json.loads(call.arguments)) == (
        "call_w1", "get_weather", {"city": "Paris"})
    # Turn 2: the call and its output go back as items; the answer is text.
    turn += [call.model_dump(exclude_none=True),
             {"type": "function_call_output", "call_id": call.call_id, "output": "18 C, sunny"}]
    final = client.responses.create(model="team", input=turn, tools=[WEATHER])
    assert final.output_text == FINAL and [i.type for i in final.output] == ["message"]
    acting = bodies(upstream, "agg")[-1]
    assert acting["messages"][-2]["tool_calls"][0]["id"] == "call_w1"
    assert acting["messages"][-1] == {"role": "tool", "tool_call_id": "call_w1",
                                      "content": "18 C, sunny"}
    assert acting["tools"] == [{"type": "function", "function": {
        k: WEATHER[k] for k in ("name", "description", "parameters", "strict")}}]
    assert all("tools" not in b for b in bodies(upstream, "a") + bodies(upstream, "b"))


def test_json_schema_format_and_sdk_parse(client: openai.OpenAI, upstream: LoopbackServer) -> None:
    schema = {"type": "json_schema", "name": "Weather", "schema": Weather.model_json_schema()}
    response = client.responses.create(model="team", input=ASK,
                                       text={"format": schema})  # type: ignore[typeddict-item]
    assert json.loads(response.output_text) == {"city": "Paris", "celsius": 18}
    assert bodies(upstream, "agg")[0]["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "Weather", "schema": schema["schema"]}}
    parsed = client.responses.parse(model="team", input=ASK, text_format=Weather)
    assert parsed.output_parsed == Weather(city="Paris", celsius=18)
    assert bodies(upstream, "agg")[1]["response_format"]["json_schema"]["strict"] is True


def test_a_cut_answer_is_incomplete(client: openai.OpenAI) -> None:
    response = client.responses.create(model="team", input=ASK, max_output_tokens=3)
    assert response.status == "incomplete" and response.output_text == "It is 18"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    events = list(client.responses.create(model="team", input=ASK, max_output_tokens=3,
                                          stream=True))
    assert events[-1].type == "response.incomplete"


@pytest.mark.parametrize(
    ("kwargs", "param", "message"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id", "moa stores no responses"),
        ({"store": True}, "store", "moa stores no responses"),
        ({"tools": [{"type": "web_search"}]}, "tools[0]", "only function tools"),
        ({"input": 42}, "input", "string or a non-empty list"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input[0]", "function_call_output"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
         "input[0].content[0]", "only input_text and output_text"),
        ({"reasoning": {"effort": "low"}}, "reasoning", "not supported"),
        ({"include": ["message.output_text.logprobs"]}, "include", "not supported"),
        ({"truncation": "auto"}, "truncation", "must be disabled"),
        ({"top_p": 0.5}, "top_p", "only 1"),
        ({"max_output_tokens": 0}, "max_output_tokens", "max_output_tokens' must be an integer"),
        ({"text": {"format": {"type": "xml"}}}, "text.format", "text.format type must be"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "other"}},
         "tool_choice", "one of the tools"),
    ],
)
def test_refusals_name_the_field(
    client: openai.OpenAI, upstream: LoopbackServer, kwargs: dict[str, Any], param: str,
    message: str,
) -> None:
    request = {"model": "team", "input": ASK, **kwargs}
    with pytest.raises(openai.BadRequestError, match=message) as caught:
        client.responses.create(**request)
    assert caught.value.param == param
    assert upstream.requests == []


def test_a_failure_after_the_stream_began_is_response_failed(
    client: openai.OpenAI, upstream: LoopbackServer
) -> None:
    upstream.set_behavior("agg", ModelBehavior(reply=FINAL, error_after=2))
    events = list(client.responses.create(model="team", input=ASK, stream=True))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "It is"
    failed = events[-1]
    assert failed.type == "response.failed" and failed.response.status == "failed"
    assert failed.response.error is not None and failed.response.error.code == "upstream_failed"
    assert "final aggregator failed" in failed.response.error.message
    with pytest.raises(openai.APIStatusError, match="final aggregator failed") as caught:
        client.responses.create(model="team", input=ASK)
    assert caught.value.status_code == 502


def test_client_disconnect_cancels_the_upstream_calls(
    client: openai.OpenAI, upstream: LoopbackServer
) -> None:
    upstream.set_behavior("a", ModelBehavior(reply="slow " * 200, tokens_per_s=20))
    with httpx.Client(base_url=str(client.base_url), timeout=0.5) as http, \
            pytest.raises(httpx.ReadTimeout):
        http.post("responses", json={"model": "team", "input": ASK, "stream": True})
    assert upstream.wait_idle(), "an upstream call kept running after the client left"
    assert not bodies(upstream, "agg")


def test_models_retrieve_and_404(client: openai.OpenAI) -> None:
    for name in ("team", "moa/team"):
        model = client.models.retrieve(name)
        assert (model.id, model.object, model.owned_by) == (name, "model", "moa")
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("nope")
    assert caught.value.code == "model_not_found"
    assert "'nope' does not exist" in caught.value.message


def test_input_items_become_chat_turns() -> None:
    call = parse_responses({"model": "team", "instructions": "Be brief.", "input": [
        {"role": "developer", "content": [{"type": "input_text", "text": "Use tools."}]},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Weather in "},
            {"type": "input_text", "text": "Rome?"}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]},
        {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "time", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2",
         "output": [{"type": "input_text", "text": "noon"}]},
    ], "max_output_tokens": 50, "temperature": 0.2, "parallel_tool_calls": False})
    assert [m["role"] for m in call.messages] == ["system", "system", "user", "assistant",
                                                  "tool", "tool"]
    assert call.messages[2]["content"] == "Weather in Rome?"
    assistant = call.messages[3]
    assert assistant["content"] == "Checking."
    assert [c["id"] for c in assistant["tool_calls"]] == ["c1", "c2"]
    assert call.messages[5] == {"role": "tool", "tool_call_id": "c2", "content": "noon"}
    assert call.overrides == {"max_tokens": 50, "temperature": 0.2, "parallel_tool_calls": False}
    with pytest.raises(RequestError) as caught:
        parse_responses({"model": "team", "input": [{"role": "user", "content": "x", "foo": 1}]})
    assert caught.value.param == "input[0].foo"


def test_an_unstreamed_answer_and_an_early_failure_are_still_well_formed_streams() -> None:
    call = parse_responses({"model": "team", "input": ASK})
    events = ResponseEvents(call, "resp_1")
    out = events.feed(RunFinished(0.0, MixtureResult(text="", outputs=[])))
    assert [e["type"] for e in out] == ["response.created", "response.in_progress",
                                        *[k for k in TEXT_EVENTS if not k.endswith("delta")],
                                        "response.completed"]
    assert out[-1]["response"]["output"][0]["content"][0]["text"] == ""
    failed = ResponseEvents(call, "resp_2").fail(None, "Internal server error.")
    assert [e["type"] for e in failed] == ["response.created", "response.in_progress",
                                           "response.failed"]
    assert failed[-1]["response"]["error"] == {"code": "server_error",
                                               "message": "Internal server error."}


@pytest.mark.parametrize("stream", [False, True])
def test_wrapper_runs_responses_create_through_the_mixture(
    upstream: LoopbackServer, stream: bool
) -> None:
    """`moa.OpenAI(...).responses.create` runs the mixture: a function call, then its result."""
    import moa

    team = {"mode": "layered", "layers": [{"agents": [{"model": "client/a"}]}],
            "aggregator": {"model": "client/agg"}}
    with moa.OpenAI(base_url=upstream.base_url, api_key="unused",
                    mixtures={"team": team}) as client:
        if stream:
            events = list(client.responses.create(model="team", input=ASK, tools=[WEATHER],
                                                  stream=True))
            assert events[0].type == "response.created"
            first = events[-1].response
        else:
            first = client.responses.create(model="team", input=ASK, tools=[WEATHER])
        (call,) = [item for item in first.output if item.type == "function_call"]
        assert call.name == "get_weather" and call.call_id == "call_w1"
        final = client.responses.create(model="team", tools=[WEATHER], input=[
            {"role": "user", "content": ASK},
            {"type": "function_call", "call_id": call.call_id, "name": call.name,
             "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": "18 C"},
        ])
        with pytest.raises(openai.BadRequestError, match="previous_response_id"):
            client.responses.create(model="team", input=ASK, previous_response_id="resp_1")
    assert final.output_text == FINAL
    assert not any(r.model == "team" for r in upstream.requests)  # never bypassed
    assert bodies(upstream, "agg")[-1]["messages"][-1]["tool_call_id"] == "call_w1"
    assert all("tools" not in b for b in bodies(upstream, "a"))
