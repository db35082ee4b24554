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
import json
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

import grpc
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader, MetricsData
from opentelemetry.sdk.resources import Resource

from ._metrics import catalogue as _metrics
from ._metrics import export as _metric_export

__all__ = ["MetricsReader", "OtlpReceiver", "ReceivedLog", "ReceivedMetric", "ReceivedSpan", "attributes"]


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


class _LoopbackReceiver:
    """An HTTP server on 127.0.0.1 in a daemon thread, and a condition to wait on.

    ``http_port`` 0 picks a free port; a fixed one makes ``stop()`` then ``start()`` a
    backend that went away and came back at the same address (what it received is kept).
    """

    def __init__(self, http_port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        self._lock = threading.Condition()
        self._http: ThreadingHTTPServer | None = None
        self._http_port = http_port
        self._tls = tls

    def _serve(self, handler: type[BaseHTTPRequestHandler], name: str) -> int:
        self._http = ThreadingHTTPServer(("127.0.0.1", self._http_port), handler)
        if self._tls is not None:  # each connection's handshake runs as it is accepted
            self._http.socket = self._tls.wrap_socket(self._http.socket, server_side=True)
        self._http.daemon_threads = True
        threading.Thread(target=self._http.serve_forever, name=name, daemon=True).start()
        return int(self._http.server_address[1])

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
        """Wait until ``predicate()`` holds (checked whenever data arrives); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._lock.wait(remaining)
            return True


class OtlpReceiver(_LoopbackReceiver):
    """OTLP/gRPC and OTLP/HTTP (protobuf) receiver bound to 127.0.0.1.

    ``status`` (HTTP) and ``grpc_status`` can be changed at any time to make the
    receiver reject requests; rejected requests are counted, not stored.
    """

    def __init__(
        self,
        path_prefix: str = "/otlp",
        required_headers: dict[str, str] | None = None,
        http_port: int = 0,
        authorize: Callable[[str, dict[str, str], bytes], bool] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        # ``tls``: a server context makes the HTTP side HTTPS (a failed handshake is no request).
        # HTTP paths are {path_prefix}/v1/{traces,metrics,logs}, the prefix optional when it is
        # the default (Loki's /otlp); a request missing a required header (an API key) gets 401.
        # ``authorize(path, headers, raw body)`` may check a request signature: False gets 403
        # (counted in ``unauthorized``, like a missing header).
        super().__init__(http_port, tls)
        self.path_prefix = path_prefix
        self.required_headers = {k.lower(): v for k, v in (required_headers or {}).items()}
        self.authorize = authorize
        self.spans: list[ReceivedSpan] = []
        self.metrics: list[ReceivedMetric] = []
        self.logs: list[ReceivedLog] = []
        self.headers: list[dict[str, str]] = []
        self.paths: list[str] = []  # every HTTP path posted to, accepted or not
        self.rejected = 0
        self.unauthorized = 0
        self.malformed = 0
        self.status = 200
        self.grpc_status = grpc.StatusCode.OK
        self._grpc: grpc.Server | None = None
        self.grpc_port = 0
        self.http_port = 0

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> Self:
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceServicer(self), self._grpc)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_MetricsServicer(self), self._grpc)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(_LogsServicer(self), self._grpc)
        self.grpc_port = self._grpc.add_insecure_port("127.0.0.1:0")
        self._grpc.start()
        self.http_port = self._serve(_http_handler(self), "otlp-http")
        return self

    def stop(self) -> None:
        if self._grpc is not None:
            self._grpc.stop(grace=None)
        super().stop()

    @property
    def grpc_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        scheme = "https" if self._tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.http_port}"

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
            path = self.path.split("?", 1)[0].rstrip("/")
            with receiver._lock:
                receiver.paths.append(path)
            if path.startswith(receiver.path_prefix):
                path = path[len(receiver.path_prefix) :]
            elif receiver.path_prefix != "/otlp":
                path = ""
            kind = _HTTP_TYPES.get(path)
            if kind is None:
                self._reply(404)
                return
            if any(self.headers.get(k) != v for k, v in receiver.required_headers.items()):
                with receiver._lock:
                    receiver.unauthorized += 1
                    receiver._lock.notify_all()
                self._reply(401)
                return
            if receiver.authorize is not None and not receiver.authorize(
                self.path, {k.lower(): v for k, v in self.headers.items()}, body
            ):
                with receiver._lock:
                    receiver.unauthorized += 1
                    receiver._lock.notify_all()
                self._reply(403)
                return
            if receiver.status != 200:
                with receiver._lock:
                    receiver.rejected += 1
                    receiver._lock.notify_all()
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


# --- Sentry -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SentryEnvelope:
    """One envelope as Sentry's ingest would receive it: headers and ``(item header, payload)``."""

    headers: dict[str, Any]
    items: list[tuple[dict[str, Any], bytes]]
    request_headers: dict[str, str]
    received_at: float

    def payloads(self, item_type: str) -> list[dict[str, Any]]:
        """The JSON payloads of the items of one type (``event``, ``profile_chunk``, ...)."""
        return [json.loads(payload) for header, payload in self.items if header.get("type") == item_type]


def parse_envelope(body: bytes) -> tuple[dict[str, Any], list[tuple[dict[str, Any], bytes]]]:
    r"""Split a Sentry envelope (already decompressed) into its header and items.

    >>> parse_envelope(b'{"event_id":"1"}\n{"type":"event"}\n{"level":"error"}\n')
    ({'event_id': '1'}, [({'type': 'event'}, b'{"level":"error"}')])
    """
    end = body.find(b"\n")
    end = len(body) if end < 0 else end
    headers = json.loads(body[:end] or b"{}")
    items: list[tuple[dict[str, Any], bytes]] = []
    pos = end + 1
    while pos < len(body):  # every turn moves pos forward
        end = body.find(b"\n", pos)
        end = len(body) if end < 0 else end
        line = body[pos:end]
        pos = end + 1
        if not line.strip():
            continue
        item = json.loads(line)
        length = item.get("length")
        if isinstance(length, int):
            payload = body[pos : pos + length]
            pos += length + (1 if body[pos + length : pos + length + 1] == b"\n" else 0)
        else:
            end = body.find(b"\n", pos)
            end = len(body) if end < 0 else end
            payload = body[pos:end]
            pos = end + 1
        items.append((item, payload))
    return headers, items


class SentryReceiver(_LoopbackReceiver):
    """A stand-in for Sentry's ingest on 127.0.0.1: keeps the envelopes the real SDK sends.

    Point an app at :attr:`dsn`, then assert on the events (decoded JSON) it received:

    >>> with SentryReceiver() as sentry:  # doctest: +SKIP
    ...     env = {"SENTRY_DSN": sentry.dsn}
    ...     ...
    ...     [event] = sentry.wait_for_events(1)
    ...     assert event["level"] == "error"

    ``delay`` (seconds before answering) and ``status`` can be changed at any time to
    make it slow or failing; envelopes are kept as soon as they are read either way.
    """

    def __init__(self, project_id: int = 42, public_key: str = "publickey", http_port: int = 0) -> None:
        super().__init__(http_port)
        self.project_id = project_id
        self.public_key = public_key
        self.envelopes: list[SentryEnvelope] = []
        self.malformed = 0
        self.delay = 0.0
        self.status = 200
        self.port = 0

    def start(self) -> Self:
        self.port = self._serve(_sentry_handler(self), "sentry-ingest")
        return self

    @property
    def dsn(self) -> str:
        return f"http://{self.public_key}@127.0.0.1:{self.port}/{self.project_id}"

    def clear(self) -> None:
        with self._lock:
            self.envelopes.clear()

    def _accept(self, envelope: SentryEnvelope) -> None:
        with self._lock:
            self.envelopes.append(envelope)
            self._lock.notify_all()

    def payloads(self, item_type: str) -> list[dict[str, Any]]:
        """Every payload of one item type received so far, in order."""
        with self._lock:
            return [p for envelope in self.envelopes for p in envelope.payloads(item_type)]

    @property
    def events(self) -> list[dict[str, Any]]:
        """The error and message events received so far."""
        return self.payloads("event")

    def wait_for_events(
        self, count: int, match: Callable[[dict[str, Any]], bool] | None = None, timeout: float = 15.0
    ) -> list[dict[str, Any]]:
        """Wait until ``count`` matching events arrived; returns all matching ones."""
        found: list[dict[str, Any]] = []

        def check() -> bool:
            found[:] = [e for e in self.payloads("event") if match is None or match(e)]
            return len(found) >= count

        if not self.wait_for(check, timeout):
            messages = [_event_title(e) for e in self.payloads("event")]
            raise AssertionError(f"{len(found)} of {count} events within {timeout}s; got {messages}")
        return found

    def wait_for_item(self, item_type: str, timeout: float = 15.0) -> dict[str, Any]:
        """Wait for the first item of ``item_type`` (such as ``profile_chunk``)."""
        if not self.wait_for(lambda: bool(self.payloads(item_type)), timeout):
            raise AssertionError(f"no {item_type} item within {timeout}s")
        return self.payloads(item_type)[0]


def _event_title(event: dict[str, Any]) -> str:
    values = (event.get("exception") or {}).get("values") or []
    if values:
        return f"{values[-1].get('type')}: {values[-1].get('value')}"
    return str((event.get("logentry") or {}).get("message") or event.get("message"))


def _sentry_handler(receiver: SentryReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            if not self.path.startswith(f"/api/{receiver.project_id}/envelope"):
                self._reply(404)
                return
            try:
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                headers, items = parse_envelope(body)
            except (OSError, zlib.error, ValueError):
                receiver.malformed += 1
                self._reply(400)
                return
            request_headers = {k.lower(): v for k, v in self.headers.items()}
            receiver._accept(SentryEnvelope(headers, items, request_headers, time.monotonic()))
            if receiver.delay > 0:
                time.sleep(receiver.delay)
            self._reply(receiver.status)

        def _reply(self, status: int) -> None:
            payload = b"{}"
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except OSError:  # the client gave up waiting
                pass

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


__all__ += ["SentryEnvelope", "SentryReceiver", "parse_envelope"]


class MetricsReader(InMemoryMetricReader):
    """The SDK's in-memory metric reader that also reads cfk_otel's metrics, as the OTLP
    push adds them (cfk_otel aggregates its metrics itself: no SDK reader sees them).

    >>> reader = MetricsReader()
    >>> provider = MeterProvider(metric_readers=[reader])
    >>> reader.read_from(provider)  # the registries made for it; default: the global provider's
    >>> data = reader.get_metrics_data()  # doctest: +SKIP
    """

    def __init__(self, preferred_temporality: dict[type, AggregationTemporality] | None = None) -> None:
        super().__init__(preferred_temporality=preferred_temporality)
        self._provider: object | None = None
        self._collection = _metric_export.Collection(
            lambda: _metrics.direct_of(self._provider), preferred_temporality
        )

    def read_from(self, provider: object) -> None:
        """Read the cfk_otel metrics registered for ``provider`` (``Metrics(provider)``)."""
        self._provider = provider

    def get_metrics_data(self) -> MetricsData:
        data = super().get_metrics_data()
        return _metric_export.merged(data, self._collection.metrics(), Resource.create())
