"""Test helpers: an in-process OTLP receiver that decodes what it is sent.

It speaks both OTLP transports on 127.0.0.1, so a test can point a real app (or a
real collector) at it and assert on the spans, metrics and logs that arrived:

>>> with OtlpReceiver() as receiver:  # doctest: +SKIP
...     env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.grpc_endpoint}
...     ...
...     span = receiver.wait_for_span(lambda s: s.name == "GET /api/tickets")
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric
from opentelemetry.proto.trace.v1.trace_pb2 import Span

__all__ = ["OtlpReceiver", "ReceivedLog", "ReceivedMetric", "ReceivedSpan", "attributes"]


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    return getattr(value, kind) if kind else None


def attributes(pairs: Any) -> dict[str, Any]:
    """OTLP ``KeyValue`` pairs as a plain dict."""
    return {kv.key: _value(kv.value) for kv in pairs if isinstance(kv, KeyValue)}


@dataclass(frozen=True)
class ReceivedSpan:
    span: Span
    resource: dict[str, Any]
    scope: str

    @property
    def name(self) -> str:
        return self.span.name

    @property
    def attributes(self) -> dict[str, Any]:
        return attributes(self.span.attributes)

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent_span_id(self) -> str:
        return self.span.parent_span_id.hex()


@dataclass(frozen=True)
class ReceivedMetric:
    metric: Metric
    resource: dict[str, Any]
    scope: str

    @property
    def name(self) -> str:
        return self.metric.name


@dataclass(frozen=True)
class ReceivedLog:
    record: LogRecord
    resource: dict[str, Any]
    scope: str

    @property
    def body(self) -> Any:
        return _value(self.record.body)

    @property
    def attributes(self) -> dict[str, Any]:
        return attributes(self.record.attributes)


class OtlpReceiver:
    """OTLP/gRPC and OTLP/HTTP (protobuf) receiver bound to 127.0.0.1.

    ``status`` (HTTP) and ``grpc_status`` can be changed at any time to make the
    receiver reject requests; rejected requests are counted, not stored.
    """

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self.spans: list[ReceivedSpan] = []
        self.metrics: list[ReceivedMetric] = []
        self.logs: list[ReceivedLog] = []
        self.headers: list[dict[str, str]] = []
        self.rejected = 0
        self.malformed = 0
        self.status = 200
        self.grpc_status = grpc.StatusCode.OK
        self._grpc: grpc.Server | None = None
        self._http: ThreadingHTTPServer | None = None
        self.grpc_port = 0
        self.http_port = 0

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> OtlpReceiver:
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceServicer(self), self._grpc)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_MetricsServicer(self), self._grpc)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(_LogsServicer(self), self._grpc)
        self.grpc_port = self._grpc.add_insecure_port("127.0.0.1:0")
        self._grpc.start()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _http_handler(self))
        self._http.daemon_threads = True
        self.http_port = self._http.server_address[1]
        threading.Thread(target=self._http.serve_forever, name="otlp-http", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._grpc is not None:
            self._grpc.stop(grace=None)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def grpc_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def clear(self) -> None:
        with self._lock:
            self.spans.clear()
            self.metrics.clear()
            self.logs.clear()
            self.headers.clear()

    # --- ingest ------------------------------------------------------------------------

    def _accept(self, request: Any, headers: dict[str, str]) -> None:
        with self._lock:
            self.headers.append(headers)
            if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
                for rs in request.resource_spans:
                    res = attributes(rs.resource.attributes)
                    for ss in rs.scope_spans:
                        self.spans.extend(ReceivedSpan(s, res, ss.scope.name) for s in ss.spans)
            elif isinstance(request, metrics_service_pb2.ExportMetricsServiceRequest):
                for rm in request.resource_metrics:
                    res = attributes(rm.resource.attributes)
                    for sm in rm.scope_metrics:
                        self.metrics.extend(ReceivedMetric(m, res, sm.scope.name) for m in sm.metrics)
            elif isinstance(request, logs_service_pb2.ExportLogsServiceRequest):
                for rl in request.resource_logs:
                    res = attributes(rl.resource.attributes)
                    for sl in rl.scope_logs:
                        self.logs.extend(ReceivedLog(r, res, sl.scope.name) for r in sl.log_records)
            self._lock.notify_all()

    # --- waiting -----------------------------------------------------------------------

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._lock.wait(remaining)
            return True

    def wait_for_span(self, match: Callable[[ReceivedSpan], bool], timeout: float = 15.0) -> ReceivedSpan:
        found: list[ReceivedSpan] = []

        def check() -> bool:
            found[:] = [s for s in self.spans if match(s)]
            return bool(found)

        if not self.wait_for(check, timeout):
            names = sorted({s.name for s in self.spans})
            raise AssertionError(f"no matching span within {timeout}s; received span names: {names}")
        return found[0]

    def iter_spans(self) -> Iterator[ReceivedSpan]:
        with self._lock:
            return iter(list(self.spans))


class _TraceServicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._r = receiver

    def Export(self, request: Any, context: Any) -> Any:
        return _grpc_export(self._r, request, context, trace_service_pb2.ExportTraceServiceResponse)


class _MetricsServicer(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._r = receiver

    def Export(self, request: Any, context: Any) -> Any:
        return _grpc_export(self._r, request, context, metrics_service_pb2.ExportMetricsServiceResponse)


class _LogsServicer(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._r = receiver

    def Export(self, request: Any, context: Any) -> Any:
        return _grpc_export(self._r, request, context, logs_service_pb2.ExportLogsServiceResponse)


def _grpc_export(receiver: OtlpReceiver, request: Any, context: Any, response: Any) -> Any:
    if receiver.grpc_status != grpc.StatusCode.OK:
        receiver.rejected += 1
        context.abort(receiver.grpc_status, "rejected by the test receiver")
    receiver._accept(request, {k: v for k, v in context.invocation_metadata() if isinstance(v, str)})
    return response()


_HTTP_TYPES: dict[str, Any] = {
    "/v1/traces": trace_service_pb2.ExportTraceServiceRequest,
    "/v1/metrics": metrics_service_pb2.ExportMetricsServiceRequest,
    "/v1/logs": logs_service_pb2.ExportLogsServiceRequest,
}


def _http_handler(receiver: OtlpReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            kind = _HTTP_TYPES.get(self.path.split("?", 1)[0].rstrip("/").removeprefix("/otlp"))
            if kind is None:
                self._reply(404)
                return
            if receiver.status != 200:
                receiver.rejected += 1
                self._reply(receiver.status)
                return
            try:
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                request = kind()
                request.ParseFromString(body)
            except (DecodeError, OSError, zlib.error):
                receiver.malformed += 1
                self._reply(400)
                return
            receiver._accept(request, {k.lower(): v for k, v in self.headers.items()})
            self._reply(200)

        def _reply(self, status: int) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
