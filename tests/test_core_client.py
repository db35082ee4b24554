"""cfk_otel/_core/seam.py's client calls (``ClientCall``, ``Spans.start_client``, ``end_client``)
as the asyncpg and redis wrappers use them: a prepared call's span crosses into the core as its
prepared form and the per-call values, and arrives as the SDK's span would."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from cfk_otel import _settings
from cfk_otel._core import sampling as _sampling
from cfk_otel._core import seam as _core
from cfk_otel._core.seam import ClientCall, CoreSpan, Spans
from cfk_otel._instrumentation import db as _db
from cfk_otel._metrics import catalogue as _metrics
from cfk_otel.testing import OtlpReceiver, ReceivedSpan

RESOURCE = Resource.create({"service.name": "cf-kanban"})
PARENT = {
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "tracestate": "vendor=value",
}


class _Other(SpanProcessor):
    """A second processor: our spans then go through the SDK's tracer (the oracle)."""


@pytest.fixture(autouse=True)
def _native(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")  # each _provider sets its own
    _core.set_value_limits(None, None)
    yield
    _core.shutdown(1.0)
    _core.activate(_core.Choice(False, "not set up"))
    _sampling.sdk_arguments(_settings.load({}))


def _provider(receiver: OtlpReceiver, *extra: SpanProcessor) -> TracerProvider:
    """As set-up builds it, with set-up's own head sampler (parent-based, always on)."""
    sampler = _sampling.sdk_arguments(_settings.load({}))["sampler"]
    assert _sampling.HEAD is not None
    assert _sampling.HEAD.sampler is sampler
    provider = TracerProvider(resource=RESOURCE, sampler=sampler)
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{receiver.http_endpoint}/v1/traces"))
    )
    _core.shutdown(1.0)
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.http_endpoint  # restored by _native
    _core.activate(_core.Choice(True, ""), provider)
    for processor in extra:
        provider.add_span_processor(processor)
    return provider


class _Params:
    database = "cfk"
    user = "cfk"


class _Connection:  # what the asyncpg wrapper reads of a connection
    _params = _Params()
    _addr = ("127.0.0.1", 55432)
    _reset_query = "RESET ALL"


class _Pool:
    def __init__(self) -> None:
        self.connection_kwargs = {"host": "127.0.0.1", "port": 56379, "db": 0}


class _Redis:
    def __init__(self) -> None:
        self.connection_pool = _Pool()


async def _ok(*args: object, **kwargs: object) -> int:
    return 1


async def _boom(*args: object, **kwargs: object) -> int:
    raise ValueError("relation does not exist")


def _calls(provider: TracerProvider, metrics: _metrics.Metrics, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request span (continuing a remote parent with a trace state) and, inside it, each kind
    of client call twice (the second time prepared): a query, a redis command, a failing query;
    then a span the app adds an attribute and an event to."""
    monkeypatch.setattr(_metrics, "_default", metrics)
    client = _db._Client(provider)
    pg = _db._asyncpg_patch(client, "connection")
    rd = _db._redis_patch(client, False, True)

    async def run() -> None:
        connection, cache = _Connection(), _Redis()
        for _ in range(2):
            await pg(_ok)(connection, "SELECT 1")
            await rd(_ok)(cache, "SET", "board:7", "secret", "EX", 60)
            with pytest.raises(ValueError, match="relation"):
                await pg(_boom)(connection, "SELECT * FROM gone")
        call = _db._asyncpg_call(client, connection, "SELECT 3", "")
        span = client.spans.start_client(call, trace.get_current_span())
        span.set_attribute("app.rows", 3)
        span.add_event("app.note", {"k": "v"})
        if type(span) is CoreSpan:
            metrics.database_query_duration.record_client(call, 0.001, span)
        else:
            client.finish(span, metrics.database_query_duration, call.labels, 0.001)

    parent = TraceContextTextMapPropagator().extract(PARENT)
    request = Spans(provider).start("GET /boards/{board_id}", parent, SpanKind.SERVER, {})
    with trace.use_span(request, end_on_exit=True):
        asyncio.run(run())
    provider.force_flush()
    assert _core.flush(5.0)


def _comparable(span: ReceivedSpan, request_id: bytes) -> dict[str, Any]:
    s = span.span
    return {
        "name": s.name,
        "kind": s.kind,
        "scope": span.scope,
        "attributes": span.attributes,
        "dropped": s.dropped_attributes_count,
        "trace_id": s.trace_id.hex(),
        "child of the request": s.parent_span_id == request_id,
        "trace_state": s.trace_state,
        "flags": s.flags,
        "status": (s.status.code, s.status.message),
        "events": [
            (e.name, {a.key: a.value.string_value for a in e.attributes if a.key != "exception.stacktrace"})
            for e in s.events
        ],
        "stacktrace": [
            len(a.value.string_value) > 0 for e in s.events for a in e.attributes if "stack" in a.key
        ],
    }


def _client_spans(receiver: OtlpReceiver) -> list[dict[str, Any]]:
    [request] = [s for s in receiver.spans if s.span.kind == 2]
    spans = [_comparable(s, request.span.span_id) for s in receiver.spans if s.span.kind == 3]
    return sorted(spans, key=lambda s: json.dumps(s, sort_keys=True, default=str))


def test_prepared_client_spans_arrive_as_the_sdk_spans_would(
    monkeypatch: pytest.MonkeyPatch, core_calls: Any
) -> None:
    """The fixed attributes converted once, the status and events of a failed call, the
    trace state and flags taken from the request: the same OTLP as the SDK's spans. All
    but the span the app wrote to crossed as a prepared call."""
    with OtlpReceiver() as lean_receiver, OtlpReceiver() as sdk_receiver:
        native = _metrics.Metrics(MeterProvider(), native=True)
        with core_calls.watch() as calls:
            _calls(_provider(lean_receiver), native, monkeypatch)
        sdk = _metrics.Metrics(MeterProvider(), native=False)
        _calls(_provider(sdk_receiver, _Other()), sdk, monkeypatch)
        assert lean_receiver.wait_for(lambda: len(lean_receiver.spans) == 8)
        assert sdk_receiver.wait_for(lambda: len(sdk_receiver.spans) == 8)
        lean, expected = _client_spans(lean_receiver), _client_spans(sdk_receiver)
    assert lean == expected
    assert len(lean) == 7
    assert {s["trace_id"] for s in lean} == {PARENT["traceparent"][3:35]}
    assert all(s["child of the request"] and s["trace_state"] == "vendor=value" for s in lean)
    failed = [s for s in lean if s["status"][0] == 2]
    assert [s["status"][1] for s in failed] == ["ValueError: relation does not exist"] * 2
    assert all(s["events"][0][0] == "exception" and s["stacktrace"] == [True] for s in failed)
    [written] = [s for s in lean if "app.rows" in s["attributes"]]
    assert written["events"] == [("app.note", {"k": "v"})]
    assert written["attributes"]["db.statement"] == "SELECT 3"
    # The first call (its Spans chose the exporter then: the generic start) and the span the
    # app wrote to went the general way; every other one as a prepared call.
    assert calls.count("end_prepared") == 5
    assert calls.count("end_call") == 2
    # Every call's duration observed in the same crossing, under its labels.
    assert [(k, sum(c)) for k, c, _ in native.database_query_duration.rows()] == [(("SELECT",), 5)]
    assert [(k, sum(c)) for k, c, _ in native.redis_operation_duration.rows()] == [(("SET",), 2)]


def _local_parent(spans: Spans) -> CoreSpan:
    parent = spans.start("GET /", None, SpanKind.SERVER, {})
    assert type(parent) is CoreSpan
    return parent


def test_a_prepared_call_is_made_again_for_a_new_exporter_after_shutdown_and_in_a_forked_child() -> None:
    call = ClientCall("SELECT", ("SELECT",), {"db.system": "postgresql"})
    with OtlpReceiver() as receiver:
        provider = _provider(receiver)
        spans = Spans(provider)
        histogram = _metrics.Metrics(MeterProvider(), native=True).database_query_duration

        def one() -> None:
            span = spans.start_client(call, _local_parent(spans))
            assert span.attributes is call.attributes  # the fast start: shared, not copied
            histogram.record_client(call, 0.001, span)  # type: ignore[arg-type]

        one()
        first = call.core
        assert first is not None
        assert first.exporter is spans.exporter
        one()
        assert call.core is first  # made once per exporter
        _core.shutdown(1.0)
        one()
        assert call.core is not first
        assert call.core is not None
        assert call.core.exporter is spans.exporter
        parent_core = call.core
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12 and later)
            pid = os.fork()
        if pid == 0:  # the child: the call's spans go to its own exporter
            try:
                one()
                own = _core._EXPORTERS.get((os.getpid(), "traces"))
                ok = call.core is not parent_core and call.core is not None and call.core.exporter is own
                os._exit(0 if ok else 1)
            except BaseException:
                os._exit(2)
        _, code = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(code) == 0
        one()
        assert call.core is parent_core
        assert _core.flush(5.0)
        assert receiver.wait_for(lambda: len([s for s in receiver.spans if s.name == "SELECT"]) == 4)


def test_a_failing_prepared_end_never_reaches_the_app(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from cfk_otel import _guard
    from cfk_otel import _native as native_module

    def broken(*args: object, **kwargs: object) -> bool:
        raise RuntimeError("broken")

    monkeypatch.setattr(_guard, "warn_once", lambda kind, *args, **kwargs: _guard._log.warning(kind))
    with OtlpReceiver() as receiver:
        spans = Spans(_provider(receiver))
        histogram = _metrics.Metrics(MeterProvider(), native=True).database_query_duration
        call = ClientCall("SELECT", ("SELECT",), {})
        span = spans.start_client(call, _local_parent(spans))
        monkeypatch.setattr(native_module, "end_prepared", broken)
        with caplog.at_level("WARNING", "cfk_otel"):
            histogram.record_client(call, 0.001, span)  # type: ignore[arg-type]  # no error
        assert "recording the end of a client call" in caplog.text
        assert not span.is_recording()


def test_a_client_span_without_one_of_our_parents_starts_the_general_way() -> None:
    """No current span, or one of the app's: the generic start (the sampler asked as
    ``Spans.start`` asks it), and the span's own attributes a copy of the call's."""
    with OtlpReceiver() as receiver:
        provider = _provider(receiver)
        spans = Spans(provider)
        call = ClientCall("GET", ("GET",), {"db.system": "redis"})
        for parent in (trace.INVALID_SPAN, provider.get_tracer("app").start_span("app")):
            with trace.use_span(parent):  # the parent given is the current span, as the wrappers read it
                span = spans.start_client(call, parent)
            assert type(span) is CoreSpan
            assert span.attributes == call.attributes
            assert span.attributes is not call.attributes
            assert span.parent == (parent.get_span_context() if parent.get_span_context().is_valid else None)


def test_set_own_never_writes_into_a_shared_call() -> None:
    with OtlpReceiver() as receiver:
        spans = Spans(_provider(receiver))
        call = ClientCall("GET", ("GET",), {"db.system": "redis"})
        span = spans.start_client(call, _local_parent(spans))
        assert type(span) is CoreSpan
        span.set_own({"extra": 1})
        assert call.attributes == {"db.system": "redis"}
        assert span.attributes == {"db.system": "redis", "extra": 1}


def test_targets_are_forgotten_with_their_connection() -> None:
    """The prepared calls are kept per live connection or pool: none past its owner."""
    client = _db._Client(None)
    connection = _Connection()
    first = _db._asyncpg_call(client, connection, "SELECT 1", "")
    assert _db._asyncpg_call(client, connection, "SELECT 1", "") is first
    assert len(client.targets) == 1
    del connection
    gc.collect()
    assert client.targets == {}
    again = _db._asyncpg_call(client, _Connection(), "SELECT 1", "")
    assert again is not first


def test_a_prepared_calls_long_values_are_cut_as_the_sdk_cuts_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fixed attributes are converted once, at the exporter's value limit: as the SDK
    cuts them for every span."""
    monkeypatch.setenv("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "8")
    statement = "SELECT * FROM a_table_with_a_long_name"

    def run(receiver: OtlpReceiver, *extra: SpanProcessor) -> list[dict[str, Any]]:
        provider = _provider(receiver, *extra)
        spans = Spans(provider)
        histogram = _metrics.Metrics(MeterProvider(), native=True).database_query_duration
        call = ClientCall("SELECT", ("SELECT",), {"db.statement": statement, "db.system": "postgresql"})
        request = spans.start("GET /", None, SpanKind.SERVER, {})
        for _ in range(3):
            span = spans.start_client(call, request)
            if type(span) is CoreSpan:
                histogram.record_client(call, 0.001, span)
            else:
                span.end()
        request.end()
        provider.force_flush()
        assert _core.flush(5.0)
        assert receiver.wait_for(lambda: len(receiver.spans) == 4)
        return [s.attributes for s in receiver.spans if s.span.kind == 3]

    with OtlpReceiver() as lean_receiver, OtlpReceiver() as sdk_receiver:
        lean = run(lean_receiver)
        expected = run(sdk_receiver, _Other())
    assert lean == expected == [{"db.statement": statement[:8], "db.system": "postgres"}] * 3
