"""OpenTelemetry GenAI spans and metrics of a run (`moa.telemetry`), over the loopback server,
with the SDK's in-memory exporter and reader passed through `telemetry.using` (the global
providers are never set)."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import moa
from moa import telemetry
from moa.config import MixtureConfig
from moa.errors import MixtureError
from moa.events import (
    AgentCall,
    AgentDelta,
    AgentFinished,
    AgentId,
    AgentRetrying,
    AgentStarted,
    Event,
    RunStarted,
    StaircaseStep,
    UsageReport,
)
from moa.openai.server import create_app
from moa.providers.base import Usage
from moa.testing import Gate, LoopbackServer, ModelBehavior
from moa.testing.otlp import OtlpReceiver

ASK = [{"role": "user", "content": "Why is the sky blue?"}]
ANSWER = "Air scatters blue light more than red light."


def config(agents: list[dict[str, Any]] | None = None, **extra: Any) -> MixtureConfig:
    return MixtureConfig.model_validate({
        "name": "team", "mode": "layered",
        "layers": [{"agents": agents or [{"model": "loop/a"}, {"model": "loop/b"}]}],
        "aggregator": {"model": "loop/agg"},
        **extra,
    })


@pytest.fixture
def upstream() -> Iterator[LoopbackServer]:
    behaviors = {
        "a": ModelBehavior(reply="Rayleigh scattering favours short wavelengths."),
        "b": ModelBehavior(reply="Blue light scatters off air molecules."),
        "agg": ModelBehavior(reply=ANSWER),
        "denied": ModelBehavior(reply="never", fail_status=401),
        "flaky": ModelBehavior(reply="Second time lucky.", fail_status=429, fail_times=1,
                               retry_after=0),
    }
    with LoopbackServer(behaviors) as server:
        yield server


class Otel:
    """An SDK tracer and meter provider recording in memory."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, name: str) -> ReadableSpan:
        (span,) = [s for s in self.spans() if s.name == name]
        return span

    def metrics(self) -> dict[str, list[Any]]:
        data = self.reader.get_metrics_data()
        out: dict[str, list[Any]] = {}
        for rm in data.resource_metrics if data else []:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    out.setdefault(metric.name, []).extend(metric.data.data_points)
        return out


@pytest.fixture
def otel() -> Iterator[Otel]:
    o = Otel()
    with telemetry.using(o.tracer_provider, o.meter_provider):
        yield o
    o.tracer_provider.shutdown()
    o.meter_provider.shutdown()


def run(mixture: moa.Mixture, messages: Any = ASK) -> Any:
    async def go() -> Any:
        try:
            return await mixture.run(messages)
        finally:
            await mixture.aclose()

    return anyio.run(go)


def test_span_tree_names_parents_and_attributes(upstream: LoopbackServer, otel: Otel) -> None:
    result = run(moa.Mixture(config(), registry=upstream.registry()))
    spans = otel.spans()
    assert sorted(s.name for s in spans) == sorted([
        "invoke_workflow team", "invoke_agent L1.1", "invoke_agent L1.2", "invoke_agent final",
        "chat a", "chat b", "chat agg",
    ])
    assert len({s.context.trace_id for s in spans}) == 1
    root = otel.named("invoke_workflow team")
    assert root.parent is None
    assert root.attributes["gen_ai.operation.name"] == "invoke_workflow"
    assert root.attributes["moa.mixture.name"] == "team"
    assert root.attributes["moa.mixture.strategy"] == "graph"
    assert root.attributes["moa.mixture.mode"] == "layered"
    assert root.attributes["gen_ai.usage.output_tokens"] == result.usage.completion_tokens > 0
    assert root.attributes["moa.time_to_first_token"] == pytest.approx(result.ttft_s)
    for key, model, kind in (("L1.1", "a", "proposer"), ("L1.2", "b", "proposer"),
                             ("final", "agg", "final")):
        agent = otel.named(f"invoke_agent {key}")
        assert agent.parent is not None and agent.parent.span_id == root.context.span_id
        assert agent.attributes["gen_ai.operation.name"] == "invoke_agent"
        assert agent.attributes["gen_ai.agent.id"] == key
        assert agent.attributes["gen_ai.request.model"] == f"loop/{model}"
        assert agent.attributes["moa.agent.kind"] == kind
        chat = otel.named(f"chat {model}")
        assert chat.kind == SpanKind.CLIENT
        assert chat.parent is not None and chat.parent.span_id == agent.context.span_id
        a = chat.attributes
        assert a["gen_ai.operation.name"] == "chat"
        assert a["gen_ai.provider.name"] == "loop"
        assert a["gen_ai.request.model"] == model
        assert a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] > 0
        assert a["gen_ai.usage.cache_read.input_tokens"] == 0
        assert tuple(a["gen_ai.response.finish_reasons"]) == ("stop",)
        assert a["gen_ai.response.time_to_first_chunk"] >= 0
        assert agent.start_time <= chat.start_time <= chat.end_time <= agent.end_time
        assert root.start_time <= agent.start_time and agent.end_time <= root.end_time
    final = otel.named("chat agg")
    assert final.attributes["gen_ai.usage.output_tokens"] == next(
        o.usage.completion_tokens for o in result.outputs if o.agent.final)


def test_metrics_histograms(upstream: LoopbackServer, otel: Otel) -> None:
    run(moa.Mixture(config(), registry=upstream.registry()))
    metrics = otel.metrics()
    tokens = metrics["gen_ai.client.token.usage"]
    kinds = {(p.attributes["gen_ai.request.model"], p.attributes["gen_ai.token.type"])
             for p in tokens}
    assert kinds == {(m, t) for m in ("a", "b", "agg") for t in ("input", "output")}
    durations = metrics["gen_ai.client.operation.duration"]
    assert sum(p.count for p in durations) == 3
    assert all(p.attributes["gen_ai.operation.name"] == "chat" for p in durations)
    (ttft,) = metrics["moa.mixture.time_to_first_token"]
    assert ttft.count == 1 and ttft.attributes == {"moa.mixture.name": "team"}


def test_failed_proposer_has_error_type_and_retries_are_events(
    upstream: LoopbackServer, otel: Otel
) -> None:
    agents = [{"model": "loop/a"}, {"model": "loop/denied"}, {"model": "loop/flaky"}]
    run(moa.Mixture(config(agents), registry=upstream.registry()))
    failed = otel.named("chat denied")
    assert failed.attributes["error.type"] == "401"
    assert failed.status.status_code == StatusCode.ERROR
    assert "gen_ai.usage.input_tokens" not in failed.attributes
    agent = otel.named("invoke_agent L1.2")
    assert agent.attributes["error.type"] == "401"
    assert agent.status.status_code == StatusCode.ERROR
    assert otel.named("invoke_workflow team").status.status_code == StatusCode.UNSET
    flaky = otel.named("chat flaky")
    assert flaky.status.status_code == StatusCode.UNSET
    (retry,) = [e for e in flaky.events if e.name == "moa.retry"]
    assert retry.attributes["moa.retry.attempt"] == 2
    assert retry.attributes["error.type"] == "429"
    durations = otel.metrics()["gen_ai.client.operation.duration"]
    assert {p.attributes.get("error.type") for p in durations} == {None, "401"}


def test_a_failed_run_marks_the_workflow_span(upstream: LoopbackServer, otel: Otel) -> None:
    mixture = moa.Mixture(config([{"model": "loop/denied"}]), registry=upstream.registry())
    with pytest.raises(MixtureError):
        run(mixture)
    root = otel.named("invoke_workflow team")
    assert root.status.status_code == StatusCode.ERROR
    assert "error.type" in root.attributes
    assert all(s.end_time is not None for s in otel.spans())


@pytest.mark.parametrize("router", [
    {"policy": "fixed", "tier": "strong"},
    {"policy": "threshold", "signal": "agreement", "threshold": 1.1},
])
def test_routing_decision_is_an_agent_span_event(
    upstream: LoopbackServer, otel: Otel, router: dict[str, Any]
) -> None:
    upstream.set_behavior("strong", ModelBehavior(reply=ANSWER))
    cfg = config(router=router, aggregator={"model": "loop/agg", "strong": "loop/strong"})
    run(moa.Mixture(cfg, registry=upstream.registry()))
    agent = otel.named("invoke_agent final")
    (route,) = [e for e in agent.events if e.name == "moa.route"]
    a = route.attributes
    assert a["moa.route.choice"] == "strong"
    assert a["moa.route.stage"].endswith("final")
    if router["policy"] == "fixed":
        assert a["moa.route.policy"] == "FixedRouter" and a["moa.route.tier"] == "strong"
    else:
        assert a["moa.route.policy"] == "ThresholdRouter"
        assert a["moa.route.signal"] == "agreement" and a["moa.route.threshold"] == 1.1
        assert 0 <= a["moa.route.signal.agreement"] <= 1
    assert agent.attributes["gen_ai.request.model"] == "loop/strong"
    chat = otel.named("chat strong")
    assert chat.parent is not None and chat.parent.span_id == agent.context.span_id


def _content_attributes(spans: list[ReadableSpan]) -> list[str]:
    return [k for s in spans for k in (s.attributes or {})
            if k in ("gen_ai.input.messages", "gen_ai.output.messages")]


def test_content_is_off_by_default(
    upstream: LoopbackServer, otel: Otel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(telemetry.CAPTURE_ENV, raising=False)
    run(moa.Mixture(config(), registry=upstream.registry()))
    assert _content_attributes(otel.spans()) == []
    dumped = json.dumps([dict(s.attributes or {}) for s in otel.spans()], default=str)
    assert "sky" not in dumped and "Rayleigh" not in dumped and ANSWER not in dumped


def test_content_is_recorded_when_switched_on(
    upstream: LoopbackServer, otel: Otel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(telemetry.CAPTURE_ENV, "true")
    run(moa.Mixture(config(), registry=upstream.registry()))
    root = otel.named("invoke_workflow team")
    question = [{"role": "user", "parts": [{"type": "text", "content": ASK[0]["content"]}]}]
    assert json.loads(root.attributes["gen_ai.input.messages"]) == question
    assert ANSWER in root.attributes["gen_ai.output.messages"]
    out = json.loads(otel.named("invoke_agent L1.1").attributes["gen_ai.output.messages"])
    assert out[0]["parts"][0]["content"].startswith("Rayleigh")
    # each call span holds the prompt that agent was sent, as the upstream received it
    for model in ("a", "b", "agg"):
        chat = otel.named(f"chat {model}")
        (sent,) = [r.body["messages"] for r in upstream.requests if r.model == model]
        assert json.loads(chat.attributes["gen_ai.input.messages"]) == json.loads(
            telemetry.input_messages(sent))
        reply = json.loads(chat.attributes["gen_ai.output.messages"])[0]
        assert reply["role"] == "assistant" and reply["finish_reason"] == "stop"
    aggregated = otel.named("chat agg").attributes["gen_ai.input.messages"]
    assert "Rayleigh scattering" in aggregated and "Blue light scatters" in aggregated
    assert ANSWER in otel.named("chat agg").attributes["gen_ai.output.messages"]
    dumped = json.dumps([dict(s.attributes or {}) for s in otel.spans()], default=str)
    assert "LOOP_API_KEY" not in dumped and "Bearer" not in dumped


def test_concurrent_runs_never_mix(upstream: LoopbackServer, otel: Otel) -> None:
    mixture = moa.Mixture(config(), registry=upstream.registry())
    questions = [f"Question {i}?" for i in range(8)]

    async def go() -> None:
        async with anyio.create_task_group() as tg:
            for q in questions:
                tg.start_soon(mixture.run, q)
        await mixture.aclose()

    anyio.run(go)
    spans = otel.spans()
    assert len(spans) == 8 * 7
    by_trace: dict[int, list[ReadableSpan]] = {}
    for s in spans:
        by_trace.setdefault(s.context.trace_id, []).append(s)
    assert len(by_trace) == 8
    for tree in by_trace.values():
        ids = {s.context.span_id for s in tree}
        roots = [s for s in tree if s.parent is None]
        assert [r.name for r in roots] == ["invoke_workflow team"]
        assert all(s.parent is None or s.parent.span_id in ids for s in tree)
        assert sorted(s.name for s in tree if s.name.startswith("chat")) == [
            "chat a", "chat agg", "chat b"]


def test_a_run_inside_an_app_span_is_its_child(upstream: LoopbackServer, otel: Otel) -> None:
    tracer = otel.tracer_provider.get_tracer("app")
    mixture = moa.Mixture(config(), registry=upstream.registry())

    async def go() -> None:
        with tracer.start_as_current_span("request"):
            await mixture.run(ASK)
        await mixture.aclose()

    anyio.run(go)
    app = otel.named("request")
    root = otel.named("invoke_workflow team")
    assert root.parent is not None and root.parent.span_id == app.context.span_id


def test_an_early_close_ends_every_span(upstream: LoopbackServer, otel: Otel) -> None:
    upstream.set_behavior("agg", ModelBehavior(reply=ANSWER, tokens_per_s=20))
    mixture = moa.Mixture(config(), registry=upstream.registry())

    async def go() -> None:
        events = mixture.stream(ASK)
        async for event in events:
            if type(event).__name__ == "FinalDelta":
                break
        await events.aclose()
        await mixture.aclose()

    anyio.run(go)
    root = otel.named("invoke_workflow team")
    assert root.status.status_code == StatusCode.ERROR
    assert {"invoke_agent final", "chat a", "chat b"} <= {s.name for s in otel.spans()}


def test_nothing_is_attached_without_opentelemetry(
    upstream: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opentelemetry import metrics, trace

    if type(trace.get_tracer_provider()).__name__ != "ProxyTracerProvider" or type(
        metrics.get_meter_provider()
    ).__name__ != "_ProxyMeterProvider":
        pytest.skip("a global OpenTelemetry provider is set in this process")
    assert telemetry.subscriber(config(), ASK) is None
    with telemetry.using(None, None):
        assert telemetry.subscriber(config(), ASK) is None

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a subscriber was attached")

    monkeypatch.setattr(telemetry, "RunTelemetry", refuse)
    result = run(moa.Mixture(config(), registry=upstream.registry()))
    assert result.text == ANSWER


def test_helpers() -> None:
    assert telemetry.provider_name("openai/gpt-4o") == "openai"
    assert telemetry.provider_name("mistral/large") == "mistral_ai"
    assert telemetry.request_model("openrouter/meta/llama-3") == "meta/llama-3"
    assert telemetry.error_type("x: HTTP 503: busy") == "503"
    assert telemetry.error_type("read timed out") == "timeout"
    assert telemetry.error_type("boom") == "_OTHER"


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def serve(upstream: LoopbackServer, body: dict[str, Any],
          headers: dict[str, str] | None = None,
          mixture: MixtureConfig | None = None) -> httpx.Response:
    """One request to `moa serve`'s app, in this thread and context (so `using` applies)."""
    app = create_app({"team": mixture or config()}, registry=upstream.registry())

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://moa") as client:
            return await client.post("/v1/chat/completions", json=body, headers=headers or {})

    return anyio.run(go)


@pytest.mark.parametrize("stream", [False, True])
def test_serve_continues_the_traceparent(
    upstream: LoopbackServer, otel: Otel, stream: bool
) -> None:
    body = {"model": "team", "messages": ASK, "stream": stream}
    response = serve(upstream, body, {"traceparent": TRACEPARENT})
    assert response.status_code == 200
    assert response.headers["x-trace-id"] == TRACE_ID
    assert response.headers["traceresponse"].startswith(f"00-{TRACE_ID}-")
    spans = otel.spans()
    assert {f"{s.context.trace_id:032x}" for s in spans} == {TRACE_ID}
    server = otel.named("POST /v1/chat/completions")
    assert server.kind == SpanKind.SERVER
    assert server.parent is not None and f"{server.parent.span_id:016x}" == "00f067aa0ba902b7"
    root = otel.named("invoke_workflow team")
    assert root.parent is not None and root.parent.span_id == server.context.span_id
    assert len(spans) == 8


def test_serve_starts_a_trace_without_traceparent(upstream: LoopbackServer, otel: Otel) -> None:
    response = serve(upstream, {"model": "team", "messages": ASK})
    assert response.status_code == 200
    server = otel.named("POST /v1/chat/completions")
    assert server.parent is None
    assert response.headers["x-trace-id"] == f"{server.context.trace_id:032x}"


@pytest.mark.parametrize("stream", [False, True])
def test_a_failed_served_run_marks_the_server_span(
    upstream: LoopbackServer, otel: Otel, stream: bool
) -> None:
    body = {"model": "team", "messages": ASK, "stream": stream}
    response = serve(upstream, body, {"traceparent": TRACEPARENT},
                     config([{"model": "loop/denied"}]))
    assert response.status_code == (200 if stream else 502)
    assert response.headers["x-trace-id"] == TRACE_ID
    server = otel.named("POST /v1/chat/completions")
    assert server.status.status_code == StatusCode.ERROR
    assert server.attributes["http.response.status_code"] == 502
    assert otel.named("invoke_workflow team").status.status_code == StatusCode.ERROR


@pytest.mark.parametrize("stream", [False, True])
def test_serve_sends_no_trace_header_without_opentelemetry(
    upstream: LoopbackServer, stream: bool
) -> None:
    with telemetry.using(None, None):
        response = serve(upstream, {"model": "team", "messages": ASK, "stream": stream},
                         {"traceparent": TRACEPARENT})
    assert response.status_code == 200
    assert "x-trace-id" not in response.headers and "traceresponse" not in response.headers


def test_one_chat_span_per_usage_report(otel: Otel) -> None:
    """An agent making two calls (an agent loop) reports usage twice: two client spans, each
    with its own time to first chunk, the finish reason on the last."""
    agent = AgentId(0, 0, "openai/gpt-4o-mini")
    sub = telemetry.RunTelemetry("solo", "graph", "layered", ASK,
                                 tracer_provider=otel.tracer_provider,
                                 meter_provider=otel.meter_provider)
    for event in [
        RunStarted(0.0, "solo", "layered", [agent]),
        AgentStarted(0.0, agent),
        AgentDelta(0.1, agent, "call"),
        UsageReport(0.2, agent, Usage(10, 2, 4), 0.001),
        AgentRetrying(0.25, agent, 2, "openai/gpt-4o-mini: HTTP 503: busy"),
        AgentDelta(0.5, agent, "answer"),
        UsageReport(0.6, agent, Usage(20, 3), None),
        AgentFinished(0.6, agent, "answer", "stop", 0.1, 0.6),
    ]:
        sub.on(event)
    sub.close()
    first, second = sorted((s for s in otel.spans() if s.name == "chat gpt-4o-mini"),
                           key=lambda s: s.start_time)
    assert first.attributes["gen_ai.provider.name"] == "openai"
    assert first.attributes["gen_ai.usage.cache_read.input_tokens"] == 4
    assert first.attributes["moa.cost_usd"] == 0.001
    assert first.attributes["gen_ai.response.time_to_first_chunk"] == pytest.approx(0.1)
    assert "gen_ai.response.finish_reasons" not in first.attributes
    assert second.attributes["gen_ai.response.time_to_first_chunk"] == pytest.approx(0.3)
    assert tuple(second.attributes["gen_ai.response.finish_reasons"]) == ("stop",)
    assert [e.name for e in second.events] == ["moa.retry"] and not first.events
    assert second.start_time - first.start_time == pytest.approx(0.2e9, abs=1e3)
    root = otel.named("invoke_workflow solo")
    assert root.status.status_code == StatusCode.ERROR  # closed without RunFinished
    assert root.attributes["error.type"] == "cancelled"


# ---- staircase steps and each call's prompt ---------------------------------------------------

WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "red",
         "blue", "green"]
SPELLED = " ".join(["cat", "dog", "sun", "moon", "sky", "tree", "rock", "fish", "bird", "king"] * 4)


def stream_all(mixture: moa.Mixture, question: Any = ASK, *,
               steps: tuple[LoopbackServer, list[Gate], list[int]] | None = None) -> list[Event]:
    """Every event of one run. With `steps` (server, gates, opens): open the gates to each
    count of `opens` in turn, the next once the aggregator sent one more request, then fully
    (as tests/test_staircase.py paces its proposers: never by sleeping)."""
    events: list[Event] = []

    async def go() -> None:
        async for event in mixture.stream(question):
            events.append(event)
        await mixture.aclose()

    async def main() -> None:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(go)
                if steps is not None:
                    srv, gates, opens = steps
                    await srv.open_in_steps(gates, opens, "agg")

    anyio.run(main)
    return events


def test_staircase_steps_are_agent_span_events(
    otel: Otel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each step of a staircase aggregator is an event on its span (step, tokens shown per
    reference, pacing margin), and each step's call is a client span holding the prompt that
    step sent, exactly as the upstream received it."""
    monkeypatch.setenv(telemetry.CAPTURE_ENV, "true")
    gates = [Gate(), Gate()]
    models = {"p1": ModelBehavior(reply=" ".join(WORDS), gate=gates[0]),
              "p2": ModelBehavior(reply=" ".join(reversed(WORDS)), gate=gates[1]),
              "agg": ModelBehavior(reply=SPELLED)}
    cfg = MixtureConfig.model_validate({
        "name": "stairs", "mode": "staircase",
        "layers": [{"agents": [{"model": "loop/p1"}, {"model": "loop/p2"}]}],
        "aggregator": {"model": "loop/agg", "max_tokens": 64},
        "staircase": {"chunk_tokens": [2, 4], "step_tokens": [2, 4], "grace_s": 30,
                      "stall_s": 30},
    })
    with LoopbackServer(models) as srv:
        events = stream_all(moa.Mixture(cfg, registry=srv.registry()), "Spell it",
                            steps=(srv, gates, [2, 6, 10]))
        sent = [r.body["messages"] for r in srv.requests if r.body and r.model == "agg"]
    expected = [  # (step, max_tokens, written, shown per reference, margin, last)
        (1, 2, 0, 2, 2, False), (2, 4, 2, 6, 4, False), (3, 4, 6, 10, 4, False),
        (4, 54, 10, 13, None, True),
    ]
    steps = [e for e in events if isinstance(e, StaircaseStep)]
    assert [(e.step, e.max_tokens, e.written, e.shown, e.margin, e.last) for e in steps] == [
        (n, limit, written, {"L1.1": shown, "L1.2": shown}, margin, last)
        for n, limit, written, shown, margin, last in expected]
    agent = otel.named("invoke_agent final")
    marks = [e for e in agent.events if e.name == "moa.staircase.step"]
    got = [(e.attributes["moa.staircase.step"], e.attributes["moa.staircase.max_tokens"],
            e.attributes["moa.staircase.written_tokens"],
            tuple(e.attributes["moa.staircase.references"]),
            tuple(e.attributes["moa.staircase.shown_tokens"]),
            e.attributes.get("moa.staircase.margin"), e.attributes["moa.staircase.last"])
           for e in marks]
    assert got == [(n, limit, written, ("L1.1", "L1.2"), (shown, shown), margin, last)
                   for n, limit, written, shown, margin, last in expected]
    calls = sorted((s for s in otel.spans() if s.name == "chat agg"), key=lambda s: s.start_time)
    assert [c.attributes["gen_ai.request.max_tokens"] for c in calls] == [2, 4, 4, 54]
    assert [json.loads(c.attributes["gen_ai.input.messages"]) for c in calls] == [
        json.loads(telemetry.input_messages(m)) for m in sent]
    for mark, call in zip(marks, calls, strict=True):
        assert call.parent is not None and call.parent.span_id == agent.context.span_id
        assert agent.start_time <= mark.timestamp <= call.start_time <= call.end_time
    written = "".join(json.loads(c.attributes["gen_ai.output.messages"])[0]["parts"][0]["content"]
                      for c in calls)
    assert written == SPELLED  # each call's own output, in order


def test_calls_carry_their_prompt_only_when_content_is_captured(
    upstream: LoopbackServer, otel: Otel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(telemetry.CAPTURE_ENV, raising=False)
    calls = [e for e in stream_all(moa.Mixture(config(), registry=upstream.registry()))
             if isinstance(e, AgentCall)]
    assert len(calls) == 3 and all(c.messages is None for c in calls)
    assert "gen_ai.input.messages" not in otel.named("chat agg").attributes
    monkeypatch.setenv(telemetry.CAPTURE_ENV, "true")
    calls = [e for e in stream_all(moa.Mixture(config(), registry=upstream.registry()))
             if isinstance(e, AgentCall)]
    assert {c.agent.key: c.messages for c in calls}["L1.1"] == ASK
    with telemetry.using(None, None):  # OpenTelemetry off: no call events at all
        events = stream_all(moa.Mixture(config(), registry=upstream.registry()))
    assert not [e for e in events if isinstance(e, AgentCall)]


def test_input_messages_follow_the_genai_shape() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                     {"type": "image_url", "image_url": {"url": "data:x"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "look", "arguments": "{\"q\": 1}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "a cat"},
    ]
    assert json.loads(telemetry.input_messages(messages)) == [
        {"role": "system", "parts": [{"type": "text", "content": "Be brief."}]},
        {"role": "user", "parts": [{"type": "text", "content": "What is this?"},
                                   {"type": "image_url"}]},
        {"role": "assistant", "parts": [{"type": "tool_call", "id": "c1", "name": "look",
                                         "arguments": "{\"q\": 1}"}]},
        {"role": "tool", "parts": [{"type": "tool_call_response", "id": "c1",
                                    "response": "a cat"}]},
    ]


# ---- export from the standard OTEL_* variables ----------------------------------------------

OTEL_VARS = [k for k in os.environ if k.startswith("OTEL_")]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in OTEL_VARS:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_export_is_asked_for_only_by_the_standard_variables(clean_env: pytest.MonkeyPatch) -> None:
    assert not telemetry.export_requested()
    assert telemetry.configure() is None  # nothing asked: no provider is set
    clean_env.setenv("OTEL_SERVICE_NAME", "svc")
    assert not telemetry.export_requested()
    clean_env.setenv("OTEL_TRACES_EXPORTER", "none")
    assert not telemetry.export_requested()
    clean_env.setenv("OTEL_METRICS_EXPORTER", "console")
    assert telemetry.export_requested()
    clean_env.delenv("OTEL_METRICS_EXPORTER")
    clean_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    assert telemetry.export_requested()
    clean_env.setenv("OTEL_SDK_DISABLED", "true")
    assert not telemetry.export_requested()
    assert telemetry.configure(force=True) is None


@pytest.mark.parametrize(("var", "value", "says"), [
    ("OTEL_TRACES_EXPORTER", "zipkin", "otlp, console or none"),
    ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json", "http/protobuf"),
])
def test_an_exporter_moa_cannot_use_is_a_config_error(
    clean_env: pytest.MonkeyPatch, var: str, value: str, says: str
) -> None:
    clean_env.setenv(var, value)
    with pytest.raises(moa.ConfigError, match=says):
        telemetry.providers_from_env()


def test_providers_from_env_export_a_run_over_otlp_http(
    upstream: LoopbackServer, clean_env: pytest.MonkeyPatch
) -> None:
    with OtlpReceiver() as otlp:
        clean_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.endpoint)
        clean_env.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
        exporting = telemetry.providers_from_env()
        assert exporting.description == (f"traces: otlp (http/protobuf) to {otlp.endpoint}; "
                                         f"metrics: otlp (http/protobuf) to {otlp.endpoint}")
        with telemetry.using(exporting.tracer_provider, exporting.meter_provider):
            run(moa.Mixture(config(), registry=upstream.registry()))
        exporting.shutdown()  # flushes: everything has been received when it returns
        spans = otlp.spans
        metrics = otlp.metrics
    assert sorted(s.name for s in spans) == sorted([
        "invoke_workflow team", "invoke_agent L1.1", "invoke_agent L1.2", "invoke_agent final",
        "chat a", "chat b", "chat agg"])
    assert {s.resource["service.name"] for s in spans} == {"moa"}
    assert {s.resource["deployment.environment"] for s in spans} == {"test"}
    assert {s.scope for s in spans} == {"moa"}
    assert {"gen_ai.client.token.usage", "gen_ai.client.operation.duration",
            "moa.mixture.time_to_first_token"} <= set(metrics)


def _serve_config(tmp_path: Path, upstream: LoopbackServer) -> Path:
    """A mixture on the loopback upstream, which wants a key (given as $LOOP_SECRET)."""
    path = tmp_path / "otel.toml"
    path.write_text(
        'name = "team"\nmode = "layered"\n'
        'layers = [{ agents = [{ model = "loop/a" }, { model = "loop/b" }] }]\n'
        'aggregator = { model = "loop/agg" }\n'
        f'[providers.loop]\nkind = "openai"\nbase_url = "{upstream.base_url}"\n'
        'key_env = "LOOP_SECRET"\n'
    )
    return path


SECRET = "sk-otel-test-3f9a1c"


def _env(otlp: OtlpReceiver) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return {**env, "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
            "OTEL_SERVICE_NAME": "moa-under-test", telemetry.CAPTURE_ENV: "true",
            "LOOP_SECRET": SECRET}


def _assert_tree(spans: list[Any]) -> None:
    """A run's spans as received: one workflow, three agents under it, a client span under
    each; the prompts are there (content captured), the upstream's key is not."""
    by_id = {s.span_id: s for s in spans}
    (root,) = [s for s in spans if s.name == "invoke_workflow team"]
    agents = [s for s in spans if s.name.startswith("invoke_agent")]
    assert sorted(a.name for a in agents) == [
        "invoke_agent L1.1", "invoke_agent L1.2", "invoke_agent final"]
    assert all(a.parent_span_id == root.span_id for a in agents)
    chats = [s for s in spans if s.name.startswith("chat ")]
    assert sorted(c.name for c in chats) == ["chat a", "chat agg", "chat b"]
    assert all(c.kind == 3 and by_id[c.parent_span_id].name.startswith("invoke_agent")
               for c in chats)
    assert all(c.attributes["gen_ai.usage.output_tokens"] > 0 for c in chats)
    assert "Why is the sky blue?" in root.attributes["gen_ai.input.messages"]
    assert "Rayleigh" in next(c for c in chats if c.name == "chat agg").attributes[
        "gen_ai.input.messages"]
    assert {s.resource["service.name"] for s in spans} == {"moa-under-test"}
    assert SECRET not in json.dumps([(s.attributes, s.resource, s.events) for s in spans],
                                    default=str)


def test_serve_exports_over_otlp_continuing_the_traceparent(tmp_path: Path) -> None:
    """`moa serve` in a subprocess, configured by the OTEL_* variables only, exports to a
    receiver this test runs: the client's trace continues through the server span into the
    mixture's tree, and SIGTERM flushes what is left."""
    behaviors = {"a": ModelBehavior(reply="Rayleigh scattering favours short wavelengths."),
                 "b": ModelBehavior(reply="Blue light scatters off air molecules."),
                 "agg": ModelBehavior(reply=ANSWER)}
    with LoopbackServer(behaviors, api_key=SECRET) as upstream, OtlpReceiver() as otlp:
        port = _free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "moa.cli", "serve", "-c", str(_serve_config(tmp_path, upstream)),
             "--port", str(port)],
            env=_env(otlp), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True)
        lines = _lines(proc)
        try:
            said = _expect(lines, "moa: serving")
            assert f"traces: otlp (http/protobuf) to {otlp.endpoint}" in said
            response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30,
                                  json={"model": "mixture", "messages": ASK},
                                  headers={"traceparent": TRACEPARENT})
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["message"]["content"] == ANSWER
            assert response.headers["x-trace-id"] == TRACE_ID
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(60)
        spans, metrics = otlp.spans, otlp.metrics
    assert {s.trace_id for s in spans} == {TRACE_ID}
    (server,) = [s for s in spans if s.name == "POST /v1/chat/completions"]
    assert server.kind == 2 and server.parent_span_id == "00f067aa0ba902b7"
    (root,) = [s for s in spans if s.name == "invoke_workflow team"]
    assert root.parent_span_id == server.span_id
    _assert_tree([s for s in spans if s is not server])
    assert {"gen_ai.client.token.usage", "gen_ai.client.operation.duration"} <= set(metrics)


def test_chat_otel_exports_the_cli_run(tmp_path: Path) -> None:
    behaviors = {"a": ModelBehavior(reply="Rayleigh scattering favours short wavelengths."),
                 "b": ModelBehavior(reply="Blue light scatters off air molecules."),
                 "agg": ModelBehavior(reply=ANSWER)}
    with LoopbackServer(behaviors, api_key=SECRET) as upstream, OtlpReceiver() as otlp:
        done = subprocess.run(
            [sys.executable, "-m", "moa.cli", "chat", "-c", str(_serve_config(tmp_path, upstream)),
             "-q", "--otel", ASK[0]["content"]],
            env=_env(otlp), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
        spans = otlp.spans
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ANSWER
    assert f"moa: OpenTelemetry traces: otlp (http/protobuf) to {otlp.endpoint}" in done.stderr
    assert len({s.trace_id for s in spans}) == 1
    _assert_tree(spans)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _lines(proc: subprocess.Popen[str]) -> queue.Queue[str | None]:
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


def _expect(lines: queue.Queue[str | None], needle: str) -> str:
    """Every stderr line up to the first holding `needle` (fails at the end of stderr)."""
    seen = []
    while True:
        line = lines.get(timeout=60)
        assert line is not None, f"no {needle!r} in: {''.join(seen)}"
        seen.append(line)
        if needle in line:
            return "".join(seen)
