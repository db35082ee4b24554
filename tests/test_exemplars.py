"""Exemplars on the native path (issue 24): the core keeps the latest measurement of an
exported trace per histogram bucket, and both the OpenMetrics scrape and the OTLP push
carry it."""

from __future__ import annotations

import os
import re
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, HistogramDataPoint
from opentelemetry.trace import SpanContext, TraceFlags
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from cfk_otel import _native as native
from cfk_otel._core import sampling as _sampling
from cfk_otel._metrics import export as _metric_export
from cfk_otel._metrics.catalogue import Metrics
from cfk_otel._metrics.scrape import Scrape, ScrapeReader, reader_arguments
from cfk_otel.testing import OtlpReceiver, ReceivedSpan
from tests.conftest import Services, free_port, launch, uvicorn_command

SERVER, CLIENT = 2, 3  # OTLP span kinds
TRACE, SPAN = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
# The exact OpenMetrics form, shared with the SDK path's text.
EXEMPLAR_LINE = re.compile(
    r"^(\w+)_bucket\{(.*)\} (\S+)"
    r' # \{trace_id="([0-9a-f]{32})",span_id="([0-9a-f]{16})"\} (\S+) (\d+\.\d{3})$'
)


def _family() -> Any:
    return native.Family(
        "took_seconds", "Took", "seconds", ["method", "path"], [0.1, 1.0], ["0.1", "1.0"], otlp_unit="s"
    )


# The core


def test_each_bucket_keeps_the_latest_exemplar_of_the_ids_given() -> None:
    family, plain = _family(), _family()
    before = time.time_ns()
    for value, ids in (
        (0.05, (TRACE, SPAN)),
        (0.07, (TRACE + 1, SPAN + 1)),  # the same bucket: replaces the one before
        (0.08, (0, 0)),  # no ids: counted, no exemplar
        (0.09, (TRACE + 2, 0)),  # half the ids: none either
        (0.5, (TRACE + 3, SPAN + 3)),
        (7.0, (TRACE + 4, SPAN + 4)),  # the +Inf bucket
    ):
        family.observe(["GET", "/a"], value, *ids)
        plain.observe(["GET", "/a"], value)
    for either in (family, plain):
        either.observe(["GET", "/b"], 0.5)
    after = time.time_ns()

    (labels, found), *rest = family.exemplars()
    assert labels == ["GET", "/a"]
    assert rest == []
    assert [(b, t, s, v) for b, t, s, v, _ in found] == [
        (0, TRACE + 1, SPAN + 1, 0.07),
        (1, TRACE + 3, SPAN + 3, 0.5),
        (2, TRACE + 4, SPAN + 4, 7.0),
    ]
    assert all(before <= when <= after for *_, when in found)
    assert family.rows() == plain.rows()
    # The Prometheus text format has no exemplars: unchanged.
    assert family.render() == plain.render()
    assert "#" not in "".join(line for line in family.render().splitlines() if not line.startswith("# "))


def test_exemplars_stay_one_per_bucket() -> None:
    family = _family()
    for i in range(1, 2001):
        family.observe(["GET", "/a"], (i % 30) / 10, TRACE + i, SPAN + i)
    (_, found), *_ = family.exemplars()
    assert len(found) == 3
    assert found[2][1] == TRACE + 2000  # the latest
    assert native.render([family], True).count(" # {") == 3


def test_the_openmetrics_text_carries_them_in_the_exact_form() -> None:
    requests = native.Family("http_requests_total", "Requests", "", ["method", "path", "status"])
    family = _family()
    native.record_request(requests, family, "GET", "/a", "200", 0.0421, TRACE, SPAN)
    native.record_request(requests, family, "GET", "/a", "200", 0.5)
    text = native.render([requests, family], True)

    lines = [line for line in text.splitlines() if " # {" in line]
    assert len(lines) == 1
    match = EXEMPLAR_LINE.match(lines[0])
    assert match is not None, lines[0]
    name, labels, count, trace_id, span_id, value, when = match.groups()
    assert (name, labels, count) == ("took_seconds", 'le="0.1",method="GET",path="/a"', "1.0")
    assert (trace_id, span_id, value) == (f"{TRACE:032x}", f"{SPAN:016x}", "0.0421")
    assert abs(float(when) - time.time()) < 60

    parsed = {f.name: f for f in text_string_to_metric_families(text + "# EOF\n")}
    exemplars = [s.exemplar for s in parsed["took_seconds"].samples if s.exemplar]
    assert [(e.labels, e.value) for e in exemplars] == [
        ({"trace_id": f"{TRACE:032x}", "span_id": f"{SPAN:016x}"}, 0.0421)
    ]


def test_the_cores_otlp_rows_carry_them(receiver: OtlpReceiver) -> None:
    family = _family()
    family.observe(["GET", "/a"], 0.5, TRACE, SPAN)
    core = native.OtlpExporter("metrics", f"{receiver.http_endpoint}/v1/metrics", [], {}, [("cfk_otel", "0")])
    try:
        core.record_metrics(0, [family], 1, 2)
        assert core.force_flush(5.0)
        assert receiver.wait_for(lambda: len(receiver.metrics) == 1)
    finally:
        core.shutdown(1.0)
    (point,) = receiver.metrics[0].metric.histogram.data_points
    (exemplar,) = point.exemplars
    assert (exemplar.trace_id, exemplar.span_id) == (TRACE.to_bytes(16, "big"), SPAN.to_bytes(8, "big"))
    assert exemplar.as_double == 0.5
    assert exemplar.time_unix_nano > 0


def test_the_sdk_metrics_data_carries_them_cumulative_and_as_deltas() -> None:
    metrics = Metrics(native=True)
    metrics.record_request("GET", "/a", "200", 0.2, TRACE, SPAN)
    metrics.record_request("GET", "/a", "200", 0.3)
    cumulative = _metric_export.Collection(metrics.direct)
    delta = _metric_export.Collection(metrics.direct, {Histogram: AggregationTemporality.DELTA})

    def point(collection: _metric_export.Collection) -> HistogramDataPoint:
        (found,) = [m for m in collection.metrics() if m.name == "http_request_duration_seconds"]
        (only,) = found.data.data_points
        assert isinstance(only, HistogramDataPoint)
        return only

    (exemplar,) = point(cumulative).exemplars
    assert (exemplar.trace_id, exemplar.span_id, exemplar.value) == (TRACE, SPAN, 0.2)
    assert exemplar.filtered_attributes == {}
    assert [e.trace_id for e in point(delta).exemplars] == [TRACE]
    metrics.record_request("GET", "/a", "200", 0.01, TRACE + 1, SPAN + 1)
    # A delta carries only the exemplars of its own measurements.
    assert [e.trace_id for e in point(delta).exemplars] == [TRACE + 1]
    assert sorted(e.trace_id for e in point(cumulative).exemplars) == [TRACE, TRACE + 1]


# Several workers: the merged scrape keeps them, the newest per bucket


def _worker(directory: Path) -> tuple[Scrape, Metrics, MeterProvider]:
    registry = CollectorRegistry()
    provider = MeterProvider(metric_readers=[ScrapeReader(**reader_arguments(registry))])
    metrics = Metrics(provider, native=True)
    return Scrape(registry, directory, metrics.direct), metrics, provider


def _bucket_exemplars(text: str) -> dict[str, tuple[str, float]]:
    return {
        sample.labels["le"]: (sample.exemplar.labels["trace_id"], sample.exemplar.value)
        for family in text_string_to_metric_families(text)
        if family.name == "http_request_duration_seconds"
        for sample in family.samples
        if sample.exemplar is not None
    }


def test_the_merged_scrape_keeps_the_newest_exemplar_per_bucket(tmp_path: Path) -> None:
    ours, theirs = tmp_path / "group", tmp_path / "other"
    scrape, metrics, provider = _worker(ours)
    other, other_metrics, other_provider = _worker(theirs)
    try:
        metrics.record_request("GET", "/x", "200", 0.03, TRACE, SPAN)  # older than the other's
        other_metrics.record_request("GET", "/x", "200", 0.04, TRACE + 1, SPAN)
        other_metrics.record_request("GET", "/x", "200", 0.3, TRACE + 2, SPAN)
        metrics.record_request("GET", "/x", "200", 0.7, TRACE + 3, SPAN)  # newer
        other.share_now()
        # The other worker's file, as a live worker (our parent stands in) leaves it.
        shared = (theirs / f"{os.getpid()}.prom").read_text()
        assert shared.endswith("# EOF\n")
        (ours / f"{os.getppid()}.prom").write_text(shared)

        body, _ = scrape.render(openmetrics_format=True)
        assert _bucket_exemplars(body.decode()) == {
            "0.05": (f"{TRACE + 1:032x}", 0.04),
            "0.5": (f"{TRACE + 2:032x}", 0.3),
            "1.0": (f"{TRACE + 3:032x}", 0.7),
        }
        counts = {
            s.labels["le"]: s.value
            for f in text_string_to_metric_families(body.decode())
            if f.name == "http_request_duration_seconds"
            for s in f.samples
            if s.name.endswith("_bucket")
        }
        assert counts["0.05"] == 2
        assert counts["+Inf"] == 4
        assert b" # {" not in scrape.render(openmetrics_format=False)[0]
    finally:
        scrape.stop()
        other.stop()
        provider.shutdown()
        other_provider.shutdown()


def test_a_share_that_does_not_parse_is_left_out_once_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    scrape, metrics, provider = _worker(tmp_path)
    try:
        metrics.record_request("GET", "/x", "200", 0.03, TRACE, SPAN)
        (tmp_path / f"{os.getppid()}.prom").write_text("# TYPE broken counter\nbroken_total{ 1\n# EOF\n")
        body, _ = scrape.render(openmetrics_format=True)
        assert _bucket_exemplars(body.decode()) == {"0.05": (f"{TRACE:032x}", 0.03)}
        assert f"metrics share ({os.getppid()}.prom) does not parse" in caplog.text
    finally:
        scrape.stop()
        provider.shutdown()


# Which ids an exemplar may take


def test_an_exemplar_names_only_an_exported_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    sampled = SpanContext(TRACE, SPAN, False, TraceFlags(TraceFlags.SAMPLED))
    unsampled = SpanContext(TRACE + 1, SPAN, False, TraceFlags(TraceFlags.DEFAULT))
    keeper = _sampling.Keeper(threshold=1.0)
    monkeypatch.setattr(_sampling, "KEEPER", keeper)
    assert _sampling.exemplar_ids(sampled) == (TRACE, SPAN)
    assert _sampling.exemplar_ids(sampled, ended=False) == (TRACE, SPAN)
    assert _sampling.exemplar_ids(unsampled) == (0, 0)
    keeper.finish(TRACE + 1, lambda span: None, object(), failed=True, duration_ns=0)
    assert _sampling.exemplar_ids(unsampled) == (TRACE + 1, SPAN)  # kept when its root ended
    assert _sampling.exemplar_ids(unsampled, ended=False) == (0, 0)  # inside it: not known yet
    monkeypatch.setattr(_sampling, "EXPORTED", False)  # OTEL_TRACES_EXPORTER=none
    assert _sampling.exemplar_ids(sampled) == (0, 0)


# End to end: at 10%, the scrape's and the push's exemplars name exported spans

HEALTHY, FAILED, SLOW = 60, 4, 3
THRESHOLD = 0.05
HISTOGRAMS = {
    "http_request_duration_seconds": (SERVER, None),
    "database_query_duration_seconds": (CLIENT, "SELECT"),
    "redis_operation_duration_seconds": (CLIENT, "GET"),
}


def _scrape(url: str, accept: str) -> str:
    request = urllib.request.Request(f"{url}/api/metrics", headers={"Accept": accept})
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(response.read().decode())


def _check(name: str, trace_id: str, span_id: str, spans: dict[str, ReceivedSpan]) -> ReceivedSpan:
    """The exported span an exemplar of ``name`` names: the histogram's own kind of span."""
    span = spans.get(span_id)
    assert span is not None, f"{name}: exemplar {trace_id}/{span_id} names no exported span"
    kind, span_name = HISTOGRAMS[name]
    assert span.trace_id == trace_id
    assert span.span.kind == kind
    assert span_name is None or span.name == span_name
    return span


def test_the_scrape_and_the_push_name_exported_spans(tmp_path: Path, services: Services) -> None:
    with OtlpReceiver() as receiver:
        port = free_port()
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "SERVICE_NAME": "cf-kanban-exemplars",
            "CFK_OTEL_NATIVE": "true",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.1",
            "CFK_TRACES_KEEP_SLOWER_THAN": str(THRESHOLD),
            "DATABASE_URL": services.database_url,
            "REDIS_URL": services.redis_url,
            "OTEL_LOGS_EXPORTER": "none",
        }
        app = launch(tmp_path, uvicorn_command("sampling_app:app", port), env, port)
        try:
            for path, count in (("/ok", HEALTHY), ("/failed", FAILED), ("/slow", SLOW), ("/ok", HEALTHY)):
                for _ in range(count):
                    app.get(path)
            openmetrics = _scrape(app.url, "application/openmetrics-text; version=1.0.0")
            prometheus = _scrape(app.url, "text/plain")

            def pushed() -> dict[str, Any]:
                last = {}
                for received in list(receiver.metrics):
                    if received.name in HISTOGRAMS and received.scope == "cfk_otel":
                        last[received.name] = received.metric
                return last

            def pushed_all() -> bool:
                last = pushed()
                return len(last) == 3 and all(
                    sum(p.count for p in m.histogram.data_points) >= 2 * HEALTHY + FAILED + SLOW
                    for n, m in last.items()
                    if n == "http_request_duration_seconds"
                )

            assert receiver.wait_for(pushed_all)
            otlp = pushed()
        finally:
            app.terminate()  # flushes the spans still queued
        spans = {s.span_id: s for s in receiver.spans}

    assert " # {" not in prometheus
    scraped: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for family in text_string_to_metric_families(openmetrics):
        for sample in family.samples:
            if sample.exemplar is not None:
                scraped[family.name].append(
                    (sample.exemplar.labels["trace_id"], sample.exemplar.labels["span_id"])
                )
    assert set(scraped) == set(HISTOGRAMS), sorted(scraped)
    roots = [_check(name, *ids, spans) for name in scraped for ids in scraped[name]]
    # A failed or a slow request's trace, kept whole although its head said no, is named too.
    assert {"GET /failed", "GET /slow"} <= {r.name for r in roots if r.span.kind == SERVER}

    carried = set()
    for name, metric in otlp.items():
        for point in metric.histogram.data_points:
            for exemplar in point.exemplars:
                _check(name, exemplar.trace_id.hex(), exemplar.span_id.hex(), spans)
                carried.add(name)
    assert carried == set(HISTOGRAMS)


def test_two_workers_scrape_carries_exemplars_of_exported_spans(tmp_path: Path, services: Services) -> None:
    with OtlpReceiver() as receiver:
        port = free_port()
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint,
            "SERVICE_NAME": "cf-kanban-exemplars",
            "CFK_TRACES_KEEP_SLOWER_THAN": str(THRESHOLD),
            "DATABASE_URL": services.database_url,
            "REDIS_URL": services.redis_url,
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_LOGS_EXPORTER": "none",
        }
        app = launch(tmp_path, uvicorn_command("sampling_app:app", port, "--workers", "2"), env, port)
        try:
            sent = 40
            for _ in range(sent // 2):
                assert app.get("/ok")[0] == 200
                assert app.get("/hello")[0] == 200
            # Whichever worker answers sums both (shares are written every 2 s).
            deadline = time.monotonic() + 15
            while True:
                text = _scrape(app.url, "application/openmetrics-text")
                families = {f.name: f for f in text_string_to_metric_families(text)}
                counted = sum(
                    s.value
                    for s in families["http_request_duration_seconds"].samples
                    if s.name.endswith("_count") and s.labels["path"] in ("/ok", "/hello")
                )
                if counted >= sent or time.monotonic() > deadline:
                    break
                time.sleep(0.3)
        finally:
            app.terminate()
        spans = {s.span_id: s for s in receiver.spans}
    assert counted >= sent
    named = 0
    for name in HISTOGRAMS:
        for sample in families[name].samples:
            if sample.exemplar is not None:
                _check(name, sample.exemplar.labels["trace_id"], sample.exemplar.labels["span_id"], spans)
                named += 1
    assert named >= 4  # /ok and /hello, a query and a Redis call
