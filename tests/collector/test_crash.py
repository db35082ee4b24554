"""The collector SIGKILLed under steady load from the real app, twice, the second time kept
away for 30 s (first refusing connections, then answering 503): every record the collector
acknowledged (HTTP 200 to the app) reaches every backend, per signal.

What the collector acknowledges is counted by a small proxy between the app and the
collector: it forwards each OTLP/HTTP export and, when the collector answers 200, decodes the
request and records the identity of every span, log record and metric point in it. A record
the app could not hand over while the collector was away is the app's to keep: its compiled
core retries with backoff (at most 5 s apart) while the queue holds what comes meanwhile, so
every request's span and log line is acknowledged in the end too.
"""

from __future__ import annotations

import gzip
import http.client
import signal
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from prometheus_client.parser import text_string_to_metric_families

from cfk_otel.testing import OtlpReceiver, attributes
from tests.collector.conftest import CloudWatchStandIns, Collector, SentryOtlp
from tests.collector.test_backends import APP_ENV, TICKET
from tests.conftest import free_port, uvicorn_command

pytestmark = pytest.mark.timeout(300)

SIGNALS = ("traces", "metrics", "logs")
REQUESTS = {
    "/v1/traces": ("traces", trace_service_pb2.ExportTraceServiceRequest),
    "/v1/metrics": ("metrics", metrics_service_pb2.ExportMetricsServiceRequest),
    "/v1/logs": ("logs", logs_service_pb2.ExportLogsServiceRequest),
}
RATE = 20.0  # requests per second, steady
FIRST_OUTAGE = 8.0  # seconds: the measurement
SECOND_OUTAGE = 30.0  # seconds: refused for the first half, 503 for the second


# --- identities: the same record seen at the proxy and at a backend -----------------------


def span_key(span: Span) -> tuple[Any, ...]:
    return ("span", span.trace_id, span.span_id)


def log_key(record: LogRecord) -> tuple[Any, ...]:
    return ("log", record.time_unix_nano, record.observed_time_unix_nano, record.span_id, str(record.body))


def point_keys(metric: Metric, resource: dict[str, Any]) -> Iterator[tuple[Any, ...]]:
    kind = metric.WhichOneof("data")
    if kind is None:
        return
    instance = resource.get("service.instance.id")
    for point in getattr(metric, kind).data_points:
        labels = frozenset((k, str(v)) for k, v in attributes(point.attributes).items())
        yield ("point", instance, metric.name, labels, point.start_time_unix_nano, point.time_unix_nano)


def request_keys(signal_: str, request: Any) -> Iterator[tuple[Any, ...]]:
    if signal_ == "traces":
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                yield from (span_key(s) for s in ss.spans)
    elif signal_ == "logs":
        for rl in request.resource_logs:
            for sl in rl.scope_logs:
                yield from (log_key(r) for r in sl.log_records)
    else:
        for rm in request.resource_metrics:
            resource = attributes(rm.resource.attributes)
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    yield from point_keys(m, resource)


def received_keys(backend: OtlpReceiver, signal_: str) -> set[tuple[Any, ...]]:
    if signal_ == "traces":
        return {span_key(s.span) for s in backend.iter_spans()}
    if signal_ == "logs":
        return {log_key(r.record) for r in list(backend.logs)}
    return {k for m in list(backend.metrics) for k in point_keys(m.metric, m.resource)}


# --- the counting proxy -------------------------------------------------------------------


class CountingProxy:
    """OTLP/HTTP between the app and the collector, on a fixed loopback port.

    ``mode`` "forward": pass the export on; the collector's answer goes back to the app and a
    200 counts every record in it as acknowledged; a refused connection becomes 503 (as from a
    load balancer with no backend). "503": answer 503 without forwarding. ``stop()`` makes
    the port refuse connections; ``start()`` opens it again.
    """

    def __init__(self, upstream_port: int) -> None:
        self.port = free_port()
        self.upstream_port = upstream_port
        self.mode = "forward"
        self.acked: dict[str, set[tuple[Any, ...]]] = {s: set() for s in SIGNALS}
        self.acked_points: list[tuple[int, float]] = []  # (time, value) of http_requests_total{TICKET}
        self.acked_paths: set[str] = set()  # url.path of every acknowledged server span
        self.answers: dict[int, int] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, reply = proxy.forward(self.path, dict(self.headers.items()), body)
                with proxy._lock:
                    proxy.answers[status] = proxy.answers.get(status, 0) + 1
                self.send_response(status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def forward(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        if self.mode == "503":
            return 503, b""
        keep = {k: v for k, v in headers.items() if k.lower() in {"content-type", "content-encoding"}}
        connection = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=10)
        try:
            connection.request("POST", path, body=body, headers=keep)
            response = connection.getresponse()
            status, reply = response.status, response.read()
        except OSError:
            return 503, b""  # refused or reset: the collector is not there
        finally:
            connection.close()
        if status == 200 and path in REQUESTS:
            self.count(path, headers, body)
        return status, reply

    def count(self, path: str, headers: dict[str, str], body: bytes) -> None:
        encoding = {k.lower(): v for k, v in headers.items()}.get("content-encoding", "")
        raw = gzip.decompress(body) if encoding == "gzip" else zlib.decompress(body) if encoding else body
        signal_, kind = REQUESTS[path]
        request = kind()
        request.ParseFromString(raw)
        keys = set(request_keys(signal_, request))
        points, paths = [], set()
        if signal_ == "traces":
            for rs in request.resource_spans:
                for ss in rs.scope_spans:
                    paths |= {str(attributes(sp.attributes).get("url.path")) for sp in ss.spans}
        if signal_ == "metrics":
            for rm in request.resource_metrics:
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        if m.name == "http_requests_total":
                            points += [
                                (p.time_unix_nano, p.as_int or p.as_double)
                                for p in m.sum.data_points
                                if attributes(p.attributes).get("path") == TICKET
                            ]
        with self._lock:
            self.acked[signal_] |= keys
            self.acked_points += points
            self.acked_paths |= paths

    def acknowledged(self, signal_: str) -> set[tuple[Any, ...]]:
        with self._lock:
            return set(self.acked[signal_])


# --- the test -----------------------------------------------------------------------------


class Load:
    """GET /api/tickets/crash-N at a steady rate in a thread, until stopped."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.served: list[str] = []
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start, i = time.monotonic(), 0
        while not self._stop.is_set() and len(self.served) < 5000:
            path = f"/api/tickets/crash-{i}"
            try:
                ok = self.app.get(path)[0] == 200
            except OSError:
                ok = False
            (self.served if ok else self.failed).append(path)
            i += 1
            self._stop.wait(max(0.0, start + i / RATE - time.monotonic()))

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def sigkill(collector: Collector) -> None:
    assert collector.process is not None
    assert collector.process.poll() is None
    collector.process.send_signal(signal.SIGKILL)
    assert collector.process.wait(10) == -signal.SIGKILL


def restart(collector: Collector, proxy: CountingProxy, backends: str, env: dict[str, str]) -> None:
    """Start the collector again on its ports, with its queue files. While it was away, one of
    those ports may have become the local port of some client connection on this shared
    machine: then on fresh ports (the app still sends to the proxy, which follows)."""
    for attempt in range(3):
        try:
            collector.start(backends, **env)
            break
        except AssertionError as exc:
            if "address already in use" not in str(exc) or attempt == 2:
                raise
            collector.grpc_port, collector.http_port = free_port(), free_port()
            collector.health_port, collector.prometheus_port = free_port(), free_port()
    proxy.upstream_port = collector.http_port


def served_ticket_requests(collector: Collector) -> float:
    return sum(
        s.value
        for family in text_string_to_metric_families(collector.scrape())
        for s in family.samples
        if s.name == "http_requests_total" and s.labels.get("path") == TICKET
    )


def report_rows(
    proxy: CountingProxy, backends: dict[str, tuple[OtlpReceiver, Iterable[str]]]
) -> list[tuple[str, str, int, int, int]]:
    rows = []
    for name, (backend, signals) in backends.items():
        for signal_ in signals:
            acked = proxy.acknowledged(signal_)
            got = received_keys(backend, signal_)
            rows.append((name, signal_, len(acked), len(acked & got), len(got)))
    return rows


def test_sigkill_loses_nothing_the_collector_acknowledged(
    run_app: Any,
    collector: Collector,
    sentry: SentryOtlp,
    cloudwatch: CloudWatchStandIns,
) -> None:
    with OtlpReceiver() as loki, OtlpReceiver() as datadog_agent:
        env = {
            "LOKI_ENDPOINT": f"{loki.http_endpoint}/otlp",
            "SENTRY_DSN": sentry.dsn,
            "DD_OTLP_ENDPOINT": datadog_agent.http_endpoint,  # the Agent route: cumulative metrics
            "DD_API_KEY": "a" * 32,
            "CLOUDWATCH_LOG_GROUP": "/cf-kanban/crash",
            "CLOUDWATCH_LOG_STREAM": "crash",
            **cloudwatch.env(),  # the direct route, SigV4-checked
        }
        backends_arg = "loki,sentry,datadog,cloudwatch,prometheus"
        collector.start(backends_arg, **env)
        proxy = CountingProxy(collector.http_port)
        proxy.start()
        port = free_port()
        app = run_app(
            uvicorn_command("starlette_app:app", port),
            {**APP_ENV, "OTEL_EXPORTER_OTLP_ENDPOINT": proxy.endpoint},
            port,
        )
        backends: dict[str, tuple[OtlpReceiver, Iterable[str]]] = {
            "loki": (loki, ["logs"]),
            "sentry": (sentry, ["traces", "logs"]),
            "datadog (Agent)": (datadog_agent, SIGNALS),
            "cloudwatch logs": (cloudwatch.logs, ["logs"]),
            "cloudwatch x-ray": (cloudwatch.traces, ["traces"]),
            "cloudwatch metrics": (cloudwatch.metrics, ["metrics"]),
        }
        try:
            with Load(app) as load:
                time.sleep(3)
                # Kill 1: SIGKILL under load, away for 8 s (the proxy answers 503: refused upstream).
                sigkill(collector)
                time.sleep(FIRST_OUTAGE)
                restart(collector, proxy, backends_arg, env)
                time.sleep(6)
                # Kill 2: away for 30 s, refused (no listener) then 503.
                sigkill(collector)
                proxy.stop()
                time.sleep(SECOND_OUTAGE / 2)
                proxy.mode = "503"
                proxy.start()
                time.sleep(SECOND_OUTAGE / 2)
                restart(collector, proxy, backends_arg, env)
                proxy.mode = "forward"
                time.sleep(6)

            def app_side_missing() -> tuple[int, int]:
                served = set(load.served)
                logs = {k for k in proxy.acknowledged("logs") if "ticket crash-" in k[-1]}
                return len(served - proxy.acked_paths), len(served) - len(logs)

            def complete() -> bool:
                return app_side_missing() == (0, 0) and all(
                    a == d for _, _, a, d, _ in report_rows(proxy, backends)
                )

            deadline = time.monotonic() + 60
            while not complete() and time.monotonic() < deadline:
                time.sleep(0.5)
            # Prometheus (pull): the last acknowledged cumulative value is what it serves.
            last = max(proxy.acked_points)[1] if proxy.acked_points else None
            prometheus_value = None
            while time.monotonic() < deadline:
                prometheus_value = served_ticket_requests(collector)
                if prometheus_value == last:
                    break
                time.sleep(0.5)
        finally:
            proxy.stop()

        rows = report_rows(proxy, backends)
        served = set(load.served)
        acked_paths = proxy.acked_paths
        acked_ticket_logs = len({k for k in proxy.acknowledged("logs") if "ticket crash-" in k[-1]})
        lines = [
            f"served {len(served)} requests ({len(load.failed)} failed) at {RATE:.0f}/s; "
            f"proxy answers {dict(sorted(proxy.answers.items()))}",
            f"app side: {len(served - acked_paths)} of {len(served)} request spans "
            f"and {len(served) - acked_ticket_logs} of {len(served)} 'ticket ... requested' log records "
            "never acknowledged by the collector (cumulative metrics catch up: see prometheus)",
            f"prometheus: http_requests_total{{path={TICKET}}} {prometheus_value}, last acknowledged {last}",
        ]
        lines += [
            f"{name:20} {sig:8} acknowledged {a:6}  delivered {d:6}  missing {a - d}  (received {r})"
            for name, sig, a, d, r in rows
        ]
        print("\n" + "\n".join(lines))

        assert len(served) >= 0.9 * RATE * (3 + FIRST_OUTAGE + 6 + SECOND_OUTAGE + 6), lines
        assert not load.failed, load.failed[:5]  # the app served every request
        assert all(a > 0 for _, _, a, _, _ in rows), lines  # every signal was acknowledged
        for name, sig, acknowledged, delivered, _ in rows:
            assert delivered == acknowledged, f"{name} {sig}: {acknowledged - delivered} lost\n" + "\n".join(
                lines
            )
        assert prometheus_value == last, lines
        assert proxy.answers.get(503, 0) > 0  # the app did meet the outages
        # The app's side: every request's span and log line reached the collector in the end.
        assert served <= acked_paths, lines
        assert acked_ticket_logs == len(served), lines
        for check in cloudwatch.checks.values():
            assert check.failures == [], check.failures
        assert collector.health() == 200
