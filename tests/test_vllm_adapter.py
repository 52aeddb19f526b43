"""The vLLM adapter: request building, cumulative-output deltas, n>1, usage, abort on cancel.

The CPU-side tests drive `VLLMEngine` with a stand-in engine that has vLLM's shape
(`generate(prompt, params, request_id)` yielding cumulative `RequestOutput`s, `abort`), so
everything but the GPU kernels is exercised. The GPU test runs a real model and skips unless
vllm and a CUDA GPU are present.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest

from moa.errors import ConfigError, ProviderError
from moa.local_engine.tools import call_schema, tool_plan
from moa.local_engine.vllm_engine import (
    ChoiceTracker,
    VLLMBackend,
    VLLMEngine,
    constraint,
    load_vllm,
    render_prompt,
    sampling_kwargs,
    shutdown_engines,
    structured_outputs,
    to_logprobs,
)
from moa.providers.base import ChatRequest
from moa.providers.registry import ProviderSpec

QUESTION = [{"role": "user", "content": "Name three colours."}]


# --- stand-ins shaped like vLLM's objects ---------------------------------------------------


class EngineGenerateError(Exception):
    """vllm.v1.engine.exceptions.EngineGenerateError: raised empty, the cause in __cause__."""


class VLLMValidationError(ValueError):
    """vllm.exceptions.VLLMValidationError (a ValueError in vLLM 0.1x)."""

    def __init__(self, message: str, *, parameter: str | None = None, value: Any = None) -> None:
        super().__init__(message)
        self.parameter, self.value = parameter, value

    def __str__(self) -> str:
        return f"{super().__str__()} (parameter={self.parameter}, value={self.value})"


class VLLMClientError(Exception):
    """vllm.exceptions.VLLMClientError: the base of request errors in newer vLLM releases."""


class LocalEntryNotFoundError(FileNotFoundError):
    """huggingface_hub.errors.LocalEntryNotFoundError (offline and not cached)."""


def sampling_params(**kw: Any) -> dict[str, Any]:
    """vllm.SamplingParams' checks: unknown keywords and out-of-range values are refused."""
    known = {"n", "max_tokens", "temperature", "top_p", "seed", "stop", "logprobs", "top_k",
             "structured_outputs"}
    if unknown := set(kw) - known:
        raise TypeError(f"Unexpected keyword argument {sorted(unknown)[0]!r}")
    if kw.get("temperature", 0) < 0:
        raise VLLMValidationError(f"temperature must be non-negative, got {kw['temperature']}.",
                                  parameter="temperature", value=kw["temperature"])
    return kw


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int | None = None
    """Prompt tokens served from the prefix cache (vLLM V1; absent or None in older releases)."""


class ChatMLTokenizer:
    """A tokenizer with a ChatML template; one token per character."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def apply_chat_template(self, messages: list[dict[str, Any]], **kw: Any) -> str:
        self.calls.append(kw)
        assert kw["tokenize"] is False
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        if kw["continue_final_message"]:
            return text.removesuffix("<|im_end|>\n")
        return text + ("<|im_start|>assistant\n" if kw["add_generation_prompt"] else "")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert add_special_tokens is False
        return [ord(c) for c in text]


def word_logprobs(words: list[str]) -> list[dict[int, Logprob]]:
    """Per position: the sampled token (id = position) and a less likely alternative."""
    return [
        {i: Logprob(-0.1, 1, w), 1000 + i: Logprob(-2.5, 2, "?")} for i, w in enumerate(words)
    ]


@dataclass
class FakeEngine:
    """vLLM's AsyncLLM surface: cumulative outputs, one step per word, `abort`."""

    replies: list[str]
    step_s: float = 0.001
    fail_after: int | None = None
    failure: BaseException | None = None
    """Raised by `generate` before any output (as vLLM raises a request it refuses)."""
    prompts: list[Any] = field(default_factory=list)
    params: list[dict[str, Any]] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)

    async def generate(self, prompt: Any, params: dict[str, Any], request_id: str):
        self.prompts.append(prompt)
        self.params.append(params)
        if self.failure is not None:
            raise self.failure
        n, limit = params["n"], params["max_tokens"]
        words = [reply.split(" ") for reply in self.replies[:n]]
        words = [[w if j == 0 else " " + w for j, w in enumerate(ws)][:limit] for ws in words]
        steps = max(len(ws) for ws in words)
        try:
            for step in range(1, steps + 1):
                if self.fail_after is not None and step > self.fail_after:
                    try:  # AsyncLLM.generate wraps an unexpected failure like this
                        raise RuntimeError("CUDA error: out of memory")
                    except RuntimeError as err:
                        raise EngineGenerateError() from err
                await asyncio.sleep(self.step_s)
                outputs = []
                for index, ws in enumerate(words):
                    done = ws[:step]
                    finish = None
                    if step >= len(ws):
                        finish = "length" if len(ws) == limit else "stop"
                    outputs.append(CompletionOutput(
                        index, "".join(done), list(range(len(done))),
                        word_logprobs(done) if params.get("logprobs") else None, finish,
                    ))
                yield RequestOutput(request_id, prompt["prompt_token_ids"], outputs,
                                    finished=step == steps)
        except asyncio.CancelledError:
            self.cancelled.append(request_id)
            raise

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def fake_loader(engine: FakeEngine, loads: list[str] | None = None, max_model_len: int = 4096,
                tokenizer: Any = None):
    async def load(model: str, options: dict[str, Any]) -> VLLMBackend:
        if loads is not None:
            loads.append(model)
        if options.get("broken"):
            raise RuntimeError("no CUDA device")
        return VLLMBackend(engine, tokenizer or ChatMLTokenizer(), max_model_len, sampling_params,
                           lambda constraint: {"structured_outputs": constraint})

    return load


@pytest.fixture(autouse=True)
def _release_engines():
    yield
    shutdown_engines()


def make_engine(engine: FakeEngine, **kw: Any) -> VLLMEngine:
    spec = ProviderSpec(prefix="vllm", kind="vllm", key_required=False,
                        options=kw.pop("options", {}))
    return VLLMEngine(spec, None, loader=fake_loader(engine, **kw))


def request(**kw: Any) -> ChatRequest:
    kw.setdefault("messages", QUESTION)
    kw.setdefault("max_tokens", 32)
    return ChatRequest(model="org/small-model", **kw)


# --- pure functions -------------------------------------------------------------------------


def test_sampling_kwargs_map_the_request() -> None:
    req = request(temperature=0.7, top_p=0.9, seed=3, stop=["\n\n"], n=3, max_tokens=50,
                  logprobs=True, top_logprobs=5, extra={"top_k": 20})
    assert sampling_kwargs(req, prompt_tokens=10, max_model_len=1000) == {
        "n": 3, "max_tokens": 50, "temperature": 0.7, "top_p": 0.9, "seed": 3,
        "stop": ["\n\n"], "logprobs": 5, "top_k": 20,
    }
    plain = sampling_kwargs(request(max_tokens=None), prompt_tokens=10, max_model_len=100)
    assert plain == {"n": 1, "max_tokens": 90}, "no max_tokens: the rest of the context"
    assert sampling_kwargs(request(max_tokens=500), 10, 100)["max_tokens"] == 90
    assert sampling_kwargs(request(logprobs=True), 10, 100)["logprobs"] == 1
    with pytest.raises(ProviderError, match="more than the context"):
        sampling_kwargs(request(), prompt_tokens=100, max_model_len=100)


def test_render_prompt_opens_or_continues_the_assistant_turn() -> None:
    tok = ChatMLTokenizer()
    fresh = "".join(map(chr, render_prompt(tok, QUESTION, continue_final=False)))
    assert fresh.endswith("<|im_start|>assistant\n")
    messages = [*QUESTION, {"role": "assistant", "content": "Red, green"}]
    cont = "".join(map(chr, render_prompt(tok, messages, continue_final=True)))
    assert cont.endswith("<|im_start|>assistant\nRed, green")
    assert tok.calls[-1]["continue_final_message"] is True
    assert tok.calls[-1]["add_generation_prompt"] is False


def test_to_logprobs_takes_the_sampled_token_and_the_top_k() -> None:
    positions = [
        {7: Logprob(-0.5, 2, " blue"), 3: Logprob(-0.2, 1, " red"), 9: Logprob(-3.0, 3, " x")},
        {4: Logprob(-0.01, 1, ",")},
    ]
    out = to_logprobs(positions, [7, 4], start=0, top=2)
    assert [(t.token, t.logprob) for t in out] == [(" blue", -0.5), (",", -0.01)]
    assert out[0].top == [(" red", -0.2), (" blue", -0.5)]
    assert [t.token for t in to_logprobs(positions, [7, 4], start=1, top=1)] == [","]


def test_tracker_turns_cumulative_outputs_into_per_choice_deltas() -> None:
    tracker = ChoiceTracker()
    steps = [
        [CompletionOutput(0, "Red", [1]), CompletionOutput(1, "Blue", [1])],
        # a step the engine's collector replaced: only the latest cumulative output arrives
        [CompletionOutput(0, "Red, green", [1, 2, 3]), CompletionOutput(1, "Blue.", [1, 2], None,
                                                                          "stop")],
        [CompletionOutput(0, "Red, green, blue", [1, 2, 3, 4, 5], None, "length"),
         CompletionOutput(1, "Blue.", [1, 2], None, "stop")],
    ]
    deltas = [d for outs in steps for d in tracker.update(RequestOutput("r", [0] * 9, outs))]
    for index, expected in ((0, "Red, green, blue"), (1, "Blue.")):
        mine = [d for d in deltas if d.index == index]
        assert "".join(d.text for d in mine) == expected
        assert [d.finish_reason for d in mine if d.finish_reason] == [
            "length" if index == 0 else "stop"
        ]
        assert mine[-1].usage is not None and not mine[-1].text
    usage = {d.index: d.usage for d in deltas if d.usage}
    assert (usage[0].prompt_tokens, usage[0].completion_tokens) == (9, 5)
    assert (usage[1].prompt_tokens, usage[1].completion_tokens) == (0, 2), "prompt counted once"


def test_tracker_reports_prefix_cache_hits_as_cached_tokens() -> None:
    done = [CompletionOutput(0, "Red.", [1, 2], None, "stop"),
            CompletionOutput(1, "Blue.", [1, 2], None, "stop")]
    hit = ChoiceTracker().update(RequestOutput("r", [0] * 48, done, True, num_cached_tokens=32))
    usage = {d.index: d.usage for d in hit if d.usage}
    assert (usage[0].prompt_tokens, usage[0].cached_tokens) == (48, 32)
    assert (usage[1].prompt_tokens, usage[1].cached_tokens) == (0, 0), "prompt counted once"
    miss = ChoiceTracker().update(RequestOutput("r", [0] * 48, done[:1], True))
    assert next(d.usage for d in miss if d.usage).cached_tokens == 0


# --- the engine with a stand-in vLLM --------------------------------------------------------


def test_streams_deltas_usage_and_sends_the_rendered_prompt() -> None:
    fake = FakeEngine(["Red, green and blue."])
    engine = make_engine(fake)

    async def main():
        return [d async for d in engine.stream(request(temperature=0.2))]

    deltas = anyio.run(main)
    assert [d.text for d in deltas if d.text] == ["Red,", " green", " and", " blue."]
    assert [d.finish_reason for d in deltas if d.finish_reason] == ["stop"]
    prompt = fake.prompts[0]["prompt_token_ids"]
    assert "".join(map(chr, prompt)).endswith("<|im_start|>assistant\n")
    (usage,) = [d.usage for d in deltas if d.usage]
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt), 4)
    assert fake.params[0]["temperature"] == 0.2
    assert fake.aborted == [], "a finished request is not aborted"


def test_n_samples_fan_out_into_separate_choices() -> None:
    fake = FakeEngine(["Red.", "Blue and green.", "Yellow, then red."])
    engine = make_engine(fake)
    out = anyio.run(engine.complete, request(n=3, seed=1, logprobs=True, top_logprobs=2))
    assert [c.text for c in out] == ["Red.", "Blue and green.", "Yellow, then red."]
    assert len(fake.prompts) == 1, "one engine request serves every sample"
    assert [len(c.logprobs or []) for c in out] == [1, 3, 3]
    assert out[1].logprobs[1].token == " and" and len(out[1].logprobs[1].top) == 2
    assert out[0].usage.completion_tokens == 1 + 3 + 3
    assert out[0].usage.prompt_tokens == len(fake.prompts[0]["prompt_token_ids"])


def test_logprobs_only_when_asked() -> None:
    fake = FakeEngine(["Red and blue."])
    out = anyio.run(make_engine(fake).complete, request())
    assert out[0].logprobs is None and "logprobs" not in fake.params[0]


def test_max_tokens_gives_finish_reason_length() -> None:
    fake = FakeEngine(["one two three four five six"])
    out = anyio.run(make_engine(fake).complete, request(max_tokens=2))
    assert out[0].text == "one two" and out[0].finish_reason == "length"


def test_continuation_leaves_the_assistant_turn_open() -> None:
    fake = FakeEngine(["blue."])
    messages = [*QUESTION, {"role": "assistant", "content": "Red, green and"}]
    anyio.run(make_engine(fake).complete, request(messages=messages, continue_final=True))
    text = "".join(map(chr, fake.prompts[0]["prompt_token_ids"]))
    assert text.endswith("<|im_start|>assistant\nRed, green and")


def test_closing_the_stream_aborts_the_request() -> None:
    fake = FakeEngine([" ".join(["word"] * 500)], step_s=0.002)
    engine = make_engine(fake)

    async def main():
        stream = engine.stream(request(max_tokens=500))
        got = []
        async for delta in stream:
            got.append(delta.text)
            if len(got) == 3:
                break
        await stream.aclose()
        return got

    got = anyio.run(main)
    assert len(got) == 3
    assert len(fake.aborted) == 1 and fake.aborted[0].startswith("moa-")
    assert fake.cancelled == fake.aborted, "the engine-side generation was cancelled too"


def test_cancelling_the_caller_aborts_the_request() -> None:
    fake = FakeEngine([" ".join(["word"] * 500)], step_s=0.002)
    engine = make_engine(fake)

    async def main():
        with anyio.move_on_after(0.05):
            await engine.complete(request(max_tokens=500))

    anyio.run(main)
    assert len(fake.aborted) == 1


def test_one_engine_per_model_shared_across_providers_and_event_loops() -> None:
    fake, loads = FakeEngine(["Red."]), []
    loader = fake_loader(fake, loads)
    spec = ProviderSpec(prefix="vllm", kind="vllm", key_required=False, options={"dtype": "half"})
    first, second = VLLMEngine(spec, None, loader=loader), VLLMEngine(spec, None, loader=loader)
    anyio.run(first.complete, request())
    anyio.run(second.complete, request())  # a new event loop, as `Mixture.run_sync` makes

    async def together():
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(first.complete, request())

    anyio.run(together)
    assert loads == ["org/small-model"]
    assert len(fake.prompts) == 5


def test_load_failure_and_engine_failure_are_clear_errors() -> None:
    broken = make_engine(FakeEngine(["x"]), options={"broken": True})
    with pytest.raises(ConfigError, match="load 'org/small-model': RuntimeError: no CUDA"):
        anyio.run(broken.complete, request())
    failing = make_engine(FakeEngine(["a b c d e f"], fail_after=2))
    with pytest.raises(ProviderError) as caught:
        anyio.run(failing.complete, request())
    # the cause behind vLLM's empty EngineGenerateError, in one sentence
    assert str(caught.value) == (
        "vLLM failed on 'org/small-model': RuntimeError: CUDA error: out of memory."
    )


@pytest.mark.parametrize(
    ("kw", "failure", "says"),
    [
        ({"extra": {"top_kk": 5}}, None, "Unexpected keyword argument 'top_kk'"),
        ({"temperature": -1.0}, None, "temperature must be non-negative, got -1.0"),
        ({}, VLLMValidationError("logprobs must be at most 20", parameter="logprobs", value=50),
         "logprobs must be at most 20"),
        ({}, VLLMClientError("max_tokens must be at least 1"), "max_tokens must be at least 1"),
    ],
)
def test_bad_sampling_options_are_a_config_error(kw, failure, says) -> None:
    engine = make_engine(FakeEngine(["Red."], failure=failure))
    with pytest.raises(ConfigError) as caught:
        anyio.run(engine.complete, request(**kw))
    message = str(caught.value)
    assert message.startswith("vLLM refused the sampling options for 'org/small-model': ")
    assert says in message and ".." not in message and message.endswith(".")


# --- tools and structured outputs -------------------------------------------------------------


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TOOLS = [WEATHER]
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
LOOP = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"}]


class ToolTemplateTokenizer(ChatMLTokenizer):
    """A tokenizer whose chat template renders tools itself (as Qwen2.5's does)."""

    chat_template = "{% if tools %}...{% endif %}"

    def apply_chat_template(self, messages: list[dict[str, Any]], **kw: Any) -> str:
        self.calls.append({**kw, "messages": messages})
        return "".join(f"<|im_start|>{m['role']}\n{m.get('content') or ''}<|im_end|>\n"
                       for m in messages) + "<|im_start|>assistant\n"


def test_constraint_per_tool_choice_and_response_format() -> None:
    def of(**kw: Any) -> dict[str, Any] | None:
        req = request(**kw)
        return constraint(req, tool_plan(req))

    assert of() is None and of(tools=TOOLS) is None, "'auto' calls are parsed, not forced"
    assert of(tools=TOOLS, tool_choice="required") == {"json": call_schema(TOOLS)}
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert of(tools=TOOLS, tool_choice=named) == {"json": call_schema(TOOLS)}
    assert of(response_format={"type": "json_object"}) == {"json_object": True}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    assert of(response_format=fmt) == {"json": schema}
    assert of(response_format={"type": "text"}) is None
    with pytest.raises(ConfigError, match="cannot continue a reply under"):
        of(response_format=fmt, continue_final=True,
           messages=[*QUESTION, {"role": "assistant", "content": "{"}])


@pytest.mark.parametrize("name", ["StructuredOutputsParams", "GuidedDecodingParams"])
def test_structured_outputs_follow_the_installed_vllm(monkeypatch, name) -> None:
    """vLLM 0.10.2+ takes `structured_outputs=StructuredOutputsParams(...)`; older releases
    `guided_decoding=GuidedDecodingParams(...)` (the same fields: json, json_object, ...)."""

    @dataclass
    class Params:
        json: Any = None
        json_object: bool | None = None

    module = types.ModuleType("vllm.sampling_params")
    setattr(module, name, Params)
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", module)
    keywords = structured_outputs()({"json_object": True})
    key = "structured_outputs" if name == "StructuredOutputsParams" else "guided_decoding"
    assert keywords == {key: Params(json_object=True)}


def test_render_prompt_gives_tools_to_a_template_that_knows_them() -> None:
    native = ToolTemplateTokenizer()
    render_prompt(native, LOOP, False, tool_plan(request(tools=TOOLS)))
    sent = native.calls[-1]
    assert sent["tools"] == TOOLS
    assert sent["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"}
    render_prompt(native, LOOP, False, tool_plan(request(tools=TOOLS, tool_choice="none")))
    assert "tools" not in native.calls[-1], "'none': the template is not given the tools"
    plain = ChatMLTokenizer()
    text = "".join(map(chr, render_prompt(plain, LOOP, False, tool_plan(request(tools=TOOLS)))))
    assert text.startswith("<|im_start|>system\nYou can use these tools")
    assert '<|im_start|>assistant\n<tool_call>{"name": "get_weather"' in text
    assert "<|im_start|>user\nThe tool get_weather (call call_1) returned: Sunny" in text
    assert "tools" not in plain.calls[-1]


def test_a_forced_call_is_a_constrained_bare_json_call() -> None:
    fake = FakeEngine(['{"name": "get_weather", "arguments": {"city": "Paris"}}'])
    engine = make_engine(fake, tokenizer=ToolTemplateTokenizer())
    (out,) = anyio.run(engine.complete, request(tools=TOOLS, tool_choice="required"))
    assert fake.params[0]["structured_outputs"] == {"json": call_schema(TOOLS)}
    assert out.text == "" and out.finish_reason == "tool_calls"
    (call,) = out.tool_calls
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_") and out.usage.completion_tokens == 5


def test_auto_parses_tool_call_replies_and_streams_text_ones() -> None:
    fake = FakeEngine(['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
                       "</tool_call>", "I cannot tell the weather."])

    async def main():
        engine = make_engine(fake)
        return [d async for d in engine.stream(request(tools=TOOLS, n=2))]

    got = anyio.run(main)
    assert "structured_outputs" not in fake.params[0]
    first = [d for d in got if d.index == 0]
    assert not any(d.text for d in first)
    (call,) = [d for d in first if d.tool_calls]
    assert call.finish_reason == "tool_calls" and call.tool_calls[0].name == "get_weather"
    second = [d.text for d in got if d.index == 1 and d.text]
    assert second == ["I", " cannot", " tell", " the", " weather."]
    assert [d.index for d in got if d.usage] == [0, 1]


def test_response_format_becomes_a_structured_output() -> None:
    fake = FakeEngine(['{"a": 1}'])
    out = anyio.run(make_engine(fake).complete, request(response_format={"type": "json_object"}))
    assert fake.params[0]["structured_outputs"] == {"json_object": True}
    assert out[0].text == '{"a": 1}' and not out[0].tool_calls


def fake_vllm(monkeypatch, *, device_type: str = "cuda", load_error: BaseException | None = None):
    """A `vllm` package with the names load_vllm imports; the engine start fails as told."""

    class AsyncEngineArgs:
        def __init__(self, model: str, enable_prefix_caching: bool, disable_log_stats: bool,
                     gpu_memory_utilization: float = 0.9) -> None:
            self.model = model
            self.enable_prefix_caching = enable_prefix_caching

    class AsyncLLM:
        @classmethod
        def from_engine_args(cls, args: AsyncEngineArgs) -> AsyncLLM:
            ENGINE_ARGS.append(args)
            if load_error is not None:
                raise load_error
            raise AssertionError("not reached in these tests")

    modules = {
        "vllm": {"AsyncEngineArgs": AsyncEngineArgs, "SamplingParams": sampling_params},
        "vllm.platforms": {"current_platform": types.SimpleNamespace(device_type=device_type)},
        "vllm.v1": {},
        "vllm.v1.engine": {},
        "vllm.v1.engine.async_llm": {"AsyncLLM": AsyncLLM},
    }
    for name, attrs in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)


ENGINE_ARGS: list[Any] = []
"""The AsyncEngineArgs each fake engine start was given."""


def load_error_of(**options: Any) -> str:
    spec = ProviderSpec(prefix="vllm", kind="vllm", key_required=False, options=options)
    engine = VLLMEngine(spec, None, loader=load_vllm)
    with pytest.raises(ConfigError) as caught:
        anyio.run(engine.complete, request())
    message = str(caught.value)
    assert ".." not in message and message.endswith(".")
    return message


def test_without_a_gpu_the_error_says_one_is_needed_and_local_runs_on_the_cpu(
    monkeypatch,
) -> None:
    fake_vllm(monkeypatch, device_type="")  # what vllm's CUDA build reports with no GPU
    message = load_error_of()
    assert "vLLM needs a CUDA GPU" in message and "`local/` models run on the CPU" in message
    assert "Device string" not in message


def test_prefix_caching_is_on_by_default_and_an_option_turns_it_off(monkeypatch) -> None:
    fake_vllm(monkeypatch, load_error=RuntimeError("stop after the engine arguments"))
    ENGINE_ARGS.clear()
    load_error_of()
    load_error_of(enable_prefix_caching=False)
    assert [a.enable_prefix_caching for a in ENGINE_ARGS] == [True, False]


def test_an_unknown_engine_option_is_named(monkeypatch) -> None:
    fake_vllm(monkeypatch)
    message = load_error_of(gpu_mem=0.5)
    assert message.startswith("Unknown vLLM engine option: ") and "'gpu_mem'" in message


def test_offline_and_uncached_the_advice_is_what_moa_exposes(monkeypatch) -> None:
    try:
        raise LocalEntryNotFoundError(
            "Cannot find an appropriate cached snapshot folder for the specified revision on "
            "the local disk and outgoing traffic has been disabled. To enable repo look-ups and "
            "downloads online, pass 'local_files_only=False' as input."
        )
    except LocalEntryNotFoundError as err:
        wrapped = OSError("org/small-model does not appear to have a file named config.json.")
        wrapped.__cause__ = err
    fake_vllm(monkeypatch, load_error=wrapped)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = load_error_of()
    assert "not in the Hugging Face cache and HF_HUB_OFFLINE is set" in message
    assert "hf download org/small-model" in message and "vllm//path/to/model" in message
    assert "local_files_only" not in message


def test_importing_moa_and_the_adapter_never_imports_vllm_or_torch() -> None:
    code = (
        "import sys, moa, moa.local_engine.vllm_engine, moa.local_engine.llamacpp\n"
        "bad = {'vllm', 'torch', 'llama_cpp'} & set(sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_without_vllm_the_reference_names_the_extra() -> None:
    from moa.providers.registry import Registry

    with pytest.raises(ConfigError, match=r"\.\[vllm\]"):
        Registry().resolve("vllm/Qwen/Qwen2.5-0.5B-Instruct")


# --- the real engine on a GPU ---------------------------------------------------------------


GPU_MODEL_DEFAULT = "HuggingFaceTB/SmolLM2-135M-Instruct"
GPU_MODEL_HOW = (
    "set MOA_VLLM_TEST_MODEL to a local model folder or a Hugging Face id vLLM can load, or "
    f"download the default once: hf download {GPU_MODEL_DEFAULT}"
)


def _gpu_model() -> tuple[str | None, str]:
    """The model for the GPU test and, when it cannot run here, why and what to do."""
    if importlib.util.find_spec("vllm") is None:
        return None, "vllm is not installed (pip install -e '.[vllm]' from a checkout)"
    import torch

    if not torch.cuda.is_available():
        return None, "no CUDA GPU (vLLM needs one; the `local/` engine tests run on the CPU)"
    if model := os.environ.get("MOA_VLLM_TEST_MODEL"):
        return model, ""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(GPU_MODEL_DEFAULT, "config.json"), str):
        return GPU_MODEL_DEFAULT, ""
    return None, f"{GPU_MODEL_DEFAULT} is not in the Hugging Face cache: {GPU_MODEL_HOW}"


@pytest.mark.gpu
def test_real_vllm_engine_on_a_gpu() -> None:
    """A small model end to end: streaming, prefix-cache hits in the usage, n>1, logprobs,
    continuation, a forced tool call, a tool result turn, a JSON response format, abort.

    The model is `MOA_VLLM_TEST_MODEL` (a local model folder or a Hugging Face id), by default
    HuggingFaceTB/SmolLM2-135M-Instruct when it is in the Hugging Face cache (the safetensors
    release of the bundled CPU model). Skips, saying what is missing, without vllm, a CUDA GPU
    or a model.
    """
    model, reason = _gpu_model()
    if model is None:
        pytest.skip(reason)
    spec = ProviderSpec(prefix="vllm", kind="vllm", key_required=False,
                        options={"gpu_memory_utilization": 0.3, "max_model_len": 2048})
    engine = VLLMEngine(spec)

    def ask(**kw: Any) -> ChatRequest:
        kw.setdefault("messages", QUESTION)
        kw.setdefault("max_tokens", 24)
        return ChatRequest(model=model, **kw)

    async def main():
        deltas = [d async for d in engine.stream(ask(temperature=0.0))]
        texts = [d.text for d in deltas if d.text]
        assert len(texts) >= 2 and next(d.usage for d in deltas if d.usage).completion_tokens > 0
        long = [{"role": "user", "content": "Summarise: " + "Prefix caching reuses KV. " * 40}]
        await engine.complete(ask(messages=long, max_tokens=2))
        again = await engine.complete(ask(messages=long, max_tokens=2))
        assert again[0].usage.cached_tokens >= 16, "the prefix cache's hits are reported"
        samples = await engine.complete(ask(n=3, temperature=0.9, seed=1, logprobs=True))
        assert len(samples) == 3 and all(s.text and s.logprobs for s in samples)
        head = "".join(texts)[:8]
        cont = await engine.complete(
            ask(messages=[*QUESTION, {"role": "assistant", "content": head}], continue_final=True)
        )
        assert cont[0].text
        with pytest.raises(ConfigError, match="vLLM refused the sampling options"):
            await engine.complete(ask(temperature=-1.0))
        forced = await engine.complete(ask(messages=LOOP[:1], tools=TOOLS, tool_choice="required",
                                           temperature=0.0, max_tokens=128))
        assert forced[0].finish_reason == "tool_calls", forced[0].text
        assert forced[0].tool_calls[0].name == "get_weather"
        assert isinstance(json.loads(forced[0].tool_calls[0].arguments), dict)
        answer = await engine.complete(ask(messages=LOOP, tools=TOOLS, temperature=0.0))
        assert answer[0].text or answer[0].tool_calls  # the tool turn renders; the model decides
        typed = await engine.complete(ask(response_format={"type": "json_object"},
                                          temperature=0.0, max_tokens=128))
        if typed[0].finish_reason == "stop":
            assert isinstance(json.loads(typed[0].text), dict)
        stream = engine.stream(ask(max_tokens=1000, temperature=0.9))
        async for _ in stream:
            break
        await stream.aclose()

    anyio.run(main)
