"""OpenTelemetry traces of a mixture run: the span tree, printed.

A staircase mixture (two proposers, one aggregator) runs over the bundled loopback server
(offline) with an OpenTelemetry SDK set as the global tracer and meter provider, recording in
memory, as an app would set it up (in production: an OTLP exporter, or `moa serve` /
`moa chat --otel` with OTEL_EXPORTER_OTLP_ENDPOINT; docs/observability.md). It prints every
span under its parent with its main attributes, the span events (the aggregator's staircase
steps) and the metrics. Set OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true to see
each call's prompt too.
"""

import json
import os

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from moa import Mixture
from moa.testing import LoopbackServer, ModelBehavior

SHOWN = (  # the attributes printed, when a span has them
    "moa.mixture.mode", "moa.agent.kind", "gen_ai.request.model", "gen_ai.request.max_tokens",
    "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens",
    "gen_ai.response.time_to_first_chunk", "moa.time_to_first_token", "error.type",
)


def attributes(span: ReadableSpan) -> str:
    out = []
    for key in SHOWN:
        value = (span.attributes or {}).get(key)
        if value is not None:
            out.append(f"{key.rsplit('.', 1)[-1]}={value:.3f}" if isinstance(value, float)
                       else f"{key.rsplit('.', 1)[-1]}={value}")
    return " ".join(out)


def print_tree(spans: list[ReadableSpan]) -> None:
    children: dict[int | None, list[ReadableSpan]] = {}
    for span in sorted(spans, key=lambda s: s.start_time or 0):
        children.setdefault(span.parent.span_id if span.parent else None, []).append(span)

    def show(span: ReadableSpan, depth: int) -> None:
        ms = ((span.end_time or 0) - (span.start_time or 0)) / 1e6
        print(f"{'  ' * depth}{span.name}  ({span.kind.name.lower()}, {ms:.0f} ms)  "
              f"{attributes(span)}")
        for event in span.events:
            a = dict(event.attributes or {})
            if event.name == "moa.staircase.step":
                shown = dict(zip(a["moa.staircase.references"], a["moa.staircase.shown_tokens"],
                                 strict=True))
                print(f"{'  ' * (depth + 1)}* step {a['moa.staircase.step']}: may write "
                      f"{a['moa.staircase.max_tokens']} after {a['moa.staircase.written_tokens']}"
                      f", shown {shown}, margin {a.get('moa.staircase.margin', '-')}"
                      f"{' (last)' if a['moa.staircase.last'] else ''}")
            else:
                print(f"{'  ' * (depth + 1)}* {event.name} {a}")
        if "gen_ai.input.messages" in (span.attributes or {}) and span.name.startswith("chat"):
            prompt = json.loads(span.attributes["gen_ai.input.messages"])
            print(f"{'  ' * (depth + 1)}prompt: {len(prompt)} messages, "
                  f"{sum(len(p.get('content', '')) for m in prompt for p in m['parts'])} chars")
        for child in children.get(span.context.span_id, []):
            show(child, depth + 1)

    for root in children.get(None, []):
        show(root, 0)


def main() -> None:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(tracer_provider)
    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))

    words = ["short", "waves", "of", "blue", "light", "scatter", "off", "the", "air", "far",
             "more", "than", "red"]
    models = {
        "fast": ModelBehavior(reply=" ".join(words * 3), tokens_per_s=400),
        "slow": ModelBehavior(reply=" ".join(reversed(words * 3)), tokens_per_s=150),
        "agg": ModelBehavior(reply=" ".join(words * 2), tokens_per_s=400),
    }
    config = {
        "name": "sky",
        "mode": "staircase",
        "layers": [{"agents": [{"model": "loop/fast"}, {"model": "loop/slow"}]}],
        "aggregator": {"model": "loop/agg", "max_tokens": 64},
        "staircase": {"chunk_tokens": [8, 16], "step_tokens": [8, 16]},
    }
    with LoopbackServer(models) as server:
        result = Mixture(config, registry=server.registry()).run_sync("Why is the sky blue?")
    print(f"answer: {result.text[:60]}...  ({result.mode}, {result.calls} calls)\n")
    print_tree(list(exporter.get_finished_spans()))
    print()
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                count = sum(p.count for p in metric.data.data_points)
                print(f"metric {metric.name} ({metric.unit}): {count} recorded")
    if not os.environ.get("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"):
        print("\n(prompts and completions are not recorded: the content switch is off)")


if __name__ == "__main__":
    main()
