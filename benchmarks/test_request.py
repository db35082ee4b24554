"""One server span: a whole ASGI request through TelemetryMiddleware vs OpenTelemetryMiddleware.

Both wrap the same trivial app and record into identical providers; the request is a
full ``await middleware(scope, receive, send)`` driven by asyncio, 100 per round. The
bare app's row is the floor: a middleware's cost is its row minus that one.

Both get a batch processor over a null exporter, which makes ours use the SDK's span;
the ``OTLP/HTTP processor alone`` rows are what cfk_otel runs in production (the lean
server span of cfk_otel/_span.py, encoded to bytes as it ends).

Upstream's defaults open two more spans per request (one per ``send`` message, three
in all); the ``exclude_spans`` row is upstream reduced to one span, like ours.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.metrics import MeterProvider, NoOpMeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from pytest_benchmark.fixture import BenchmarkFixture

from cfk_otel import TelemetryMiddleware, _native
from cfk_otel._asgi.middleware import ASGIApp
from cfk_otel._core import sampling as _sampling
from cfk_otel._core import seam as _core
from cfk_otel._native import OtlpExporter

from .conftest import describe, hello_app, requests_in_a_loop

REQUESTS = 100  # per round; the report shows µs per request
UPSTREAM_LEAN = ["receive", "send"]
LEAN_LABEL = "OpenTelemetryMiddleware, exclude_spans=receive,send (1 span)"
# The provider cfk_otel builds: our OTLP/HTTP processor alone, so the lean server span.
LEAN_OURS = "TelemetryMiddleware, our spans in the compiled core (one call when each ends)"
SDK_SPAN_OURS = "TelemetryMiddleware, batch processor over a null exporter (SDK span)"


def ours(tracer_provider: TracerProvider, meter_provider: MeterProvider) -> ASGIApp:
    return TelemetryMiddleware(hello_app, tracer_provider=tracer_provider, meter_provider=meter_provider)


def upstream(
    tracer_provider: TracerProvider, meter_provider: MeterProvider, exclude_spans: list[str] | None = None
) -> ASGIApp:
    app: ASGIApp = OpenTelemetryMiddleware(
        hello_app,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        exclude_spans=exclude_spans,
    )
    return app


def run(
    benchmark: BenchmarkFixture,
    loop: asyncio.AbstractEventLoop,
    app: ASGIApp,
    side: str,
    label: str,
    primary: bool = True,  # the pair's row in the summary; False for variants
) -> None:
    describe(benchmark, side, label, per_call=REQUESTS, primary=primary)
    exchange = benchmark(requests_in_a_loop(loop, app, REQUESTS))
    assert (exchange.status, exchange.body) == (200, b"hello")


# --- With the metrics: what a request costs in an app with METRICS_ENABLED=true ---

REQUEST = "ASGI request: server span + request metrics"


@pytest.mark.benchmark(group=REQUEST)
def test_request_bare_app(benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop) -> None:
    run(benchmark, loop, hello_app, "baseline", "the bare app, no middleware", primary=False)


@pytest.mark.benchmark(group=REQUEST)
def test_request_ours(
    benchmark: BenchmarkFixture,
    loop: asyncio.AbstractEventLoop,
    tracer_provider: TracerProvider,
    meter_provider: MeterProvider,
) -> None:
    app = ours(tracer_provider, meter_provider)
    run(benchmark, loop, app, "ours", SDK_SPAN_OURS, primary=False)


@pytest.mark.benchmark(group=REQUEST)
def test_request_ours_otlp(
    benchmark: BenchmarkFixture,
    loop: asyncio.AbstractEventLoop,
    otlp_tracer_provider: TracerProvider,
    meter_provider: MeterProvider,
) -> None:
    app = ours(otlp_tracer_provider, meter_provider)
    run(benchmark, loop, app, "ours", LEAN_OURS)


@pytest.mark.benchmark(group=REQUEST)
def test_request_upstream(
    benchmark: BenchmarkFixture,
    loop: asyncio.AbstractEventLoop,
    tracer_provider: TracerProvider,
    meter_provider: MeterProvider,
) -> None:
    app = upstream(tracer_provider, meter_provider)
    run(benchmark, loop, app, "upstream", "OpenTelemetryMiddleware (defaults: 3 spans)")


@pytest.mark.benchmark(group=REQUEST)
def test_request_upstream_one_span(
    benchmark: BenchmarkFixture,
    loop: asyncio.AbstractEventLoop,
    tracer_provider: TracerProvider,
    meter_provider: MeterProvider,
) -> None:
    app = upstream(tracer_provider, meter_provider, UPSTREAM_LEAN)
    run(benchmark, loop, app, "upstream", LEAN_LABEL, primary=False)


# --- Spans alone: no-op meters on both sides ---

SPAN = "ASGI request: server span only (no-op meters)"


@pytest.mark.benchmark(group=SPAN)
def test_span_ours(
    benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, tracer_provider: TracerProvider
) -> None:
    app = ours(tracer_provider, NoOpMeterProvider())
    run(benchmark, loop, app, "ours", SDK_SPAN_OURS, primary=False)


@pytest.mark.benchmark(group=SPAN)
def test_span_ours_otlp(
    benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, otlp_tracer_provider: TracerProvider
) -> None:
    run(benchmark, loop, ours(otlp_tracer_provider, NoOpMeterProvider()), "ours", LEAN_OURS)


@pytest.mark.benchmark(group=SPAN)
def test_span_upstream(
    benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, tracer_provider: TracerProvider
) -> None:
    app = upstream(tracer_provider, NoOpMeterProvider())
    run(benchmark, loop, app, "upstream", "OpenTelemetryMiddleware (defaults: 3 spans)")


@pytest.mark.benchmark(group=SPAN)
def test_span_upstream_one_span(
    benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, tracer_provider: TracerProvider
) -> None:
    app = upstream(tracer_provider, NoOpMeterProvider(), UPSTREAM_LEAN)
    run(benchmark, loop, app, "upstream", LEAN_LABEL, primary=False)


# --- Sampled out: what a request costs when the ratio says no (issue 24) ---

SAMPLED_OUT = "ASGI request the ratio refuses: server span only (no-op meters)"


@pytest.fixture
def refusing_provider(
    otlp_tracer_provider: TracerProvider, request: pytest.FixtureRequest
) -> Iterator[TracerProvider]:
    """The core's provider with a ratio of 0 (every new trace refused): the plain head
    sampler, or wrapped for failed and slow traces (``request.param``: keep them or not)."""
    keep = bool(request.param)
    ratio = ParentBased(TraceIdRatioBased(0.0))
    sampler = _sampling.KeepSampler(ratio) if keep else ratio
    provider = TracerProvider(sampler=sampler, resource=otlp_tracer_provider.resource)
    _core.activate(_core.Choice(True, ""), provider)
    _sampling.KEEPER = _sampling.Keeper(2.0) if keep else None
    yield provider
    _sampling.KEEPER = None
    _core.activate(_core.Choice(False, "not set up"))
    provider.shutdown()


@pytest.mark.benchmark(group=SAMPLED_OUT)
@pytest.mark.parametrize("refusing_provider", [False], indirect=True)
def test_sampled_out_head_only(
    benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, refusing_provider: TracerProvider
) -> None:
    app = ours(refusing_provider, NoOpMeterProvider())
    run(benchmark, loop, app, "ours", "ratio 0, head sampling alone (nothing recorded)", primary=False)


@pytest.mark.benchmark(group=SAMPLED_OUT)
@pytest.mark.parametrize("refusing_provider", [True], indirect=True)
def test_sampled_out_kept_if_failed_or_slow(
    benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, refusing_provider: TracerProvider
) -> None:
    app = ours(refusing_provider, NoOpMeterProvider())
    run(
        benchmark,
        loop,
        app,
        "ours",
        "ratio 0, recorded and dropped at the end (CFK_TRACES_KEEP_SLOWER_THAN)",
        primary=False,
    )
    keeper = _sampling.KEEPER
    assert keeper is not None
    assert keeper.dropped_traces > 0
    assert keeper.kept_traces == 0
    assert keeper.held() == 0


# --- OTLP encoding: what the exporter thread then pays per request, on the same core ---

ENCODE = "OTLP encoding of one request's spans (exporter thread)"
BATCH_SPANS = 512  # BatchSpanProcessor's default export batch


def spans_of_one_request(app_of: str, resource: Resource) -> list[ReadableSpan]:
    captured = InMemorySpanExporter()
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(SimpleSpanProcessor(captured))
    app = ours(provider, NoOpMeterProvider()) if app_of == "ours" else upstream(provider, NoOpMeterProvider())
    loop = asyncio.new_event_loop()
    try:
        requests_in_a_loop(loop, app, 1)()
    finally:
        loop.close()
    provider.shutdown()
    return list(captured.get_finished_spans())


@pytest.fixture(scope="module")
def our_spans(resource: Resource) -> list[ReadableSpan]:
    spans = spans_of_one_request("ours", resource)
    assert [s.name for s in spans] == ["GET /hello"]
    return spans


@pytest.fixture(scope="module")
def upstream_spans(resource: Resource) -> list[ReadableSpan]:
    spans = spans_of_one_request("upstream", resource)
    assert len(spans) == 3  # http send (start), http send (body), the server span
    return spans


def encode(spans: Sequence[ReadableSpan]) -> bytes:
    # What the stock OTLPSpanExporter does before the network: protobuf objects, then bytes.
    data: bytes = encode_spans(spans).SerializeToString()
    return data


def hand_over(core: OtlpExporter, spans: Sequence[ReadableSpan]) -> int:
    # What the request thread pays with the compiled core: one call per span; the core's own
    # thread then encodes and sends without the GIL.
    for span in spans:
        context = span.get_span_context()
        assert context is not None
        core.record_span(
            0,
            context.trace_id,
            context.span_id,
            0,
            0x100,
            "",
            span.name,
            span.kind.value + 1,
            span.start_time or 0,
            span.end_time or 0,
            dict(span.attributes or {}),
        )
    return len(spans)


@pytest.mark.benchmark(group=ENCODE)
def test_encode_ours(benchmark: BenchmarkFixture, our_spans: list[ReadableSpan]) -> None:
    describe(
        benchmark, "ours", "1 span, handed to the compiled core (which encodes off the GIL)", primary=True
    )
    core = _native.OtlpExporter(
        "traces", "http://127.0.0.1:9/v1/traces", [], {}, [("cfk_otel", "")], schedule_delay=3600.0
    )
    assert benchmark(hand_over, core, our_spans)
    core.shutdown(0.1)


@pytest.mark.benchmark(group=ENCODE)
def test_encode_upstream(benchmark: BenchmarkFixture, upstream_spans: list[ReadableSpan]) -> None:
    describe(benchmark, "upstream", "3 spans (defaults), exported alone", primary=True)
    assert benchmark(encode, upstream_spans)


@pytest.mark.benchmark(group=ENCODE)
def test_encode_upstream_in_a_batch(benchmark: BenchmarkFixture, upstream_spans: list[ReadableSpan]) -> None:
    requests = BATCH_SPANS // len(upstream_spans)
    spans = upstream_spans * requests
    describe(benchmark, "upstream", f"per request, in a batch of {len(spans)} spans", per_call=requests)
    assert benchmark(encode, spans)
