"""One log line inside a request's span: cfk_otel's logging set-up vs the upstream equivalents.

The same stdlib call (``logging.getLogger(...).info(message, extra=...)``) goes through
each side's root-logger set-up; only the handlers differ. Two pairs:

* JSON line on stdout. OpenTelemetry itself writes no JSON lines; what a team without
  cfk_otel bolts together is python-json-logger's formatter plus trace ids injected by
  opentelemetry-instrumentation-logging's record factory (``inject_trace_context``).
  That factory is reproduced below rather than installed: the package registers an
  instrumentor that ``opentelemetry-instrument`` would load into the macro benchmark's
  scenarios too.
* OTLP log record. Ours is ``OtlpHandler``; upstream's is the SDK's ``LoggingHandler``,
  the one the stock distro installs with ``OTEL_PYTHON_LOGGING_AUTO_INSTRUMENTATION_ENABLED``
  (the macro benchmark's upstream scenario). Both feed the same batch processor.

cfk_otel's default (``LOG_OUTPUT=both``) pays for one line of each pair.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import INVALID_SPAN, INVALID_SPAN_CONTEXT
from pytest_benchmark.fixture import BenchmarkFixture
from pythonjsonlogger.json import JsonFormatter as PythonJsonFormatter

from cfk_otel._core import seam as _core
from cfk_otel._logs.api import get_logger
from cfk_otel._logs.handlers import OtlpHandler, configure_logging
from cfk_otel._settings import load

from .conftest import SETTINGS, NullLogExporter, NullStream, describe

MESSAGE = "User created ticket"
CONTEXT = {"userId": "user-123", "ticketId": "ticket-456"}
APP_LOGGER = "bench.app"
SERVER_LOGGERS = ("uvicorn", "uvicorn.error", "gunicorn", "gunicorn.error")  # configure_logging adopts them


@pytest.fixture
def root() -> Iterator[logging.Logger]:
    """The root logger, its handlers, the record factory and the server loggers restored after."""
    root = logging.getLogger()
    handlers, level, factory = list(root.handlers), root.level, logging.getLogRecordFactory()
    server = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate) for n in SERVER_LOGGERS}
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.setLogRecordFactory(factory)
    for name, (saved, propagate) in server.items():
        logging.getLogger(name).handlers[:] = saved
        logging.getLogger(name).propagate = propagate
    for name in ("uvicorn.access", "gunicorn.access"):
        logging.getLogger(name).disabled = False
    logging.captureWarnings(False)


def null_stdout(monkeypatch: pytest.MonkeyPatch) -> NullStream:
    # Called in the test body: pytest's output capture sets sys.stdout again after set-up.
    stream = NullStream()
    monkeypatch.setattr(sys, "stdout", stream)
    return stream


@pytest.fixture
def in_a_span(resource: Resource) -> Iterator[trace.Span]:
    # A recording span, current for the benchmark: both sides add its ids to the line.
    tracer = TracerProvider(resource=resource).get_tracer("bench")
    with tracer.start_as_current_span("GET /boards/{board_id}", kind=trace.SpanKind.SERVER) as span:
        yield span


def log_once() -> None:
    logging.getLogger(APP_LOGGER).info(MESSAGE, extra=CONTEXT)


def trace_context_record_factory(service_name: str) -> Callable[..., logging.LogRecord]:
    """What ``LoggingInstrumentor().instrument(inject_trace_context=True)`` installs (0.66b2)."""
    old_factory = logging.getLogRecordFactory()

    def record_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = old_factory(*args, **kwargs)
        record.otelSpanID = "0"
        record.otelTraceID = "0"
        record.otelTraceSampled = False
        record.otelServiceName = service_name
        span = trace.get_current_span()
        if span != INVALID_SPAN:
            ctx = span.get_span_context()
            if ctx != INVALID_SPAN_CONTEXT:
                record.otelSpanID = format(ctx.span_id, "016x")
                record.otelTraceID = format(ctx.trace_id, "032x")
                record.otelTraceSampled = ctx.trace_flags.sampled
        return record

    return record_factory


JSON_LINE = "JSON log line on stdout, with trace ids"


@pytest.mark.benchmark(group=JSON_LINE)
@pytest.mark.usefixtures("root")
def test_json_line_ours(
    benchmark: BenchmarkFixture, monkeypatch: pytest.MonkeyPatch, in_a_span: trace.Span
) -> None:
    stdout = null_stdout(monkeypatch)
    configure_logging(load({**SETTINGS, "LOG_OUTPUT": "stdout"}), None)
    describe(benchmark, "ours", "configure_logging (JsonFormatter), stdlib call", primary=True)
    benchmark(log_once)
    line = json.loads(stdout.last)
    assert (line["message"], line["userId"], line["span_id"]) == (
        MESSAGE,
        "user-123",
        format(in_a_span.get_span_context().span_id, "016x"),
    )


@pytest.mark.benchmark(group=JSON_LINE)
@pytest.mark.usefixtures("root")
def test_json_line_ours_logger_api(
    benchmark: BenchmarkFixture, monkeypatch: pytest.MonkeyPatch, in_a_span: trace.Span
) -> None:
    stdout = null_stdout(monkeypatch)
    configure_logging(load({**SETTINGS, "LOG_OUTPUT": "stdout"}), None)
    log = get_logger(APP_LOGGER)
    describe(benchmark, "ours", "configure_logging, cfk_otel.logger.info(message, **context)")
    benchmark(log.info, MESSAGE, **CONTEXT)
    assert json.loads(stdout.last)["ticketId"] == "ticket-456"


@pytest.mark.benchmark(group=JSON_LINE)
def test_json_line_upstream(
    benchmark: BenchmarkFixture,
    root: logging.Logger,
    monkeypatch: pytest.MonkeyPatch,
    in_a_span: trace.Span,
    resource: Resource,
) -> None:
    stdout = null_stdout(monkeypatch)
    # The same fields as ours: timestamp, level, message, logger, service/environment/version.
    formatter = PythonJsonFormatter(
        ["levelname", "message", "name"],
        rename_fields={"levelname": "level", "name": "logger"},
        static_fields={"service": "cf-kanban", "environment": "production", "version": "1.0.0"},
        timestamp=True,
    )
    handler = logging.StreamHandler(stdout)
    handler.setFormatter(formatter)
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.setLogRecordFactory(trace_context_record_factory(str(resource.attributes["service.name"])))
    describe(benchmark, "upstream", "python-json-logger + instrumentation-logging trace ids", primary=True)
    benchmark(log_once)
    line = json.loads(stdout.last)
    assert (line["message"], line["userId"], line["otelSpanID"]) == (
        MESSAGE,
        "user-123",
        format(in_a_span.get_span_context().span_id, "016x"),
    )


OTLP_RECORD = "OTLP log record (handler to the batch processor)"


def check_exported(provider: LoggerProvider, exporter: NullLogExporter, span: trace.Span) -> None:
    provider.force_flush()
    record = exporter.last
    assert record is not None
    assert record.log_record.body == MESSAGE
    assert record.log_record.attributes is not None
    assert record.log_record.attributes["userId"] == "user-123"
    assert record.log_record.span_id == span.get_span_context().span_id


@pytest.mark.benchmark(group=OTLP_RECORD)
def test_otlp_record_ours(
    benchmark: BenchmarkFixture,
    root: logging.Logger,
    logger_provider: LoggerProvider,
    log_exporter: NullLogExporter,
    in_a_span: trace.Span,
) -> None:
    root.handlers[:] = [OtlpHandler(logger_provider, logging.INFO)]
    root.setLevel(logging.INFO)
    describe(benchmark, "ours", "OtlpHandler, batch processor over a null exporter (SDK record)")
    benchmark(log_once)
    check_exported(logger_provider, log_exporter, in_a_span)


@pytest.mark.benchmark(group=OTLP_RECORD)
def test_otlp_record_ours_direct(
    benchmark: BenchmarkFixture,
    root: logging.Logger,
    otlp_log_sink: _core.LogSink,
    in_a_span: trace.Span,
) -> None:
    root.handlers[:] = [OtlpHandler(otlp_log_sink.provider, logging.INFO, otlp_log_sink)]
    root.setLevel(logging.INFO)
    describe(benchmark, "ours", "OtlpHandler into the compiled core (one call per record)", primary=True)
    benchmark(log_once)
    stats = _core.stats()["logs"]  # the direct route: every record went into the core
    assert stats["accepted"] >= 1
    # Each is queued, dropped for room, or taken by the export thread: at most one batch (512)
    # is in flight there, waiting out its retry pause, and counted nowhere yet.
    settled = sum(stats.get(k, 0) for k in ("queued", "dropped_queue_full", "exported", "rejected"))
    assert 0 <= stats["accepted"] - settled - stats.get("dropped_export_failed", 0) <= 512


@pytest.mark.benchmark(group=OTLP_RECORD)
def test_otlp_record_upstream(
    benchmark: BenchmarkFixture,
    root: logging.Logger,
    logger_provider: LoggerProvider,
    log_exporter: NullLogExporter,
    in_a_span: trace.Span,
) -> None:
    with warnings.catch_warnings():  # deprecated in favour of instrumentation-logging's copy
        warnings.simplefilter("ignore", DeprecationWarning)
        handler = LoggingHandler(logging.NOTSET, logger_provider)
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    label = "SDK LoggingHandler (the stock distro's logging auto-instrumentation)"
    describe(benchmark, "upstream", label, primary=True)
    benchmark(log_once)
    check_exported(logger_provider, log_exporter, in_a_span)
