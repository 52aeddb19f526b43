"""Cached prompt tokens: parsed from each backend's wire shape, priced, budgeted and shown.

Real sockets throughout: the loopback server (which reports prompt caching the way OpenAI does)
behind the real providers, the official `openai` SDK against `moa serve`, and the real
llama.cpp engine for its reused-KV count.
"""

from __future__ import annotations

import io
import tomllib
from collections.abc import Iterator

import anyio
import httpx
import openai
import pytest
from rich.console import Console

import moa
from moa import Mixture
from moa.cli.live import LiveView
from moa.cli.views import summary_line
from moa.config import from_dict
from moa.errors import ConfigError
from moa.events import RunFinished
from moa.openai.server import ServerThread, create_app
from moa.pricing import PRICES, cost, price_function, rates
from moa.providers.anthropic import AnthropicProvider
from moa.providers.base import ChatRequest, Usage
from moa.providers.openai_compat import OpenAICompatProvider, parse_usage
from moa.providers.registry import ProviderSpec
from moa.runtime.budget import Budget, BudgetGuard
from moa.testing import LoopbackServer, ModelBehavior
from moa.testing.behavior import cached_prefix, prompt_sequence
from moa.tokens import count_messages

QUESTION = " ".join(f"w{i}" for i in range(40))
"""40 loopback prompt tokens: above the loopback's default cache minimum of 32."""
ASK = [{"role": "user", "content": QUESTION}]
EPHEMERAL = {"type": "ephemeral"}


def openai_provider(srv: LoopbackServer) -> OpenAICompatProvider:
    return OpenAICompatProvider(
        ProviderSpec(prefix="o", base_url=srv.base_url, key_required=False), None
    )


def anthropic_provider(srv: LoopbackServer, **options: object) -> AnthropicProvider:
    spec = ProviderSpec(prefix="a", kind="anthropic", base_url=srv.anthropic_base_url,
                        key_required=False, options=options)
    return AnthropicProvider(spec, None)


def usages(provider, model: str, *requests: list[dict]) -> list[Usage]:
    """The usage of each request, sent one after the other."""

    async def main() -> list[Usage]:
        out = []
        for messages in requests:
            [done] = await provider.complete(ChatRequest(model=model, messages=messages))
            out.append(done.usage)
        await provider.aclose()
        return out

    return anyio.run(main)


# --- providers: each backend's wire shape ----------------------------------------------------


def test_openai_cached_tokens_from_the_streamed_usage_chunk_and_a_response_body() -> None:
    with LoopbackServer(default=ModelBehavior(reply="Fine.")) as srv:
        first, second = usages(openai_provider(srv), "m", ASK, ASK)
        body = httpx.post(f"{srv.base_url}/chat/completions",
                          json={"model": "m", "messages": ASK}).json()
    assert (first.prompt_tokens, first.cached_tokens) == (40, 0)
    assert (second.prompt_tokens, second.cached_tokens) == (40, 40)
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 40}
    assert parse_usage(body["usage"]) == Usage(40, 1, cached_tokens=40)
    # DeepSeek reports its cache hits in its own field.
    deepseek = {"prompt_tokens": 90, "completion_tokens": 5, "prompt_cache_hit_tokens": 64,
                "prompt_cache_miss_tokens": 26}
    assert parse_usage(deepseek) == Usage(90, 5, cached_tokens=64)


OPENAI_FINAL_CHUNK = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":"Hi"},"finish_reason":null}]}'
    b'\n\n'
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o",'
    b'"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}\n\n'
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o",'
    b'"choices":[],"usage":{"prompt_tokens":2006,"completion_tokens":300,"total_tokens":2306,'
    b'"prompt_tokens_details":{"cached_tokens":1920,"audio_tokens":0},'
    b'"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,'
    b'"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}\n\n'
    b"data: [DONE]\n\n"
)
"""OpenAI's stream with `include_usage`, as the API sends it."""


def anthropic_stream(delta_usage: bytes) -> bytes:
    """A Messages stream as the API sends it after a cache read and a cache write."""
    return (
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1",'
        b'"type":"message","role":"assistant","content":[],"model":"claude-sonnet-4-0",'
        b'"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":21,'
        b'"cache_creation_input_tokens":188,"cache_read_input_tokens":1800,'
        b'"output_tokens":1}}}\n\n'
        b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
        b'"content_block":{"type":"text","text":""}}\n\n'
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":"Hello"}}\n\n'
        b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":'
        b'"end_turn","stop_sequence":null},"usage":' + delta_usage + b"}\n\n"
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    )


def test_real_wire_shapes_of_openai_and_anthropic_usage() -> None:
    with LoopbackServer(default=None) as srv:
        srv.set_behavior("gpt", ModelBehavior(raw_sse=OPENAI_FINAL_CHUNK))
        [chat] = usages(openai_provider(srv), "gpt", ASK)
        assert chat == Usage(2006, 300, cached_tokens=1920)
        # message_delta with only the output count, and with cumulative counts (newer API)
        for delta in (b'{"output_tokens":15}',
                      b'{"input_tokens":21,"cache_creation_input_tokens":188,'
                      b'"cache_read_input_tokens":1800,"output_tokens":15}'):
            srv.set_behavior("claude", ModelBehavior(raw_sse=anthropic_stream(delta)))
            [claude] = usages(anthropic_provider(srv), "claude", ASK)
            assert claude == Usage(21 + 188 + 1800, 15, cached_tokens=1800,
                                   cache_write_tokens=188)
            assert claude.uncached_prompt_tokens == 21 + 188


def test_anthropic_reads_and_writes_over_the_loopback() -> None:
    chat = [{"role": "system", "content": QUESTION}, {"role": "user", "content": "Hi there."}]
    with LoopbackServer(default=ModelBehavior(reply="Hello.")) as srv:
        first, second = usages(anthropic_provider(srv), "c", chat, chat)
    # The first call writes the marked system prompt; the second reads the whole prompt.
    assert first == Usage(42, 1, cached_tokens=0, cache_write_tokens=40)
    assert second == Usage(42, 1, cached_tokens=42, cache_write_tokens=0)


# --- Anthropic cache_control -----------------------------------------------------------------


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is MoA?"},
    {"role": "assistant", "content": "A mixture of agents."},
    {"role": "user", "content": "Who proposed it?"},
]


def test_anthropic_marks_the_system_prompt_and_the_message_before_the_last_user_turn() -> None:
    with LoopbackServer(default=ModelBehavior(reply="Wang et al.")) as srv:
        usages(anthropic_provider(srv), "c", CONVERSATION)
        body = srv.requests[-1].body
    assert body is not None
    assert body["system"] == [{"type": "text", "text": "Be brief.", "cache_control": EPHEMERAL}]
    assert body["messages"] == [
        {"role": "user", "content": "What is MoA?"},
        {"role": "assistant", "content": [{"type": "text", "text": "A mixture of agents.",
                                           "cache_control": EPHEMERAL}]},
        {"role": "user", "content": "Who proposed it?"},
    ]
    assert CONVERSATION[2]["content"] == "A mixture of agents.", "the request is not changed"


def test_anthropic_breakpoints_with_a_prefill_within_four_and_switched_off() -> None:
    with LoopbackServer(default=ModelBehavior(reply="Wang et al. proposed it.")) as srv:
        provider = anthropic_provider(srv)
        prefill = [*CONVERSATION, {"role": "assistant", "content": "Wang"}]
        body, _, _ = provider.body(ChatRequest(model="c", messages=prefill, continue_final=True))
        # the final user turn is before the prefill: the assistant turn before it is marked
        assert body["messages"][1]["content"][-1]["cache_control"] == EPHEMERAL
        assert body["messages"][-1] == {"role": "assistant", "content": "Wang"}
        # a request that already carries 3 breakpoints gets one more (the system prompt)
        marked = [{"type": "text", "text": f"part {i}", "cache_control": EPHEMERAL}
                  for i in range(3)]
        crowded = [CONVERSATION[0], {"role": "user", "content": marked}, *CONVERSATION[2:]]
        body, _, _ = provider.body(ChatRequest(model="c", messages=crowded))
        assert body["system"][0]["cache_control"] == EPHEMERAL
        assert body["messages"][1]["content"] == "A mixture of agents.", "no room left"
        off = anthropic_provider(srv, cache_control=False)
        usages(off, "c", CONVERSATION)
        sent = srv.requests[-1].body
    assert sent is not None and "cache_control" not in str(sent)
    assert sent["system"] == "Be brief."


# --- prices, cost and budgets ----------------------------------------------------------------


def test_cost_bills_cached_reads_and_writes_at_their_rates() -> None:
    usage = Usage(1_000_000, 1_000_000, cached_tokens=600_000, cache_write_tokens=100_000)
    table = {"x/two": (1.0, 2.0), "x/three": (1.0, 2.0, 0.5), "x/four": (1.0, 2.0, 0.5, 1.25)}
    assert cost("x/two", usage, table) == pytest.approx(1.0 + 2.0)  # every rate is the input's
    assert cost("x/three", usage, table) == pytest.approx(0.4 + 0.6 * 0.5 + 2.0)
    assert cost("x/four", usage, table) == pytest.approx(0.3 + 0.3 + 0.125 + 2.0)
    assert rates((1.0, 2.0)) == (1.0, 2.0, 1.0, 1.0)
    assert cost("local/smollm2", usage) == 0.0
    # the built-in table: OpenAI's cached input, Anthropic's reads and writes
    assert rates(PRICES["openai/gpt-4o-mini"])[2] == pytest.approx(0.15 / 2)
    assert rates(PRICES["openai/gpt-4.1"])[2] == pytest.approx(2.00 / 4)
    inp, _, read, write = rates(PRICES["anthropic/claude-sonnet-4-0"])
    assert (read, write) == (pytest.approx(inp / 10), pytest.approx(inp * 1.25))


def test_config_takes_two_three_and_four_rate_prices_from_toml() -> None:
    text = """
    [[layers]]
    agents = [{ model = "openai/gpt-4o-mini" }]
    [aggregator]
    model = "openai/gpt-4o-mini"
    [prices]
    "openai/a" = [1.0, 2.0]
    "openai/b" = [1.0, 2.0, 0.25]
    "openai/c" = [1.0, 2.0, 0.25, 1.5]
    """
    config = from_dict(tomllib.loads(text))
    assert config.prices == {"openai/a": (1.0, 2.0), "openai/b": (1.0, 2.0, 0.25),
                             "openai/c": (1.0, 2.0, 0.25, 1.5)}
    price = price_function(config.prices)
    assert price("openai/b", Usage(100, 0, cached_tokens=100)) == pytest.approx(25e-6)
    for bad in ("[1.0]", "[1, 2, 3, 4, 5]", '["x", 2]', "[-1.0, 2.0]"):
        with pytest.raises(ConfigError, match="the price of 'openai/a' must be"):
            from_dict(tomllib.loads(text.replace("[1.0, 2.0]\n", f"{bad}\n", 1)))


def test_a_budgets_worst_case_assumes_no_cache_hit() -> None:
    price = price_function({"x/cache": (1.0, 2.0, 0.1), "x/write": (1.0, 2.0, 0.1, 1.25)})
    prompt = count_messages(ASK)
    guard = BudgetGuard(price, Budget(usd=1.0))
    assert guard.worst_case("x/cache", ASK, 100)[0] == pytest.approx((prompt + 200) / 1e6)
    assert guard.worst_case("x/write", ASK, 100)[0] == pytest.approx(
        (prompt * 1.25 + 200) / 1e6)


# --- the loopback server's cache -------------------------------------------------------------


def test_loopback_prefix_is_counted_message_by_message_from_a_minimum() -> None:
    def seq(*texts: str) -> list:
        return prompt_sequence({"messages": [{"role": "user", "content": t} for t in texts]},
                               False)[0]

    assert cached_prefix(seq("a b c d"), [seq("a b c x"), seq("a b")], 0) == 3
    assert cached_prefix(seq("a b c d"), [seq("a b c x")], 4) == 0, "below the minimum"
    assert cached_prefix(seq("a b", "c d"), [seq("a b c d")], 0) == 2, "message by message"
    assert cached_prefix(seq("a"), [], 0) == 0
    body = {"system": [{"type": "text", "text": "s t", "cache_control": EPHEMERAL}],
            "messages": [{"role": "user", "content": "u v w"}]}
    tokens, marked = prompt_sequence(body, True)
    assert (len(tokens), marked) == (5, 2)


def test_loopback_cache_minimum_history_and_the_sdk() -> None:
    short = [{"role": "user", "content": "Capital of France?"}]
    with LoopbackServer({"m": ModelBehavior(reply="Paris."),
                         "every": ModelBehavior(reply="Paris.", cache_min_tokens=0)}) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)

        def cached(model: str, messages: list) -> int:
            reply = client.chat.completions.create(model=model, messages=messages)
            assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
            return reply.usage.prompt_tokens_details.cached_tokens or 0

        assert [cached("m", short), cached("m", short)] == [0, 0], "3 tokens: under 32"
        assert [cached("every", short), cached("every", short)] == [0, 3]
        assert [cached("m", ASK), cached("m", ASK)] == [0, 40]
        for i in range(64):  # 64 other prompts push ASK out of the model's history
            cached("m", [{"role": "user", "content": f"{i} {QUESTION}"}])
        assert cached("m", ASK) == 0


# --- surfaces: results, the CLI's views, moa serve --------------------------------------------


def cached_mixture() -> dict:
    """Two proposers on one model sent the same 40-token prompt: one of them is a cache hit."""
    return {"name": "cache", "mode": "layered",
            "layers": [{"agents": [{"model": "loop/p"}, {"model": "loop/p"}]}],
            "aggregator": {"model": "loop/agg"},
            "prices": {"loop/p": [1.0, 2.0, 0.25], "loop/agg": [1.0, 2.0]}}


@pytest.fixture
def upstream() -> Iterator[LoopbackServer]:
    with LoopbackServer({"p": ModelBehavior(reply="Paris."),
                         "agg": ModelBehavior(reply="It is Paris.")}) as srv:
        yield srv


def test_result_cost_summary_line_json_and_live_totals_show_cached_tokens(
    upstream: LoopbackServer,
) -> None:
    mixture = Mixture(cached_mixture(), registry=upstream.registry())
    view = LiveView(console=Console(file=io.StringIO()))
    events = list(mixture.stream_sync(QUESTION))
    for event in events:
        view.on_event(event)
    result = next(e.result for e in events if isinstance(e, RunFinished))
    assert result.usage.cached_tokens == 40
    assert result.to_dict()["usage"]["cached_tokens"] == 40  # moa chat --json
    proposers = [o.usage for o in result.outputs if not o.agent.final]
    assert sorted(u.cached_tokens for u in proposers) == [0, 40]
    uncached = (2 * 40 * 1.0 + 2 * 1 * 2.0) / 1e6  # both prompts at the input rate, 1 token out
    saved = 40 * (1.0 - 0.25) / 1e6
    assert sum(o.cost_usd or 0 for o in result.outputs if not o.agent.final) == pytest.approx(
        uncached - saved)
    assert f"{result.usage.prompt_tokens:,} in, 40 cached / " in summary_line(result)
    assert "40 cached prompt tokens" in view._totals().plain


def test_moa_serve_usage_has_prompt_tokens_details(upstream: LoopbackServer) -> None:
    config = from_dict(cached_mixture(), registry=upstream.registry())
    app = create_app({"moa": config}, registry=upstream.registry())
    with ServerThread(app) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        reply = client.chat.completions.create(model="moa", messages=ASK)  # type: ignore[arg-type]
        assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
        assert reply.usage.prompt_tokens_details.cached_tokens == 40
        assert (reply.model_extra or {})["moa"]["usage"]["cached_tokens"] == 40
        # Again, streamed: every prompt of the first request is now a prefix cache hit.
        stream = client.chat.completions.create(
            model="moa", messages=ASK, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True},
        )
        with stream:
            chunks = list(stream)
        usage = chunks[-1].usage
        assert usage is not None and usage.prompt_tokens_details is not None
        assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens
        response = client.responses.create(model="moa", input=QUESTION)
        assert response.usage is not None
        details = response.usage.input_tokens_details
        assert details.cached_tokens == response.usage.input_tokens


def test_the_wrapped_clients_usage_has_prompt_tokens_details(upstream: LoopbackServer) -> None:
    team = {"mode": "layered", "layers": [{"agents": [{"model": "client/p"}] * 2}],
            "aggregator": {"model": "client/agg"}}
    client = moa.OpenAI(base_url=upstream.base_url, api_key="k", max_retries=0,
                        mixtures={"team": team})
    reply = client.chat.completions.create(model="team", messages=ASK)  # type: ignore[arg-type]
    assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
    assert reply.usage.prompt_tokens_details.cached_tokens == 40


# --- the embedded llama.cpp engine ------------------------------------------------------------


@pytest.mark.slow
def test_llama_cpp_reports_the_prompt_tokens_whose_kv_it_reused() -> None:
    """A second request that extends the first evaluates only the new tokens, and says so."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (moa-stack[local]) missing")
    from moa.local_engine.llamacpp import model_pool
    from moa.local_engine.model_files import bundled_model_path
    from moa.providers.registry import Registry

    engine, model = Registry().resolve("local/smollm2")
    first = [{"role": "user", "content": "Name three colours of the rainbow, please."}]
    second = [*first, {"role": "assistant", "content": "Red, orange and yellow."},
              {"role": "user", "content": "And three more?"}]

    async def ask(messages: list) -> Usage:
        [done] = await engine.complete(ChatRequest(model=model, messages=messages, max_tokens=2,
                                                   temperature=0.0))
        return done.usage

    anyio.run(ask, [{"role": "user", "content": "Hello."}])  # loads the model
    instance = model_pool(bundled_model_path(), False, dict(engine.options)).instances[0]
    evaluated: list[int] = []
    prefill = instance.prefill

    def counting(tokens: list[int]) -> None:
        real = instance.llm.eval
        instance.llm.eval = lambda batch: (evaluated.append(len(batch)), real(batch))[1]
        try:
            prefill(tokens)
        finally:
            del instance.llm.eval

    instance.prefill = counting  # type: ignore[method-assign]
    try:
        base = anyio.run(ask, first)
        before = sum(evaluated)
        extended = anyio.run(ask, second)
    finally:
        del instance.prefill
    assert before == base.prompt_tokens - base.cached_tokens
    assert sum(evaluated) - before == extended.prompt_tokens - extended.cached_tokens
    assert extended.cached_tokens >= base.prompt_tokens - 2, "the first prompt's KV is reused"
    assert extended.prompt_tokens - extended.cached_tokens < extended.prompt_tokens / 2
