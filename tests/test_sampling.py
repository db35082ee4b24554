"""Sampling that keeps every failed and slow trace whole (cfk_otel._core.sampling, issue 24)."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, Decision, ParentBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, StatusCode, TraceFlags

from cfk_otel import _settings
from cfk_otel._core import sampling as _sampling
from cfk_otel._core import seam as _core
from cfk_otel.testing import OtlpReceiver, ReceivedSpan
from tests.conftest import Services, free_port, launch, uvicorn_command

SERVER, CLIENT = 2, 3  # OTLP span kinds
HEALTHY, FAILED, CRASHED, SLOW = 150, 8, 8, 6
THRESHOLD = 0.05


# The setting


def test_the_threshold_is_declared_once_with_its_default_and_off() -> None:
    assert _settings.load({}).keep_slower_than == 2.0
    assert _settings.load({"CFK_TRACES_KEEP_SLOWER_THAN": "0.25"}).keep_slower_than == 0.25
    assert _settings.load({"CFK_TRACES_KEEP_SLOWER_THAN": "OFF"}).keep_slower_than is None
    for bad in ("0", "-1", "soon", "nan"):
        loaded = _settings.load({"CFK_TRACES_KEEP_SLOWER_THAN": bad})
        assert loaded.keep_slower_than == 2.0
        (problem,) = loaded.problems
        assert problem.variable == "CFK_TRACES_KEEP_SLOWER_THAN"
        assert "seconds, more than 0; or off" in str(problem)


def test_the_bias_wraps_ratio_samplers_only() -> None:
    ratio = _settings.load(
        {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
    )
    arguments = _sampling.sdk_arguments(ratio)
    assert arguments["sampler"].get_description() == (
        "KeepFailedAndSlow{ParentBased{root:TraceIdRatioBased{0.1},remoteParentSampled:AlwaysOnSampler,"
        "remoteParentNotSampled:AlwaysOffSampler,localParentSampled:AlwaysOnSampler,"
        "localParentNotSampled:AlwaysOffSampler}}"
    )
    assert _sampling.KEEPER is not None
    assert _sampling.KEEPER.threshold_ns == 2_000_000_000
    sentry = _settings.load({"SENTRY_TRACES_SAMPLE_RATE": "0.1"})
    assert "TraceIdRatioBased{0.1}" in _sampling.sdk_arguments(sentry)["sampler"].get_description()
    # Without a ratio, or with the bias off, the head sampler alone (no processor, no keeper).
    plain = _sampling.sdk_arguments(_settings.load({}))  # parentbased_always_on
    assert list(plain) == ["sampler"]
    assert plain["sampler"].get_description().startswith("ParentBased{root:AlwaysOnSampler")
    assert _sampling.KEEPER is None
    off = _settings.load({"OTEL_TRACES_SAMPLER": "traceidratio", "CFK_TRACES_KEEP_SLOWER_THAN": "off"})
    assert {k: v.get_description() for k, v in _sampling.sdk_arguments(off).items()} == {
        "sampler": "TraceIdRatioBased{1.0}"
    }


# The sampler and the keeper, in one process


@pytest.fixture
def sdk() -> Any:
    """A provider whose ratio says no to every new trace, with the keeper in front of an
    in-memory exporter; yields (tracer, exporter, keeper)."""
    keeper = _sampling.Keeper(0.05, max_per_trace=4, max_spans=6)
    memory = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider(sampler=_sampling.KeepSampler(ParentBased(ALWAYS_OFF)))
    provider.add_span_processor(_sampling.KeepProcessor(SimpleSpanProcessor(memory), keeper))
    yield provider.get_tracer("test"), memory, keeper
    provider.shutdown()


def _ended(
    tracer: trace.Tracer,
    children: int,
    *,
    failed: bool = False,
    duration_ns: int = 1000,
    scheme: str = "http",
) -> int:
    root = tracer.start_span(
        "GET /x", kind=trace.SpanKind.SERVER, start_time=1_000, attributes={"url.scheme": scheme}
    )
    ctx = trace.set_span_in_context(root)
    for i in range(children):
        child = tracer.start_span(f"child {i}", context=ctx, kind=trace.SpanKind.CLIENT)
        assert child.is_recording()
        assert not child.get_span_context().trace_flags.sampled
        grandchild = tracer.start_span("app span", context=trace.set_span_in_context(child))
        grandchild.end()
        child.end()
    if failed:
        root.set_status(StatusCode.ERROR)
    root.end(end_time=1_000 + duration_ns)
    return root.get_span_context().trace_id


def test_a_healthy_unsampled_trace_is_dropped_and_a_failed_or_slow_one_kept_whole(
    sdk: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracer, memory, keeper = sdk
    healthy = _ended(tracer, 1)
    assert memory.get_finished_spans() == ()
    assert keeper.held() == 0
    assert not _sampling.kept(SpanContext(healthy, 1, False, TraceFlags(0)))
    failed = _ended(tracer, 1, failed=True)
    slow = _ended(tracer, 1, duration_ns=50_000_000)
    just_fast = _ended(tracer, 1, duration_ns=49_999_999)
    spans = memory.get_finished_spans()
    assert sorted({s.context.trace_id for s in spans}) == sorted({failed, slow})
    assert just_fast not in {s.context.trace_id for s in spans}
    for trace_id in (failed, slow):
        names = sorted(s.name for s in spans if s.context.trace_id == trace_id)
        assert names == ["GET /x", "app span", "child 0"]
    # Exported as sampled, with their parents as they were.
    assert all(s.context.trace_flags.sampled for s in spans)
    root = next(s for s in spans if s.name == "GET /x" and s.context.trace_id == failed)
    child = next(s for s in spans if s.name == "child 0" and s.context.trace_id == failed)
    assert child.parent is not None
    assert child.parent.span_id == root.context.span_id
    assert child.kind is trace.SpanKind.CLIENT
    assert (keeper.kept_traces, keeper.dropped_traces, keeper.held()) == (2, 2, 0)
    # What an exemplar may name: a kept trace, never a dropped one.
    monkeypatch.setattr(_sampling, "KEEPER", keeper)
    assert _sampling.kept(SpanContext(failed, 1, False, TraceFlags(0)))
    assert not _sampling.kept(SpanContext(just_fast, 1, False, TraceFlags(0)))
    assert _sampling.kept(SpanContext(just_fast, 1, False, TraceFlags(TraceFlags.SAMPLED)))


def test_a_long_websocket_connection_is_not_slow(sdk: Any) -> None:
    tracer, memory, _ = sdk
    _ended(tracer, 1, duration_ns=10**10, scheme="wss")
    assert memory.get_finished_spans() == ()
    failed = _ended(tracer, 1, duration_ns=10**10, scheme="ws", failed=True)
    assert {s.context.trace_id for s in memory.get_finished_spans()} == {failed}


def test_the_cores_spans_take_the_same_keeper(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the native path our spans end in the core: held and decided the same way, and
    the app's SDK spans under them go with them."""
    with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.http_endpoint)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "10")
        memory = InMemorySpanExporter()
        keeper = _sampling.Keeper(0.05)
        provider = sdk_trace.TracerProvider(sampler=_sampling.KeepSampler(ParentBased(ALWAYS_OFF)))
        provider.add_span_processor(_sampling.KeepProcessor(SimpleSpanProcessor(memory), keeper))
        _core.shutdown(1.0)
        _core.activate(_core.Choice(True, ""), provider)
        monkeypatch.setattr(_sampling, "KEEPER", keeper)
        try:
            spans = _core.Spans(provider)
            app = provider.get_tracer("app")

            def request(name: str, scheme: str, seconds: float, failed: bool = False) -> None:
                root = spans.start(name, None)
                assert type(root) is _core.CoreSpan
                assert not root.get_span_context().trace_flags.sampled
                inside = trace.set_span_in_context(root)
                spans.start("SELECT", inside, trace.SpanKind.CLIENT, {"db.system.name": "postgresql"}).end()
                app.start_span("own work", context=inside).end()
                root.set_own({"url.scheme": scheme})
                if failed:
                    root.set_status(StatusCode.ERROR)
                root.end(end_time=root.start_time + int(seconds * 1e9))

            request("GET /healthy", "http", 0.01)
            request("GET /socket", "ws", 60.0)
            request("GET /slow", "http", 0.06)
            request("GET /failed", "http", 0.01, failed=True)
            assert receiver.wait_for(lambda: len(receiver.spans) >= 4)
            assert _core.flush(5.0)
            received = sorted(s.name for s in receiver.spans)
            assert received == ["GET /failed", "GET /slow", "SELECT", "SELECT"]
            assert sorted(s.name for s in memory.get_finished_spans()) == ["own work", "own work"]
            by_trace = {s.trace_id for s in receiver.spans}
            assert {f"{s.context.trace_id:032x}" for s in memory.get_finished_spans()} == by_trace
            assert (keeper.kept_traces, keeper.dropped_traces, keeper.held()) == (2, 2, 0)
        finally:
            _core.activate(_core.Choice(False, "not set up"))
            _core.shutdown(0.5)
            provider.shutdown()


def test_held_spans_are_bounded_per_trace_and_in_all(sdk: Any) -> None:
    tracer, memory, keeper = sdk
    _ended(tracer, 5, failed=True)  # 10 children and grandchildren: 4 held, the rest let go
    assert len(memory.get_finished_spans()) == 4 + 1
    assert keeper.overflow == 6
    memory.clear()
    # Open roots hold their children: never more than six spans in all, the oldest trace first.
    roots = [tracer.start_span(f"open {i}") for i in range(4)]
    for root in roots:
        for _ in range(2):
            tracer.start_span("child", context=trace.set_span_in_context(root)).end()
    assert keeper.held() == 6
    for root in roots:
        root.set_status(StatusCode.ERROR)
        root.end()
    kept = memory.get_finished_spans()
    assert sum(s.name == "child" for s in kept) == 6  # the first trace's two were let go
    assert keeper.held() == 0


def test_held_spans_are_bounded_in_size() -> None:
    keeper = _sampling.Keeper(0.05, max_trace_bytes=12_000, max_bytes=20_000)
    memory = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider(sampler=_sampling.KeepSampler(ParentBased(ALWAYS_OFF)))
    provider.add_span_processor(_sampling.KeepProcessor(SimpleSpanProcessor(memory), keeper))
    tracer = provider.get_tracer("test")
    big = {"db.query.text": "x" * 5000}
    assert _sampling.estimate(big) == _sampling.SPAN_BYTES + 5000
    assert _sampling.estimate({}, [{"exception.stacktrace": "y" * 100}]) == 512 + 128 + 100
    try:
        root = tracer.start_span("GET /big")
        for _ in range(3):  # the third would pass 12,000 bytes: let go
            tracer.start_span("child", context=trace.set_span_in_context(root), attributes=big).end()
        assert keeper.held_bytes() == 2 * (512 + 5000)
        root.set_status(StatusCode.ERROR)
        root.end()
        assert sorted(s.name for s in memory.get_finished_spans()) == ["GET /big", "child", "child"]
        assert keeper.overflow == 1
        memory.clear()
        roots = [tracer.start_span(f"open {i}") for i in range(2)]
        for open_root in roots:
            for _ in range(2):
                tracer.start_span("child", context=trace.set_span_in_context(open_root), attributes=big).end()
        assert keeper.held_bytes() == 2 * (512 + 5000)  # the first trace's were let go
        assert keeper.overflow == 3
        for open_root in roots:
            open_root.set_status(StatusCode.ERROR)
            open_root.end()
        assert sum(s.name == "child" for s in memory.get_finished_spans()) == 2
        assert (keeper.held(), keeper.held_bytes()) == (0, 0)
    finally:
        provider.shutdown()


def test_a_remote_parents_flag_is_honoured() -> None:
    sampler = _sampling.KeepSampler(ParentBased(ALWAYS_OFF))
    for sampled, expected in ((True, Decision.RECORD_AND_SAMPLE), (False, Decision.DROP)):
        remote = SpanContext(7, 9, is_remote=True, trace_flags=TraceFlags(int(sampled)))
        parent = trace.set_span_in_context(NonRecordingSpan(remote))
        assert sampler.should_sample(parent, 7, "GET /x").decision is expected
    # A new trace the ratio refuses is recorded; so are the children of such a span,
    # but not the children of a span that was dropped.
    assert sampler.should_sample(None, 7, "GET /x").decision is Decision.RECORD_ONLY
    local = SpanContext(7, 9, is_remote=False, trace_flags=TraceFlags(0))
    dropped = trace.set_span_in_context(NonRecordingSpan(local))
    assert sampler.should_sample(dropped, 7, "child").decision is Decision.DROP
    # The ratio's yes stays a yes.
    always = _sampling.KeepSampler(ParentBased(ALWAYS_ON))
    assert always.should_sample(context_api.Context(), 7, "GET /x").decision is Decision.RECORD_AND_SAMPLE


# End to end, on both paths: at 10%, every failed and slow trace arrives whole


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            total += float(match.group(2))
    return total


def _run(tmp_path: Path, services: Services, native: str) -> tuple[list[ReceivedSpan], str, str]:
    with OtlpReceiver() as receiver:
        port = free_port()
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "SERVICE_NAME": "cf-kanban-sampling",
            "CFK_OTEL_NATIVE": native,
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.1",
            "CFK_TRACES_KEEP_SLOWER_THAN": str(THRESHOLD),
            "DATABASE_URL": services.database_url,
            "REDIS_URL": services.redis_url,
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_LOGS_EXPORTER": "none",
        }
        app = launch(tmp_path, uvicorn_command("sampling_app:app", port), env, port)
        try:
            for path, count, status in (
                ("/ok", HEALTHY, 200),
                ("/failed", FAILED, 500),
                ("/boom", CRASHED, 500),
                ("/slow", SLOW, 200),
            ):
                for _ in range(count):
                    assert app.get(path)[0] == status
            scrape = app.get("/api/metrics")[2].decode()
            wanted = FAILED + CRASHED + SLOW
            assert receiver.wait_for(
                lambda: sum(s.span.kind == SERVER and s.name != "GET /ok" for s in receiver.spans) >= wanted
            )
        finally:
            app.terminate()  # flushes what is queued
        return list(receiver.spans), scrape, app.output()


@pytest.mark.parametrize("native", ["true", "false"])
def test_failed_and_slow_traces_arrive_whole_healthy_ones_at_the_ratio(
    tmp_path: Path, services: Services, native: str
) -> None:
    spans, scrape, output = _run(tmp_path, services, native)
    path = "native core" if native == "true" else "OpenTelemetry SDK"
    assert f"request path: {path}" in output
    traces: dict[str, list[ReceivedSpan]] = defaultdict(list)
    for span in spans:
        traces[span.trace_id].append(span)
    roots = [s for s in spans if s.span.kind == SERVER]
    by_route = defaultdict(list)
    for root in roots:
        by_route[root.name].append(root)
    assert len(by_route["GET /failed"]) == FAILED
    assert len(by_route["GET /boom"]) == CRASHED
    assert len(by_route["GET /slow"]) == SLOW
    # Healthy ones at about the ratio: 150 at 0.1 is 15 on average (3 to 40: beyond 3 sigma).
    assert 3 <= len(by_route["GET /ok"]) <= 40, len(by_route["GET /ok"])
    head = traces[by_route["GET /ok"][0].trace_id]  # sampled at its head
    shapes = {s.name: sorted(s.attributes) for s in head if s.span.kind == CLIENT}
    assert "db.statement" in shapes["SELECT"] or "db.query.text" in shapes["SELECT"]
    for root in roots:
        if root.name == "GET /hello":
            continue
        whole = traces[root.trace_id]
        assert len({s.trace_id for s in whole}) == 1
        names = sorted(s.name for s in whole if s is not root)
        assert names == ["GET", "SELECT", "own work"], (root.name, names)
        own = next(s for s in whole if s.name == "own work")
        query = next(s for s in whole if s.name == "SELECT")
        cache = next(s for s in whole if s.name == "GET")
        assert own.parent_span_id == cache.parent_span_id == root.span_id
        assert query.parent_span_id == own.span_id
        assert query.span.kind == cache.span.kind == CLIENT
        # Whole: each span with the attributes of a trace the ratio kept at its head.
        assert sorted(query.attributes) == shapes["SELECT"], root.name
        assert sorted(cache.attributes) == shapes["GET"], root.name
        assert root.attributes["http.route"] == root.name.split(" ")[1]
        assert root.attributes["http.response.status_code"] in (200, 500)
        assert root.parent_span_id == ""
    for root in by_route["GET /failed"] + by_route["GET /boom"]:
        assert root.span.status.code == 2  # ERROR
    # Metrics and request lines count every request, whatever the sampling.
    assert _metric(scrape, "http_requests_total", path="/ok", status="200") == HEALTHY
    assert _metric(scrape, "http_requests_total", path="/failed", status="500") == FAILED
    assert _metric(scrape, "http_requests_total", path="/boom", status="500") == CRASHED
    assert _metric(scrape, "http_requests_total", path="/slow", status="200") == SLOW
    assert _metric(scrape, "http_request_duration_seconds_count", path="/ok") == HEALTHY
    assert _metric(scrape, "errors_total") >= CRASHED
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    counted = defaultdict(int)
    for line in lines:
        if line.get("path") in ("/ok", "/failed", "/boom", "/slow"):
            counted[line["path"]] += 1
    assert counted == {"/ok": HEALTHY, "/failed": FAILED, "/boom": CRASHED, "/slow": SLOW}
