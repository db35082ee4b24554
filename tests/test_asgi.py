"""cfk_otel/_asgi/middleware.py and _routes.py, in process, with providers injected."""

from __future__ import annotations

import asyncio
import random
import string
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi import APIRouter, FastAPI
from opentelemetry import propagate
from opentelemetry.context import get_current
from opentelemetry.propagators.textmap import TextMapPropagator, default_getter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket

from cfk_otel import TelemetryMiddleware
from cfk_otel.testing import MetricsReader
from tests.conftest import IN_MEMORY_PROVIDERS


async def ok(request: Any) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def fail(request: Any) -> PlainTextResponse:
    raise ValueError("nope")


async def ws_handler(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text("hi")
    await websocket.close()


def starlette_app() -> Starlette:
    inner = Starlette(routes=[Route("/items/{item_id}", ok)])
    return Starlette(
        routes=[
            Route("/", ok),
            Route("/tickets/{ticket_id}", ok, methods=["GET"]),
            Route("/fail", fail),
            WebSocketRoute("/ws", ws_handler),
            Mount("/api", routes=[Mount("/v2", routes=[Route("/boards/{board_id}", ok)])]),
            Mount("/orgs/{org}", routes=[Route("/cards/{card_id}", ok)]),
            Mount("/sub", app=inner),
        ]
    )


@dataclass
class Harness:
    client: TestClient
    spans: InMemorySpanExporter
    reader: InMemoryMetricReader

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def points(self, name: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        if data is None:
            return []
        return [
            point
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for metric in sm.metrics
            if metric.name == name
            for point in metric.data.data_points
        ]


def harness(app: Any) -> Iterator[Harness]:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = MetricsReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    reader.read_from(meter_provider)
    wrapped = TelemetryMiddleware(app, tracer_provider=tracer_provider, meter_provider=meter_provider)
    with TestClient(wrapped, raise_server_exceptions=False) as client:
        yield Harness(client, spans, reader)
    meter_provider.shutdown()
    tracer_provider.shutdown()


@pytest.fixture
def h() -> Iterator[Harness]:
    yield from harness(starlette_app())


@pytest.mark.parametrize(
    ("path", "name", "route"),
    [
        ("/", "GET /", "/"),
        ("/tickets/42", "GET /tickets/{ticket_id}", "/tickets/{ticket_id}"),
        ("/api/v2/boards/7", "GET /api/v2/boards/{board_id}", "/api/v2/boards/{board_id}"),
        ("/orgs/acme/cards/9", "GET /orgs/{org}/cards/{card_id}", "/orgs/{org}/cards/{card_id}"),
        ("/sub/items/3", "GET /sub/items/{item_id}", "/sub/items/{item_id}"),
    ],
)
def test_span_named_by_route_template(h: Harness, path: str, name: str, route: str) -> None:
    assert h.client.get(path).status_code == 200
    [span] = h.finished()
    assert span.name == name
    assert span.attributes is not None
    assert span.attributes["http.route"] == route
    assert span.attributes["url.path"] == path
    [requests] = h.points("http_requests_total")
    assert dict(requests.attributes) == {"method": "GET", "path": route, "status": "200"}


@pytest.mark.parametrize("path", ["/nowhere", "/api/v2/nothing", "/orgs/acme/nothing", "/sub/none"])
def test_unmatched_paths_share_one_name(h: Harness, path: str) -> None:
    assert h.client.get(path).status_code == 404
    [span] = h.finished()
    assert span.name == "GET"
    assert span.attributes is not None
    assert "http.route" not in span.attributes
    [requests] = h.points("http_requests_total")
    assert requests.attributes["path"] == "unmatched"


def test_method_not_allowed_keeps_the_route(h: Harness) -> None:
    assert h.client.post("/tickets/1").status_code == 405
    [requests] = h.points("http_requests_total")
    assert dict(requests.attributes) == {"method": "POST", "path": "/tickets/{ticket_id}", "status": "405"}


def test_unknown_methods_are_folded(h: Harness) -> None:
    h.client.request("BREW", "/")
    [requests] = h.points("http_requests_total")
    assert requests.attributes["method"] == "_OTHER"


async def _request(app: Any, path: str) -> None:
    # A bare ASGI call: TestClient's thread hop per request would dominate this test.
    scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "scheme": "http",
        "server": ("test", 80),
        "client": None,
        "http_version": "1.1",
        "asgi": {"version": "3.0"},
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        pass

    await app(scope, receive, send)


def test_cardinality_is_bounded(h: Harness) -> None:
    rng = random.Random(7)
    paths = []
    for i in range(10_000):
        segment = "".join(rng.choices(string.ascii_letters + string.digits + "%/.-", k=12))
        paths.append(
            rng.choice([f"/{segment}", f"/tickets/{segment}", f"/orgs/{segment}/cards/{i}", f"/x/{i}"])
        )

    async def run() -> None:
        for path in paths:
            await _request(h.client.app, path)

    asyncio.run(run())
    points = h.points("http_requests_total")
    assert sum(p.value for p in points) == 10_000
    assert {p.attributes["path"] for p in points} == {
        "/tickets/{ticket_id}",
        "/orgs/{org}/cards/{card_id}",
        "unmatched",
    }
    assert len(points) <= 6, points  # those three paths times a few status codes (200, 307, 404)
    assert len(h.points("http_request_duration_seconds")) <= 3


def test_exception_is_recorded_and_reraised(h: Harness) -> None:
    assert h.client.get("/fail").status_code == 500
    [span] = h.finished()
    assert span.status.status_code.name == "ERROR"
    assert span.attributes is not None
    assert span.attributes["error.type"] == "ValueError"
    assert span.attributes["http.response.status_code"] == 500
    assert [e.name for e in span.events] == ["exception"]
    [requests] = h.points("http_requests_total")
    assert requests.attributes["status"] == "500"


def test_duration_histogram_labels_and_buckets(h: Harness) -> None:
    h.client.get("/tickets/1")
    [point] = h.points("http_request_duration_seconds")
    assert dict(point.attributes) == {"method": "GET", "path": "/tickets/{ticket_id}"}
    assert {0.1, 0.5, 1.0, 2.0} <= set(point.explicit_bounds)
    assert point.count == 1
    assert 0 < point.sum < 1  # seconds, not milliseconds


def test_incoming_trace_context_is_continued(h: Harness) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    h.client.get("/", headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    [span] = h.finished()
    assert format(span.context.trace_id, "032x") == trace_id
    assert span.parent is not None
    assert format(span.parent.span_id, "016x") == "00f067aa0ba902b7"


def test_websocket_span(h: Harness) -> None:
    with h.client.websocket_connect("/ws") as ws:
        assert ws.receive_text() == "hi"
    [span] = h.finished()
    assert span.name == "WEBSOCKET /ws"
    assert span.attributes is not None
    assert span.attributes["http.response.status_code"] == 101
    assert h.points("http_requests_total") == []  # websockets are not HTTP requests


def test_fastapi_router_and_lifespan() -> None:
    events: list[str] = []
    router = APIRouter(prefix="/api/tickets")

    @router.get("/{ticket_id}")
    async def get_ticket(ticket_id: int) -> dict[str, int]:
        return {"id": ticket_id}

    app = FastAPI(on_startup=[lambda: events.append("up")], on_shutdown=[lambda: events.append("down")])
    app.include_router(router)
    for h in harness(app):
        assert h.client.get("/api/tickets/5").json() == {"id": 5}
        [span] = h.finished()
        assert span.name == "GET /api/tickets/{ticket_id}"
    assert events == ["up", "down"]


def test_a_failing_route_lookup_never_fails_the_request(caplog: pytest.LogCaptureFixture) -> None:
    class Hostile:
        path_format = property(lambda self: 1 / 0)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        scope["route"] = Hostile()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"fine"})

    for hh in harness(app):
        assert hh.client.get("/").text == "fine"
        assert hh.client.get("/").text == "fine"
    assert caplog.text.count("recording a request failed") == 1


def test_a_failing_request_line_costs_neither_span_nor_metrics(caplog: pytest.LogCaptureFixture) -> None:
    """The request line is written before the request's span and metrics are recorded (they
    go into the core together): a line that fails must not take them along."""
    from cfk_otel._logs.requests import RequestLog
    from cfk_otel._settings import load

    class Failing(RequestLog):
        def write(self, info: Any) -> None:
            raise RuntimeError("stdout is gone")

    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = MetricsReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    reader.read_from(meter_provider)
    seen: list[int] = []
    app = TelemetryMiddleware(
        starlette_app(),
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        observers=[Failing(load({})), lambda info: seen.append(info.status)],
    )
    with TestClient(app) as client:
        assert client.get("/tickets/1").status_code == 200
        assert client.get("/tickets/2").status_code == 200
    assert [s.name for s in spans.get_finished_spans()] == ["GET /tickets/{ticket_id}"] * 2
    assert app.metrics.http_requests.values() == [(("GET", "/tickets/{ticket_id}", "200"), 2.0)]
    assert seen == [200, 200]  # the other observers still run
    assert caplog.text.count("writing a request line failed") == 1
    meter_provider.shutdown()
    tracer_provider.shutdown()


class _XTracePropagator(TextMapPropagator):
    """A vendor propagator with its own header: its declared field is what is looked for."""

    def extract(self, carrier: Any, context: Any = None, getter: Any = default_getter) -> Any:
        values = getter.get(carrier, "x-trace")
        if not values:
            return context if context is not None else get_current()
        span = SpanContext(int(values[0], 16), 0x1234, is_remote=True, trace_flags=TraceFlags(1))
        return set_span_in_context(NonRecordingSpan(span), context)

    def inject(self, carrier: Any, context: Any = None, setter: Any = None) -> None:
        pass

    @property
    def fields(self) -> set[str]:
        return {"X-Trace"}


def test_propagation_headers_are_those_the_global_propagator_declares(h: Harness) -> None:
    before = propagate.get_global_textmap()
    try:
        h.client.get("/", headers={"x-trace": "abc"})  # not a field of the default propagators
        propagate.set_global_textmap(_XTracePropagator())
        h.client.get("/", headers={"x-trace": "abc"})
        h.client.get("/", headers={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"})
    finally:
        propagate.set_global_textmap(before)
    first, second, third = h.finished()
    assert first.parent is None
    assert second.context.trace_id == 0xABC
    assert second.parent is not None
    assert second.parent.span_id == 0x1234
    assert third.parent is None  # traceparent is not the vendor propagator's


FASTAPI_NATIVE = (
    IN_MEMORY_PROVIDERS
    + """
from fastapi import FastAPI
from starlette.testclient import TestClient
from cfk_otel import TelemetryMiddleware
from cfk_otel.testing import MetricsReader

app = FastAPI()

@app.get("/tickets/{ticket_id}")
async def ticket(ticket_id: int):
    with trace.get_tracer("app").start_as_current_span("load"):
        return {"id": ticket_id}

@app.get("/boom")
async def boom():
    raise RuntimeError("boom")

with TestClient(TelemetryMiddleware(app), raise_server_exceptions=False) as client:
    assert client.get("/tickets/5").status_code == 200
    assert client.get("/boom").status_code == 500
print(sorted((s.name, s.kind.name, s.instrumentation_scope.name) for s in spans.get_finished_spans()))
data = reader.get_metrics_data()
# SDK 1.40 and 1.41 also count their own spans, as "opentelemetry-sdk": not FastAPI's.
scopes = {sm.scope.name for rm in data.resource_metrics for sm in rm.scope_metrics}
print(sorted(scopes - {"opentelemetry-sdk"}))
"""
)


def test_fastapi_native_telemetry_does_not_duplicate_ours() -> None:
    # FastAPI 0.165+ would add a second server span (a new trace, from the request
    # headers) and its own HTTP metrics when a global provider is set, as in production.
    result = subprocess.run(
        [sys.executable, "-c", FASTAPI_NATIVE], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    spans, scopes = result.stdout.splitlines()[-2:]
    assert spans == str(
        [
            ("GET /boom", "SERVER", "cfk_otel"),
            ("GET /tickets/{ticket_id}", "SERVER", "cfk_otel"),
            ("load", "INTERNAL", "app"),
        ]
    )
    assert scopes == "['cfk_otel']"
