"""The embedded llama.cpp engine with the real bundled SmolLM2-135M model (short generations)."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from moa.errors import ConfigError
from moa.providers.base import ChatRequest
from moa.providers.registry import ProviderSpec, Registry

pytestmark = pytest.mark.slow  # the real model: deselect with -m "not slow" for quick runs

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (moa-stack[local]) missing")

from moa.local_engine.llamacpp import (  # noqa: E402
    ModelPool,
    model_pool,
    prompt_slices,
    render_prompt,
)
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


def test_greedy_output_does_not_depend_on_what_the_instance_ran_before(engine) -> None:
    """llama.cpp computes a token evaluated alone differently from one inside a batch; a
    prompt found whole in the cache used to be finished by a lone token, which changed the
    greedy answer to this question. Now cold, exact-hit and prefix-hit runs agree."""
    other = request(messages=[{"role": "user", "content": "Name three animals."}], max_tokens=4)
    anyio.run(engine.complete, other)  # only the template's head is shared with QUESTION
    cold = anyio.run(engine.complete, request(max_tokens=16))[0].text
    cached = anyio.run(engine.complete, request(max_tokens=16))[0].text  # whole prompt cached
    anyio.run(engine.complete, other)
    prefix = anyio.run(engine.complete, request(max_tokens=16))[0].text
    assert cold == cached == prefix


def test_prompt_slices_never_evaluate_a_lone_token() -> None:
    assert prompt_slices(0, 10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert prompt_slices(0, 9, 4) == [(0, 4), (4, 7), (7, 9)]
    assert prompt_slices(3, 5, 512) == [(3, 5)]
    assert prompt_slices(0, 1, 512) == [(0, 1)]  # a one-token prompt has no other way


def test_continuation_continues_the_assistant_turn(engine) -> None:
    full = anyio.run(engine.complete, request(max_tokens=16))[0].text
    head = full[: len(full) // 2]
    messages = [*QUESTION, {"role": "assistant", "content": head}]
    follow = request(messages=messages, max_tokens=16, continue_final=True)
    warm = anyio.run(engine.complete, follow)[0].text  # the answer's own tokens are cached
    anyio.run(engine.complete, request(messages=[{"role": "user", "content": "Hi"}], max_tokens=2))
    cold = anyio.run(engine.complete, follow)[0].text
    # Continuing from a cache that holds the interrupted answer is the same as from scratch,
    # and it carries the turn on instead of starting a new answer.
    assert warm == cold and warm.strip()
    assert not (head + warm).lstrip().startswith(head.lstrip() + full[:8])


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
    holding = anyio.Event()

    async def stepper() -> None:
        for step in range(4):
            async with pool.claim():
                order.append("step")
                if not step:  # hold the model until the proposer has queued for it
                    holding.set()
                    while not pool.queue:
                        await anyio.lowlevel.checkpoint()

    async def proposer() -> None:
        await holding.wait()  # arrives while the first step holds the model
        async with pool.claim():
            order.append("proposer")

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(stepper)
            tg.start_soon(proposer)

    anyio.run(main)
    assert order == ["step", "proposer", "step", "step", "step"]
    assert not pool.queue


def test_the_queue_starts_every_agent_then_serves_the_deepest_steps_first() -> None:
    """Requests that start an answer go first, in arrival order (an agent that has not spoken
    binds no aggregator, so it must not be overtaken by steps that could finish without it);
    then continuations, the deepest stage first (the final answer's steps wait behind no
    refiner's), in arrival order within a stage."""
    import threading
    from types import SimpleNamespace

    pool = ModelPool(Path("unused.gguf"), False, {}, 1,
                     instances=[SimpleNamespace(busy=threading.Lock())])  # type: ignore[list-item]
    order: list[str] = []
    holding, queued = anyio.Event(), anyio.Event()
    arrivals = [("refiner A step", 1, True), ("final step", 2, True), ("proposer", 0, False),
                ("refiner B step", 1, True), ("final start", 2, False)]

    async def holder() -> None:
        async with pool.claim():
            holding.set()
            await queued.wait()  # every other request is in the queue
            order.append("holder")

    async def claim(name: str, priority: int, continues: bool, before: int) -> None:
        await holding.wait()
        while len(pool.queue) < before:  # join the queue in the order given
            await anyio.lowlevel.checkpoint()
        async with pool.claim(priority=priority, continues=continues):
            order.append(name)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(holder)
            for i, arrival in enumerate(arrivals):
                tg.start_soon(claim, *arrival, i)
            while len(pool.queue) < len(arrivals):
                await anyio.lowlevel.checkpoint()
            queued.set()

    anyio.run(main)
    assert order == ["holder", "proposer", "final start", "final step", "refiner A step",
                     "refiner B step"]
    assert not pool.queue


def test_a_mixture_gives_each_call_its_stage_depth() -> None:
    """Each stage's requests carry its depth as their priority (the engine's queue order)."""
    from moa.bench.staircase_coverage import Recorder
    from moa.mixture import Mixture
    from moa.testing import LoopbackServer, ModelBehavior

    calls: list[ChatRequest] = []

    class Recording(Registry):
        def resolve(self, ref: str):  # type: ignore[no-untyped-def]
            provider, model = super().resolve(ref)
            return Recorder(provider, calls), model

    models = {m: ModelBehavior(reply=f"{m} says hi") for m in ("p", "r", "a")}
    with LoopbackServer(models) as srv:
        config = {"layers": [{"agents": [{"model": "loop/p"}]}, {"agents": [{"model": "loop/r"}]}],
                  "aggregator": {"model": "loop/a"}, "mode": "layered"}
        Mixture(config, registry=Recording(srv.registry().specs())).run_sync("Q")
    assert sorted((c.model, c.priority) for c in calls) == [("a", 2), ("p", 0), ("r", 1)]
    assert all("priority" not in r.body for r in srv.requests if r.body), "never sent"


def test_n_samples_get_their_own_indexes(engine) -> None:
    async def main():
        return [d async for d in engine.stream(request(n=2, max_tokens=6, temperature=0.9,
                                                       seed=1))]

    deltas = anyio.run(main)
    assert [d.index for d in deltas] == sorted(d.index for d in deltas), "one sample, then next"
    for index in (0, 1):
        mine = [d for d in deltas if d.index == index]
        assert "".join(d.text for d in mine), f"sample {index} has no text"
        assert [d.finish_reason for d in mine if d.finish_reason] in (["stop"], ["length"])
        (usage,) = [d.usage for d in mine if d.usage]
        assert 0 < usage.completion_tokens <= 6


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


NO_NETWORK = """
import os, socket

def _refuse(what):
    with open(os.environ["MOA_TEST_NET_LOG"], "a") as log:
        log.write(f"{what}\\n")
    raise OSError(f"network blocked by the test: {what}")

_connect, _getaddrinfo = socket.socket.connect, socket.getaddrinfo

def connect(self, address):
    if self.family != socket.AF_UNIX and address[0] not in ("127.0.0.1", "::1", "localhost"):
        _refuse(address)
    return _connect(self, address)

def getaddrinfo(host, *args, **kwargs):
    if host not in (None, "127.0.0.1", "::1", "localhost"):
        _refuse(host)
    return _getaddrinfo(host, *args, **kwargs)

socket.socket.connect, socket.getaddrinfo = connect, getaddrinfo
"""


def test_main_command_answers_offline(tmp_path: Path) -> None:
    """The README's main job: `moa chat` with no key and no flags runs the local preset, with
    every connection beyond loopback refused (a sitecustomize in the subprocess)."""
    (tmp_path / "sitecustomize.py").write_text(NO_NETWORK)
    attempts = tmp_path / "attempts.txt"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "PYTHONPATH": str(tmp_path),
           "MOA_TEST_NET_LOG": str(attempts)}
    lookup = "import socket; socket.getaddrinfo('pypi.org', 443)"
    probe = subprocess.run([sys.executable, "-c", lookup],
                           capture_output=True, text=True, timeout=60, env=env)
    assert "network blocked by the test" in probe.stderr, "the block is not in place"
    attempts.unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "moa.cli", "chat", "--quiet", "--max-tokens", "8", "Hi!"],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert "Traceback" not in proc.stderr
    assert not attempts.exists(), attempts.read_text()


def test_a_cancel_stops_the_aggregators_long_prompt_evaluation(engine, caplog, capfd) -> None:
    """A cancel or deadline during a long prefill ends the call inside llama.cpp's decode
    (its abort callback), not after the whole prompt has been evaluated. llama.cpp's own log
    lines about it go to the `moa` logger at DEBUG (shown by --debug), not to the terminal."""
    import logging
    import threading

    from moa.runtime.prompts import Reference, aggregate_messages, readable_block

    anyio.run(engine.complete, request(max_tokens=1))  # load the instance
    model = model_pool(bundled_model_path(), False, {}).instances[0]
    answers = [f"Answer {i}: air scatters blue light more than red light. " * 60 for i in range(3)]
    messages = aggregate_messages(QUESTION, readable_block([Reference(a) for a in answers]))
    tokens = model.tokenize(render_prompt(model.formatter, messages, False)[0], bos=True)
    assert len(tokens) > 2 * model.llm.n_batch  # several slices: one uninterrupted call before
    decoding = threading.Event()

    class Probe(threading.Event):
        """The abort flag, which llama.cpp polls between the steps of a running decode."""

        def is_set(self) -> bool:
            decoding.set()
            return super().is_set()

    model.abort = Probe()

    async def main() -> bool:
        with anyio.CancelScope() as scope:

            async def cancel_once_decoding() -> None:
                await anyio.to_thread.run_sync(decoding.wait)
                scope.cancel()

            async with anyio.create_task_group() as tg:
                tg.start_soon(cancel_once_decoding)
                await engine.complete(request(messages=messages, max_tokens=8))
        return scope.cancelled_caught

    try:
        with caplog.at_level(logging.DEBUG, logger="moa.local_engine.llama_cpp"):
            assert anyio.run(main), "the call should end by cancellation"
    finally:
        model.abort = threading.Event()
    assert [r for r in caplog.records if r.name == "moa.local_engine.llama_cpp"]
    assert capfd.readouterr().err == ""
    assert len(model.evaluated) < model.llm.n_batch, "the prompt evaluation was not stopped"
    assert not model.busy.locked()
    after = anyio.run(engine.complete, request(max_tokens=4))  # the instance serves the next
    assert after[0].text


def test_a_gguf_without_chat_template_needs_a_named_chat_format(tmp_path: Path) -> None:
    import shutil

    plain = tmp_path / "no-template.gguf"
    shutil.copy(bundled_model_path(), plain)
    with plain.open("r+b") as handle:  # rename the metadata key in place (same length)
        head = handle.read(8 << 20)  # the metadata precedes the tensors
        at = head.index(b"tokenizer.chat_template")
        handle.seek(at)
        handle.write(b"tokenizer.chat_templatX")

    def provider(**options):
        spec = ProviderSpec(prefix="plain", kind="llamacpp", key_required=False,
                            options={"n_threads": 1, **options})
        return Registry([spec]).resolve(f"plain/{plain}")

    engine, model = provider()
    with pytest.raises(ConfigError, match=r"no chat template.*chat_format = \"chatml\""):
        anyio.run(engine.complete, ChatRequest(model=model, messages=QUESTION, max_tokens=2))
    engine, model = provider(chat_format="no-such-format")
    with pytest.raises(ConfigError, match=r"Unknown chat_format 'no-such-format'.*chatml"):
        anyio.run(engine.complete, ChatRequest(model=model, messages=QUESTION, max_tokens=2))
    engine, model = provider(chat_format="chatml")
    out = anyio.run(engine.complete, ChatRequest(model=model, messages=QUESTION, max_tokens=6,
                                                 temperature=0.0))
    assert out[0].text and out[0].usage.prompt_tokens > 5


LONG = "Consensus protocols such as Paxos and Raft let machines agree on a value. " * 6


def test_a_prompt_reuses_a_saved_prefix_after_other_prompts_ran() -> None:
    """The instance's KV holds the last prompt only; the one it drops is saved (KV state), so
    a prompt that extends it after another prompt ran in between (a conversation's next turn,
    an aggregator extending its advisors' prompt, a staircase step) evaluates only its new
    tokens, says so in `cached_tokens`, and answers as a fresh evaluation does."""
    def provider(**options):
        spec = ProviderSpec(prefix="saved", kind="llamacpp", key_required=False,
                            options={"n_batch": 64, **options})
        return Registry([spec]).resolve("saved/smollm2")[0]

    first = [{"role": "user", "content": LONG + "Name one of them."}]
    other = [{"role": "user", "content": "Name three animals, please, in one short line."}]
    extended = [*first, {"role": "assistant", "content": "Raft."},
                {"role": "user", "content": "And the other one?"}]
    diverged = [{"role": "user", "content": LONG + "Which is older?"}]

    def ask(engine, messages):
        return anyio.run(engine.complete, request(messages=messages, max_tokens=8))[0]

    engine = provider(prompt_cache_bytes=64 << 20)
    base = ask(engine, first)
    ask(engine, other)  # the instance's KV now holds another prompt
    pool = model_pool(bundled_model_path(), False, {"n_batch": 64,
                                                    "prompt_cache_bytes": 64 << 20})
    instance = pool.instances[0]
    assert pool.states is not None and len(pool.states.entries) == 1  # `first`, saved
    evaluated: list[int] = []
    real = instance.llm.eval
    instance.llm.eval = lambda batch: (evaluated.append(len(batch)), real(batch))[1]
    try:
        again = ask(engine, extended)
    finally:
        del instance.llm.eval
    prompt_evaluated = sum(n for n in evaluated if n > 1)  # generation evaluates one at a time
    usage = again.usage
    assert prompt_evaluated == usage.prompt_tokens - usage.cached_tokens
    assert usage.cached_tokens >= base.usage.prompt_tokens - 2, "the saved prompt is reused"
    assert prompt_evaluated < usage.prompt_tokens / 4
    assert pool.states.size <= 64 << 20

    ask(engine, other)
    part = ask(engine, diverged)  # leaves the saved prompts part way: only that part is reused
    assert base.usage.prompt_tokens / 2 < part.usage.cached_tokens < base.usage.prompt_tokens - 2

    fresh = provider(prompt_cache_bytes=0)  # no saved states: the same prompts evaluated anew
    ask(fresh, other)
    cold = ask(fresh, extended)
    assert cold.usage.cached_tokens < base.usage.prompt_tokens / 4
    assert cold.text == again.text
    ask(fresh, other)
    assert ask(fresh, diverged).text == part.text


def test_saved_prompt_states_stay_within_their_byte_limit() -> None:
    from moa.local_engine.llamacpp import PromptStates

    def state(size: int):
        return (ctypes.c_uint8 * size)()

    states = PromptStates(250)
    states.put((1, 2, 3), state(100))
    states.put((1, 2, 4), state(100))
    assert states.longest([1, 2, 3, 9]) == ((1, 2, 3), 3)
    states.get((1, 2, 3))  # now the most recently used
    states.put((5,), state(100))
    assert list(states.entries) == [(1, 2, 3), (5,)] and states.size == 200
    states.put((6,), state(300))  # larger than the limit: not kept
    assert (6,) not in states.entries and states.size <= 250
    assert states.covers([1, 2]) and not states.covers([1, 2, 3, 4])
