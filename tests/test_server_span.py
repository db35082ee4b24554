"""native/src/span.rs: an HTTP request's server span as an object of the core (``seam.ServerSpan``).

Started in one call and ended in one call while set-up's own head sampler is the provider's;
held to the SDK's span (the oracle) and to ``CoreSpan`` (the general native path)."""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import propagate, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Sampler
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from cfk_otel import _settings
from cfk_otel._asgi.middleware import TelemetryMiddleware
from cfk_otel._core import sampling as _sampling
from cfk_otel._core import seam as _core
from cfk_otel._core.seam import CoreSpan, ServerSpan, Spans
from cfk_otel.testing import OtlpReceiver
from tests.conftest import IN_CI
from tests.test_core_span import (  # the same set-up and comparison as the CoreSpan oracle
    PARENT,
    REQUESTS,
    _app,
    _comparable,
    _flush,
    _native,  # noqa: F401  (the autouse fixture: the core's exporter per test)
    _Other,
    _provider,
)

# Off CI only: with CI=true a missing compiled core fails these tests rather than skipping them.
pytestmark = pytest.mark.skipif(ServerSpan is None and not IN_CI, reason="the compiled core is not installed")


def _head(env: dict[str, str] | None = None) -> Sampler:
    """Set-up's own head sampler (``sampling.HEAD``), as ``configure()`` builds it."""
    sampler: Sampler = _sampling.sdk_arguments(
        _settings.load({"CFK_TRACES_KEEP_SLOWER_THAN": "off", **(env or {})})
    )["sampler"]
    return sampler


@pytest.fixture
def head() -> Iterator[Sampler]:
    yield _head()
    _sampling.sdk_arguments(_settings.load({}))


async def _unavailable(request: Request) -> PlainTextResponse:
    return PlainTextResponse("down", status_code=503)


async def _outgoing(request: Request) -> JSONResponse:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return JSONResponse(carrier)


def _serve(provider: TracerProvider, requests: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    app = _app(provider)
    app.router.routes.extend([Route("/unavailable", _unavailable), Route("/outgoing", _outgoing)])
    with TestClient(
        TelemetryMiddleware(app, tracer_provider=provider), raise_server_exceptions=False
    ) as client:
        answers = [client.get(path, headers=headers) for path, headers in requests]
    _flush(provider)
    return answers


MORE = [
    *REQUESTS,
    ("/unavailable", {"user-agent": "probe/1.0"}),
    ("/boards/9", {"traceparent": PARENT[:-2] + "00"}),  # a remote parent not sampled: nothing
    ("/boards/10", {"user-agent": b"caf\xe9"}),  # not ASCII: decoded as latin-1
]


def test_server_spans_arrive_as_the_sdks_and_the_core_spans_would(head: Sampler) -> None:
    with OtlpReceiver() as lean, OtlpReceiver() as core, OtlpReceiver() as sdk:
        _serve(_provider(lean, sampler=head), MORE)
        _serve(_provider(core, sampler=copy.copy(head)), MORE)  # not set-up's: CoreSpan
        _serve(_provider(sdk, _Other(), sampler=head), MORE)  # a processor of the app's: the SDK
        for receiver in (lean, core, sdk):
            assert receiver.wait_for(lambda r=receiver: len(r.spans) == 9)  # type: ignore[misc]

        def servers(receiver: OtlpReceiver) -> list[dict[str, Any]]:
            return [_comparable(s) for s in receiver.spans if s.span.kind == 2]

        assert servers(lean) == servers(sdk)
        assert servers(core) == servers(sdk)
        names = [s["name"] for s in servers(lean)]
        assert names == [
            "GET /boards/{board_id}",
            "GET /boards/{board_id}",
            "GET /fail",
            "GET",
            "GET /unavailable",
            "GET /boards/{board_id}",
        ]
        by_name = {s["name"]: s for s in servers(lean)}
        assert by_name["GET /fail"]["status"] == (2, "boom")
        assert [e[0] for e in by_name["GET /fail"]["events"]] == ["exception"]
        assert by_name["GET /fail"]["stacktrace"] == [True]
        assert by_name["GET /unavailable"]["status"] == (2, "")
        assert by_name["GET /unavailable"]["attributes"]["error.type"] == "503"
        assert by_name["GET /unavailable"]["attributes"]["user_agent.original"] == "probe/1.0"
        # The test client sends the value UTF-8 encoded; ASGI's bytes are decoded as latin-1.
        assert servers(lean)[-1]["attributes"]["user_agent.original"] == "caf\xc3\xa9"
        # The app's spans are children of the core's server span, in its trace.
        kinds = {s.attributes["server.span.type"] for s in lean.spans if s.name == "child"}
        assert kinds == {"ServerSpan"}
        assert {s.attributes["server.span.type"] for s in core.spans if s.name == "child"} == {"CoreSpan"}
        by_id = {s.span.span_id: s for s in lean.spans}
        for child in (s for s in lean.spans if s.name == "child"):
            parent = by_id[child.span.parent_span_id]
            assert (parent.span.kind, parent.span.trace_id) == (2, child.span.trace_id)


def test_the_trace_context_goes_out_as_the_sdks(head: Sampler) -> None:
    """Propagation out: what the app injects names the server span, with the SDK's flags."""
    with OtlpReceiver() as lean, OtlpReceiver() as sdk:
        requests = [("/outgoing", {}), ("/outgoing", {"traceparent": PARENT, "tracestate": "vendor=value"})]
        lean_answers = _serve(_provider(lean, sampler=head), requests)
        sdk_answers = _serve(_provider(sdk, _Other(), sampler=head), requests)
        for receiver in (lean, sdk):
            assert receiver.wait_for(lambda r=receiver: len(r.spans) == 2)  # type: ignore[misc]
        for receiver, answers in ((lean, lean_answers), (sdk, sdk_answers)):
            for span, answer in zip(receiver.spans, answers, strict=True):
                _, trace_id, span_id, _ = answer.json()["traceparent"].split("-")
                assert (trace_id, span_id) == (span.span.trace_id.hex(), span.span.span_id.hex())
        flags = [[a.json()["traceparent"][-2:], a.json().get("tracestate")] for a in lean_answers]
        assert flags == [[a.json()["traceparent"][-2:], a.json().get("tracestate")] for a in sdk_answers]
        assert lean_answers[1].json()["traceparent"][3:35] == PARENT[3:35]
        assert lean_answers[1].json()["tracestate"] == "vendor=value"


def _made(kind: str, head: Sampler, receiver: OtlpReceiver) -> Any:
    if kind == "sdk":
        return TracerProvider(sampler=head).get_tracer("t").start_span("GET", kind=SpanKind.SERVER)
    if kind == "core":
        span = Spans(_provider(receiver)).start("GET", None)
        assert type(span) is CoreSpan
        return span
    spans = Spans(_provider(receiver, sampler=head))
    spans.start("GET", None)  # chooses the path, and makes its ServerSpans
    assert spans.server is not None
    span = spans.server.start("GET", None)
    assert type(span) is ServerSpan
    return span


def _calls(span: Any) -> dict[str, Any]:
    """The same calls on any span; what it says afterwards."""
    recording = span.is_recording()
    span.set_attribute("a", 1)
    span.set_attributes({"b": "x" * 20, "c": [1, 2], "bad": object(), "a": 2})
    span.add_event("e", {"k": "v", "n": 1, "bad": object()})
    span.add_event("t", timestamp=123)
    span.update_name("renamed")
    span.set_status(Status(StatusCode.UNSET))
    span.set_status(StatusCode.ERROR, "broken")
    span.set_status(Status(StatusCode.ERROR, "worse"))
    span.record_exception(ValueError("boom"), {"extra": "1"}, escaped=True)
    first_status = (span.status.status_code, span.status.description)
    span.set_status(StatusCode.OK)
    span.set_status(StatusCode.ERROR, "after OK")  # OK is final
    with span:  # the API's context manager ends it
        pass
    span.set_attribute("late", 1)
    span.update_name("late")
    span.add_event("late")
    span.set_status(StatusCode.ERROR)
    events = [
        (e.name, e.timestamp, dict(e.attributes)) if hasattr(e, "timestamp") else e for e in span.events
    ]
    for _, _, attributes in events:
        assert len(attributes.pop("exception.stacktrace", "x")) > 0
    return {
        "recording": (recording, span.is_recording()),
        "name": span.name,
        "attributes": dict(span.attributes),
        "status": (first_status, span.status.status_code, span.status.description),
        "events": [(name, time if name == "t" else 0, attributes) for name, time, attributes in events],
        "context": span.get_span_context().is_valid and not span.get_span_context().is_remote,
        "span": isinstance(span, trace.Span),
    }


def test_the_span_api_does_as_the_sdks_span_and_core_span(
    head: Sampler, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "10")  # the SDK's limits, from the environment
    monkeypatch.setenv("OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT", "2")
    with OtlpReceiver() as receiver:
        said = {kind: _calls(_made(kind, head, receiver)) for kind in ("sdk", "core", "server")}
    assert said["server"] == said["sdk"]
    assert said["core"] == said["sdk"]
    assert {k: said["server"]["attributes"][k] for k in "abc"} == {"a": 2, "b": "x" * 10, "c": (1, 2)}
    assert said["server"]["status"][1:] == (StatusCode.OK, None)
    with caplog.at_level(logging.WARNING):
        span = _made("server", head, receiver)
        span.end()
        span.end()
        span.set_attribute("x", 1)
    assert "Calling end() on an ended span." in caplog.text
    assert "Setting attribute on ended span." in caplog.text
    span.add_link(span.get_span_context())
    span.add_link(span.get_span_context())
    assert caplog.text.count("links added to cfk_otel's request or client spans") == 1


def test_the_span_context_is_made_once_when_asked(head: Sampler, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[Any] = []
    real = _core.SpanContext

    def counted(*args: Any, **kwargs: Any) -> Any:
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(_core, "SpanContext", counted)
    with OtlpReceiver() as receiver:
        span = _made("server", head, receiver)
        assert made == []
        first = span.get_span_context()
        assert span.get_span_context() is first
        assert span.context is first
        assert made == [first]
        assert (first.trace_id, first.span_id) == (span.trace_id, span.span_id)
        assert first.trace_flags.sampled
        assert not first.is_remote
        child = TracerProvider().get_tracer("app").start_span("child", trace.set_span_in_context(span))
        assert child.parent == first


@pytest.mark.parametrize("sampler", ["always_off", "parentbased_always_off"])
def test_a_sampled_out_span_records_nothing_as_the_sdks(sampler: str) -> None:
    off = _head({"OTEL_TRACES_SAMPLER": sampler})
    try:
        with OtlpReceiver() as receiver:
            provider = _provider(receiver, sampler=off)
            seen: list[Any] = []

            async def look(request: Request) -> PlainTextResponse:
                span = trace.get_current_span()
                seen.append((type(span), span.is_recording(), span.get_span_context()))
                span.set_attribute("a", 1)
                span.record_exception(ValueError("x"))
                span.set_status(StatusCode.ERROR)
                span.end()
                return PlainTextResponse("ok")

            meter = MeterProvider()
            app = TelemetryMiddleware(
                Starlette(routes=[Route("/look", look)]), tracer_provider=provider, meter_provider=meter
            )
            with TestClient(app) as client:
                assert client.get("/look").status_code == 200
                assert client.get("/look", headers={"traceparent": PARENT}).status_code == 200
            _flush(provider)
            assert app.metrics.http_requests.values() == [(("GET", "/look", "200"), 2.0)]
            (kind, recording, context), (_, _, continued) = seen
            assert (kind, recording, context.trace_flags.sampled) == (ServerSpan, False, False)
            assert context.is_valid
            # A sampled remote parent is followed by the parent-based sampler only.
            assert continued.trace_flags.sampled == (sampler == "parentbased_always_off")
            expected = 1 if sampler == "parentbased_always_off" else 0
            assert receiver.wait_for(lambda: len(receiver.spans) == expected, timeout=2.0) or expected == 0
            assert len(receiver.spans) == expected
    finally:
        _sampling.sdk_arguments(_settings.load({}))


def test_ids_are_never_repeated_in_a_forked_child(head: Sampler) -> None:
    with OtlpReceiver() as receiver:
        spans = Spans(_provider(receiver, sampler=head))
        spans.start("GET", None)
        server = spans.server
        assert server is not None
        read, write = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12 and later)
            pid = os.fork()
        if pid == 0:
            try:
                os.close(read)
                stale = server.start("GET", None)  # the parent's: never used in the child
                span = spans.start("GET", None)  # the child's own ServerSpans, made now
                own = spans.server
                ids = [own.start("GET", None) for _ in range(200)] if own is not None else []
                text = "\n".join(f"{s.trace_id} {s.span_id}" for s in ids if s is not None)
                new = own is not None and own is not server
                os.write(write, f"{stale is None} {new} {type(span).__name__} {len(ids)}\n{text}".encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read) as pipe:
            head_line, *lines = pipe.read().splitlines()
        os.waitpid(pid, 0)
        assert head_line == "True True CoreSpan 200"
        child = {tuple(map(int, line.split())) for line in lines}
        mine = set()
        for _ in range(200):
            span = server.start("GET", None)
            assert span is not None
            mine.add((span.trace_id, span.span_id))
        assert len(child) == len(mine) == 200
        assert not {t for t, _ in child} & {t for t, _ in mine}
        assert not {s for _, s in child} & {s for _, s in mine}


async def _bare(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


_HOSTILE: dict[str, dict[str, Any]] = {
    "nothing but the type": {"type": "http"},
    "a path that is not text": {"type": "http", "path": 5, "headers": None},
    "a huge path": {"type": "http", "path": "/" + "x" * (1 << 17), "method": "GET"},
    "a lone surrogate in the path": {"type": "http", "path": "/a\ud800b"},
    "a user agent that is not bytes": {"type": "http", "path": "/", "headers": [(b"user-agent", "b\udc80")]},
    "an absolute-form target": {"type": "http", "path": "http://user:pw@host/x", "server": ("h", None)},
    "odd server and client": {"type": "http", "path": "/", "server": ("h",), "client": ()},
    "a method of its own": {"type": "http", "path": "/", "method": "BREW"},
}


@pytest.mark.parametrize("scope", list(_HOSTILE.values()), ids=list(_HOSTILE))
def test_hostile_scopes_never_reach_the_app(
    head: Sampler, scope: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    with OtlpReceiver() as receiver:
        provider = _provider(receiver, sampler=head)
        app = TelemetryMiddleware(_bare, tracer_provider=provider, meter_provider=MeterProvider())
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b""}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        loop = asyncio.new_event_loop()
        try:
            for _ in range(2):  # the first request makes the core's ServerSpans
                loop.run_until_complete(app(dict(scope), receive, send))
        finally:
            loop.close()
        assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"] * 2
        assert app._spans.server is not None  # the core's path, both times
        method = scope.get("method", "GET")
        label = method if method == "GET" else "_OTHER"
        assert app.metrics.http_requests.values() == [((label, "unmatched", "200"), 2.0)]
        _flush(provider)
        if scope.get("path") == "http://user:pw@host/x":
            assert receiver.wait_for(lambda: len(receiver.spans) == 2)
            assert {s.attributes["url.path"] for s in receiver.spans} == {"http://[REDACTED]@host/x"}
            assert "server.port" not in receiver.spans[0].attributes
        if scope.get("path") == "/" + "x" * (1 << 17):
            assert receiver.wait_for(lambda: len(receiver.spans) == 2)
            assert {len(s.attributes["url.path"]) for s in receiver.spans} == {1 + (1 << 17)}


def test_one_call_into_the_core_at_the_start_and_one_at_the_end(head: Sampler, core_calls: Any) -> None:
    with OtlpReceiver() as receiver:
        provider = _provider(receiver, sampler=head)
        app = TelemetryMiddleware(_bare, tracer_provider=provider, meter_provider=MeterProvider())

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b""}

        async def send(message: dict[str, Any]) -> None:
            return None

        loop = asyncio.new_event_loop()
        scope = {"type": "http", "path": "/", "method": "GET", "headers": [(b"user-agent", b"t")]}
        loop.run_until_complete(app(dict(scope), receive, send))
        with core_calls.watch() as calls:
            loop.run_until_complete(app(dict(scope), receive, send))
        loop.close()
        assert calls == ["start", "end_request"]
        _flush(provider)
        assert receiver.wait_for(lambda: len(receiver.spans) == 2)
        assert receiver.spans[1].attributes == {
            "http.request.method": "GET",
            "url.path": "/",
            "url.scheme": "http",
            "network.protocol.version": "1.1",
            "http.response.status_code": 200,
            "user_agent.original": "t",
        }


def test_the_span_limits_bound_the_apps_attributes_as_on_core_spans(
    head: Sampler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ours first, then the app's while the limit allows, as CoreSpan (the SDK's span keeps
    the newest instead: the middleware sets ours last there)."""
    monkeypatch.setenv("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "12")
    with OtlpReceiver() as lean, OtlpReceiver() as core:
        for receiver, sampler in ((lean, head), (core, copy.copy(head))):
            provider = _provider(receiver, sampler=sampler, span_limits=SpanLimits(max_span_attributes=12))

            async def many(request: Request) -> PlainTextResponse:
                span = trace.get_current_span()
                for i in range(20):
                    span.set_attribute(f"app.{i}", i)
                return PlainTextResponse("ok")

            with TestClient(
                TelemetryMiddleware(Starlette(routes=[Route("/many", many)]), tracer_provider=provider)
            ) as client:
                client.get("/many")
            _flush(provider)
            assert receiver.wait_for(lambda r=receiver: len(r.spans) == 1)  # type: ignore[misc]
        (ours,), (theirs,) = lean.spans, core.spans
        assert _comparable(ours) == _comparable(theirs)
        assert len(ours.attributes) == 12
        assert ours.span.dropped_attributes_count == theirs.span.dropped_attributes_count > 0


def test_a_current_span_outside_the_request_is_its_parent(head: Sampler) -> None:
    """No incoming headers: the current context decides, as Spans.start (an outer layer's span)."""
    with OtlpReceiver() as receiver:
        provider = _provider(receiver, sampler=head)
        app = TelemetryMiddleware(_bare, tracer_provider=provider, meter_provider=MeterProvider())

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b""}

        async def send(message: dict[str, Any]) -> None:
            return None

        loop = asyncio.new_event_loop()
        try:
            with provider.get_tracer("outer").start_as_current_span("outer") as outer:
                for _ in range(2):
                    loop.run_until_complete(app({"type": "http", "path": "/"}, receive, send))
            loop.run_until_complete(app({"type": "http", "path": "/"}, receive, send))
        finally:
            loop.close()
        assert app._spans.server is not None
        _flush(provider)
        assert receiver.wait_for(lambda: sum(s.span.kind == 2 for s in receiver.spans) == 3)
        inside, again, alone = (s.span for s in receiver.spans if s.span.kind == 2)
        ids = outer.get_span_context()
        for span in (inside, again):
            assert span.parent_span_id == ids.span_id.to_bytes(8, "big")
            assert span.trace_id == ids.trace_id.to_bytes(16, "big")
        assert alone.parent_span_id == b""
        assert alone.trace_id != inside.trace_id


def test_the_core_span_gives_way_when_the_set_up_changes(
    head: Sampler, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []

    async def look(request: Request) -> PlainTextResponse:
        seen.append(type(trace.get_current_span()).__name__)
        return PlainTextResponse("ok")

    with OtlpReceiver() as receiver:
        provider = _provider(receiver, sampler=head)
        app = TelemetryMiddleware(Starlette(routes=[Route("/l", look)]), tracer_provider=provider)
        memory = InMemorySpanExporter()
        with TestClient(app) as client:
            client.get("/l")
            _core.shutdown(1.0)  # a new exporter in the core: a new ServerSpans
            client.get("/l")
            with monkeypatch.context() as keeping:  # a keeper of failed and slow traces: CoreSpan
                keeping.setattr(_sampling, "KEEPER", _sampling.Keeper(1.0))
                client.get("/l")
            client.get("/l")
            provider.add_span_processor(SimpleSpanProcessor(memory))  # the app's: the SDK's span
            client.get("/l")
        assert seen == ["ServerSpan", "ServerSpan", "CoreSpan", "ServerSpan", "_Span"]
        assert [s.name for s in memory.get_finished_spans()] == ["GET /l"]


class _Asking(logging.Handler):
    """A log handler that asks the current span for its context, as cfk_otel's own do."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[int] = []
        self.errors: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.ids.append(trace.get_current_span().get_span_context().span_id)
        except Exception as error:  # what the test looks for
            self.errors.append(error)


def test_what_the_span_logs_can_ask_the_span_for_its_context(head: Sampler) -> None:
    """The SDK logs while the app uses the span (a value it cleans, a status description, a
    second end): a handler asking the current span, this one, gets its context."""
    asking = _Asking()
    seen: list[int] = []

    async def chatty(request: Request) -> PlainTextResponse:
        span = trace.get_current_span()
        seen.append(span.get_span_context().span_id)
        span.set_attribute("odd", object())  # type: ignore[arg-type]  # cleaned, and said
        span.add_event("e", {"odd": object()})  # type: ignore[dict-item]
        span.set_status(Status(StatusCode.OK, "a description without ERROR"))
        span.end()
        span.end()
        span.set_attribute("late", 1)
        return PlainTextResponse("ok")

    root = logging.getLogger()
    root.addHandler(asking)
    try:
        with OtlpReceiver() as receiver:
            provider = _provider(receiver, sampler=head)
            app = TelemetryMiddleware(Starlette(routes=[Route("/c", chatty)]), tracer_provider=provider)
            with TestClient(app) as client:
                assert client.get("/c").status_code == 200
            _flush(provider)
            assert receiver.wait_for(lambda: len(receiver.spans) == 1)
    finally:
        root.removeHandler(asking)
    assert asking.errors == []
    assert len(asking.ids) >= 5
    assert set(asking.ids[:5]) == set(seen)


def test_own_attributes_written_straight_from_the_scope_are_cut_as_any_other(head: Sampler) -> None:
    """A server span with only its own attributes has them encoded straight from the scope's
    values (``value.rs``, ``encode_attribute``): a text over set-up's limit is still cut with
    the marker, and a text of multi-byte characters within it (more bytes than the limit's
    characters) stays whole."""

    async def plain(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    _core.set_value_limits(12, 12)
    with OtlpReceiver() as receiver:
        provider = _provider(receiver, sampler=head)
        routes = [Route("/p/{rest:path}", plain)]
        app = TelemetryMiddleware(Starlette(routes=routes), tracer_provider=provider)
        with TestClient(app) as client:
            client.get("/p/" + "é" * 9, headers={"user-agent": "u" * 13})
            client.get("/p/" + "é" * 20)
        _flush(provider)
        assert receiver.wait_for(lambda: len(receiver.spans) == 2)
    whole, cut = (span.attributes for span in receiver.spans)
    assert whole["url.path"] == "/p/" + "é" * 9  # 12 characters, 21 bytes
    assert whole["user_agent.original"] == "u" * 12 + "…[truncated 1 chars]"
    assert cut["url.path"] == "/p/" + "é" * 9 + "…[truncated 11 chars]"
    assert (whole["http.response.status_code"], whole["server.port"]) == (200, 80)
    assert whole["http.route"] == "/p/{rest}"
