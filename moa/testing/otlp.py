"""`OtlpReceiver`: a tiny OTLP/HTTP receiver on a free loopback port, for tests and examples.

    with OtlpReceiver() as otlp:               # OTEL_EXPORTER_OTLP_ENDPOINT=otlp.endpoint
        ...                                    # run something that exports to it
        span = otlp.wait_span("invoke_workflow mixture")
        span.attributes["moa.mixture.name"], otlp.metrics["gen_ai.client.token.usage"]

It decodes the protobuf `ExportTraceServiceRequest`s and `ExportMetricsServiceRequest`s it is
sent (gzip or not) into plain records, as a collector would receive them. It needs
`opentelemetry-proto` (the `otel` extra brings it).
"""

from __future__ import annotations

import gzip
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class ReceivedSpan:
    """One span as the receiver got it (ids in hex; `parent_span_id` empty for a root)."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    """The OTLP enum: 1 internal, 2 server, 3 client."""
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    status_code: int
    """0 unset, 1 ok, 2 error."""
    resource: dict[str, Any]
    scope: str


@dataclass
class _Store:
    spans: list[ReceivedSpan] = field(default_factory=list)
    metrics: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    paths: list[str] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return _attributes(v.kvlist_value.values)
    return getattr(v, kind) if kind else None


def _attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


class OtlpReceiver:
    """Receives OTLP over HTTP at `endpoint` (`/v1/traces`, `/v1/metrics`; `/v1/logs` is
    accepted and dropped) until the `with` block ends."""

    def __init__(self) -> None:
        self._store = _Store()
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                reply = receiver._take(self.path, dict(self.headers), body)
                self.send_response(200 if reply is not None else 404)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(reply or b"")))
                self.end_headers()
                self.wfile.write(reply or b"")

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        """The base URL, as `OTEL_EXPORTER_OTLP_ENDPOINT` takes it."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._changed:
            return list(self._store.spans)

    @property
    def metrics(self) -> dict[str, list[dict[str, Any]]]:
        """Metric name -> the attributes of each data point received."""
        with self._changed:
            return {k: list(v) for k, v in self._store.metrics.items()}

    @property
    def headers(self) -> list[dict[str, str]]:
        """The HTTP headers of every export request, in order."""
        with self._changed:
            return list(self._store.headers)

    def named(self, name: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.name == name]

    def wait_span(self, name: str, timeout: float = 30.0) -> ReceivedSpan:
        """The first span called `name`, once it has arrived (TimeoutError after `timeout`)."""
        with self._changed:
            if not self._changed.wait_for(
                lambda: any(s.name == name for s in self._store.spans), timeout
            ):
                raise TimeoutError(f"no span {name!r} within {timeout:g} s")
            return next(s for s in self._store.spans if s.name == name)

    def _take(self, path: str, headers: dict[str, str], body: bytes) -> bytes | None:
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        spans: list[ReceivedSpan] = []
        points: list[tuple[str, dict[str, Any]]] = []
        if path == "/v1/traces":
            request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
            for rs in request.resource_spans:
                resource = _attributes(rs.resource.attributes)
                for ss in rs.scope_spans:
                    spans += [
                        ReceivedSpan(
                            s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                            s.kind, _attributes(s.attributes),
                            [(e.name, _attributes(e.attributes)) for e in s.events],
                            s.status.code, resource, ss.scope.name,
                        )
                        for s in ss.spans
                    ]
            reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        elif path == "/v1/metrics":
            request = metrics_service_pb2.ExportMetricsServiceRequest.FromString(body)
            for rm in request.resource_metrics:
                for sm in rm.scope_metrics:
                    for metric in sm.metrics:
                        data = getattr(metric, metric.WhichOneof("data") or "gauge")
                        points += [(metric.name, _attributes(p.attributes))
                                   for p in data.data_points]
            reply = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
        elif path == "/v1/logs":
            reply = b""
        else:
            return None
        with self._changed:
            self._store.paths.append(path)
            self._store.headers.append(headers)
            self._store.spans += spans
            for name, attrs in points:
                self._store.metrics.setdefault(name, []).append(attrs)
            self._changed.notify_all()
        return reply

    def __enter__(self) -> OtlpReceiver:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)
