"""`moa bench overhead`: orchestration overhead of a layered mixture against its critical path.

A 3-layer mixture (6 proposers, 6 refiners, 1 aggregator) runs against the loopback server,
every agent with a set TTFT and token rate. The critical path is the sum over layers of the
slowest agent's TTFT + (tokens - 1) / rate (the loopback server sends the first token at the
TTFT). Whatever the run takes beyond it is overhead (HTTP, SSE parsing, prompt building,
scheduling). The runs share one event loop and connection pool, as a server's would; the
loopback server runs in the same process, so its work counts as overhead too.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

TARGET_SHARE = 0.05
TARGET_PER_LAYER_S = 0.020


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=5, help="runs to measure (default 5)")
    parser.add_argument("--tokens", type=int, default=100, help="tokens per reply (default 100)")
    parser.add_argument("--pairs", type=int, default=None,
                        help="interleaved runs of the mixture and of the same calls made "
                             "directly with httpx (default 4 x --repeats)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _agents(layer: int, tokens: int) -> dict[str, tuple[float, float]]:
    """Model name -> (TTFT seconds, tokens/s), spread across the layer's agents."""
    if layer == 3:
        return {"final": (0.2, 150.0)}
    return {f"L{layer}a{i}": (0.1 + 0.04 * i, 100.0 + 50.0 * (i % 3)) for i in range(6)}


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    import anyio

    from moa.config import MixtureConfig
    from moa.mixture import Mixture
    from moa.testing import LoopbackServer, ModelBehavior

    layers = [_agents(n, args.tokens) for n in (1, 2, 3)]
    reply = " ".join(f"w{i}" for i in range(args.tokens))
    models = {
        name: ModelBehavior(reply=reply, ttft_s=ttft, tokens_per_s=rate)
        for layer in layers
        for name, (ttft, rate) in layer.items()
    }
    critical = sum(
        max(ttft + (args.tokens - 1) / rate for ttft, rate in layer.values()) for layer in layers
    )
    config = MixtureConfig.model_validate(
        {
            "name": "moa-3x6",
            "mode": "layered",
            "layers": [{"agents": [{"model": f"loop/{m}"} for m in layer]} for layer in layers[:2]],
            "aggregator": {"model": "loop/final"},
        }
    )
    rows: list[dict[str, Any]] = []

    def record(api: str, i: int, result: Any, measured: float) -> None:
        overhead = measured - critical
        rows.append(
            {
                "mixture": config.name,
                "mode": "layered",
                "api": api,
                "run": i + 1,
                "calls": result.calls,
                "critical_path_s": round(critical, 4),
                "measured_s": round(measured, 4),
                "overhead_ms": round(overhead * 1000, 1),
                "overhead_pct": round(100 * overhead / critical, 2),
                "per_layer_ms": round(overhead * 1000 / 3, 1),
            }
        )

    async def measure(mixture: Mixture) -> None:
        await mixture.run("warm up")
        for i in range(args.repeats):
            start = time.perf_counter()
            result = await mixture.run("How much overhead?")
            record("async", i, result, time.perf_counter() - start)
        await _measure_traced(mixture, args.repeats, record, traced)

    traced: list[int] = []  # spans recorded per traced run
    with LoopbackServer(models) as srv:
        mixture = Mixture(config, registry=srv.registry())
        anyio.run(measure, mixture)
        for i in range(args.repeats):  # each call starts its own event loop and pools
            start = time.perf_counter()
            result = mixture.run_sync("How much overhead?")
            record("run_sync", i, result, time.perf_counter() - start)
    sync_rows = [r for r in rows if r["api"] == "run_sync"]
    otel_rows = [r for r in rows if r["api"] == OTEL_API]
    rows = [r for r in rows if r["api"] == "async"]
    median = sorted(rows, key=lambda r: r["overhead_ms"])[len(rows) // 2]  # the async runs
    ok = (
        median["overhead_pct"] < 100 * TARGET_SHARE
        and median["per_layer_ms"] < 1000 * TARGET_PER_LAYER_S
    )
    notes = [
        f"3 layers x 6 agents, {args.tokens} tokens per reply; critical path = sum over layers "
        "of the slowest agent's TTFT + (tokens - 1) / rate.",
        f"target: overhead < {100 * TARGET_SHARE:g} % and < {1000 * TARGET_PER_LAYER_S:g} ms per "
        f"layer; median run: {median['overhead_pct']} %, {median['per_layer_ms']} ms per layer -> "
        f"{'met' if ok else 'NOT met'}.",
        "run_sync rows: each call starts a new event loop with new connection pools, as calls "
        f"from a plain script do; median overhead {_median_ms(sync_rows)} ms.",
        _otel_note(rows, otel_rows, traced),
    ]
    from moa.bench import direct  # the same calls by hand with httpx, and the cold start

    pairs = args.pairs if args.pairs is not None else 4 * args.repeats
    direct_rows, direct_notes = direct.run(pairs, args.tokens, args.repeats)
    return rows + otel_rows + sync_rows + direct_rows, notes + direct_notes


def _median_ms(rows: list[dict[str, Any]]) -> float:
    return sorted(r["overhead_ms"] for r in rows)[len(rows) // 2]


OTEL_API = "async+otel"


async def _measure_traced(mixture: Any, repeats: int, record: Any, traced: list[int]) -> None:
    """The async runs again with an OpenTelemetry SDK recording every span and metric in
    memory (`moa.telemetry.using`), so tracing's own cost shows beside the untraced rows."""
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    except ImportError:
        return  # no SDK (the otel extra): the note says so
    from moa import telemetry

    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    with telemetry.using(tracer_provider, meter_provider):
        await mixture.run("warm up")
        for i in range(repeats):
            exporter.clear()
            start = time.perf_counter()
            result = await mixture.run("How much overhead?")
            record(OTEL_API, i, result, time.perf_counter() - start)
            traced.append(len(exporter.get_finished_spans()))
    tracer_provider.shutdown()
    meter_provider.shutdown()


def _otel_note(rows: list[dict[str, Any]], otel_rows: list[dict[str, Any]],
               traced: list[int]) -> str:
    if not otel_rows:
        return (f"{OTEL_API} rows: not measured, the OpenTelemetry SDK is not installed "
                "(pip install 'moa-stack[otel]').")
    delta = _median_ms(otel_rows) - _median_ms(rows)
    spans = f"{min(traced)}" if min(traced) == max(traced) else f"{min(traced)}-{max(traced)}"
    return (f"{OTEL_API} rows: the same async runs with an OpenTelemetry SDK recording every "
            f"span and metric in memory ({spans} spans a run); median "
            f"overhead {_median_ms(otel_rows)} ms, {delta:+.1f} ms against tracing off.")
