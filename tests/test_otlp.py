"""cfk_otel/_otlp.py: our wire bytes decode equal to the upstream encoder's messages."""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry._logs import SeverityNumber
from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs as upstream_logs
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as upstream_spans
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk._logs import LoggerProvider, ReadableLogRecord
from opentelemetry.sdk._logs.export import ConsoleLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter as InMemoryLogExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)

from cfk_otel import _otlp
from cfk_otel.testing import OtlpReceiver

RESOURCE = Resource.create({"service.name": "cf-kanban", "deployment.environment": "test", "k": [1, 2]})


@pytest.fixture
def finished() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=RESOURCE)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    yield provider, memory
    provider.shutdown()


def _varied_spans(provider: TracerProvider, memory: InMemorySpanExporter) -> tuple[ReadableSpan, ...]:
    tracer = provider.get_tracer("cfk_otel", "1.2.3", schema_url="https://opentelemetry.io/schemas/1.26.0")
    other = provider.get_tracer("other.scope", attributes={"scope.attr": "x"})
    remote = SpanContext(
        0x0AF7651916CD43DD8448EB211C80319C,
        0xB7AD6B7169203331,
        is_remote=True,
        trace_flags=TraceFlags(1),
        trace_state=TraceState([("vendor", "value"), ("k2", "v2")]),
    )
    server_attributes = {
        "http.request.method": "GET",
        "url.path": "/api/boards/7",
        "http.response.status_code": 200,
        "server.port": 8000,
        "http.route": "/api/boards/{id}",
        "user_agent.original": "wrk \u00e9\u4e2d",
    }
    parent = set_span_in_context(NonRecordingSpan(remote))
    with tracer.start_as_current_span(
        "GET /api/boards/{id}", context=parent, kind=SpanKind.SERVER, attributes=server_attributes
    ):
        with other.start_as_current_span(
            "child",
            kind=SpanKind.CLIENT,
            links=[Link(remote, {"link.attr": 1}), Link(SpanContext(1, 2, is_remote=False))],
            attributes={
                "f": 1.5,
                "b": False,
                "t": True,
                "zero": 0,
                "neg": -5,
                "big": 2**62,
                "empty": "",
                "strings": ("a", "b"),
                "ints": [1, 2, 3],
                "floats": [0.5],
                "bools": [True],
            },
        ) as child:
            child.add_event("cache miss", {"key": "board:7", "n": 3})
            child.add_event("")
            child.set_status(Status(StatusCode.ERROR, "boom"))
        with tracer.start_as_current_span("ok", kind=SpanKind.INTERNAL) as ok:
            ok.set_status(Status(StatusCode.OK))
    tracer.start_span("unnamed-kinds", kind=SpanKind.PRODUCER).end()
    tracer.start_span("", kind=SpanKind.CONSUMER).end()
    return memory.get_finished_spans()


def test_spans_decode_equal_to_upstream(finished: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    spans = _varied_spans(*finished)
    assert len(spans) == 5
    ours = ExportTraceServiceRequest.FromString(_otlp.encode_spans(spans))
    assert ours == upstream_spans(spans)
    # The comparison must be able to fail: a changed name no longer matches.
    ours.resource_spans[0].scope_spans[0].spans[0].name = "changed"
    assert ours != upstream_spans(spans)


def test_spans_from_two_resources_are_grouped_as_upstream() -> None:
    spans: list[ReadableSpan] = []
    for name in ("a", "b"):
        memory = InMemorySpanExporter()
        provider = TracerProvider(resource=Resource.create({"service.name": name}))
        provider.add_span_processor(SimpleSpanProcessor(memory))
        for scope in ("one", "two"):
            provider.get_tracer(scope).start_span(f"{name}-{scope}").end()
        spans += memory.get_finished_spans()
        provider.shutdown()
    ours = ExportTraceServiceRequest.FromString(_otlp.encode_spans(spans))
    assert ours == upstream_spans(spans)
    assert [len(r.scope_spans) for r in ours.resource_spans] == [2, 2]


def test_the_string_cache_stays_bounded_and_correct(
    finished: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, memory = finished
    tracer = provider.get_tracer("t")
    for i in range(_otlp._CACHE_LIMIT + 100):
        tracer.start_span("s", attributes={"url.path": f"/hostile/{i}"}).end()
    spans = memory.get_finished_spans()
    ours = ExportTraceServiceRequest.FromString(_otlp.encode_spans(spans))
    assert ours == upstream_spans(spans)
    assert len(_otlp._strings) <= _otlp._CACHE_LIMIT


def test_cached_small_ints_never_stand_in_for_bools_or_floats(
    finished: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, memory = finished
    tracer = provider.get_tracer("t")
    for value in (1, True, 1.0, 1, 0, False, 0.0, 200, 70000, -5, True):
        tracer.start_span("s", attributes={"v": value}).end()
    spans = memory.get_finished_spans()
    assert ExportTraceServiceRequest.FromString(_otlp.encode_spans(spans)) == upstream_spans(spans)


def test_values_upstream_cannot_encode_drop_only_their_attribute(
    finished: tuple[TracerProvider, InMemorySpanExporter], caplog: pytest.LogCaptureFixture
) -> None:
    provider, memory = finished
    # The SDK accepts an int beyond int64 and a lone surrogate; OTLP has no room for the
    # first (dropped with a warning) and UTF-8 none for the second (replaced by "?").
    provider.get_tracer("t").start_span("s", attributes={"huge": 2**70, "ok": 1, "bad": "a\ud800b"}).end()
    [span] = memory.get_finished_spans()
    with caplog.at_level(logging.WARNING, logger="cfk_otel"):
        decoded = ExportTraceServiceRequest.FromString(_otlp.encode_spans([span]))
    attributes = {kv.key: kv.value for kv in decoded.resource_spans[0].scope_spans[0].spans[0].attributes}
    assert set(attributes) == {"ok", "bad"}
    assert attributes["bad"].string_value == "a?b"
    assert "'huge' not exported" in caplog.text


def _varied_logs() -> tuple[ReadableLogRecord, ...]:
    memory = InMemoryLogExporter()
    provider = LoggerProvider(resource=RESOURCE)
    provider.add_log_record_processor(SimpleLogRecordProcessor(memory))
    logger = provider.get_logger("cfk_otel.request", "1.0", schema_url="https://example.test/schema")
    trace_context = set_span_in_context(
        NonRecordingSpan(SpanContext(0xABC, 0xDEF, is_remote=False, trace_flags=TraceFlags(1)))
    )
    logger.emit(
        body="GET /api/boards/{id} 200",
        severity_number=SeverityNumber.INFO,
        severity_text="INFO",
        attributes={"http.route": "/api/boards/{id}", "duration_ms": 1.25, "status": 200},
        context=trace_context,
    )
    logger.emit(
        body={"structured": [1, "two", {"three": 3.0}], "none": None}, severity_number=SeverityNumber.ERROR
    )
    logger.emit(body=b"\x00\x01", event_name="board.created")
    logger.emit(body=None)
    logger.emit(body=["a", 1])
    records = tuple(memory.get_finished_logs())
    provider.shutdown()
    return records


def test_log_records_decode_equal_to_upstream() -> None:
    records = _varied_logs()
    assert len(records) == 5
    ours = ExportLogsServiceRequest.FromString(_otlp.encode_logs(records))
    assert ours == upstream_logs(records)
    ours.resource_logs[0].scope_logs[0].log_records[0].body.string_value = "changed"
    assert ours != upstream_logs(records)


def test_processors_wrap_only_the_otlp_http_exporters() -> None:
    console = ConsoleSpanExporter()
    processor = _otlp.span_processor(console)
    assert processor.span_exporter is console  # type: ignore[attr-defined]
    processor.shutdown()
    log_console = ConsoleLogRecordExporter()
    log_proc = _otlp.log_processor(log_console)
    assert log_proc._batch_processor._exporter is log_console  # type: ignore[attr-defined]
    log_proc.shutdown()


def test_spans_and_logs_arrive_through_the_upstream_http_client() -> None:
    with OtlpReceiver(required_headers={"authorization": "Bearer t0ken"}) as receiver:
        base = receiver.http_endpoint
        headers = {"authorization": "Bearer t0ken"}
        tracer_provider = TracerProvider(resource=RESOURCE)
        tracer_provider.add_span_processor(
            _otlp.span_processor(OTLPSpanExporter(endpoint=f"{base}/v1/traces", headers=headers))
        )
        logger_provider = LoggerProvider(resource=RESOURCE)
        logger_provider.add_log_record_processor(
            _otlp.log_processor(OTLPLogExporter(endpoint=f"{base}/v1/logs", headers=headers))
        )
        tracer_provider.get_tracer("t").start_span("GET /hello", attributes={"http.route": "/hello"}).end()
        logger_provider.get_logger("l").emit(body="hello", severity_number=SeverityNumber.WARN)
        tracer_provider.force_flush()
        logger_provider.force_flush()
        span = receiver.wait_for_span(lambda s: s.name == "GET /hello")
        assert span.attributes == {"http.route": "/hello"}
        assert receiver.wait_for(lambda: any(log.body == "hello" for log in receiver.logs))
        tracer_provider.shutdown()
        logger_provider.shutdown()


def test_request_lines_encoded_directly_arrive_beside_sdk_records() -> None:
    with OtlpReceiver() as receiver:
        provider = LoggerProvider(resource=RESOURCE)
        processor = _otlp.log_processor(OTLPLogExporter(endpoint=f"{receiver.http_endpoint}/v1/logs"))
        assert isinstance(processor, _otlp.OtlpHttpLogProcessor)
        provider.add_log_record_processor(processor)
        span = SpanContext(0xABC, 0xDEF, is_remote=False, trace_flags=TraceFlags(1))
        fields = {"method": "GET", "path": "/hello", "route": "/hello", "status": 200, "duration_ms": 1.5}
        scope = InstrumentationScope("cfk_otel.requests")
        prefix = processor.groups.prefix(provider.resource, scope)
        assert prefix is not None
        data = _otlp.encode_request_record(
            prefix,
            1_700_000_000_000_000_000,
            9,
            "INFO",
            "GET /hello",
            "GET",
            "/hello",
            "/hello",
            200,
            1.5,
            span,
        )
        processor.emit_encoded(provider.resource, scope, data, named=True)
        assert type(processor._batch_processor._queue[0]) is bytes  # no tuple, nothing for the GC
        provider.get_logger("app").emit(body="from the SDK", severity_number=SeverityNumber.WARN)
        provider.force_flush()
        assert receiver.wait_for(lambda: len(receiver.logs) == 2)
        by_body = {log.body: log for log in receiver.logs}
        line = by_body["GET /hello"]
        assert line.attributes == fields
        assert line.scope == "cfk_otel.requests"
        assert line.resource["service.name"] == "cf-kanban"
        assert (line.record.trace_id.hex(), line.record.span_id.hex()) == (f"{0xABC:032x}", f"{0xDEF:016x}")
        assert (line.record.severity_number, line.record.severity_text, line.record.flags) == (9, "INFO", 1)
        assert by_body["from the SDK"].scope == "app"
        provider.shutdown()


@pytest.mark.parametrize(
    ("path", "status", "span"),
    [
        ("/hello", 200, SpanContext(0xABC, 0xDEF, is_remote=False, trace_flags=TraceFlags(1))),
        ('/p/"\u00e9\ud800', 404, SpanContext(1 << 127, 1, is_remote=False, trace_flags=TraceFlags(0))),
        ("/x" * 300, 503, None),
    ],
)
def test_request_records_encode_as_the_general_encoder_does(
    path: str, status: int, span: SpanContext | None
) -> None:
    fields = {"method": "POST", "path": path, "route": "/p/{x}", "status": status, "duration_ms": 12.345}
    for _ in range(2):  # cold, then from the attribute cache
        general = _otlp.encode_log_record(
            timestamp=1_700_000_000_123_456_789,
            observed_timestamp=1_700_000_000_123_456_789,
            severity_number=13,
            severity_text="WARN",
            body=f"POST {path} {status}",
            attributes=fields,
            trace_flags=int(span.trace_flags) if span is not None else 0,
            trace_id=span.trace_id if span is not None else None,
            span_id=span.span_id if span is not None else None,
        )
        direct = _otlp.encode_request_record(
            b"",
            1_700_000_000_123_456_789,
            13,
            "WARN",
            f"POST {path} {status}",
            "POST",
            path,
            "/p/{x}",
            status,
            12.345,
            span,
        )
        assert direct == general


def test_named_items_arrive_under_their_own_resource_and_scope() -> None:
    """Plain-bytes items of several (resource, scope) pairs, beside Encoded ones."""
    with OtlpReceiver() as receiver:
        processor = _otlp.log_processor(OTLPLogExporter(endpoint=f"{receiver.http_endpoint}/v1/logs"))
        assert isinstance(processor, _otlp.OtlpHttpLogProcessor)
        other = Resource.create({"service.name": "other"})
        pairs = [
            (RESOURCE, InstrumentationScope("a")),
            (RESOURCE, InstrumentationScope("b", "1")),
            (other, None),
        ]
        prefixes = [processor.groups.prefix(r, s) for r, s in pairs]
        assert prefixes == [b"\x00", b"\x01", b"\x02"]
        # Scopes compare by value: an equal scope from another tracer gets the same name.
        assert processor.groups.prefix(RESOURCE, InstrumentationScope("b", "1")) == b"\x01"
        for i, prefix in enumerate(prefixes * 2):
            processor.emit_encoded(
                *pairs[i % 3],
                _otlp.encode_request_record(
                    prefix, 1, 9, "INFO", f"line {i}", "GET", "/", "/", 200, 1.0, None
                ),
                named=True,
            )
        processor.emit_encoded(
            other,
            InstrumentationScope("c"),
            _otlp.encode_log_record(
                timestamp=1,
                observed_timestamp=1,
                severity_number=9,
                severity_text="INFO",
                body="encoded",
                attributes={},
            ),
        )
        processor.force_flush()
        assert receiver.wait_for(lambda: len(receiver.logs) == 7)
        where = {log.body: (log.resource.get("service.name"), log.scope) for log in receiver.logs}
        assert where == {
            "line 0": ("cf-kanban", "a"),
            "line 1": ("cf-kanban", "b"),
            "line 2": ("other", ""),
            "line 3": ("cf-kanban", "a"),
            "line 4": ("cf-kanban", "b"),
            "line 5": ("other", ""),
            "encoded": ("other", "c"),
        }
        processor.shutdown()


def test_groups_stop_naming_at_their_limit() -> None:
    groups = _otlp.Groups()
    resources = [Resource.create({"n": i}) for i in range(_otlp.Groups.LIMIT + 1)]
    named = [groups.prefix(r, None) for r in resources]
    assert named[-1] is None  # the caller then queues Encoded items
    assert [p[0] for p in named[:-1] if p is not None] == list(range(_otlp.Groups.LIMIT))


def test_spans_encoded_as_they_end_arrive_as_upstream_would_send_them(
    finished: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, memory = finished
    with OtlpReceiver() as receiver:
        processor = _otlp.span_processor(OTLPSpanExporter(endpoint=f"{receiver.http_endpoint}/v1/traces"))
        assert isinstance(processor, _otlp.OtlpHttpSpanProcessor)
        provider.add_span_processor(processor)
        spans = _varied_spans(provider, memory)
        provider.force_flush()
        assert receiver.wait_for(lambda: len(receiver.spans) == len(spans))
        expected = upstream_spans(spans)
        want = sorted(
            (
                rs.resource == expected.resource_spans[0].resource,
                ss.scope.name,
                s.SerializeToString(deterministic=True),
            )
            for rs in expected.resource_spans
            for ss in rs.scope_spans
            for s in ss.spans
        )
        got = sorted((True, r.scope, r.span.SerializeToString(deterministic=True)) for r in receiver.spans)
        assert got == want
        assert {r.resource["service.name"] for r in receiver.spans} == {"cf-kanban"}


def test_sdk_log_records_are_queued_as_bytes_and_arrive() -> None:
    records = _varied_logs()
    with OtlpReceiver() as receiver:
        provider = LoggerProvider(resource=RESOURCE)
        processor = _otlp.log_processor(OTLPLogExporter(endpoint=f"{receiver.http_endpoint}/v1/logs"))
        provider.add_log_record_processor(processor)
        logger = provider.get_logger("cfk_otel.request", "1.0", schema_url="https://example.test/schema")
        for readable in records:
            record = readable.log_record
            logger.emit(
                timestamp=record.timestamp,
                observed_timestamp=record.observed_timestamp,
                body=record.body,
                severity_number=record.severity_number,
                severity_text=record.severity_text,
                attributes=record.attributes,
                event_name=record.event_name,
            )
        provider.force_flush()
        assert receiver.wait_for(lambda: len(receiver.logs) == len(records))
        expected = [
            r for rl in upstream_logs(records).resource_logs for sl in rl.scope_logs for r in sl.log_records
        ]
        for got, want in zip(receiver.logs, expected, strict=True):
            want.ClearField("trace_id")  # the originals were emitted inside a span; these not
            want.ClearField("span_id")
            want.ClearField("flags")
            assert got.record == want
        provider.shutdown()


def test_a_full_queue_drops_quietly_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    # Nothing listens on port 9 and the schedule is longer than the test: the queue fills.
    exporter = OTLPSpanExporter(endpoint="http://127.0.0.1:9/v1/traces", timeout=1)
    processor = _otlp.span_processor(
        exporter, max_queue_size=4, max_export_batch_size=4, schedule_delay_millis=3_600_000
    )
    assert isinstance(processor, _otlp.OtlpHttpSpanProcessor)
    sdk_records: list[logging.LogRecord] = []
    sdk_logger = logging.getLogger("opentelemetry.sdk._shared_internal")
    original = sdk_logger.makeRecord

    def counting(*args: object, **kwargs: object) -> logging.LogRecord:
        record = original(*args, **kwargs)  # type: ignore[arg-type]
        sdk_records.append(record)
        return record

    sdk_logger.makeRecord = counting  # type: ignore[method-assign]
    batch = processor._batch_processor
    try:
        # Holding the export lock keeps the worker from taking the queued batch meanwhile.
        with batch._export_lock, caplog.at_level(logging.WARNING, logger="cfk_otel"):
            for i in range(50):
                processor.emit_encoded(RESOURCE, None, bytes([i]))
            assert len(batch._queue) == 4
            batch._queue.clear()
    finally:
        del sdk_logger.makeRecord
    assert processor.queue.dropped == 46
    assert [r.getMessage() for r in caplog.records if r.name == "cfk_otel"] == [
        "cfk_otel: the span export queue is full (collector down or slow?); 1 dropped so far"
    ]
    assert not [r for r in sdk_records if "Queue full" in r.getMessage()]  # no record built per drop
    processor.shutdown()


def test_high_cardinality_and_long_values_are_never_cached(
    finished: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, memory = finished
    tracer = provider.get_tracer("t")
    _otlp._strings.clear()
    long_value = "v" * (_otlp._CACHED_LENGTH + 1)
    for i in range(3):
        attributes = {
            "url.path": f"/p/{i}",
            "user_agent.original": f"agent {i}",
            "client.address": f"10.0.0.{i}",
            "app.note": long_value,
            "http.route": "/p/{id}",
        }
        tracer.start_span("s", attributes=attributes).end()
    spans = memory.get_finished_spans()
    ours = ExportTraceServiceRequest.FromString(_otlp.encode_spans(spans))
    assert ours == upstream_spans(spans)
    # The request line's own path goes through the same cache.
    _otlp.encode_request_record(b"", 1, 9, "INFO", "GET /p/9", "GET", "/p/9", "/p/{id}", 200, 1.0, None)
    assert {key for key, _ in _otlp._strings} == {"client.address", "http.route", "method", "route", "status"}


@pytest.mark.parametrize("key", ["url.path", "k" * 120])
@pytest.mark.parametrize("size", [0, 1, 100, 110, 117, 118, 125, 126, 127, 128, 300, 20_000])
def test_uncached_text_values_encode_as_the_general_path(key: str, size: int) -> None:
    for value in ("p" * size, "é" * size, "\udcff" + "p" * size):
        general = _otlp._message(_otlp._key(key) + b"\x12" + _otlp._message(_otlp._any(value)))
        assert _otlp._text_key_value(key, value) == general


@pytest.fixture
def limits() -> Iterator[None]:
    _otlp.set_value_limits(10, 20)
    yield
    _otlp.set_value_limits(8192, 8192)


def test_long_span_attribute_values_are_cut_with_a_marker(
    finished: tuple[TracerProvider, InMemorySpanExporter], limits: None
) -> None:
    provider, memory = finished
    with provider.get_tracer("t").start_as_current_span("s") as span:
        span.set_attributes({"url.path": "/" + "p" * 30, "short": "ok", "list": ["x" * 12, "y"], "n": 7})
        span.add_event("e", {"note": "n" * 11})
    (decoded,) = (
        ExportTraceServiceRequest.FromString(_otlp.encode_spans(memory.get_finished_spans()))
        .resource_spans[0]
        .scope_spans[0]
        .spans
    )
    values = {kv.key: kv.value for kv in decoded.attributes}
    assert values["url.path"].string_value == "/ppppppppp…[truncated 21 chars]"
    assert values["short"].string_value == "ok"
    assert [v.string_value for v in values["list"].array_value.values] == [
        "xxxxxxxxxx…[truncated 2 chars]",
        "y",
    ]
    assert values["n"].int_value == 7
    assert decoded.events[0].attributes[0].value.string_value == "nnnnnnnnnn…[truncated 1 chars]"


def _decoded_record(data: bytes) -> Any:
    request = ExportLogsServiceRequest.FromString(_otlp.encode_logs([_otlp.Encoded(RESOURCE, None, data)]))
    return request.resource_logs[0].scope_logs[0].log_records[0]


def test_log_attribute_values_are_cut_at_the_log_limit(limits: None) -> None:
    data = _otlp.encode_log_record(
        timestamp=1,
        observed_timestamp=2,
        severity_number=9,
        severity_text="INFO",
        body="b" * 40,
        attributes={"path": "/" + "p" * 30, "extra": "e" * 20},
    )
    record = _decoded_record(data)
    values = {kv.key: kv.value.string_value for kv in record.attributes}
    assert values == {"path": "/" + "p" * 19 + "…[truncated 11 chars]", "extra": "e" * 20}
    assert record.body.string_value == "b" * 40  # the body is cut by its own rule (MAX_MESSAGE)


def test_a_log_record_over_the_ceiling_is_fitted_within_it() -> None:
    attributes = {f"k{i}": "v" * 8000 for i in range(20)}  # each within the 8192 limit
    data = _otlp.encode_log_record(
        timestamp=1,
        observed_timestamp=2,
        severity_number=9,
        severity_text="INFO",
        body="m" * 1_000_000,
        attributes=attributes,
        trace_id=5,
        span_id=6,
    )
    assert len(data) <= _otlp.RECORD_MAX_BYTES
    record = _decoded_record(data)
    assert record.body.string_value == "m" * 8192 + f"…[truncated {1_000_000 - 8192} chars]"
    kept = [kv.key for kv in record.attributes]
    assert kept == [f"k{i}" for i in range(len(kept))]
    assert 0 < len(kept) < 20
    assert record.dropped_attributes_count == 20 - len(kept)
    assert (record.trace_id[-1], record.span_id[-1], record.severity_text) == (5, 6, "INFO")
    # A body that is not text: its repr, cut.
    data = _otlp.encode_log_record(
        timestamp=1,
        observed_timestamp=2,
        severity_number=9,
        severity_text="INFO",
        body={"big": "x" * 100_000},
        attributes=None,
    )
    assert len(data) <= _otlp.RECORD_MAX_BYTES
    assert _decoded_record(data).body.string_value.startswith("{'big': 'xxx")


def test_a_queue_full_in_bytes_drops_and_gives_back_what_each_batch_took(
    caplog: pytest.LogCaptureFixture,
) -> None:
    exporter = OTLPSpanExporter(endpoint="http://127.0.0.1:9/v1/traces", timeout=1)
    processor = _otlp.span_processor(exporter, schedule_delay_millis=3_600_000)
    assert isinstance(processor, _otlp.OtlpHttpSpanProcessor)
    queue, batch = processor.queue, processor._batch_processor
    queue.max_bytes = 1000
    with batch._export_lock, caplog.at_level(logging.WARNING, logger="cfk_otel"):
        for _ in range(10):
            processor.emit_encoded(RESOURCE, None, b"x" * 300)
        assert len(batch._queue) == 3  # 300, 600 and 900 bytes are within the bound
        assert (queue.bytes, queue.dropped) == (900, 7)
    assert "the span export queue is full" in caplog.text
    processor.force_flush()  # the batch is exported (and fails: nothing listens): its bytes go
    assert (len(batch._queue), queue.bytes) == (0, 0)
    processor.emit_encoded(RESOURCE, None, b"x" * 300)
    assert (len(batch._queue), queue.bytes) == (1, 300)
    processor.shutdown()


def test_failed_exports_free_their_request_bodies_once_they_add_up(monkeypatch: pytest.MonkeyPatch) -> None:
    # The SDK's HTTP client leaves each failed attempt in a reference cycle (exception,
    # traceback, frame) that holds the body: freed only by a full collection.
    freed: list[int] = []

    class Body(bytes):
        def __del__(self) -> None:
            freed.append(len(self))

    sender = _otlp._Sender(OTLPSpanExporter(endpoint="http://127.0.0.1:9/v1/traces", timeout=1))
    # The client logs each retry with its exception, which pytest's log capture would keep
    # (with the body, through its traceback) until the test ends.
    monkeypatch.setattr(
        logging.getLogger("opentelemetry.exporter.otlp.proto.http.trace_exporter"), "disabled", True
    )
    monkeypatch.setattr(_otlp, "_garbage", [_otlp._GARBAGE_BYTES - 1500])
    gc.collect()
    gc.disable()  # no collection but ours
    try:
        assert not sender.send("spans", lambda batch: Body(b"x" * 1000), [])
        assert freed == []  # 1000 bytes more: still under the threshold, left to Python
        assert not sender.send("spans", lambda batch: Body(b"y" * 1000), [])
        assert freed == [1000, 1000]  # over it: both bodies freed
        assert _otlp._garbage == [0]
    finally:
        gc.enable()


def test_a_forked_child_starts_with_an_empty_byte_count() -> None:
    import os

    exporter = OTLPSpanExporter(endpoint="http://127.0.0.1:9/v1/traces", timeout=1)
    processor = _otlp.span_processor(exporter, schedule_delay_millis=3_600_000)
    assert isinstance(processor, _otlp.OtlpHttpSpanProcessor)
    processor.emit_encoded(RESOURCE, None, b"x" * 300)
    assert processor.queue.bytes == 300
    pid = os.fork()
    if pid == 0:  # the SDK empties its queue in the child; the count must follow
        os._exit(0 if processor.queue.bytes == 0 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    processor.shutdown()
