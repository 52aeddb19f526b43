"""OpenTelemetry GenAI traces and metrics of a run, built from its typed event stream.

`Mixture.stream` attaches one `RunTelemetry` per run when OpenTelemetry is configured (an SDK
tracer or meter provider is set globally, or `using()` names providers) and none otherwise, so
a run without it pays one cheap check. Only `opentelemetry-api` is used, imported lazily.

Spans: `invoke_workflow {mixture}` per run; under it `invoke_agent {agent key}` per agent;
under each agent a `chat {model}` client span per provider call (from `UsageReport`, or the
`AgentFailed` that ends a call), starting at its `AgentCall`. Retries, waits, routing decisions,
staircase steps and notices are span events. Metrics: `gen_ai.client.token.usage`,
`gen_ai.client.operation.duration`, `moa.mixture.time_to_first_token` and `moa.mixture.cost`.
Prompts and completions (the run's, each agent's and each call's) are recorded only when
`OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT` is true.

`configure()` sets global SDK providers exporting as the standard `OTEL_*` variables say
(`moa serve`, `moa chat --otel`); it needs the `otel` extra. docs/observability.md has it all.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moa.errors import ConfigError
from moa.events import (
    AgentCall,
    AgentDelta,
    AgentFailed,
    AgentFinished,
    AgentId,
    AgentRetrying,
    AgentStarted,
    AgentWaiting,
    Event,
    Notice,
    RouteDecision,
    RunFailed,
    RunFinished,
    RunStarted,
    StaircaseStep,
    UsageReport,
)

if TYPE_CHECKING:
    from opentelemetry.metrics import Histogram, MeterProvider
    from opentelemetry.trace import Span, TracerProvider

    from moa.config import MixtureConfig
    from moa.providers.base import Message
    from moa.routing.router import Router

log = logging.getLogger(__name__)

CAPTURE_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
SCOPE = "moa"
PROVIDER_NAMES = {
    "openai": "openai",
    "anthropic": "anthropic",
    "groq": "groq",
    "deepseek": "deepseek",
    "mistral": "mistral_ai",
    "gemini": "gcp.gemini",
    "xai": "x_ai",
}
"""moa prefixes whose GenAI `gen_ai.provider.name` differs or is well known; others pass as is."""

_OFF = frozenset({"NoOpTracerProvider", "ProxyTracerProvider",
                  "NoOpMeterProvider", "_ProxyMeterProvider"})
"""The API's own providers: with only these, OpenTelemetry is not configured."""

_providers: ContextVar[tuple[Any, Any] | None] = ContextVar("moa_otel_providers", default=None)


@contextlib.contextmanager
def using(tracer_provider: TracerProvider | None = None,
          meter_provider: MeterProvider | None = None) -> Iterator[None]:
    """Send the spans and metrics of runs started inside this block (this context) to these
    providers instead of the global ones (tests; apps with a provider of their own)."""
    token = _providers.set((tracer_provider, meter_provider))
    try:
        yield
    finally:
        _providers.reset(token)


@functools.cache
def _otel() -> Any:
    """The `opentelemetry` API modules (trace, metrics), or None when it is not installed."""
    try:
        from opentelemetry import metrics, trace
    except ImportError:
        return None
    return trace, metrics


def _configured() -> tuple[Any, Any] | None:
    """(tracer provider, meter provider) when either is a real one, else None: the API's
    default providers are no-ops (or proxies to nothing), and then nothing is attached."""
    override = _providers.get()
    if override is not None:
        return override if any(p is not None for p in override) else None
    if "opentelemetry.trace" not in sys.modules and "opentelemetry.metrics" not in sys.modules:
        return None  # nothing set a provider up: not even worth importing the API
    api = _otel()
    if api is None:
        return None
    trace, metrics = api
    tp, mp = trace.get_tracer_provider(), metrics.get_meter_provider()
    real_t, real_m = type(tp).__name__ not in _OFF, type(mp).__name__ not in _OFF
    if not (real_t or real_m):
        return None
    return (tp if real_t else None, mp if real_m else None)


def capture_content() -> bool:
    """Whether the GenAI content switch asks for prompts and completions in the spans."""
    value = os.environ.get(CAPTURE_ENV, "").strip().lower()
    return value in {"true", "1", "yes", "span_only", "span_and_event"}


def subscriber(config: MixtureConfig, messages: list[Message],
               router: Router | None = None) -> RunTelemetry | None:
    """A new subscriber for one run, or None when OpenTelemetry is not configured."""
    providers = _configured()
    if providers is None:
        return None
    return RunTelemetry(config.name, config.strategy, config.mode, messages, router=router,
                        tracer_provider=providers[0], meter_provider=providers[1])


def provider_name(model: str) -> str:
    """`gen_ai.provider.name` of a moa model reference ("openai/gpt-4o" -> "openai")."""
    prefix = model.partition("/")[0]
    return PROVIDER_NAMES.get(prefix, prefix)


def request_model(model: str) -> str:
    """The model as its provider names it ("openai/gpt-4o" -> "gpt-4o")."""
    prefix, sep, rest = model.partition("/")
    return rest if sep else prefix


def error_type(error: str) -> str:
    """A low-cardinality `error.type` for an error message: the HTTP status when it names
    one, "timeout", "cancelled", else "_OTHER"."""
    if m := re.search(r"\bHTTP (\d{3})\b", error):
        return m[1]
    lower = error.lower()
    if "timed out" in lower or "timeout" in lower:
        return "timeout"
    if "cancel" in lower:
        return "cancelled"
    return "_OTHER"


def _part(part: Any) -> dict[str, Any]:
    """One content part of an OpenAI-shaped message as a GenAI message part (text as text;
    other kinds, e.g. images, by their type only)."""
    if isinstance(part, dict):
        if part.get("type") == "text":
            return {"type": "text", "content": part.get("text", "")}
        return {"type": str(part.get("type", "unknown"))}
    return {"type": "text", "content": str(part)}


def input_messages(messages: list[Message]) -> str:
    """`gen_ai.input.messages`: OpenAI-shaped chat messages in the GenAI conventions' shape
    (role and parts: text, tool calls, tool call responses), as JSON."""
    out = []
    for m in messages:
        content = m.get("content")
        role = m.get("role", "user")
        parts: list[dict[str, Any]] = []
        if role == "tool":
            parts.append({"type": "tool_call_response", "id": m.get("tool_call_id"),
                          "response": content})
        elif isinstance(content, list):
            parts.extend(_part(p) for p in content)
        elif content:
            parts.append({"type": "text", "content": str(content)})
        for call in m.get("tool_calls") or []:
            fn = call.get("function") or {}
            parts.append({"type": "tool_call", "id": call.get("id"), "name": fn.get("name"),
                          "arguments": fn.get("arguments")})
        out.append({"role": role, "parts": parts})
    return json.dumps(out, default=str)


def output_messages(text: str, finish_reason: str) -> str:
    """`gen_ai.output.messages`: one assistant message of `text`, as JSON."""
    return json.dumps([{"role": "assistant", "parts": [{"type": "text", "content": text}],
                        "finish_reason": finish_reason}])


@dataclass
class _Instruments:
    tokens: Histogram
    duration: Histogram
    ttft: Histogram
    cost: Histogram


@functools.lru_cache(maxsize=16)
def _instruments(meter_provider: Any) -> _Instruments:
    meter = meter_provider.get_meter(SCOPE)
    return _Instruments(
        meter.create_histogram("gen_ai.client.token.usage", unit="{token}",
                               description="Tokens used per model call"),
        meter.create_histogram("gen_ai.client.operation.duration", unit="s",
                               description="Duration of a model call"),
        meter.create_histogram("moa.mixture.time_to_first_token", unit="s",
                               description="Time to the first token of the final answer"),
        meter.create_histogram("moa.mixture.cost", unit="USD",
                               description="Cost of a mixture run"),
    )


@dataclass
class _Call:
    """One provider call of an agent, in `t` (seconds since the run started)."""

    start: float
    first_delta: float | None = None
    retries: list[tuple[float, int, str]] = field(default_factory=list)
    report: UsageReport | None = None
    max_tokens: int | None = None
    messages: list[Message] | None = None
    """The prompt it sent (content capture only)."""
    text: list[str] = field(default_factory=list)
    """What it wrote (content capture only)."""


@dataclass
class _Agent:
    span: Span
    current: _Call
    """The call in progress (or none yet: then it is empty)."""
    reported: _Call | None = None
    """The last call, whose usage came: it waits for its finish reason."""


class RunTelemetry:
    """Turns one run's events into spans and metrics; call `on` for every event in order and
    `close` once at the end. Every run has its own instance: runs never share spans."""

    def __init__(self, mixture: str, strategy: str, mode: str, messages: list[Message], *,
                 router: Router | None = None,
                 tracer_provider: TracerProvider | None = None,
                 meter_provider: MeterProvider | None = None) -> None:
        trace, metrics = _otel()
        self._trace = trace
        tracer_provider = tracer_provider or trace.get_tracer_provider()
        self._tracer = tracer_provider.get_tracer(SCOPE)
        self._metrics = _instruments(meter_provider or metrics.get_meter_provider())
        self._content = capture_content()
        self._t0 = time.time_ns()
        self._mixture = mixture
        self._agents: dict[AgentId, _Agent] = {}
        self._policy: dict[str, Any] = {}
        if router is not None:
            self._policy["moa.route.policy"] = type(router).__name__
        for name in ("signal", "threshold", "tier"):  # the router's settings, where it has them
            if isinstance(value := getattr(router, name, None), str | int | float):
                self._policy[f"moa.route.{name}"] = value
        self._decided: dict[AgentId, list[tuple[float, dict[str, Any]]]] = {}
        self._done = False
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": "invoke_workflow",
            "moa.mixture.name": mixture,
            "moa.mixture.strategy": strategy,
            "moa.mixture.mode": mode,
        }
        if self._content:
            attrs["gen_ai.input.messages"] = input_messages(messages)
        self._run = self._tracer.start_span(f"invoke_workflow {mixture}", attributes=attrs,
                                            start_time=self._t0)

    @property
    def content(self) -> bool:
        """Whether prompts and completions are recorded (the run then sends its prompts in
        `AgentCall` events)."""
        return self._content

    def _ns(self, t: float) -> int:
        return self._t0 + int(t * 1e9)

    def on(self, event: Event) -> None:
        """Record one event; telemetry never breaks a run (a failure here stops recording)."""
        if self._done:
            return
        try:
            self._on(event)
        except Exception:
            self._done = True
            log.warning("moa telemetry stopped recording this run", exc_info=True)
            with contextlib.suppress(Exception):
                self._run.end()

    def _on(self, event: Event) -> None:
        if isinstance(event, AgentDelta):
            agent = self._agents.get(event.agent)
            if agent is not None:
                if agent.current.first_delta is None:
                    agent.current.first_delta = event.t
                if self._content:
                    agent.current.text.append(event.text)
        elif isinstance(event, AgentCall):
            agent = self._agents.get(event.agent)
            if agent is not None:  # the call in progress starts now (not at the last report)
                agent.current = _Call(event.t, max_tokens=event.max_tokens,
                                      messages=event.messages)
        elif isinstance(event, StaircaseStep):
            self._step(event)
        elif isinstance(event, AgentStarted):
            self._start_agent(event)
        elif isinstance(event, UsageReport):
            agent = self._agents.get(event.agent)
            if agent is not None:
                if agent.reported is not None:  # a further call: the last one ended already
                    self._call(event.agent, agent.span, agent.reported, None, None)
                agent.current.report = event
                agent.reported, agent.current = agent.current, _Call(event.t)
        elif isinstance(event, AgentFinished):
            self._finish_agent(event.agent, event.t, event.text, event.finish_reason, None)
        elif isinstance(event, AgentFailed):
            self._finish_agent(event.agent, event.t, event.partial_text, None, event.error)
        elif isinstance(event, AgentRetrying):
            agent = self._agents.get(event.agent)
            if agent is not None:
                agent.current.retries.append((event.t, event.attempt, event.reason))
        elif isinstance(event, AgentWaiting):
            agent = self._agents.get(event.agent)
            if agent is not None:
                agent.span.add_event("moa.waiting", {"moa.waiting.why": event.why},
                                     timestamp=self._ns(event.t))
        elif isinstance(event, RouteDecision):
            self._decision(event)
        elif isinstance(event, Notice):
            self._run.add_event("moa.notice", {"moa.notice.kind": event.kind,
                                               "moa.notice.message": event.message},
                                timestamp=self._ns(event.t))
        elif isinstance(event, RunStarted):
            self._run.set_attribute("moa.mixture.mode", event.mode)
        elif isinstance(event, RunFinished):
            self._end_run(event.t, event.result, None)
        elif isinstance(event, RunFailed):
            self._end_run(event.t, event.result, event.error)

    def _start_agent(self, event: AgentStarted) -> None:
        a = event.agent
        role = ("final" if a.final else "debater" if a.prefix == "R"
                else "proposer" if a.layer == 0 else "aggregator")
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.id": a.key,
            "gen_ai.agent.name": a.name or a.key,
            "gen_ai.request.model": a.model,
            "moa.agent.layer": a.layer,
            "moa.agent.index": a.index,
            "moa.agent.kind": role,
        }
        if a.strong:
            attrs["moa.agent.strong_model"] = a.strong
        ctx = self._trace.set_span_in_context(self._run)
        span = self._tracer.start_span(f"invoke_agent {a.key}", context=ctx, attributes=attrs,
                                       start_time=self._ns(event.t))
        for t, decision in self._decided.pop(a, []):
            span.add_event("moa.route", decision, timestamp=self._ns(t))
        self._agents[a] = _Agent(span, _Call(event.t))

    def _call(self, aid: AgentId, parent: Span, call: _Call, finish: str | None,
              error: str | None, end: float | None = None) -> None:
        """The client span of one provider call, under its agent's span; it ends at its usage
        report, or at `end` (a failure)."""
        report = call.report
        end = report.t if report is not None else end if end is not None else call.start
        model = (report.agent if report is not None else aid).model
        base = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": provider_name(model),
            "gen_ai.request.model": request_model(model),
        }
        attrs: dict[str, Any] = {**base, "moa.agent.id": aid.key}
        if report is not None:
            u = report.usage
            attrs["gen_ai.usage.input_tokens"] = u.prompt_tokens
            attrs["gen_ai.usage.output_tokens"] = u.completion_tokens
            attrs["gen_ai.usage.cache_read.input_tokens"] = u.cached_tokens
            if report.cost_usd is not None:
                attrs["moa.cost_usd"] = report.cost_usd
            for kind, n in (("input", u.prompt_tokens), ("output", u.completion_tokens)):
                self._metrics.tokens.record(n, {**base, "gen_ai.token.type": kind})
        if call.max_tokens is not None:
            attrs["gen_ai.request.max_tokens"] = call.max_tokens
        if finish:
            attrs["gen_ai.response.finish_reasons"] = [finish]
        if call.first_delta is not None:
            attrs["gen_ai.response.time_to_first_chunk"] = call.first_delta - call.start
        if error is not None:
            attrs["error.type"] = error_type(error)
        if self._content:
            if call.messages is not None:
                attrs["gen_ai.input.messages"] = input_messages(call.messages)
            if call.text:
                attrs["gen_ai.output.messages"] = output_messages(
                    "".join(call.text), finish or ("error" if error else ""))
        ctx = self._trace.set_span_in_context(parent)
        span = self._tracer.start_span(f"chat {request_model(model)}", context=ctx,
                                       kind=self._trace.SpanKind.CLIENT, attributes=attrs,
                                       start_time=self._ns(call.start))
        for t, attempt, reason in call.retries:
            span.add_event("moa.retry", {"moa.retry.attempt": attempt,
                                         "error.type": error_type(reason),
                                         "moa.retry.reason": reason},
                           timestamp=self._ns(t))
        if error is not None:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, error))
        span.end(end_time=self._ns(end))
        duration = {**base, **({"error.type": attrs["error.type"]} if error else {})}
        self._metrics.duration.record(max(end - call.start, 0.0), duration)

    def _finish_agent(self, aid: AgentId, t: float, text: str, finish: str | None,
                      error: str | None) -> None:
        agent = self._agents.pop(aid, None)
        if agent is None:
            return
        if agent.reported is not None:
            self._call(aid, agent.span, agent.reported, None if error else finish, None)
        if error is not None:  # the call in progress failed
            self._call(aid, agent.span, agent.current, None, error, end=t)
        span = agent.span
        span.set_attribute("gen_ai.request.model", aid.model)
        if finish:
            span.set_attribute("gen_ai.response.finish_reasons", [finish])
        if self._content and text:
            span.set_attribute("gen_ai.output.messages",
                               output_messages(text, finish or ("error" if error else "")))
        if error is not None:
            span.set_attribute("error.type", error_type(error))
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, error))
        span.end(end_time=self._ns(t))

    def _step(self, event: StaircaseStep) -> None:
        agent = self._agents.get(event.agent)
        if agent is None:
            return
        attrs: dict[str, Any] = {
            "moa.staircase.step": event.step,
            "moa.staircase.max_tokens": event.max_tokens,
            "moa.staircase.written_tokens": event.written,
            "moa.staircase.references": list(event.shown),
            "moa.staircase.shown_tokens": list(event.shown.values()),
            "moa.staircase.last": event.last,
        }
        if event.margin is not None:
            attrs["moa.staircase.margin"] = event.margin
        agent.span.add_event("moa.staircase.step", attrs, timestamp=self._ns(event.t))

    def _decision(self, event: RouteDecision) -> None:
        attrs: dict[str, Any] = {**self._policy, "moa.route.stage": event.stage,
                                 "moa.route.choice": event.choice,
                                 "moa.route.reason": event.reason}
        for key, value in event.signals.items():
            if isinstance(value, bool | int | float | str):
                attrs[f"moa.route.signal.{key}"] = value
        if event.agent is None:
            self._run.add_event("moa.route", attrs, timestamp=self._ns(event.t))
        elif (agent := self._agents.get(event.agent)) is not None:
            agent.span.add_event("moa.route", attrs, timestamp=self._ns(event.t))
        else:  # decided before the agent starts: recorded on its span when it does
            self._decided.setdefault(event.agent, []).append((event.t, attrs))

    def _end_run(self, t: float, result: Any, error: str | None) -> None:
        for aid in list(self._agents):
            self._finish_agent(aid, t, "", None, error)
        run = self._run
        for decided in self._decided.values():  # stages that never started (skipped)
            for at, decision in decided:
                run.add_event("moa.route", decision, timestamp=self._ns(at))
        if result is not None:
            usage = result.usage
            run.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
            run.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)
            run.set_attribute("gen_ai.usage.cache_read.input_tokens", usage.cached_tokens)
            attrs = {"moa.mixture.name": self._mixture}
            if result.ttft_s is not None:
                run.set_attribute("moa.time_to_first_token", result.ttft_s)
                self._metrics.ttft.record(result.ttft_s, attrs)
            if result.cost_usd is not None:
                run.set_attribute("moa.cost_usd", result.cost_usd)
                self._metrics.cost.record(result.cost_usd, attrs)
            if self._content and error is None:
                run.set_attribute("gen_ai.output.messages",
                                  output_messages(result.text, result.finish_reason or ""))
        if error is not None:
            run.set_attribute("error.type", error_type(error))
            run.set_status(self._trace.Status(self._trace.StatusCode.ERROR, error))
        run.end(end_time=self._ns(t))
        self._done = True  # ended: later events (none expected) are ignored

    def close(self) -> None:
        """End whatever is still open (a run cancelled or closed early)."""
        if self._done:
            return
        t = (time.time_ns() - self._t0) / 1e9
        try:
            self._end_run(t, None, "cancelled")
        except Exception:
            log.warning("moa telemetry could not end this run", exc_info=True)
        self._done = True


class ServedRequest:
    """The server span of one `moa serve` request, continuing the client's `traceparent`;
    with OpenTelemetry off every method does nothing (and `headers` is empty)."""

    def __init__(self, span: Span | None = None) -> None:
        self._span = span
        self.headers: dict[str, str] = {}
        """Response headers naming the trace: `x-trace-id` and W3C `traceresponse`."""
        if span is not None:
            ctx = span.get_span_context()
            trace_id, flags = f"{ctx.trace_id:032x}", f"{int(ctx.trace_flags):02x}"
            self.headers = {"x-trace-id": trace_id,
                            "traceresponse": f"00-{trace_id}-{ctx.span_id:016x}-{flags}"}

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Make the span current, so the runs started inside are its children."""
        if self._span is None:
            yield
            return
        from opentelemetry import context, trace

        token = context.attach(trace.set_span_in_context(self._span))
        try:
            yield
        finally:
            context.detach(token)

    def fail(self, status: int, error: str) -> None:
        """Record the error answer the request got."""
        if self._span is not None and self._span.is_recording():
            from opentelemetry import trace

            self._span.set_attribute("http.response.status_code", status)
            self._span.set_attribute("error.type", str(status))
            self._span.set_status(trace.Status(trace.StatusCode.ERROR, error))

    def end(self) -> None:
        """End the span (once; later calls do nothing)."""
        span, self._span = self._span, None
        if span is not None:
            span.end()


def serving(method: str, path: str, headers: Any) -> ServedRequest:
    """A server span for a request whose `headers` may carry a `traceparent` (no-op when
    OpenTelemetry is not configured)."""
    providers = _configured()
    if providers is None:
        return ServedRequest()
    trace, _ = _otel()
    from opentelemetry import propagate

    tracer = (providers[0] or trace.get_tracer_provider()).get_tracer(SCOPE)
    span = tracer.start_span(f"{method} {path}", context=propagate.extract(headers),
                             kind=trace.SpanKind.SERVER,
                             attributes={"http.request.method": method, "url.path": path})
    return ServedRequest(span)


# ---- export from the standard OTEL_* variables (moa serve, moa chat --otel) ------------------

EXTRA = "pip install 'moa-stack[otel]'"
ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                 "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
EXPORTER_VARS = ("OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER")


def _names(value: str) -> list[str]:
    """The exporters a comma-separated `OTEL_*_EXPORTER` value names, in order, once each."""
    return list(dict.fromkeys(n.strip().lower() for n in value.split(",") if n.strip()))


def _disabled() -> bool:
    return os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def export_requested() -> bool:
    """Whether the standard variables ask for export: an OTLP endpoint, or an exporter other
    than `none` in `OTEL_TRACES_EXPORTER` / `OTEL_METRICS_EXPORTER` (never when
    `OTEL_SDK_DISABLED=true`)."""
    if _disabled():
        return False
    if any(os.environ.get(var) for var in ENDPOINT_VARS):
        return True
    return any(set(_names(os.environ.get(var, ""))) - {"none"} for var in EXPORTER_VARS)


def _protocol(signal: str) -> str:
    return (os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL")
            or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip().lower()


def _exporter(signal: str, name: str) -> Any:
    """A new span ("TRACES") or metric ("METRICS") exporter called `name`; the OTLP ones read
    their endpoint, headers, timeout and compression from the standard variables."""
    spans = signal == "TRACES"
    if name == "console":
        if spans:
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            return ConsoleSpanExporter(out=sys.stderr)  # stdout holds the answer
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        return ConsoleMetricExporter(out=sys.stderr)
    if name != "otlp":
        raise ConfigError(f"OTEL_{signal}_EXPORTER={name!r}: moa exports with otlp, console "
                          "or none.")
    protocol = _protocol(signal)
    try:
        if protocol == "http/protobuf":
            if spans:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                    OTLPSpanExporter,
                )

                return OTLPSpanExporter()
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )

            return OTLPMetricExporter()
        if protocol == "grpc":
            if spans:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                    OTLPSpanExporter as GrpcSpanExporter,
                )

                return GrpcSpanExporter()
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter as GrpcMetricExporter,
            )

            return GrpcMetricExporter()
    except ImportError:
        if protocol == "grpc":
            raise ConfigError("OTLP export over grpc needs opentelemetry-exporter-otlp-proto-grpc: "
                              "pip install opentelemetry-exporter-otlp-proto-grpc.") from None
        raise ConfigError(f"OTLP export needs the otel extra: {EXTRA}.") from None
    raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: moa exports over "
                      "http/protobuf (the default) or grpc.")


@dataclass
class Exporting:
    """SDK providers exporting as the `OTEL_*` variables say (`providers_from_env`);
    `shutdown()` exports what is left and stops them."""

    tracer_provider: Any = None
    meter_provider: Any = None
    description: str = ""
    """What goes where, e.g. "traces: otlp (http/protobuf), metrics: otlp (http/protobuf)"."""

    def shutdown(self) -> None:
        """Flush and stop both providers (once; errors are logged, never raised)."""
        for name in ("tracer_provider", "meter_provider"):
            provider = getattr(self, name)
            setattr(self, name, None)
            if provider is not None:
                try:
                    provider.shutdown()
                except Exception:
                    log.warning("OpenTelemetry export did not shut down cleanly", exc_info=True)


def providers_from_env(service: str = "moa") -> Exporting:
    """New SDK tracer and meter providers exporting as the standard variables say (not set
    globally): `OTEL_TRACES_EXPORTER` / `OTEL_METRICS_EXPORTER` (otlp, the default; console;
    none), `OTEL_EXPORTER_OTLP_*` (endpoint, protocol, headers, timeout), `OTEL_SERVICE_NAME`
    and `OTEL_RESOURCE_ATTRIBUTES` (service.name defaults to `service`), `OTEL_BSP_*` and
    `OTEL_METRIC_EXPORT_INTERVAL`. Raises `ConfigError` without the SDK or for an exporter
    or protocol moa cannot use."""
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise ConfigError(f"Exporting OpenTelemetry needs the otel extra: {EXTRA}.") from None
    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": service}))
    out = Exporting()
    said = []
    traces = [n for n in _names(os.environ.get("OTEL_TRACES_EXPORTER") or "otlp") if n != "none"]
    meters = [n for n in _names(os.environ.get("OTEL_METRICS_EXPORTER") or "otlp") if n != "none"]
    span_exporters = [_exporter("TRACES", n) for n in traces]
    metric_exporters = [_exporter("METRICS", n) for n in meters]
    if span_exporters:
        out.tracer_provider = TracerProvider(resource=resource)
        for exporter in span_exporters:
            out.tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
        said.append("traces: " + ", ".join(_said(n, "TRACES") for n in traces))
    if metric_exporters:
        readers = [PeriodicExportingMetricReader(e) for e in metric_exporters]
        out.meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        said.append("metrics: " + ", ".join(_said(n, "METRICS") for n in meters))
    out.description = "; ".join(said) or "nothing (both exporters are none)"
    return out


def _said(name: str, signal: str) -> str:
    if name != "otlp":
        return name
    endpoint = (os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")
                or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    where = f" to {endpoint}" if endpoint else ""
    return f"otlp ({_protocol(signal)}){where}"


def configure(service: str = "moa", *, force: bool = False) -> Exporting | None:
    """Set the global tracer and meter providers to SDK ones exporting as the standard
    variables say (`providers_from_env`), when they ask for export (`export_requested`) or
    `force` does (then OTLP to its default endpoint unless told otherwise). None, and nothing
    set, when export is not asked for, when `OTEL_SDK_DISABLED=true`, or when the process
    already set a tracer provider of its own. Raises `ConfigError` when export is asked for
    but cannot be done (no otel extra, an unknown exporter). Call `shutdown()` on the result
    before exiting, so the last spans are sent."""
    if _disabled() or not (force or export_requested()):
        return None
    api = _otel()
    if api is None:
        raise ConfigError(f"Exporting OpenTelemetry needs the otel extra: {EXTRA}.")
    trace, metrics = api
    if type(trace.get_tracer_provider()).__name__ not in _OFF:
        return None  # the app configured OpenTelemetry itself
    exporting = providers_from_env(service)
    if exporting.tracer_provider is not None:
        trace.set_tracer_provider(exporting.tracer_provider)
    if exporting.meter_provider is not None:
        if type(metrics.get_meter_provider()).__name__ in _OFF:
            metrics.set_meter_provider(exporting.meter_provider)
        else:
            exporting.meter_provider.shutdown()
            exporting.meter_provider = None
    return exporting


def configure_cli(*, force: bool = False) -> Exporting | None:
    """`configure()` for a command (`moa serve`, `moa chat`), saying on stderr where the
    telemetry goes. A problem is a warning (the command runs without export) unless `force`
    (`--otel`) asked for export: then it raises `ConfigError`."""
    try:
        exporting = configure("moa", force=force)
    except ConfigError as err:
        if force:
            raise
        print(f"moa: not exporting OpenTelemetry: {err}", file=sys.stderr)
        return None
    if exporting is not None:
        print(f"moa: OpenTelemetry {exporting.description}", file=sys.stderr)
    return exporting
