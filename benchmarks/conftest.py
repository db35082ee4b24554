"""Shared pieces of the micro-benchmarks: providers built the way cfk_otel builds them.

Each benchmark gets fresh providers (no global state): the same ``BatchSpanProcessor``
and ``BatchLogRecordProcessor`` (SDK defaults, which cfk_otel keeps) in front of an
exporter that drops everything, and a meter provider with the readers cfk_otel's
configurator attaches (the ``/api/metrics`` scrape reader and the periodic OTLP one).
Ours and upstream get identical providers: only the code under test differs.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pytest
from opentelemetry.sdk._logs import LoggerProvider, ReadableLogRecord
from opentelemetry.sdk._logs.export import (
    BatchLogRecordProcessor,
    LogRecordExporter,
    LogRecordExportResult,
)
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from prometheus_client import CollectorRegistry
from pytest_benchmark.fixture import BenchmarkFixture
from starlette.routing import Route

from cfk_otel._asgi.middleware import ASGIApp, Message, Receive, Scope, Send
from cfk_otel._bootstrap.resource import build_attributes
from cfk_otel._core import seam as _core
from cfk_otel._metrics.scrape import ScrapeReader, reader_arguments
from cfk_otel._settings import load

SETTINGS: Mapping[str, str] = {
    "SERVICE_NAME": "cf-kanban",
    "SERVICE_ENVIRONMENT": "production",
    "SERVICE_VERSION": "1.0.0",
}


class NullSpanExporter(SpanExporter):
    """Drops every batch: the cost measured is the app thread's, not the network's."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


class NullMetricExporter(MetricExporter):
    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        return None


class NullLogExporter(LogRecordExporter):
    """Drops every batch, keeping only the last record (for the correctness checks)."""

    last: ReadableLogRecord | None = None

    def export(self, batch: Sequence[ReadableLogRecord]) -> LogRecordExportResult:
        self.last = batch[-1]
        return LogRecordExportResult.SUCCESS

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


class NullStream(io.TextIOBase):
    """A text stream that keeps only the last line written (for the correctness checks)."""

    last = ""

    def write(self, text: str) -> int:
        if text != "\n":
            self.last = text
        return len(text)


@pytest.fixture(scope="session")
def resource() -> Resource:
    return Resource.create(build_attributes(load(SETTINGS)))


@pytest.fixture
def tracer_provider(resource: Resource) -> Iterator[TracerProvider]:
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(NullSpanExporter()))
    yield provider
    provider.shutdown()


@pytest.fixture
def otlp_tracer_provider(resource: Resource, monkeypatch: pytest.MonkeyPatch) -> Iterator[TracerProvider]:
    """cfk_otel's production span path: our spans recorded by the compiled core
    (cfk_otel/_core/seam.py, the native path set-up chooses), the app's through the SDK.

    Nothing is sent while benchmarking: the endpoint is a closed port and the schedule
    longer than the run; the core's queue is bounded, so it drops the oldest, as in production.
    """
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "3600000")
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(NullSpanExporter()))
    _core.activate(_core.Choice(True, ""), provider)
    yield provider
    _core.shutdown(0.1)
    _core.activate(_core.Choice(False, "not set up"))
    provider.shutdown()


def cfk_meter_provider(resource: Resource, registry: CollectorRegistry | None = None) -> MeterProvider:
    """The meter provider of an app with METRICS_ENABLED=true: scrape reader plus OTLP push."""
    readers = [
        ScrapeReader(**reader_arguments(registry or CollectorRegistry(auto_describe=True))),
        PeriodicExportingMetricReader(NullMetricExporter()),
    ]
    return MeterProvider(metric_readers=readers, resource=resource)


@pytest.fixture
def meter_provider(resource: Resource) -> Iterator[MeterProvider]:
    provider = cfk_meter_provider(resource)
    yield provider
    provider.shutdown()


@pytest.fixture
def log_exporter() -> NullLogExporter:
    return NullLogExporter()


@pytest.fixture
def logger_provider(resource: Resource, log_exporter: NullLogExporter) -> Iterator[LoggerProvider]:
    provider = LoggerProvider(resource=resource)
    provider.add_log_record_processor(BatchLogRecordProcessor(log_exporter))
    yield provider
    provider.shutdown()


@pytest.fixture
def otlp_log_sink(resource: Resource, monkeypatch: pytest.MonkeyPatch) -> Iterator[_core.LogSink]:
    """cfk_otel's production log path: logging's records straight into the compiled core
    (nothing sent while benchmarking: a closed port, a schedule longer than the run)."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_BLRP_SCHEDULE_DELAY", "3600000")
    provider = LoggerProvider(resource=resource)
    yield _core.LogSink(provider)
    _core.shutdown(0.1)
    provider.shutdown()


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    event_loop = asyncio.new_event_loop()
    yield event_loop
    event_loop.close()


# --- A trivial ASGI app and one request, for the middleware and scrape benchmarks ---


async def _hello(request: Any) -> None:  # never called: the route only names the template
    return None


# Like Starlette's router, the app leaves the matched route in the scope; both
# middlewares read the route template from it.
HELLO_ROUTE = Route("/hello", _hello)
HELLO_SCOPE: Scope = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.4"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/hello",
    "raw_path": b"/hello",
    "query_string": b"",
    "root_path": "",
    "headers": [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"wrk/4.2.0"), (b"accept", b"*/*")],
    "server": ("127.0.0.1", 8000),
    "client": ("127.0.0.1", 51234),
}


async def hello_app(scope: Scope, receive: Receive, send: Send) -> None:
    scope["route"] = HELLO_ROUTE
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"5")],
        }
    )
    await send({"type": "http.response.body", "body": b"hello"})


class Exchange:
    """receive/send for one request; keeps the response status and body."""

    def __init__(self) -> None:
        self.status = 0
        self.body = b""

    async def receive(self) -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body":
            self.body += message.get("body", b"")


def requests_in_a_loop(
    loop: asyncio.AbstractEventLoop, app: ASGIApp, count: int, scope: Scope = HELLO_SCOPE
) -> Callable[[], Exchange]:
    """A callable that awaits ``app(scope, receive, send)`` ``count`` times in ``loop``.

    Batching keeps ``run_until_complete``'s own cost (tens of µs) out of the per-request
    figure; the report divides by ``count``.
    """

    async def batch() -> Exchange:
        exchange = Exchange()
        for _ in range(count):
            exchange.body = b""
            await app(dict(scope), exchange.receive, exchange.send)
        return exchange

    return lambda: loop.run_until_complete(batch())


def describe(
    benchmark: BenchmarkFixture, side: str, label: str, *, per_call: int = 1, primary: bool = False
) -> None:
    """What the report needs: ``side`` (ours, upstream, baseline), a label, calls per round."""
    benchmark.extra_info.update(side=side, label=label, per_call=per_call, primary=primary)
