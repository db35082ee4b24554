"""cfk_otel/_metrics/reader.py: our reader of the SDK's metrics for the scrape, held to the SDK's own
Prometheus reader (opentelemetry-exporter-prometheus, the test extra's oracle)."""

from __future__ import annotations

import inspect
import re
import time
from collections.abc import Iterable
from pathlib import Path

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from cfk_otel._metrics.reader import SdkReader, label_name, metric_name, trace_id_first, unit_suffix
from cfk_otel._metrics.scrape import Scrape
from cfk_otel.testing import OtlpReceiver
from tests.conftest import Services, free_port, launch, uvicorn_command


def observe(options: CallbackOptions) -> Iterable[Observation]:
    yield Observation(7, {"queue": "default"})


def record_everything(provider: MeterProvider) -> None:
    """Every instrument kind, units the specification maps, names and attributes to sanitise."""
    meter = provider.get_meter("app", "1.0")
    other = provider.get_meter("library")
    meter.create_counter("http.server.requests", "{request}", "Requests").add(3, {"http.method": "GET"})
    # The same metric from a second scope is one family.
    other.create_counter("http.server.requests", "{request}", "Requests").add(1, {"http.method": "POST"})
    meter.create_counter("jobs_total", description='Jobs "done"\\n').add(2.5, {"kind": "x", "zone": "eu"})
    meter.create_up_down_counter("queue.depth", "By").add(-4, {"queue": "q", "1st": True})
    meter.create_histogram("latency", "ms", "Latency").record(12.0, {"route": "/a", "codes": "[1, 2]"})
    meter.create_histogram("latency", "ms", "Latency").record(7000.0, {"route": "/b", "n": 3})
    meter.create_histogram("speed", "m/s").record(1.5, {"weird key!": "v\\"})
    meter.create_observable_gauge("temperature", [observe], "Cel")
    meter.create_observable_counter("d3.rendered", [observe], "1")
    meter.create_observable_up_down_counter("ratio", [observe], "%")
    meter.create_gauge("load", "{cpu}/s").set(0.25, {"host": "h1"})


def families(text: str) -> dict[str, tuple[object, ...]]:
    """Each family by name, without the labels only the SDK's reader adds (scope, before
    0.64b0 it could not leave them out) and its target_info."""
    return {
        f.name: (
            f.type,
            f.documentation,
            f.unit,
            sorted((s.name, sorted(_ours(s.labels)), s.value) for s in f.samples),
        )
        for f in text_string_to_metric_families(text)
        if f.name != "target"
    }


def _ours(labels: dict[str, str]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in labels.items() if not k.startswith("otel_scope_")]


def scraped(reader: MetricReader, registry: CollectorRegistry) -> dict[str, tuple[object, ...]]:
    provider = MeterProvider(metric_readers=[reader])
    record_everything(provider)
    try:
        return families(generate_latest(registry).decode())
    finally:
        provider.shutdown()


def test_the_scrape_equals_the_sdk_prometheus_readers() -> None:
    ours = scraped(SdkReader(registry := CollectorRegistry()), registry)
    # The oracle's options as the installed release takes them: before 0.63b0 it writes to
    # prometheus_client's global registry (its shutdown unregisters it again).
    accepted = inspect.signature(PrometheusMetricReader).parameters
    options = {"disable_target_info": True, "scope_info_enabled": False}
    options = {k: v for k, v in options.items() if k in accepted}
    oracle_registry = CollectorRegistry() if "registry" in accepted else REGISTRY
    if "registry" in accepted:
        options["registry"] = oracle_registry
    theirs = scraped(PrometheusMetricReader(**options), oracle_registry)
    # The global registry's own collectors (process, platform, gc) are not the reader's.
    theirs = {name: family for name, family in theirs.items() if not name.startswith(("process_", "python_"))}
    assert ours == theirs
    assert set(ours) == {
        "http_server_requests",
        "jobs",
        "queue_depth_bytes",
        "latency_milliseconds",
        "speed_meters_per_second",
        "temperature_celsius",
        "d3_rendered",
        "ratio_percent",
        "load_per_second",
    }
    assert ours["http_server_requests"][0] == "counter"
    assert ours["queue_depth_bytes"][0] == "gauge"  # a cumulative up-down counter
    # Label sets differ between points: each is filled in with empty values.
    count = ("latency_milliseconds_count", [("codes", ""), ("n", "3"), ("route", "/b")], 1.0)
    assert count in ours["latency_milliseconds"][3]


def test_no_target_info_no_scope_labels_and_an_unused_reader_scrapes_empty() -> None:
    registry = CollectorRegistry(auto_describe=True)  # as set-up makes it: nothing collected yet
    reader = SdkReader(registry)
    assert generate_latest(registry) == b""  # not on a provider yet: nothing, and no error
    provider = MeterProvider(metric_readers=[reader])
    provider.get_meter("app", "2.0").create_counter("hits").add(1)
    text = generate_latest(registry).decode()
    assert text.endswith("hits_total 1.0\n")
    assert "target_info" not in text
    assert "otel_scope" not in text
    provider.shutdown()
    assert generate_latest(registry) == b""  # shut down: out of the registry
    reader.shutdown()  # twice is harmless


def test_the_sdks_metrics_about_itself_are_left_out_as_from_1_42() -> None:
    """SDK 1.40 and 1.41 count every span they start (otel.sdk.span.*) on the meter provider,
    unasked; from 1.42 only with OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED=true."""
    registry = CollectorRegistry()
    provider = MeterProvider(metric_readers=[SdkReader(registry)])
    provider.get_meter("app").create_counter("hits").add(1)
    with TracerProvider(meter_provider=provider).get_tracer("t").start_as_current_span("x"):
        pass
    text = generate_latest(registry).decode()
    assert "hits_total 1.0" in text
    assert "otel_sdk" not in text
    provider.shutdown()


def test_names_and_units_as_the_specification_maps_them() -> None:
    assert metric_name("3http.server-duration") == "_http_server_duration"
    assert metric_name("a:b") == "a:b"
    assert label_name("a:b.c") == "a_b_c"
    assert unit_suffix("s") == "seconds"
    assert unit_suffix("{packet}") == ""
    assert unit_suffix("By/s") == "bytes_per_second"
    assert unit_suffix("/min") == "per_min"  # no numerator; "min" has no "per" name
    assert unit_suffix("{x}/h") == "per_hour"
    assert unit_suffix("_weird unit_") == "weird_unit"


EXEMPLAR_LINE = re.compile(
    # prometheus_client's OpenMetrics writer sorts the labels, le among them (so does the core).
    r'^latency_seconds_bucket\{le="0\.1",method="GET",path="/x"\} \d\.0 '
    r'# \{trace_id="([0-9a-f]{32})",span_id="([0-9a-f]{16})"\} 0\.0421 (\d+\.\d{3})$',
    re.MULTILINE,
)


def openmetrics_text(registry: CollectorRegistry) -> str:
    return Scrape(registry, direct=lambda: ()).render(openmetrics_format=True)[0].decode()


def test_histogram_exemplars_on_the_openmetrics_buckets_only() -> None:
    """Issue 24 point 2 on the SDK path: the latest exemplar of each bucket, the span it was
    recorded in, in the form both paths write; none in the Prometheus text format."""
    registry = CollectorRegistry()
    provider = MeterProvider(metric_readers=[SdkReader(registry)])
    histogram = provider.get_meter("app").create_histogram(
        "latency", "s", explicit_bucket_boundaries_advisory=[0.01, 0.1, 1.0]
    )
    tracer = TracerProvider().get_tracer("test")
    labels = {"path": "/x", "method": "GET"}
    before = time.time()
    with tracer.start_as_current_span("request") as span:
        histogram.record(0.0421, labels)
    text = openmetrics_text(registry)
    (trace_id, span_id, stamp), *more = EXEMPLAR_LINE.findall(text)
    assert not more
    assert (int(trace_id, 16), int(span_id, 16)) == (span.context.trace_id, span.context.span_id)
    assert before - 0.001 <= float(stamp) <= time.time()
    assert text.count(" # {") == 1  # the other buckets, the _count and the _sum have none
    # prometheus_client's OpenMetrics parser reads it back.
    family = next(f for f in openmetrics_families(text) if f.name == "latency_seconds")
    bucket = next(s for s in family.samples if s.labels.get("le") == "0.1")
    assert bucket.exemplar is not None
    assert bucket.exemplar.labels == {"trace_id": trace_id, "span_id": span_id}
    assert bucket.exemplar.value == 0.0421
    assert " # " not in generate_latest(registry).decode()  # the Prometheus text: none

    # Kept while nothing newer falls in the bucket; the newest replaces it.
    assert EXEMPLAR_LINE.findall(openmetrics_text(registry))[0][:2] == (trace_id, span_id)
    with tracer.start_as_current_span("later") as later:
        histogram.record(0.0421, labels)
    assert EXEMPLAR_LINE.findall(openmetrics_text(registry))[0][1] == f"{later.context.span_id:016x}"
    # A measurement outside a sampled span leaves none behind.
    unsampled = TracerProvider(sampler=ALWAYS_OFF).get_tracer("test")
    with unsampled.start_as_current_span("dropped"):
        histogram.record(5.0, labels)
    histogram.record(0.005, labels)
    assert openmetrics_text(registry).count(" # {") == 1
    provider.shutdown()


def test_trace_id_first_touches_exemplars_only() -> None:
    ids = 'span_id="00f067aa0ba902b7",trace_id="4bf92f3577b34da6a3ce929d0e0e4736"'
    body = (
        '# HELP x_seconds Help with # {span_id=\\"00f067aa0ba902b7\\",trace_id=\\"x\\"}\n'
        'x_seconds_bucket{le="1.0",path="# {span_id=\\"1\\"}"} 1.0 # {' + ids + "} 0.5 12.345\n"
    ).encode()
    assert trace_id_first(body) == body.replace(
        ids.encode(), b'trace_id="4bf92f3577b34da6a3ce929d0e0e4736",span_id="00f067aa0ba902b7"'
    )
    assert trace_id_first(b"x 1.0\n") == b"x 1.0\n"


def test_an_apps_exemplars_name_exported_spans(tmp_path: Path, services: Services) -> None:
    """The SDK path under opentelemetry-instrument: each exemplar of the scrape names a span the
    app exported (the request's server span: the client calls' durations are recorded in it)."""
    with OtlpReceiver() as receiver:
        port = free_port()
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint,
            "SERVICE_NAME": "cf-kanban-exemplars",
            "CFK_OTEL_NATIVE": "false",
            "DATABASE_URL": services.database_url,
            "REDIS_URL": services.redis_url,
        }
        app = launch(tmp_path, uvicorn_command("core_app:app", port), env, port)
        try:
            for _ in range(3):
                assert app.get("/boards/7/work")[0] == 200  # one PostgreSQL query, one Redis call
            status, headers, body = app.get("/api/metrics", {"Accept": "application/openmetrics-text"})
            assert status == 200
            assert headers["content-type"].startswith("application/openmetrics-text")
            exemplars = {
                family.name: {
                    (s.exemplar.labels["trace_id"], s.exemplar.labels["span_id"])
                    for s in family.samples
                    if s.exemplar
                }
                for family in openmetrics_families(body.decode())
            }
            wanted = (
                "http_request_duration_seconds",
                "database_query_duration_seconds",
                "redis_operation_duration_seconds",
            )
            for name in wanted:
                assert exemplars[name], name
            shown = set().union(*(exemplars[name] for name in wanted))

            def exported() -> set[tuple[str, str]]:
                return {(s.trace_id, s.span_id) for s in receiver.iter_spans()}

            assert receiver.wait_for(lambda: shown <= exported()), (shown, exported())
            servers = {(s.trace_id, s.span_id) for s in receiver.iter_spans() if s.name.startswith("GET ")}
            assert exemplars["http_request_duration_seconds"] <= servers
            assert b" # {" not in app.get("/api/metrics")[2]  # the Prometheus text: none
        finally:
            app.terminate()


def test_the_sdk_paths_histograms_take_the_ids_they_are_given_and_no_others() -> None:
    """cfk_otel's histograms on the SDK path: the exemplar names the ids given (a request's
    span, which has left the context by then); without ids, none, even inside a sampled span
    (the native path's rule: only a trace known to be exported)."""
    from cfk_otel._metrics.catalogue import Metrics

    registry = CollectorRegistry()
    provider = MeterProvider(metric_readers=[SdkReader(registry)])
    m = Metrics(provider, native=False)
    with TracerProvider().get_tracer("t").start_as_current_span("ambient"):
        m.http_request_duration.record_by_key(("GET", "/x"), 0.0421)
    assert " # {" not in openmetrics_text(registry)
    m.http_request_duration.record_by_key(("GET", "/x"), 0.0421, 0xABC, 0xDEF)
    family = next(
        f for f in openmetrics_families(openmetrics_text(registry)) if f.name.startswith("http_request")
    )
    shown = [(s.labels["le"], s.exemplar.labels) for s in family.samples if s.exemplar]
    assert shown == [("0.05", {"trace_id": f"{0xABC:032x}", "span_id": f"{0xDEF:016x}"})]
    provider.shutdown()
