"""The embedded llama.cpp engine with the real bundled SmolLM2-135M model (short generations)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from moa.errors import ConfigError
from moa.providers.base import ChatRequest
from moa.providers.registry import ProviderSpec, Registry

pytestmark = pytest.mark.slow  # the real model: deselect with -m "not slow" for quick runs

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (moa-stack[local]) missing")

from moa.local_engine.llamacpp import ModelPool, model_pool, render_prompt  # noqa: E402
from moa.local_engine.model_files import bundled_model_path, resolve_model_path  # noqa: E402

QUESTION = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def engine():
    provider, model = Registry().resolve("local/smollm2")
    assert model == "smollm2"
    return provider


def request(**kw) -> ChatRequest:
    kw.setdefault("messages", QUESTION)
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0.0)
    return ChatRequest(model="smollm2", **kw)


def test_bundled_model_is_a_gguf() -> None:
    path = bundled_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert resolve_model_path("smollm2") == path


def test_streams_deltas_and_usage(engine) -> None:
    async def main():
        return [d async for d in engine.stream(request())]

    deltas = anyio.run(main)
    texts = [d.text for d in deltas if d.text]
    assert len(texts) >= 3, "tokens should arrive one by one"
    usage = [d.usage for d in deltas if d.usage]
    assert len(usage) == 1
    assert usage[0].prompt_tokens > 5
    assert 0 < usage[0].completion_tokens <= 12
    assert deltas[-2].finish_reason in ("stop", "length")


def test_greedy_is_deterministic_and_logprobs_only_when_asked(engine) -> None:
    plain = anyio.run(engine.complete, request())[0]
    assert plain.logprobs is None
    scored = anyio.run(engine.complete, request(logprobs=True, top_logprobs=3))[0]
    assert scored.text == plain.text
    assert scored.logprobs and len(scored.logprobs) >= 3
    first = scored.logprobs[0]
    assert first.logprob <= 0 and len(first.top) == 3
    assert max(lp for _, lp in first.top) >= first.logprob - 1e-6


def test_continuation_continues_the_assistant_turn(engine) -> None:
    full = anyio.run(engine.complete, request(max_tokens=16))[0].text
    head = full[: len(full) // 2]
    messages = [*QUESTION, {"role": "assistant", "content": head}]
    follow = request(messages=messages, max_tokens=16, continue_final=True)
    rest = anyio.run(engine.complete, follow)
    # Greedy decoding continued from the same prefix reproduces the rest of the same answer.
    assert (head + rest[0].text).startswith(full[: len(head) + 4].rstrip())


def test_render_prompt_leaves_the_assistant_turn_open(engine) -> None:
    pool = model_pool(bundled_model_path(), False, {})
    formatter = pool.instances[0].formatter if pool.instances else None
    if formatter is None:
        anyio.run(engine.complete, request(max_tokens=1))
        formatter = pool.instances[0].formatter
    messages = [*QUESTION, {"role": "assistant", "content": "Red, green"}]
    prompt, stop = render_prompt(formatter, messages, continue_final=True)
    assert "<|im_end|>" in stop
    assert prompt.endswith("<|im_start|>assistant\nRed, green")
    assert "<|im_end|>" not in prompt[-20:]
    fresh, _ = render_prompt(formatter, QUESTION, continue_final=False)
    assert fresh.endswith("<|im_start|>assistant\n")


def test_cancellation_stops_generation_and_frees_the_model(engine) -> None:
    pool = model_pool(bundled_model_path(), False, {})

    async def main():
        stream = engine.stream(request(max_tokens=400, temperature=0.7))
        got = []
        async for delta in stream:
            got.append(delta.text)
            if len(got) == 3:
                break
        await stream.aclose()
        assert not any(m.busy.locked() for m in pool.instances), "instance still generating"
        with anyio.fail_after(30):
            return got, await engine.complete(request(max_tokens=4))

    got, after = anyio.run(main)
    assert len(got) == 3
    assert after[0].usage.completion_tokens <= 4


def test_concurrent_requests_are_served(engine) -> None:
    results: dict[int, str] = {}

    async def one(i: int) -> None:
        messages = [{"role": "user", "content": f"Say the number {i}."}]
        results[i] = (await engine.complete(request(messages=messages, max_tokens=8)))[0].text

    async def main():
        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(one, i)

    anyio.run(main)
    assert sorted(results) == [0, 1, 2]
    assert all(results.values())


def test_parallel_pool_serves_two_at_once() -> None:
    spec = ProviderSpec(prefix="local2", kind="llamacpp", key_required=False,
                        options={"parallel": 2, "n_threads": 1})
    registry = Registry([spec])
    provider, _ = registry.resolve("local2/smollm2")

    async def main():
        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(provider.complete, request(max_tokens=6))

    anyio.run(main)
    pool = model_pool(bundled_model_path(), False, {"parallel": 2, "n_threads": 1})
    assert len(pool.instances) == 2


def test_a_request_that_keeps_coming_back_does_not_starve_the_queue() -> None:
    """A staircase aggregator claims the model step after step; a proposer queued during its
    first step must run before its second."""
    import threading
    from types import SimpleNamespace

    pool = ModelPool(Path("unused.gguf"), False, {}, 1,
                     instances=[SimpleNamespace(busy=threading.Lock())])  # type: ignore[list-item]
    order: list[str] = []

    async def stepper() -> None:
        for _ in range(4):
            async with pool.claim():
                order.append("step")
                await anyio.sleep(0.05)

    async def proposer() -> None:
        await anyio.sleep(0.02)  # arrives while the first step holds the model
        async with pool.claim():
            order.append("proposer")

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(stepper)
            tg.start_soon(proposer)

    anyio.run(main)
    assert order == ["step", "proposer", "step", "step", "step"]
    assert not pool.queue


def test_n_samples_get_their_own_indexes(engine) -> None:
    out = anyio.run(engine.complete, request(n=2, max_tokens=6, temperature=0.9, seed=1))
    assert len(out) == 2 and all(c.text for c in out)


def test_missing_and_corrupt_model_files(tmp_path: Path, engine) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_model_path(str(tmp_path / "absent.gguf"))
    text = tmp_path / "notes.gguf"
    text.write_text("hello")
    with pytest.raises(ConfigError, match="not a GGUF"):
        resolve_model_path(str(text))
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x00" * 64)
    bad = ChatRequest(model=str(corrupt), messages=QUESTION, max_tokens=2)
    with pytest.raises(ConfigError, match="could not load"):
        anyio.run(engine.complete, bad)


def test_self_moa_end_to_end_on_the_cpu() -> None:
    from moa.config import preset
    from moa.mixture import Mixture

    config = preset("local")
    for agent in config.agents():
        agent.max_tokens = 12
    result = Mixture(config).run_sync("What is 2 + 2?")
    assert result.text
    assert [o.ok for o in result.outputs] == [True] * 4
    proposals = [o.text for o in result.proposals(0)]
    assert len(proposals) == 3 and all(proposals)
    assert result.usage.completion_tokens > 0


def test_main_command_answers_offline() -> None:
    """The README's main job: `moa chat` with no key and no flags runs the local preset."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "moa.cli", "chat", "--quiet", "--max-tokens", "8", "Hi!"],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert "Traceback" not in proc.stderr
