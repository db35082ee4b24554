"""cfk_otel/_core/seam.py: the core's spans are exported exactly as the SDK's spans would be."""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    ParentBasedTraceIdRatio,
    Sampler,
)
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags, TraceState
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from cfk_otel import _settings
from cfk_otel._asgi.middleware import TelemetryMiddleware
from cfk_otel._core import sampling as _sampling
from cfk_otel._core import seam as _core
from cfk_otel._core.seam import CoreSpan, Spans
from cfk_otel.testing import OtlpReceiver, ReceivedSpan

RESOURCE = Resource.create({"service.name": "cf-kanban"})
PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _app(provider: TracerProvider) -> Starlette:
    async def board(request: Request) -> PlainTextResponse:
        span = trace.get_current_span()
        span.set_attribute("app.user", "user-1")
        span.set_attributes({"app.n": 3, "app.bad": object()})  # type: ignore[dict-item]  # cleaned, as the SDK does
        span.add_event("cache.miss", {"key": "board:7"})
        with provider.get_tracer("app").start_as_current_span("child") as child:
            child.set_attribute("server.span.type", type(span).__name__)
        return PlainTextResponse("ok")

    async def fail(request: Request) -> PlainTextResponse:
        raise RuntimeError("boom")

    return Starlette(routes=[Route("/boards/{board_id}", board), Route("/fail", fail)])


class _Other(SpanProcessor):
    """Any second processor: the SDK's span must then be used, so that it sees the span."""

    def __init__(self) -> None:
        self.ended: list[str] = []

    def on_end(self, span: Any) -> None:
        self.ended.append(span.name)


@pytest.fixture(autouse=True)
def _native(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")  # each _provider sets its own
    _core.set_value_limits(None, None)  # the SDK's limits, as without set-up
    yield
    _core.shutdown(1.0)
    _core.activate(_core.Choice(False, "not set up"))
    _core.set_value_limits(None, None)


def _provider(receiver: OtlpReceiver, *extra: SpanProcessor, **kwargs: Any) -> TracerProvider:
    """As set-up builds it: the SDK's processor for the app's spans, the core for ours (its
    target from the environment). A processor added after set-up moves ours to the SDK."""
    provider = TracerProvider(resource=RESOURCE, **kwargs)
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{receiver.http_endpoint}/v1/traces"))
    )
    _core.shutdown(1.0)  # the previous receiver's exporter
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.http_endpoint  # restored by _native
    _core.activate(_core.Choice(True, ""), provider)
    for processor in extra:
        provider.add_span_processor(processor)
    return provider


def _flush(provider: TracerProvider) -> None:
    provider.force_flush()
    assert _core.flush(5.0)


def _serve(provider: TracerProvider, requests: list[tuple[str, dict[str, str]]]) -> None:
    app = TelemetryMiddleware(_app(provider), tracer_provider=provider)
    with TestClient(app, raise_server_exceptions=False) as client:
        for path, headers in requests:
            client.get(path, headers=headers)
    _flush(provider)


def _comparable(span: ReceivedSpan) -> dict[str, Any]:
    s = span.span
    return {
        "name": s.name,
        "kind": s.kind,
        "scope": span.scope,
        "attributes": span.attributes,
        "dropped": s.dropped_attributes_count,
        "parent": s.parent_span_id.hex(),
        "trace_id": s.trace_id.hex() if s.parent_span_id else "new",
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


REQUESTS = [
    ("/boards/7", {}),
    ("/boards/8", {"traceparent": PARENT, "tracestate": "vendor=value"}),
    ("/fail", {}),
    ("/nowhere", {}),
]


def test_core_server_spans_arrive_as_the_sdk_spans_would() -> None:
    with OtlpReceiver() as lean_receiver, OtlpReceiver() as sdk_receiver:
        other = _Other()
        _serve(_provider(lean_receiver), REQUESTS)
        _serve(_provider(sdk_receiver, other), REQUESTS)
        assert lean_receiver.wait_for(lambda: len(lean_receiver.spans) == 6)
        assert sdk_receiver.wait_for(lambda: len(sdk_receiver.spans) == 6)

        def servers(receiver: OtlpReceiver) -> list[dict[str, Any]]:
            return [_comparable(s) for s in receiver.spans if s.span.kind == 2]

        assert servers(lean_receiver) == servers(sdk_receiver)
        assert len(servers(lean_receiver)) == 4
        children = {s.attributes["server.span.type"] for s in lean_receiver.spans if s.name == "child"}
        assert children == {"CoreSpan"}
        assert {s.attributes["server.span.type"] for s in sdk_receiver.spans if s.name == "child"} == {
            "_Span"
        }
        assert sorted(other.ended) == sorted(
            ["child", "child", "GET /boards/{board_id}", "GET /boards/{board_id}", "GET /fail", "GET"]
        )
        # Children are parented to the lean span, in its trace.
        by_id = {s.span.span_id: s for s in lean_receiver.spans}
        for child in (s for s in lean_receiver.spans if s.name == "child"):
            parent = by_id[child.span.parent_span_id]
            assert parent.span.kind == 2
            assert parent.span.trace_id == child.span.trace_id
        continued = [s for s in lean_receiver.spans if s.span.trace_id.hex() == PARENT[3:35]]
        assert len(continued) == 2


def test_a_processor_added_later_gets_the_sdk_span_from_then_on() -> None:
    with OtlpReceiver() as receiver:
        provider = _provider(receiver)
        app = TelemetryMiddleware(_app(provider), tracer_provider=provider)
        memory = InMemorySpanExporter()
        with TestClient(app) as client:
            client.get("/boards/1")
            provider.add_span_processor(SimpleSpanProcessor(memory))
            client.get("/boards/2")
        _flush(provider)
        assert receiver.wait_for(lambda: len(receiver.spans) == 4)
        types = [s.attributes["server.span.type"] for s in receiver.spans if s.name == "child"]
        assert types == ["CoreSpan", "_Span"]
        assert [s.name for s in memory.get_finished_spans()] == ["child", "GET /boards/{board_id}"]


@pytest.mark.parametrize("sampler", [ALWAYS_OFF, ParentBased(ALWAYS_OFF)])
def test_the_providers_sampler_decides(sampler: Sampler) -> None:
    with OtlpReceiver() as receiver:
        provider = _provider(receiver, sampler=sampler)
        _serve(provider, [("/boards/1", {})])
        if isinstance(sampler, ParentBased):  # a sampled remote parent is followed
            _serve(provider, [("/boards/2", {"traceparent": PARENT})])
            assert receiver.wait_for(lambda: len(receiver.spans) == 2)
            assert {s.span.trace_id.hex() for s in receiver.spans} == {PARENT[3:35]}
        else:
            _serve(provider, [("/boards/2", {"traceparent": PARENT})])
            assert not receiver.wait_for(lambda: len(receiver.spans) > 0, timeout=1.0)


_PARENTS = {
    "root": None,
    **{
        f"{'remote' if remote else 'local'} {'sampled' if sampled else 'not sampled'}": SpanContext(
            0x1234,
            0x5678,
            is_remote=remote,
            trace_flags=TraceFlags(sampled),
            trace_state=TraceState([("v", "1")]),
        )
        for remote in (True, False)
        for sampled in (1, 0)
    },
}


@pytest.mark.parametrize(
    "sampler",
    [
        ParentBased(ALWAYS_ON),
        ParentBased(ALWAYS_OFF),
        ParentBased(ALWAYS_ON, remote_parent_sampled=ALWAYS_OFF, local_parent_not_sampled=ALWAYS_ON),
        ParentBased(ALWAYS_OFF, remote_parent_not_sampled=ALWAYS_ON, local_parent_sampled=ALWAYS_OFF),
        ParentBasedTraceIdRatio(0.5),
        ALWAYS_ON,
    ],
)
def test_core_spans_take_the_samplers_decision_for_every_parent(sampler: Sampler) -> None:
    with OtlpReceiver() as receiver:
        spans = Spans(_provider(receiver, sampler=sampler))
        for label, parent in _PARENTS.items():
            context = trace.set_span_in_context(trace.NonRecordingSpan(parent)) if parent else None
            span = spans.start("GET", context, SpanKind.SERVER, {"k": "v"})
            expected = sampler.should_sample(
                context, span.get_span_context().trace_id, "GET", attributes={"k": "v"}
            )
            got = span.get_span_context()
            assert (got.trace_flags.sampled, got.trace_state) == (
                expected.decision is Decision.RECORD_AND_SAMPLE,
                expected.trace_state or TraceState(),  # a span context's empty state
            ), label
            assert type(span) is (CoreSpan if expected.decision.is_recording() else trace.NonRecordingSpan), (
                label
            )
            if type(span) is CoreSpan:
                assert span.attributes == {"k": "v"}
                assert got.trace_id == (parent.trace_id if parent else got.trace_id)


def test_the_apps_attributes_are_bounded_by_the_span_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    # The core reads the limits from the environment, as set-up builds the provider's.
    monkeypatch.setenv("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "20")
    monkeypatch.setenv("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "10")

    async def many(request: Request) -> PlainTextResponse:
        span = trace.get_current_span()
        for i in range(50):
            span.set_attribute(f"app.{i}", "x" * 100)
        return PlainTextResponse("ok")

    with OtlpReceiver() as receiver:
        provider = _provider(
            receiver, span_limits=SpanLimits(max_span_attributes=20, max_attribute_length=10)
        )
        app = TelemetryMiddleware(Starlette(routes=[Route("/many", many)]), tracer_provider=provider)
        with TestClient(app) as client:
            client.get("/many")
        _flush(provider)
        span = receiver.wait_for_span(lambda s: s.name == "GET /many")
        assert len(span.attributes) == 20
        assert span.attributes["http.route"] == "/many"  # ours are kept first
        assert span.span.dropped_attributes_count == 50 - (20 - len(_own_keys(span)))
        assert all(len(v) == 10 for k, v in span.attributes.items() if k.startswith("app."))


def _own_keys(span: ReceivedSpan) -> list[str]:
    return [k for k in span.attributes if not k.startswith("app.")]


def test_the_core_span_is_an_api_span_and_ends_once(caplog: pytest.LogCaptureFixture) -> None:
    memory_provider = TracerProvider(resource=RESOURCE)  # the core's span, to a closed port
    _core.activate(_core.Choice(True, ""), memory_provider)
    seen: list[trace.Span] = []

    async def keep(request: Request) -> PlainTextResponse:
        seen.append(trace.get_current_span())
        return PlainTextResponse("ok")

    app = TelemetryMiddleware(Starlette(routes=[Route("/k", keep)]), tracer_provider=memory_provider)
    with TestClient(app) as client:
        client.get("/k")
    (span,) = seen
    assert isinstance(span, CoreSpan)
    assert not span.is_recording()
    assert span.name == "GET /k"
    span.end()
    assert "ended span" in caplog.text
    span.set_attribute("late", 1)
    assert "late" not in span.attributes


def test_long_values_are_cut_as_the_sdk_cuts_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "10")

    async def long(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    def serve(provider: TracerProvider) -> None:
        app = Starlette(routes=[Route("/long/{rest:path}", long)])
        with TestClient(TelemetryMiddleware(app, tracer_provider=provider)) as client:
            client.get("/long/abcdefghijklmnop", headers={"user-agent": "a-rather-long-user-agent"})
        spans = Spans(provider)  # a client span, as cfk_otel/_instrumentation/db.py starts them
        statement = {"db.statement": "SELECT * FROM a_long_table_name", "net.peer.port": 5432}
        spans.start("SELECT", None, SpanKind.CLIENT, statement).end()
        _flush(provider)

    limits = SpanLimits(max_attribute_length=10)
    with OtlpReceiver() as lean_receiver, OtlpReceiver() as sdk_receiver:
        serve(_provider(lean_receiver, span_limits=limits))
        serve(_provider(sdk_receiver, _Other(), span_limits=limits))
        for receiver in (lean_receiver, sdk_receiver):
            assert receiver.wait_for(lambda r=receiver: len(r.spans) == 2)  # type: ignore[misc]
        lean = sorted((_comparable(s) for s in lean_receiver.spans), key=lambda c: c["name"])
        sdk = sorted((_comparable(s) for s in sdk_receiver.spans), key=lambda c: c["name"])
    for c in lean + sdk:
        c.pop("trace_id")
        c.pop("parent")
        c.pop("scope")
    assert lean == sdk
    server, client = lean  # by name: "GET /long/{rest:path}", "SELECT"
    assert server["attributes"]["url.path"] == "/long/abcd"
    assert client["attributes"] == {"db.statement": "SELECT * F", "net.peer.port": 5432}
    assert client["kind"] == 3  # CLIENT


class _BrokenSampler(Sampler):
    def should_sample(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("sampler bug")

    def get_description(self) -> str:
        return "Broken"


@pytest.mark.parametrize("lean", [True, False])
def test_a_failing_sampler_never_fails_the_request(lean: bool, caplog: pytest.LogCaptureFixture) -> None:
    with OtlpReceiver() as receiver:
        extra = () if lean else (_Other(),)
        provider = _provider(receiver, *extra, sampler=_BrokenSampler())

        async def plain(request: Request) -> PlainTextResponse:
            return PlainTextResponse("ok")

        app = TelemetryMiddleware(Starlette(routes=[Route("/plain", plain)]), tracer_provider=provider)
        with TestClient(app) as client:
            statuses = [client.get("/plain").status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    assert caplog.text.count("starting a span failed") == 1


def test_the_settings_limit_cuts_with_a_marker(monkeypatch: pytest.MonkeyPatch) -> None:
    """Set-up's limit (OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT, 8192 by default) cuts our values
    and the app's in the core, and says how much went (issue 20)."""

    async def long(request: Request) -> PlainTextResponse:
        trace.get_current_span().set_attribute("app.blob", "y" * 100)
        return PlainTextResponse("ok")

    _core.set_value_limits(12, 12)
    with OtlpReceiver() as receiver:
        provider = _provider(receiver)
        app = TelemetryMiddleware(
            Starlette(routes=[Route("/long/{rest:path}", long)]), tracer_provider=provider
        )
        with TestClient(app) as client:
            client.get("/long/" + "x" * 50)
        _flush(provider)
        span = receiver.wait_for_span(lambda s: s.name == "GET /long/{rest}")
    assert span.attributes["url.path"] == "/long/xxxxxx…[truncated 44 chars]"
    assert span.attributes["app.blob"] == "yyyyyyyyyyyy…[truncated 88 chars]"
    assert span.attributes["http.route"] == "/long/{rest}"  # within the limit: whole


_STOCK = [
    (name, None) for name in ("always_on", "always_off", "parentbased_always_on", "parentbased_always_off")
] + [
    (name, arg)
    for name in ("traceidratio", "parentbased_traceidratio")
    for arg in (None, "0", "0.25", "0.5", "1")
]


@pytest.mark.parametrize(("name", "arg"), _STOCK)
def test_the_setups_own_sampler_decides_as_the_sdk_would(
    name: str, arg: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Set-up's head sampler is decided without the generic call (``sampling.Head``) while
    it is the provider's: the SDK's sampler is the oracle, over every kind of parent."""
    env = {"OTEL_TRACES_SAMPLER": name, "CFK_TRACES_KEEP_SLOWER_THAN": "off"}
    if arg is not None:
        env["OTEL_TRACES_SAMPLER_ARG"] = arg
    sampler = _sampling.sdk_arguments(_settings.load(env))["sampler"]
    assert _sampling.HEAD is not None
    assert _sampling.HEAD.sampler is sampler
    calls: list[str] = []
    oracle = type(sampler).should_sample

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append("generic")
        return oracle(sampler, *args, **kwargs)

    monkeypatch.setattr(sampler, "should_sample", counted)  # the same object: still set-up's
    parents = {
        **_PARENTS,
        "invalid": SpanContext(0, 0, is_remote=True),
        "remote sampled, no state": SpanContext(0x1234, 0x5678, is_remote=True, trace_flags=TraceFlags(1)),
        "local not sampled, no state": SpanContext(0x9ABC, 0x5678, is_remote=False),
    }
    # Trace ids either side of each ratio's bound (its low 64 bits), and high bits that do not count.
    ids = [1, 0x1234, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, (0xFF << 64) | 5, (1 << 126) | (1 << 62)]
    try:
        with OtlpReceiver() as receiver:
            provider = _provider(receiver, sampler=sampler)
            spans = Spans(provider)
            for label, parent in parents.items():
                context = trace.set_span_in_context(trace.NonRecordingSpan(parent)) if parent else None
                for trace_id in ids:
                    monkeypatch.setattr(provider.id_generator, "generate_trace_id", lambda t=trace_id: t)
                    span = spans.start("GET", context, SpanKind.SERVER, {"k": "v"})
                    got = span.get_span_context()
                    expected = oracle(sampler, context, got.trace_id, "GET", attributes={"k": "v"})
                    case = f"{label}, trace id {trace_id:#x}"
                    assert (got.trace_flags.sampled, got.trace_state) == (
                        expected.decision is Decision.RECORD_AND_SAMPLE,
                        expected.trace_state or TraceState(),
                    ), case
                    recorded = expected.decision.is_recording()
                    assert type(span) is (CoreSpan if recorded else trace.NonRecordingSpan), case
                    if type(span) is CoreSpan:
                        assert span.attributes == dict(expected.attributes), case
            assert calls == []  # never the generic call
            # Another sampler object, even of the same kind: asked through its interface.
            other = copy.copy(sampler)
            other_spans = Spans(_provider(receiver, sampler=other))
            asked: list[str] = []
            monkeypatch.setattr(
                other, "should_sample", lambda *a, **k: asked.append("x") or oracle(other, *a, **k)
            )
            other_spans.start("GET", None)
            assert asked == ["x"]
    finally:
        _sampling.sdk_arguments(_settings.load({}))


def test_the_span_context_is_made_when_asked_and_is_the_same_each_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[SpanContext] = []

    def counted(*args: Any, **kwargs: Any) -> SpanContext:
        made.append(SpanContext(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(_core, "SpanContext", counted)
    with OtlpReceiver() as receiver:
        provider = _provider(receiver)
        quiet = Starlette(routes=[Route("/q", lambda request: PlainTextResponse("ok"))])
        with TestClient(TelemetryMiddleware(quiet, tracer_provider=provider)) as client:
            client.get("/q", headers={"traceparent": PARENT, "tracestate": "vendor=value"})
        assert made == []  # nobody asked: the span went to the core without one
        spans = Spans(provider)
        parent = SpanContext(
            0x1234, 0x5678, is_remote=True, trace_flags=TraceFlags(1), trace_state=TraceState([("v", "1")])
        )
        span = spans.start("GET", trace.set_span_in_context(trace.NonRecordingSpan(parent)))
        assert type(span) is CoreSpan
        first = span.get_span_context()
        assert span.get_span_context() is first
        assert made == [first]
        assert (first.trace_id, first.is_remote, first.trace_flags.sampled) == (0x1234, False, True)
        assert first.trace_state == TraceState([("v", "1")])
        # A child the app starts under it is its child.
        with provider.get_tracer("app").start_as_current_span(
            "child", context=trace.set_span_in_context(span)
        ) as c:
            assert c.parent == first
        span.end()
        _flush(provider)
        assert receiver.wait_for(lambda: len(receiver.spans) == 3)
        ours = next(
            s.span
            for s in receiver.spans
            if s.name == "GET" and s.span.span_id == first.span_id.to_bytes(8, "big")
        )
        assert (ours.trace_id.hex(), ours.trace_state) == (format(first.trace_id, "032x"), "v=1")
        quick = next(s.span for s in receiver.spans if s.name == "GET /q")
        assert (quick.trace_id.hex(), quick.parent_span_id.hex(), quick.trace_state) == (
            PARENT[3:35],
            PARENT[36:52],
            "vendor=value",
        )


def test_spans_take_a_new_exporter_after_shutdown_and_in_a_forked_child() -> None:
    with OtlpReceiver() as receiver:
        spans = Spans(_provider(receiver))
        spans.start("GET", None).end()
        first = spans.exporter
        assert first is not None
        _core.shutdown(1.0)
        spans.start("GET", None).end()
        assert spans.exporter is not None
        assert spans.exporter is not first  # the shut-down one is never used again
        parent = spans.exporter
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12 and later)
            pid = os.fork()
        if pid == 0:  # the child: its own exporter, not the parent's (whose thread did not follow)
            try:
                span = spans.start("GET", None)
                span.end()
                ok = spans.exporter is not parent and spans.exporter is _core._EXPORTERS.get(
                    (os.getpid(), "traces")
                )
                os._exit(0 if ok and type(span) is CoreSpan else 1)
            except BaseException:
                os._exit(2)
        _, code = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(code) == 0
        spans.start("GET", None).end()
        assert spans.exporter is parent  # the parent's stays
