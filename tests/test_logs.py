"""cfk_otel/_logs/: the document's JSON lines, child loggers, redaction, correlation."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import SpanContext, TraceFlags

import cfk_otel
from cfk_otel._core import sampling as _sampling
from cfk_otel._logs.api import (
    Logger,
    get_logger,
)
from cfk_otel._logs.handlers import (
    configure_logging,
)
from cfk_otel._logs.record import (
    LINE_ATTRIBUTES,
    _RequestLine,
    _RequestRecord,
)
from cfk_otel._logs.render import (
    MAX_MESSAGE,
    JsonFormatter,
    PrettyFormatter,
    _dumps,
    cut,
)
from cfk_otel._settings import Settings, load


@pytest.fixture
def settings() -> Settings:
    return load(
        {"SERVICE_NAME": "cf-kanban", "SERVICE_ENVIRONMENT": "production", "SERVICE_VERSION": "1.0.0"}
    )


class Capture:
    def __init__(self, name: str, formatter: logging.Formatter, level: int = logging.DEBUG) -> None:
        self.stream = io.StringIO()
        self.std = logging.getLogger(name)
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setFormatter(formatter)
        self.std.addHandler(self.handler)
        self.std.setLevel(level)
        self.std.propagate = False

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines()]

    def close(self) -> None:
        self.std.removeHandler(self.handler)
        self.std.propagate = True


@pytest.fixture
def capture(request: pytest.FixtureRequest, settings: Settings) -> Iterator[Capture]:
    c = Capture(f"test.{request.node.name}", JsonFormatter(settings))
    yield c
    c.close()


def test_document_fields_in_order(capture: Capture) -> None:
    log = get_logger(capture.std.name)
    log.info("User created ticket", userId="user-123", ticketId="ticket-456", duration=45)
    [line] = capture.lines()
    assert list(line)[:6] == ["timestamp", "level", "message", "service", "environment", "version"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["timestamp"])
    assert line == {
        "timestamp": line["timestamp"],
        "level": "info",
        "message": "User created ticket",
        "service": "cf-kanban",
        "environment": "production",
        "version": "1.0.0",
        "userId": "user-123",
        "ticketId": "ticket-456",
        "duration": 45,
    }


def test_levels_and_filtering(capture: Capture) -> None:
    capture.std.setLevel(logging.WARNING)
    log = get_logger(capture.std.name)
    log.debug("d")
    log.info("i")
    log.warn("w")
    log.warning("w2")
    log.error("e")
    log.fatal("f")  # does not exit
    assert [(x["level"], x["message"]) for x in capture.lines()] == [
        ("warn", "w"),
        ("warn", "w2"),
        ("error", "e"),
        ("fatal", "f"),
    ]


def test_error_records_the_exception(capture: Capture) -> None:
    try:
        raise ValueError("bad ticket")
    except ValueError as exc:
        get_logger(capture.std.name).error("Failed to create ticket", exc, ticketData={"title": "x"})
    [line] = capture.lines()
    assert line["error"]["type"] == "ValueError"
    assert line["error"]["message"] == "bad ticket"
    assert "raise ValueError" in line["error"]["stack"]
    assert line["ticketData"] == {"title": "x"}


def test_child_loggers_merge_and_do_not_leak(capture: Capture) -> None:
    root = get_logger(capture.std.name)
    child = root.create_child_logger(requestId="r-1", userId="u-1")
    grandchild = child.bind(step="validate", userId="u-2")
    grandchild.info("deep")
    child.info("child")
    root.info("root")
    deep, mid, top = capture.lines()
    assert (deep["requestId"], deep["userId"], deep["step"]) == ("r-1", "u-2", "validate")
    assert (mid["requestId"], mid["userId"]) == ("r-1", "u-1")
    assert "step" not in mid
    assert "requestId" not in top


def test_concurrent_tasks_keep_their_own_context(capture: Capture) -> None:
    async def handle(n: int) -> None:
        log = get_logger(capture.std.name).create_child_logger(requestId=f"r-{n}")
        for step in range(5):
            await asyncio.sleep(0)
            log.info("step", step=step, n=n)

    async def main() -> None:
        await asyncio.gather(*(handle(n) for n in range(50)))

    asyncio.run(main())
    lines = capture.lines()
    assert len(lines) == 250
    assert all(line["requestId"] == f"r-{line['n']}" for line in lines)


def test_secrets_are_redacted_at_any_depth(capture: Capture) -> None:
    get_logger(capture.std.name).info(
        "login",
        password="hunter2",
        user={"name": "ann", "api_key": "k-123", "devices": [{"token": "t-1", "id": 7}]},
        headers={"Authorization": "Bearer abc", "Cookie": "sid=1", "Accept": "json"},
        sentry_dsn="https://key@sentry.example/1",
    )
    [line] = capture.lines()
    text = json.dumps(line)
    for secret in ("hunter2", "k-123", "t-1", "Bearer abc", "sid=1", "key@sentry"):
        assert secret not in text
    assert line["user"]["devices"][0] == {"token": "[REDACTED]", "id": 7}
    assert line["headers"]["Accept"] == "json"


def test_bad_values_never_raise(capture: Capture) -> None:
    class Unprintable:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    loop: dict[str, Any] = {}
    loop["self"] = loop
    log = get_logger(capture.std.name)
    log.info("odd values", obj=object(), s={1, 2}, nan=float("nan"), circular=loop, bad=Unprintable())
    log.info("x" * (MAX_MESSAGE + 10))
    first, second = capture.lines()
    assert first["obj"].startswith("<object object")
    assert first["s"] == [1, 2]
    assert first["nan"] == "nan"
    assert "unrepresentable" in first["bad"]
    assert second["message"].endswith("…[truncated 10 chars]")
    assert len(second["message"]) < MAX_MESSAGE + 30


def test_stdlib_records_and_their_extras(capture: Capture, settings: Settings) -> None:
    capture.std.info("%s tickets", 3, extra={"board": "b-1"})
    [first] = capture.lines()
    assert (first["message"], first["board"], first["logger"]) == ("3 tickets", "b-1", capture.std.name)
    # A formatting mistake in the app keeps the line rather than raising.
    record = logging.LogRecord("app", logging.INFO, __file__, 1, "bad %d format", ("x",), None)
    assert "bad %d format" in json.loads(JsonFormatter(settings).format(record))["message"]


def test_trace_ids_of_the_active_span(capture: Capture) -> None:
    tracer = TracerProvider().get_tracer("t")
    with tracer.start_as_current_span("work") as span:
        get_logger(capture.std.name).info("inside")
    get_logger(capture.std.name).info("outside")
    inside, outside = capture.lines()
    ctx = span.get_span_context()
    assert inside["trace_id"] == format(ctx.trace_id, "032x")
    assert inside["span_id"] == format(ctx.span_id, "016x")
    assert "trace_id" not in outside


def test_datadog_fields(request: pytest.FixtureRequest) -> None:
    settings = load(
        {"DD_LOGS_INJECTION": "true", "SERVICE_NAME": "svc", "DD_ENV": "prod", "SERVICE_VERSION": "2"}
    )
    c = Capture(f"test.{request.node.name}", JsonFormatter(settings))
    try:
        with TracerProvider().get_tracer("t").start_as_current_span("work") as span:
            get_logger(c.std.name).info("hi")
        [line] = c.lines()
    finally:
        c.close()
    ctx = span.get_span_context()
    assert line["dd.trace_id"] == str(ctx.trace_id & (2**64 - 1))
    assert line["dd.span_id"] == str(ctx.span_id)
    assert (line["dd.service"], line["dd.env"], line["dd.version"]) == ("svc", "prod", "2")


def test_log_request_line(capture: Capture) -> None:
    log = get_logger(capture.std.name)
    log.log_request("POST", "/api/tickets", 201, 45, userId="u-1")
    log.log_request("GET", "/api/tickets/9", 404, 3.5)
    log.log_request("GET", "/api/fail", 500, 12)
    created, missing, failed = capture.lines()
    assert created["message"] == "POST /api/tickets 201 45ms"
    assert (created["method"], created["path"], created["status"], created["duration_ms"]) == (
        "POST",
        "/api/tickets",
        201,
        45,
    )
    assert created["userId"] == "u-1"
    assert [created["level"], missing["level"], failed["level"]] == ["info", "warn", "error"]


def test_pretty_format(settings: Settings, request: pytest.FixtureRequest) -> None:
    stream = io.StringIO()
    std = logging.getLogger(f"test.{request.node.name}")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(PrettyFormatter(settings, colour=True))
    std.addHandler(handler)
    std.setLevel(logging.INFO)
    std.propagate = False
    try:
        Logger(std.name).warn("Rate limit approaching", userId="u 1", remaining=5)
    finally:
        std.removeHandler(handler)
    line = stream.getvalue()
    assert line.count("\n") == 1
    assert "\x1b[33m" in line
    assert "WARN" in line
    assert 'Rate limit approaching  userId="u 1" remaining=5' in line


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    server = {
        n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate)
        for n in ("uvicorn", "uvicorn.error", "uvicorn.access", "gunicorn.access")
    }
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, (h, propagate) in server.items():
        logging.getLogger(name).handlers[:] = h
        logging.getLogger(name).propagate = propagate
    logging.getLogger("uvicorn.access").disabled = False
    logging.captureWarnings(False)


@pytest.mark.usefixtures("restore_root")
def test_configure_logging_owns_the_root(capsys: pytest.CaptureFixture[str]) -> None:
    logging.getLogger("uvicorn.error").addHandler(logging.StreamHandler())
    logging.getLogger("uvicorn.error").propagate = False
    configure_logging(load({"LOG_LEVEL": "warn", "LOG_OUTPUT": "stdout"}), None)
    logging.getLogger("uvicorn.error").warning("from uvicorn")
    logging.getLogger("uvicorn.error").info("filtered")
    logging.getLogger("uvicorn.access").warning("never: replaced by our request line")
    assert not logging.getLogger("uvicorn.access").hasHandlers()  # uvicorn skips the line's work
    logging.getLogger("anything").error("from the app")
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(x["logger"], x["message"]) for x in lines] == [
        ("uvicorn.error", "from uvicorn"),
        ("anything", "from the app"),
    ]


def test_request_lines_are_sampled_but_errors_kept(settings: Settings) -> None:
    from opentelemetry.trace import INVALID_SPAN_CONTEXT

    from cfk_otel._asgi.middleware import RequestInfo
    from cfk_otel._logs.requests import request_observer

    c = Capture("cfk_otel.requests", JsonFormatter(settings))
    try:
        assert request_observer(load({"LOG_REQUESTS": "false"})) is None
        observe = request_observer(load({"LOG_REQUESTS_SAMPLE_RATE": "0"}))
        assert observe is not None
        for status in (200, 201, 302, 404, 500):
            scope = {"path": f"/s/{status}"}
            observe(RequestInfo(scope, "http", "GET", "/s/{n}", status, 0.01, None, INVALID_SPAN_CONTEXT))
        observe(RequestInfo({"path": "/ws"}, "websocket", "GET", "/ws", 101, 1.0, None, INVALID_SPAN_CONTEXT))
        lines = c.lines()
    finally:
        c.close()
    assert [line["status"] for line in lines] == [404, 500]
    assert lines[0]["route"] == "/s/{n}"


class _Hostile:
    def __repr__(self) -> str:
        raise RuntimeError("repr refuses")

    def __str__(self) -> str:
        raise RuntimeError("str refuses")


def test_values_whose_repr_raises_still_give_a_line(capture: Capture) -> None:
    log = get_logger(capture.std.name)
    log.info("odd values", thing=_Hostile(), things={_Hostile()}, fine=1)
    capture.std.info("via extra", extra={"thing": _Hostile()})
    first, second = capture.lines()
    assert first["thing"] == "<unrepresentable _Hostile>"
    assert first["things"] == ["<unrepresentable _Hostile>"]
    assert first["fine"] == 1
    assert second["thing"] == "<unrepresentable _Hostile>"


@pytest.mark.parametrize("status", [200, 404, 503])
@pytest.mark.parametrize("traced", [True, False])
def test_request_line_written_directly_equals_the_generic_document(
    settings: Settings, status: int, traced: bool
) -> None:
    span = SpanContext(0xABC, 0xDEF, is_remote=False, trace_flags=TraceFlags(1)) if traced else None
    path = '/tickets/"quoted"\\\u00e9\u4e2d\n'
    fields = {"method": "GET", "path": path, "route": "/tickets/{id}", "status": status, "duration_ms": 1.234}
    record = _RequestRecord(logging.INFO, f"GET {path} {status} 1.234ms", fields, span)
    formatter = JsonFormatter(settings)
    direct = formatter.format(record)
    generic = _dumps(formatter.document(record))
    assert direct == generic
    assert json.loads(direct)["path"] == path


@pytest.mark.usefixtures("restore_root")
def test_request_lines_take_the_direct_route_only_when_nothing_else_listens(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    from cfk_otel._asgi.middleware import RequestInfo
    from cfk_otel._logs import requests as _logs
    from cfk_otel._logs.requests import request_observer

    configure_logging(settings, None)  # stdout only
    observe = request_observer(settings)
    assert observe is not None
    span = SpanContext(0xABC, 0xDEF, is_remote=False, trace_flags=TraceFlags(1))

    def request(status: int) -> dict[str, Any]:
        observe(RequestInfo({"path": '/p/"x"\u00e9'}, "http", "GET", "/p/{x}", status, 0.0125, None, span))
        assert cfk_otel.flush()  # the core's lines are written in batches
        [line] = capsys.readouterr().out.splitlines()
        document: dict[str, Any] = json.loads(line)
        document.pop("timestamp")
        return document

    routed: list[Any] = []
    original = _logs._route
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_logs, "_route", lambda handlers: routed.append(original(handlers)) or routed[-1])
        direct = request(404)
        assert routed[-1] is not None  # our handlers only: written without logging's dispatch
        requests = logging.getLogger("cfk_otel.requests")
        seen: list[logging.LogRecord] = []
        requests.addFilter(lambda record: seen.append(record) or True)  # the app listens: logging's way
        try:
            via_logging = request(404)
            assert routed[-1] is None
            assert [r.getMessage() for r in seen] == ['GET /p/"x"\u00e9 404 12.5ms']
        finally:
            requests.filters.clear()
        assert request(404) == direct
        assert routed[-1] is not None
        app_handler = logging.StreamHandler(io.StringIO())
        logging.getLogger("cfk_otel").addHandler(app_handler)  # a handler up the chain
        try:
            assert request(404) == direct
            assert routed[-1] is None
            assert "GET /p/" in app_handler.stream.getvalue()
        finally:
            logging.getLogger("cfk_otel").removeHandler(app_handler)
    assert direct == via_logging
    assert direct["level"] == "warn"
    assert direct["trace_id"] == f"{0xABC:032x}"


def test_both_handlers_share_one_redaction_and_see_what_a_filter_adds(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor

    from cfk_otel._logs import handlers, render

    calls: list[object] = []
    original = render.scrub
    monkeypatch.setattr(
        render, "scrub", lambda value, known=None: calls.append(value) or original(value, known=known)
    )
    provider = LoggerProvider()
    memory = InMemoryLogRecordExporter()
    provider.add_log_record_processor(SimpleLogRecordProcessor(memory))
    stream = io.StringIO()
    json_handler = logging.StreamHandler(stream)
    json_handler.setFormatter(JsonFormatter(settings))
    otlp_handler = handlers.OtlpHandler(provider)
    std = logging.getLogger("test.shared_redaction")
    std.propagate = False
    std.setLevel(logging.INFO)
    std.addHandler(json_handler)
    std.addHandler(otlp_handler)
    try:
        log = get_logger(std.name, password="hunter2")
        log.info("one", userId="u-1")
        assert len(calls) == 1  # worked out once, for both handlers
        otlp_handler.addFilter(lambda record: setattr(record, "tenant", "t-9") or True)
        log.info("two", userId="u-2")  # the OTLP handler's filter adds context after the stdout one
        assert len(calls) == 3
    finally:
        std.removeHandler(json_handler)
        std.removeHandler(otlp_handler)
        std.propagate = True
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(x["userId"], x["password"]) for x in lines] == [("u-1", "[REDACTED]"), ("u-2", "[REDACTED]")]
    records = [r.log_record for r in memory.get_finished_logs()]
    assert [dict(r.attributes or {}).get("password") for r in records] == ["[REDACTED]", "[REDACTED]"]
    assert [dict(r.attributes or {}).get("tenant") for r in records] == [None, "t-9"]
    assert "tenant" not in lines[1]


def _record(message: str, **extra: Any) -> logging.LogRecord:
    try:
        raise ValueError("bad ticket")
    except ValueError:
        import sys

        exc_info = sys.exc_info()
    record = logging.LogRecord("tests.direct", logging.ERROR, __file__, 7, message, None, exc_info, "fn")
    record.__dict__.update(extra)
    return record


def _sink_provider(receiver: Any, monkeypatch: pytest.MonkeyPatch, **kwargs: Any) -> tuple[Any, Any]:
    """A logger provider as set-up builds it (the SDK's processor for the Logs API) and the
    core's sink for logging's records, both sending to ``receiver``."""
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor

    from cfk_otel._core import seam as _core

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.http_endpoint)
    _core.shutdown(1.0)
    _core.set_value_limits(None, None)  # the SDK's limits, as without set-up
    provider = LoggerProvider(**kwargs)
    provider.add_log_record_processor(
        BatchLogRecordProcessor(OTLPLogExporter(endpoint=f"{receiver.http_endpoint}/v1/logs"))
    )
    return provider, _core.LogSink(provider)


def _flush(provider: Any) -> None:
    from cfk_otel._core import seam as _core

    provider.force_flush()
    assert _core.flush(5.0)


def test_app_records_sent_by_the_core_equal_the_sdks(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk._logs import LogRecordProcessor
    from opentelemetry.sdk.resources import Resource

    from cfk_otel._core import seam as _core
    from cfk_otel._logs.handlers import OtlpHandler
    from cfk_otel.testing import OtlpReceiver

    span = SpanContext(0xABC, 0xDEF, is_remote=False, trace_flags=TraceFlags(1))
    records = [
        _record("plain", userId="u-1", tags=["a", "b"], nested={"k": 1}, token="s3cret"),
        _record("explicit span", cfk_span=span),
    ]
    with OtlpReceiver() as receiver:
        provider, sink = _sink_provider(
            receiver, monkeypatch, resource=Resource.create({"service.name": "cf-kanban"})
        )
        direct, via_sdk = OtlpHandler(provider, sink=sink), OtlpHandler(provider)
        taken: list[str] = []
        original = _core.LogSink.record
        # The direct route is the one that goes through the sink (the SDK's through its logger).
        monkeypatch.setattr(
            _core.LogSink, "record", lambda self, *a: taken.append(a[5]) or original(self, *a)
        )
        with trace.use_span(trace.NonRecordingSpan(SpanContext(0x123, 0x456, False, TraceFlags(1)))):
            for record in records:
                direct.handle(record)
                via_sdk.handle(record)
        assert taken == ["plain", "explicit span"]  # the direct route, for the first handler only

        class Counting(LogRecordProcessor):
            seen = 0

            def on_emit(self, log_record: Any) -> None:
                Counting.seen += 1

            def shutdown(self) -> None: ...

            def force_flush(self, timeout_millis: int = 30000) -> bool:
                return True

        provider.add_log_record_processor(Counting())
        direct.handle(_record("a second processor"))  # seen by it: the SDK's route again
        assert Counting.seen == 1
        assert taken == ["plain", "explicit span"]
        _flush(provider)
        assert receiver.wait_for(lambda: len(receiver.logs) == 5)

        def comparable(body: str) -> list[tuple[Any, ...]]:
            return [
                (
                    log.scope,
                    log.resource,
                    log.attributes,
                    log.record.time_unix_nano,
                    log.record.severity_number,
                    log.record.severity_text,
                    log.record.trace_id,
                    log.record.span_id,
                    log.record.flags,
                    log.record.dropped_attributes_count,
                )
                for log in receiver.logs
                if log.body == body
            ]

        for body in ("plain", "explicit span"):
            first, second = comparable(body)
            assert first == second, body
        plain = comparable("plain")[0]
        assert plain[2]["token"] == "[REDACTED]"
        assert plain[2]["exception.type"] == "ValueError"
        assert plain[6].hex() == f"{0x123:032x}"  # the active span
        assert comparable("explicit span")[0][6].hex() == f"{0xABC:032x}"
        provider.shutdown()
        _core.shutdown(1.0)


def test_app_records_beyond_the_attribute_limit_go_through_the_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.sdk._logs import LogRecordLimits

    from cfk_otel._core import seam as _core
    from cfk_otel._logs.handlers import OtlpHandler
    from cfk_otel.testing import OtlpReceiver

    limits: dict[str, Any] = {}
    if hasattr(LogRecordLimits(), "max_log_record_attributes"):
        monkeypatch.setenv("OTEL_LOGRECORD_ATTRIBUTE_COUNT_LIMIT", "3")  # the core reads it, as set-up does
        limits["log_record_limits"] = LogRecordLimits(max_attributes=3)
    else:  # SDK < 1.44 (the oldest supported): a record takes the global limit, from the environment
        monkeypatch.setenv("OTEL_ATTRIBUTE_COUNT_LIMIT", "3")
    with OtlpReceiver() as receiver:
        provider, sink = _sink_provider(receiver, monkeypatch, **limits)
        with warnings.catch_warnings():  # the SDK warns that it dropped some
            warnings.simplefilter("ignore")
            OtlpHandler(provider, sink=sink).handle(_record("many", a=1, b=2, c=3, d=4))
        _flush(provider)
        assert "logs" not in _core.stats()  # refused by the core, which made no exporter: the SDK took it
        assert sink.record("x", 1, 1, 9, "INFO", "b", {"a": 1, "b": 2, "c": 3, "d": 4}, None) is False
        assert sink.record("x", 1, 1, 9, "INFO", "b", {"a": 1, "b": 2, "c": 3}, None) is True
        assert receiver.wait_for(lambda: len(receiver.logs) == 1)
        assert len(receiver.logs[0].attributes) == 3
        assert receiver.logs[0].record.dropped_attributes_count > 0
        assert _core.flush(5.0)
        assert receiver.wait_for(lambda: len(receiver.logs) == 2)  # the one within the limit, by the core
        provider.shutdown()
        _core.shutdown(1.0)


# --- issue 19: every call shape of the document's "Usage" section ---------------------------


def test_every_call_shape_of_the_document_keeps_its_context(capture: Capture) -> None:
    log = get_logger(capture.std.name)
    err = ValueError("title missing")
    log.debug("d", {"a": 1})
    log.info("User logged in", {"userId": "u-1", "ip": "10.0.0.1"})
    log.info("both", {"userId": "u-1", "n": 1}, n=2)  # keywords win over the dict
    log.warn("Rate limit approaching", {"userId": "u-1", "remaining": 5})
    log.warning("w", {"b": 2})
    log.error("Failed to create ticket", err, {"ticketData": {"title": ""}})
    log.error("no exception", {"ticketData": {"title": "x"}})
    log.error("keywords", err, ticketData={"title": "y"})
    log.error("exc keyword", exc=err, step=3)
    log.error("None first", None, {"k": "v"})
    log.fatal("Out of connections", err, {"pool": "main"})
    log.fatal("fatal dict", {"pool": "replica"})
    log.log_request("POST", "/api/tickets", 201, 45, {"userId": "u-1"})
    log.log_request("GET", "/api/tickets", 200, 3, userId="u-2")
    child = log.create_child_logger({"requestId": "r-1", "userId": "u-1"})
    child.info("Processing request")
    log.create_child_logger({"requestId": "r-2"}, userId="u-3").bind({"step": 1}).info("nested")
    lines = capture.lines()
    got = [
        {k: v for k, v in x.items() if k not in ("timestamp", "service", "environment", "version")}
        for x in lines
    ]
    assert got[0] == {"level": "debug", "message": "d", "a": 1}
    assert got[1] == {"level": "info", "message": "User logged in", "userId": "u-1", "ip": "10.0.0.1"}
    assert got[2] == {"level": "info", "message": "both", "userId": "u-1", "n": 2}
    assert got[3] == {"level": "warn", "message": "Rate limit approaching", "userId": "u-1", "remaining": 5}
    assert got[4] == {"level": "warn", "message": "w", "b": 2}
    for line, data in zip(lines[5:8], ({"title": ""}, {"title": "x"}, {"title": "y"}), strict=True):
        assert line["level"] == "error"
        assert line["ticketData"] == data
    assert lines[5]["error"]["type"] == "ValueError"
    assert "error" not in lines[6]
    assert lines[7]["error"]["message"] == "title missing"
    assert (lines[8]["error"]["type"], lines[8]["step"]) == ("ValueError", 3)
    assert (lines[9]["k"], "error" in lines[9]) == ("v", False)
    assert (lines[10]["level"], lines[10]["pool"], lines[10]["error"]["type"]) == (
        "fatal",
        "main",
        "ValueError",
    )
    assert (lines[11]["level"], lines[11]["pool"], "error" in lines[11]) == ("fatal", "replica", False)
    assert (lines[12]["message"], lines[12]["status"], lines[12]["userId"]) == (
        "POST /api/tickets 201 45ms",
        201,
        "u-1",
    )
    assert (lines[13]["message"], lines[13]["userId"]) == ("GET /api/tickets 200 3ms", "u-2")
    assert (lines[14]["requestId"], lines[14]["userId"]) == ("r-1", "u-1")
    assert (lines[15]["requestId"], lines[15]["userId"], lines[15]["step"]) == ("r-2", "u-3", 1)
    assert not any("args" in x for x in lines)


def test_context_keys_that_collide_with_the_lines_own_fields_are_prefixed(capture: Capture) -> None:
    log = get_logger(capture.std.name)
    log.info(
        "m",
        {"level": "L", "message": "M", "service": "S", "timestamp": "T", "trace_id": "X", "error": "E"},
        environment="dev",
    )
    log.info("again", {"level": "L", "context.level": "CL"})
    log.create_child_logger(level="bound", version="v9").warn("child")
    log.log_request("GET", "/x", 200, 1, {"status": "S", "method": "M", "level": "L"})
    log.bind(path="/bound").log_request("GET", "/y", 404, 2)
    capture.std.info("stdlib", extra={"service": "from extra"})
    first, second, child, request, bound, stdlib = capture.lines()
    assert (first["level"], first["message"], first["service"]) == ("info", "m", "cf-kanban")
    assert "trace_id" not in first
    assert "error" not in first
    assert {k: v for k, v in first.items() if k.startswith("context.")} == {
        "context.level": "L",
        "context.message": "M",
        "context.service": "S",
        "context.timestamp": "T",
        "context.trace_id": "X",
        "context.error": "E",
        "context.environment": "dev",
    }
    assert (second["context.level"], second["context.context.level"]) == ("CL", "L")
    assert (child["level"], child["version"], child["context.level"], child["context.version"]) == (
        "warn",
        "1.0.0",
        "bound",
        "v9",
    )
    assert (request["status"], request["method"], request["level"]) == (200, "GET", "info")
    assert (request["context.status"], request["context.method"], request["context.level"]) == ("S", "M", "L")
    assert (bound["path"], bound["context.path"], bound["level"]) == ("/y", "/bound", "warn")
    assert (stdlib["service"], stdlib["context.service"]) == ("cf-kanban", "from extra")


def test_colliding_keys_are_prefixed_in_the_otlp_record_too() -> None:
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor

    from cfk_otel._logs.handlers import OtlpHandler

    provider = LoggerProvider()
    memory = InMemoryLogRecordExporter()
    provider.add_log_record_processor(SimpleLogRecordProcessor(memory))
    std = logging.getLogger("test.otlp_collisions")
    std.propagate = False
    std.setLevel(logging.INFO)
    handler = OtlpHandler(provider)
    std.addHandler(handler)
    try:
        get_logger(std.name).error(
            "m", ValueError("v"), {"level": "L", "code.line.number": "mine", "exception.type": "T"}
        )
    finally:
        std.removeHandler(handler)
        std.propagate = True
    [record] = [r.log_record for r in memory.get_finished_logs()]
    attributes = dict(record.attributes or {})
    assert attributes["context.level"] == "L"
    assert attributes["context.code.line.number"] == "mine"
    assert isinstance(attributes["code.line.number"], int)
    assert (attributes["exception.type"], attributes["context.exception.type"]) == ("ValueError", "T")
    assert "level" not in attributes


@pytest.fixture
def warnings_seen(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The once-only misuse warnings (logger "cfk_otel"), each test starting afresh."""
    from cfk_otel._logs import api as _logs

    monkeypatch.setattr(_logs, "_misused", set())
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    own = logging.getLogger("cfk_otel")
    own.addHandler(handler)
    yield seen
    own.removeHandler(handler)


def test_bad_arguments_still_give_a_line_and_one_warning_naming_the_call(
    capture: Capture, warnings_seen: list[str]
) -> None:
    log = get_logger(capture.std.name)
    log.info("two dicts and a str", {"a": 1}, "oops", {"b": 2})
    log.info("again", "oops")
    log.warn(404)  # type: ignore[arg-type]
    log.debug("exception where none is taken", ValueError("x"))  # type: ignore[arg-type]
    log.error("str instead of an exception", "E_TICKET", {"ticketId": 7})  # type: ignore[arg-type]
    log.error("exc keyword not an exception", exc="nope", k=1)  # type: ignore[arg-type]
    log.log_request("GET", "/x", "two hundred", None)  # type: ignore[arg-type]
    log.log_request(["GET"], "/x", 200, 1.5, "extra")  # type: ignore[arg-type]
    child = log.create_child_logger("not a dict", {"requestId": "r"})  # type: ignore[arg-type]
    child.info("from the child")
    lines = capture.lines()
    assert [x["message"] for x in lines] == [
        "two dicts and a str",
        "again",
        "404",
        "exception where none is taken",
        "str instead of an exception",
        "exc keyword not an exception",
        "GET /x two hundred Nonems",
        "['GET'] /x 200 1.5ms",
        "from the child",
    ]
    first, again, _, debug, error, exc_keyword, bad_request, odd_method, child_line = lines
    assert (first["a"], first["b"], first["args"]) == (1, 2, ["oops"])
    assert again["args"] == ["oops"]
    assert debug["args"] == ["ValueError('x')"]
    assert (error["args"], error["ticketId"], "error" in error) == (["E_TICKET"], 7, False)
    assert (exc_keyword["args"], exc_keyword["k"]) == (["nope"], 1)
    assert (bad_request["status"], bad_request["duration_ms"], bad_request["level"]) == (
        "two hundred",
        None,
        "info",
    )
    assert (odd_method["method"], odd_method["args"]) == (["GET"], ["extra"])
    assert (child_line["requestId"], child_line["args"]) == ("r", ["not a dict"])
    # One warning per method and kind of mistake, naming the call.
    assert len(warnings_seen) == len(set(warnings_seen)) == 7, warnings_seen
    assert sum("logger.info()" in w for w in warnings_seen) == 1
    assert any("logger.warn(): the message must be a str" in w for w in warnings_seen)
    assert any("logger.log_request(): status must be an int" in w for w in warnings_seen)
    assert any("logger.create_child_logger()" in w for w in warnings_seen)
    log.info("once more", 1, 2, 3)
    assert len(warnings_seen) == 7


def test_a_mapping_that_raises_still_gives_a_line(capture: Capture, warnings_seen: list[str]) -> None:
    from collections.abc import Mapping as AbcMapping

    class Broken(AbcMapping[str, Any]):
        def __getitem__(self, key: str) -> Any:
            raise KeyError(key)

        def __iter__(self) -> Iterator[str]:
            raise RuntimeError("no iteration")

        def __len__(self) -> int:
            return 1

        def __repr__(self) -> str:
            return "<Broken>"

    get_logger(capture.std.name).info("broken", Broken(), ok=True)
    [line] = capture.lines()
    assert (line["message"], line["ok"], line["args"]) == ("broken", True, ["<Broken>"])
    assert len(warnings_seen) == 1


# --- LOG_FORMAT=pretty: colour only where wanted, no line forged (issues 19 and 20) ----------

_PRETTY_HEAD = re.compile(r"\d\d:\d\d:\d\d\.\d{3} (DEBUG|INFO |WARN |ERROR|FATAL) ")
_HOSTILE = "a\r\n12:00:00.000 ERROR forged line admin logged in\x1b[2J\x00\x07\x7f\x85\u2028\u2029\tend"


def _pretty(settings: Settings, name: str, colour: bool | None = None) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    std = logging.getLogger(f"test.pretty.{name}")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(PrettyFormatter(settings, colour=colour))
    std.handlers[:] = [handler]
    std.setLevel(logging.DEBUG)
    std.propagate = False
    return std, stream


def test_pretty_escapes_control_characters_everywhere(settings: Settings) -> None:
    std, stream = _pretty(settings, "escapes", colour=False)
    try:
        raise ValueError(_HOSTILE)
    except ValueError as exc:
        Logger(std.name).error(_HOSTILE, exc, {_HOSTILE: _HOSTILE, "nested": {"k": _HOSTILE}, "plain": "x"})
    std.info("stdlib %s", _HOSTILE, extra={"path": _HOSTILE})
    text = stream.getvalue()
    lines = text.splitlines()
    assert len(text.split("\n")) == len(lines) + 1  # \n is the only line break left
    heads = [x for x in lines if not x.startswith("  | ")]
    assert len(heads) == 2
    assert all(_PRETTY_HEAD.match(x) for x in heads), heads
    assert all(x.startswith("  | ") for x in lines[1:-1])  # the stack, under its line
    for char in "\r\x1b\x00\x07\x7f\x85\u2028\u2029\t":
        assert char not in text, repr(char)
    escaped = "a\\r\\n12:00:00.000 ERROR forged line admin logged in\\x1b[2J\\x00\\x07\\x7f"
    assert escaped + "\\x85\\u2028\\u2029\\tend" in heads[0]
    assert "plain=x" in heads[0]
    # The exception's own line, split by its \n like any stack line: indented, the \r escaped.
    assert lines[-3:-1] == [
        "  | ValueError: a\\r",
        "  | 12:00:00.000 ERROR forged line admin logged in\\x1b[2J\\x00\\x07\\x7f\\x85\\u2028\\u2029\\tend",
    ]
    assert heads[1].count("forged") == 2  # the message and the path field, each escaped


def test_pretty_colours_only_a_terminal_and_honours_no_color_and_force_color(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cfk_otel._logs.render import colour_wanted

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    class Broken(io.StringIO):
        def isatty(self) -> bool:
            raise ValueError("I/O operation on closed file")

    assert colour_wanted(Terminal(), no_color=False, force_color=False)
    assert not colour_wanted(io.StringIO(), no_color=False, force_color=False)
    assert not colour_wanted(Broken(), no_color=False, force_color=False)
    assert not colour_wanted(object(), no_color=False, force_color=False)
    assert not colour_wanted(Terminal(), no_color=True, force_color=False)
    assert colour_wanted(io.StringIO(), no_color=False, force_color=True)
    assert not colour_wanted(Terminal(), no_color=True, force_color=True)  # NO_COLOR wins

    def line(env: dict[str, str], stdout: io.StringIO) -> str:
        monkeypatch.setattr("sys.stdout", stdout)
        settings = load({"LOG_FORMAT": "pretty", **env})
        formatter = PrettyFormatter(settings)
        return formatter.format(logging.LogRecord("x", logging.WARNING, __file__, 1, "m", None, None))

    assert "\x1b[33m" in line({}, Terminal())
    assert "\x1b" not in line({}, io.StringIO())  # a file, a pipe
    assert "\x1b" not in line({"NO_COLOR": "1"}, Terminal())
    assert "\x1b" in line({"NO_COLOR": ""}, Terminal())  # set but empty: not set (no-color.org)
    assert "\x1b[33m" in line({"FORCE_COLOR": "0"}, io.StringIO())  # any value (force-color.org)
    assert "\x1b" not in line({"FORCE_COLOR": "1", "NO_COLOR": "1"}, Terminal())


@pytest.mark.usefixtures("restore_root")
def test_configure_logging_pretty_follows_stdout(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    configure_logging(load({"LOG_FORMAT": "pretty", "LOG_OUTPUT": "stdout"}), None)
    piped, terminal = io.StringIO(), Terminal()
    monkeypatch.setattr("sys.stdout", piped)
    logging.getLogger("tests.pretty").warning("to a pipe")
    monkeypatch.setattr("sys.stdout", terminal)
    logging.getLogger("tests.pretty").warning("to a terminal")
    assert "to a pipe" in piped.getvalue()
    assert "\x1b" not in piped.getvalue()
    assert "\x1b[33m" in terminal.getvalue()


def test_a_str_subclass_is_a_message_without_a_warning(capture: Capture, warnings_seen: list[str]) -> None:
    class Markup(str):
        pass

    get_logger(capture.std.name).info(Markup("<b>safe</b>"), k=1)
    [line] = capture.lines()
    assert (line["message"], line["k"]) == ("<b>safe</b>", 1)
    assert warnings_seen == []


def test_long_context_values_are_cut_with_a_marker(capture: Capture) -> None:
    log = get_logger(capture.std.name)
    log.info("big extra", {"blob": "x" * 1_048_576, "short": "ok"})
    capture.std.info("stdlib extra", extra={"blob": "y" * 10_000})
    log.log_request("GET", "/" + "p" * 20_000, 200, 1.0)
    first, second, request = capture.lines()
    assert first["blob"] == "x" * 8192 + f"…[truncated {1_048_576 - 8192} chars]"
    assert first["short"] == "ok"
    assert second["blob"] == "y" * 8192 + "…[truncated 1808 chars]"
    assert request["path"] == "/" + "p" * 8191 + "…[truncated 11809 chars]"
    assert all(len(line) < 30_000 for line in capture.stream.getvalue().splitlines())


def test_a_line_over_the_byte_ceiling_is_fitted_within_it(capture: Capture) -> None:
    from cfk_otel._logs.render import LINE_MAX_BYTES

    log = get_logger(capture.std.name)
    log.info("nested", {"nested": {"a": "é" * 1_000_000}, "small": 1})
    log.info("many", {f"k{i}": "v" * 8000 for i in range(100)})
    try:
        raise ValueError("e" * 100_000)
    except ValueError:
        capture.std.exception("failed", extra={"big": ["z" * 8000] * 20})
    lines = capture.stream.getvalue().splitlines()
    assert all(len(line.encode()) <= LINE_MAX_BYTES for line in lines)
    nested, many, failed = capture.lines()
    assert nested["nested"].startswith('{"a":"ééé')
    assert nested["nested"].endswith("…[truncated 998984 chars]")  # its JSON text: 1,000,008 chars
    assert nested["small"] == 1
    assert nested["message"] == "nested"
    assert many["cfk_otel.dropped_fields"] > 0
    assert many["k0"].endswith("…[truncated 6976 chars]")
    assert (many["message"], many["level"], many["service"]) == ("many", "info", "cf-kanban")
    assert failed["error"]["type"] == "ValueError"
    assert "ValueError" in failed["error"]["stack"]


def test_the_request_lines_path_is_cut_at_the_log_limit(settings: Settings) -> None:
    from opentelemetry.trace import INVALID_SPAN_CONTEXT

    from cfk_otel._asgi.middleware import RequestInfo
    from cfk_otel._logs.requests import request_observer

    c = Capture("cfk_otel.requests", JsonFormatter(settings))
    try:
        observe = request_observer(load({"OTEL_LOGRECORD_ATTRIBUTE_VALUE_LENGTH_LIMIT": "20"}))
        assert observe is not None
        path = "/" + "p" * 1_000_000
        observe(RequestInfo({"path": path}, "http", "GET", "/{p}", 404, 0.01, None, INVALID_SPAN_CONTEXT))
        (line,) = c.lines()
    finally:
        c.close()
    cut = "/" + "p" * 19 + "…[truncated 999981 chars]"
    assert line["path"] == cut
    assert line["message"] == f"GET {cut} 404 10ms"


def test_an_otlp_record_over_the_ceiling_is_fitted_within_it() -> None:
    """Issue 20: a record's attributes stay within 64 KiB in UTF-8, whatever the context."""
    from cfk_otel._logs.render import RECORD_MAX_BYTES, _within_ceiling

    small = {"userId": "u-1", "n": 3, "code.file.path": "/app/x.py"}
    assert _within_ceiling(small) is small  # the usual case: untouched
    many = {f"field{i:03}": "é" * 2000 for i in range(100)}  # 400 KB of UTF-8
    many["code.function.name"] = "create"
    many["exception.stacktrace"] = "Traceback..."
    fitted = _within_ceiling(many)
    encoded = sum(len(k.encode()) + len(str(v).encode()) for k, v in fitted.items())
    assert encoded <= RECORD_MAX_BYTES
    assert fitted["field000"].endswith("…[truncated 976 chars]")
    assert fitted["code.function.name"] == "create"  # the location and the error stay
    assert fitted["exception.stacktrace"] == "Traceback..."
    dropped = fitted.get("cfk_otel.dropped_fields", 0)
    assert len([k for k in fitted if k.startswith("field")]) + dropped == 100


# --- issue 22: one call into the core when a request ends -----------------------------------


async def _serve_once(app: Any, path: str) -> None:
    scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "raw_path": path.encode("utf-8", "surrogateescape"),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"user-agent", b"tests")],
        "scheme": "http",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "http_version": "1.1",
        "asgi": {"version": "3.0"},
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        return None

    await app(scope, receive, send)


@pytest.mark.usefixtures("restore_root")
def test_a_request_ends_in_one_call_into_the_core(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], core_calls: Any
) -> None:
    """The server span, both request metrics and the request line's OTLP record cross into
    the core together; the stdout line is written as before, and all of it arrives."""
    from opentelemetry.sdk.metrics import MeterProvider
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from cfk_otel._asgi.middleware import TelemetryMiddleware
    from cfk_otel._core import seam as _core
    from cfk_otel._logs.requests import request_observer
    from cfk_otel.testing import OtlpReceiver

    async def hello(request: Any) -> PlainTextResponse:
        return PlainTextResponse("hello")

    with OtlpReceiver() as receiver:
        provider, sink = _sink_provider(receiver, monkeypatch)
        configure_logging(settings, provider, sink)
        tracer_provider = TracerProvider()
        _core.activate(_core.Choice(True, ""), tracer_provider)
        try:
            observer = request_observer(settings)
            assert observer is not None
            app = TelemetryMiddleware(
                Starlette(routes=[Route("/hello/{n}", hello)]),
                tracer_provider=tracer_provider,
                meter_provider=MeterProvider(),
                observers=[observer],
            )
            loop = asyncio.new_event_loop()
            loop.run_until_complete(_serve_once(app, "/hello/1"))  # the first makes the exporters
            with core_calls.watch() as calls:
                loop.run_until_complete(_serve_once(app, "/hello/2"))
            loop.close()
            assert calls == ["end_request"]
            assert cfk_otel.flush()
            assert [json.loads(line)["path"] for line in capsys.readouterr().out.splitlines()] == [
                "/hello/1",
                "/hello/2",
            ]
            _flush(provider)
            assert receiver.wait_for(lambda: len(receiver.spans) == 2 and len(receiver.logs) == 2)
            spans = {s.attributes["url.path"]: s for s in receiver.spans}
            assert spans["/hello/2"].name == "GET /hello/{n}"
            assert spans["/hello/2"].attributes["http.response.status_code"] == 200
            [line] = [log for log in receiver.logs if log.attributes["path"] == "/hello/2"]
            assert line.scope == "cfk_otel.requests"
            assert line.record.span_id == spans["/hello/2"].span.span_id
            assert line.attributes["route"] == "/hello/{n}"
            [(labels, _, _, count, _, _)] = app.metrics.http_request_duration.family.rows()  # type: ignore[union-attr]
            assert (labels, count) == (["GET", "/hello/{n}"], 2)
            assert app.metrics.http_requests.values() == [(("GET", "/hello/{n}", "200"), 2.0)]
            # The exemplar's ids travelled in the same call: the second request's are in its bucket.
            [(_, exemplars)] = app.metrics.http_request_duration.family.exemplars()  # type: ignore[union-attr]
            ids = (
                int(spans["/hello/2"].span.trace_id.hex(), 16),
                int(spans["/hello/2"].span.span_id.hex(), 16),
            )
            assert ids in {(t, s) for _, t, s, _, _ in exemplars}
        finally:
            _core.activate(_core.Choice(False, "not set up"))
            _core.shutdown(1.0)
            provider.shutdown()


# Values a request line must survive byte for byte: quotes, backslashes, every C0 control
# character, DEL, non-ASCII and astral characters, a path cut at the value limit.
_HOSTILE_PATHS = (
    "/plain",
    '/q"u"o"t"e',
    "/back\\slash\\",
    "/c0" + "".join(map(chr, range(32))),
    "/del\x7f\x80\x9f",
    "/\u00e9\u4e2d\u2028\u2029\ufeff",
    "/astral/\U0001f600\U00010000\U0010ffff",
    cut("/long/" + "\u00e9" * 100, 40),
)
# Seconds: 0, half a microsecond either side of rounding, the 0.001 ms steps, 1 s, 1e6 s,
# six-digit ties of %g (123456.5 ms, 1000.125 ms) and a duration whose repr needs an exponent.
_DURATIONS = (
    0.0,
    0.0000005,
    0.0000015,
    0.0000025,
    0.0005,
    0.000001,
    0.000999,
    0.001,
    0.0010005,
    0.0125,
    1.0,
    1.000125,
    123.4565,
    1e6,
    1e13,
)
# Created: the epoch, a leap day, the last millisecond of a year, now-ish.
_CREATED = (0.0, 1709164800.5, 1767225599.9995, 1767225600.123456)


def test_the_cores_request_line_equals_the_formatters_over_hostile_values(settings: Settings) -> None:
    from cfk_otel import _native

    formatter = JsonFormatter(settings)
    core = _native.RequestLine(formatter._service_fields)
    span = SpanContext(0xABC << 64 | 0xDEF, 0x1234, is_remote=False, trace_flags=TraceFlags(1))
    compared = 0
    for path in _HOSTILE_PATHS:
        for seconds in _DURATIONS:
            for status in (200, 404, 500):
                for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL):
                    for traced in (span, None):
                        created = _CREATED[compared % len(_CREATED)]
                        duration_ms = round(seconds * 1_000_000) / 1000
                        request = _RequestLine(
                            created,
                            level,
                            f"GET {path} {status} {duration_ms:g}ms",
                            "GET",
                            path,
                            "/r/{x}" + path[-3:],
                            status,
                            duration_ms,
                            traced,
                        )
                        ids = (traced.trace_id, traced.span_id) if traced is not None else (0, 0)
                        mine = core.render(
                            created, level, "GET", path, request.route, str(status), seconds, *ids
                        )
                        assert mine == formatter._line(request), (path, seconds, status, level)
                        compared += 1
    assert compared == len(_HOSTILE_PATHS) * len(_DURATIONS) * 3 * 5 * 2


@pytest.mark.parametrize("server_span", ["core", "python"])
def test_the_cores_line_and_record_equal_pythons_and_a_lone_surrogate_takes_pythons_way(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], server_span: str
) -> None:
    """The same requests, the line written by the core and then by Python: the same stdout
    lines and the same OTLP records but for time and duration; a path the core cannot take
    (a lone surrogate) takes Python's way, on the core's route too (where, as before, a
    strict stdout and the core's queue refuse it: lost, and said so). The request's span is
    the core's server span (set-up's own head sampler: the line takes its ids from the span,
    ``RequestLog.write_span``) or ``CoreSpan`` (any other sampler: from a ``RequestInfo``)."""
    from opentelemetry.sdk.metrics import MeterProvider
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from cfk_otel._asgi.middleware import TelemetryMiddleware
    from cfk_otel._core import seam as _core
    from cfk_otel._logs import requests as _logs
    from cfk_otel._logs.requests import request_observer
    from cfk_otel.testing import OtlpReceiver

    served: list[tuple[str, str]] = []  # each request's span's ids, as its line must say

    async def hello(request: Any) -> PlainTextResponse:
        return PlainTextResponse("hello", status_code=int(request.query_params.get("s", "200")))

    routes = Starlette(routes=[Route("/hello/{n}", hello)])

    async def noting(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            context = trace.get_current_span().get_span_context()
            served.append((f"{context.trace_id:032x}", f"{context.span_id:016x}"))
        await routes(scope, receive, send)

    paths = ["/hello/1", '/hello/"q"\\\x01\x7f\u00e9\U0001f600', "/nowhere/\t"]
    built: list[object] = []
    original = _logs.request_line
    with OtlpReceiver() as receiver:
        provider, sink = _sink_provider(receiver, monkeypatch)
        configure_logging(settings, provider, sink)
        head = _sampling.sdk_arguments(load({"CFK_TRACES_KEEP_SLOWER_THAN": "off"}))["sampler"]
        tracer_provider = TracerProvider(sampler=head if server_span == "core" else ALWAYS_ON)
        _core.activate(_core.Choice(True, ""), tracer_provider)
        spans: list[bool] = []
        try:
            observer = request_observer(settings)
            assert observer is not None
            app = TelemetryMiddleware(
                noting,
                tracer_provider=tracer_provider,
                meter_provider=MeterProvider(),
                observers=[observer],
            )
            loop = asyncio.new_event_loop()
            monkeypatch.setattr(_logs, "request_line", lambda *a: built.append(original(*a)) or built[-1])
            for path in paths:
                loop.run_until_complete(_serve_once(app, path))
                spans.append(app._spans.server is not None)  # the core's server spans start them
            assert spans == [server_span == "core"] * 3
            assert built
            assert built[-1] is not None  # the core wrote those
            monkeypatch.setattr(_logs, "request_line", lambda *a: None)
            configure_logging(settings, provider, sink)  # new handlers: the line's route again
            for path in paths:
                loop.run_until_complete(_serve_once(app, path))
            surrogate = "/hello/\udc80"
            monkeypatch.setattr(_logs, "request_line", original)
            configure_logging(settings, provider, sink)
            by_python: list[str] = []
            python_line = JsonFormatter._line
            monkeypatch.setattr(
                JsonFormatter, "_line", lambda self, r: by_python.append(r.path) or python_line(self, r)
            )
            loop.run_until_complete(_serve_once(app, paths[0]))
            assert by_python == []  # the core's route again
            loop.run_until_complete(_serve_once(app, surrogate))
            assert by_python == [surrogate]  # Python's: stdout cannot take it either (logging says so)
            loop.close()
            lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
            # Nor can the core queue a lone surrogate's OTLP record (a warning says it is lost).
            lines = [line for line in lines if "route" in line]
            # Each line has its request's time and ids (the core's from the ending span itself).
            assert [(line["trace_id"], line["span_id"]) for line in lines] == [
                served[i] for i, path in enumerate([*paths, *paths, paths[0], surrogate]) if path != surrogate
            ]
            assert all(line["timestamp"] >= "2026" for line in lines)
            for line in lines:
                line.pop("timestamp")
                line.pop("duration_ms")
                line.pop("trace_id")
                line.pop("span_id")
                line["message"] = line["message"].rsplit(" ", 1)[0]
            assert [line["path"] for line in lines] == [*paths, *paths, paths[0]]
            assert lines[:3] == lines[3:6]
            _flush(provider)
            assert receiver.wait_for(
                lambda: sum(log.scope == "cfk_otel.requests" for log in receiver.logs) == 7
            )

            def comparable(log: Any) -> tuple[Any, ...]:
                # Each value with its type: 200 and 200.0 are equal in Python, not in OTLP.
                attributes = {k: (type(v).__name__, v) for k, v in log.attributes.items()}
                _, duration = attributes.pop("duration_ms")
                assert type(duration) is float
                assert str(log.body).endswith(f" {duration:g}ms")
                return (
                    log.scope,
                    log.resource,
                    str(log.body).rsplit(" ", 1)[0],
                    attributes,
                    log.record.time_unix_nano == log.record.observed_time_unix_nano > 0,
                    log.record.severity_number,
                    log.record.severity_text,
                    len(log.record.trace_id),
                    len(log.record.span_id),
                    log.record.flags,
                    log.record.dropped_attributes_count,
                )

            records = [comparable(log) for log in receiver.logs if log.scope == "cfk_otel.requests"]
            assert records[:3] == records[3:6]
            hello = {"method": "GET", "path": "/hello/1", "route": "/hello/{n}", "status": 200}
            assert records[0][3] == {k: (type(v).__name__, v) for k, v in hello.items()}
        finally:
            _core.activate(_core.Choice(False, "not set up"))
            _core.shutdown(1.0)
            provider.shutdown()
            _sampling.sdk_arguments(load({}))


@pytest.mark.usefixtures("restore_root")
def test_the_line_attribute_count_is_the_records_field_count() -> None:
    # The count decides whether the SDK's attribute limit lets the core queue the record.
    line = _RequestLine(0.0, logging.INFO, "GET / 200 1ms", "GET", "/", "/", 200, 1.0, None)
    assert len(line.fields) == LINE_ATTRIBUTES


class _ServerSpanIds:
    """What ``RequestLog.write_span`` reads of the core's server span."""

    def __init__(self, context: SpanContext) -> None:
        self.trace_id, self.span_id, self.flags = context.trace_id, context.span_id, context.trace_flags
        self._context = context

    def get_span_context(self) -> SpanContext:
        return self._context


@pytest.mark.parametrize("method", ["write", "write_span"])
def test_the_cores_line_follows_a_new_exporter_and_a_processor_the_app_adds(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], method: str
) -> None:
    """The line's configuration in the core is built once, and again when its exporter is
    replaced (a fork, a shutdown); once the app adds a log processor, records take the SDK's
    way, and so does the line. Both ways in: a ``RequestInfo`` (``write``) and the core's
    server span (``write_span``, which checks the route in its own frame)."""
    from opentelemetry.sdk._logs import LogRecordProcessor

    from cfk_otel._asgi.types import RequestInfo
    from cfk_otel._core import seam as _core
    from cfk_otel._logs.requests import request_observer
    from cfk_otel.testing import OtlpReceiver

    span = SpanContext(0xABC, 0xDEF, is_remote=False, trace_flags=TraceFlags(1))
    info = RequestInfo({"path": "/p"}, "http", "GET", "/p", 200, 0.0125, None, span)
    with OtlpReceiver() as receiver:
        provider, sink = _sink_provider(receiver, monkeypatch)
        configure_logging(settings, provider, sink)
        try:
            observer = request_observer(settings)
            assert observer is not None

            def write() -> Any:
                if method == "write":
                    return observer.write(info)
                ids = _ServerSpanIds(span)
                return observer.write_span(info.scope, "GET", "/p", 200, 0.0125, ids)  # type: ignore[arg-type]

            first, again = write(), write()
            assert first is not None
            assert again is not None
            assert first[0] is again[0]  # built once
            assert first[2:4] == (logging.INFO, "/p")
            outputs = _core.LINE_STDOUT | _core.LINE_OTLP
            if method == "write":
                assert first[4:] == (0xABC, 0xDEF, 1, outputs)
            else:  # the time, ids and flags: the server span's, filled in as it ends
                assert first[1] == 0.0
                assert first[4:] == (0, 0, 0, outputs | _core.LINE_OWN_SPAN)
                with pytest.raises(ValueError, match="ends with that span"):  # nowhere else
                    _core._native.end_request(None, None, None, "GET", "/p", "200", 0.0125, first)  # type: ignore[union-attr]

                def ended(line: Any) -> Any:  # as ServerSpan.end_request fills them in
                    return (line[0], time.time(), *line[2:4], 0xABC, 0xDEF, 1, line[7] & ~_core.LINE_OWN_SPAN)

                first, again = ended(first), ended(again)
            _core.shutdown(1.0)  # the exporter goes: the next line names the new one
            renewed = write()
            assert renewed is not None
            if method == "write_span":
                renewed = ended(renewed)
            assert renewed[0] is not first[0]
            for line in (first, again, renewed):
                _core.end_request(None, None, None, "GET", "/p", "200", 0.0125, line)  # type: ignore[arg-type]

            class Seen(LogRecordProcessor):
                bodies: list[object] = []  # noqa: RUF012

                def on_emit(self, log_record: Any) -> None:
                    Seen.bodies.append(getattr(log_record, "log_record", log_record).body)

                def shutdown(self) -> None: ...

                def force_flush(self, timeout_millis: int = 30000) -> bool:
                    return True

            provider.add_log_record_processor(Seen())
            assert write() is None  # stdout written by Python, the record by the SDK
            assert Seen.bodies == ["GET /p 200 12.5ms"]
            lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
            assert [line["message"] for line in lines] == ["GET /p 200 12.5ms"] * 4
            _flush(provider)
            # The renewed line's record (the core) and the last one (the SDK's processor); the
            # first two were handed to the exporter that had shut down, which takes no more.
            assert receiver.wait_for(lambda: len(receiver.logs) == 2)
            assert [log.body for log in receiver.logs] == ["GET /p 200 12.5ms"] * 2
        finally:
            _core.shutdown(1.0)
            provider.shutdown()
