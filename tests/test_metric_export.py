"""cfk_otel/_metrics/export.py: our metrics joining the SDK's OTLP push through its public exporter."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.metrics import Observation
from opentelemetry.sdk.metrics import Counter, Histogram, MeterProvider, ObservableCounter, UpDownCounter
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from prometheus_client.parser import text_string_to_metric_families

from cfk_otel import _settings
from cfk_otel._metrics.catalogue import Metrics
from cfk_otel._metrics.export import OtlpMetricExporter, in_place_of_otlp, preferred_temporality
from cfk_otel.testing import OtlpReceiver
from tests.conftest import Services, free_port, launch, uvicorn_command

DELTA = AggregationTemporality.DELTA
CUMULATIVE = AggregationTemporality.CUMULATIVE


class Capture(MetricExporter):
    def __init__(self) -> None:
        super().__init__()
        self.exports: list[MetricsData] = []

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        self.exports.append(metrics_data)
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        pass


class SdkCapture(OTLPMetricExporter):
    """The SDK's own OTLP exporter, its temporality read from the environment; nothing sent."""

    def __init__(self) -> None:
        super().__init__()
        self.exports: list[MetricsData] = []

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        self.exports.append(metrics_data)
        return MetricExportResult.SUCCESS


def temporalities(exporter: MetricExporter, exports: list[MetricsData]) -> dict[str, Any]:
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
    provider = MeterProvider(metric_readers=[reader])
    meter = provider.get_meter("app")
    meter.create_counter("c").add(1)
    meter.create_histogram("h").record(1)
    meter.create_up_down_counter("u").add(1)
    meter.create_observable_counter("o", callbacks=[lambda options: [Observation(1)]])
    reader.force_flush()
    provider.shutdown()
    return {
        m.name: m.data.aggregation_temporality
        for rm in exports[0].resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }


@pytest.mark.parametrize(
    ("preference", "counter", "histogram", "observable_counter"),
    [
        ("cumulative", CUMULATIVE, CUMULATIVE, CUMULATIVE),
        ("delta", DELTA, DELTA, DELTA),
        ("lowmemory", DELTA, DELTA, CUMULATIVE),
    ],
)
def test_temporality_follows_the_specifications_choices(
    monkeypatch: pytest.MonkeyPatch, preference: str, counter: Any, histogram: Any, observable_counter: Any
) -> None:
    chosen = preferred_temporality(preference)
    assert (chosen[Counter], chosen[Histogram], chosen[ObservableCounter]) == (
        counter,
        histogram,
        observable_counter,
    )
    assert chosen[UpDownCounter] is CUMULATIVE  # a level is never sent as differences
    # The SDK's own exporter, reading the same variable, exports the same temporalities.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", preference)
    sdk = SdkCapture()
    ours = Capture()
    expected = temporalities(sdk, sdk.exports)
    assert expected == {"c": counter, "h": histogram, "u": CUMULATIVE, "o": observable_counter}
    # No metrics of ours (the process's registry holds whatever earlier tests registered).
    exporter = OtlpMetricExporter(inner=ours, preference=preference, source=lambda: ())
    assert temporalities(exporter, ours.exports) == expected


def test_the_setting_names_the_variable_and_what_it_accepts() -> None:
    assert _settings.load({}).metrics_temporality == "cumulative"
    variable = "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE"
    assert _settings.load({variable: "Delta"}).metrics_temporality == "delta"
    with pytest.raises(_settings.ConfigurationError, match=f"{variable}.*cumulative, delta, lowmemory"):
        _settings.load({variable: "sometimes", "CFK_OTEL_STRICT": "true"})


def exported(capture: Capture, name: str) -> tuple[Any, list[Any]]:
    found = [
        (metric.data, list(metric.data.data_points), sm.scope.name)
        for rm in capture.exports[-1].resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
        if metric.name == name
    ]
    [(data, points, scope)] = found
    assert scope == "cfk_otel"
    return data, points


@pytest.fixture
def pushed() -> Iterator[tuple[Capture, Metrics, PeriodicExportingMetricReader]]:
    capture = Capture()
    found: list[Metrics] = []

    def ours() -> list[Any]:
        return found[0].direct()

    exporter = OtlpMetricExporter(inner=capture, preference="delta", source=ours)
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
    provider = MeterProvider(metric_readers=[reader])
    metrics = Metrics(provider)  # on the SDK path, its instruments are the provider's
    found.append(metrics)
    provider.get_meter("app").create_counter("app_jobs").add(2)  # the SDK's own, beside ours
    # As the registry's active_users on the global provider: the SDK hands over data on every
    # export (with none at all, its reader would not call the exporter).
    provider.get_meter("app").create_observable_gauge("level", callbacks=[lambda options: [Observation(1)]])
    yield capture, metrics, reader
    provider.shutdown()


def test_our_metrics_join_each_export_as_deltas(
    pushed: tuple[Capture, Metrics, PeriodicExportingMetricReader],
) -> None:
    capture, metrics, reader = pushed
    labels = {"method": "GET", "path": "/a", "status": "200"}
    metrics.http_requests.inc(labels)
    metrics.http_requests.inc(labels)
    metrics.http_request_duration.observe(0.2, {"method": "GET", "path": "/a"})
    metrics.websocket_connections.inc()
    reader.force_flush()
    data, [first] = exported(capture, "http_requests_total")
    assert (data.aggregation_temporality, data.is_monotonic, first.value) == (DELTA, True, 2)
    data, [point] = exported(capture, "http_request_duration_seconds")
    assert (data.aggregation_temporality, point.count, point.sum) == (DELTA, 1, 0.2)
    data, [point] = exported(capture, "websocket_connections_active")
    assert (data.aggregation_temporality, data.is_monotonic, point.value) == (CUMULATIVE, False, 1)
    _, points = exported(capture, "errors_total")
    assert points == []  # declared from the first export, without a made-up series
    app = [m for rm in capture.exports[-1].resource_metrics for sm in rm.scope_metrics for m in sm.metrics]
    assert "app_jobs" in {m.name for m in app}

    metrics.http_requests.inc(labels)
    reader.force_flush()
    _, [second] = exported(capture, "http_requests_total")
    assert second.value == 1  # only what happened since the last export
    assert second.start_time_unix_nano == first.time_unix_nano
    _, [level] = exported(capture, "websocket_connections_active")
    assert level.value == 1


def test_a_failing_read_of_ours_still_sends_the_sdks() -> None:
    capture = Capture()

    def broken() -> list[Any]:
        raise RuntimeError("boom")

    exporter = OtlpMetricExporter(inner=capture, source=broken)
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
    provider = MeterProvider(metric_readers=[reader])
    provider.get_meter("app").create_counter("app_jobs").add(1)
    reader.force_flush()
    names = {
        m.name for rm in capture.exports[-1].resource_metrics for sm in rm.scope_metrics for m in sm.metrics
    }
    assert names == {"app_jobs"}
    provider.shutdown()


def test_the_default_inner_exporter_is_the_sdks_for_the_protocol(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_PROTOCOL", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", raising=False)
    exporter = OtlpMetricExporter(preference="delta")
    assert isinstance(exporter._inner, OTLPMetricExporter)
    exporter.shutdown()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http/json")
    with pytest.raises(RuntimeError, match="http/json"):
        OtlpMetricExporter()


@pytest.mark.parametrize(
    ("value", "during", "names"),
    [
        ("otlp", "none", ["cfk_prometheus", "cfk_otlp"]),
        ("console,OTLP", "console", ["cfk_prometheus", "cfk_otlp"]),
        ("console", "console", ["cfk_prometheus"]),
        (None, None, ["cfk_prometheus"]),
    ],
)
def test_the_wrapper_takes_otlps_place_while_the_configurator_runs(
    monkeypatch: pytest.MonkeyPatch, value: str | None, during: str | None, names: list[str]
) -> None:
    if value is None:
        monkeypatch.delenv("OTEL_METRICS_EXPORTER", raising=False)
    else:
        monkeypatch.setenv("OTEL_METRICS_EXPORTER", value)
    arguments: dict[str, Any] = {"metric_exporter_names": ["cfk_prometheus"]}
    with in_place_of_otlp(arguments):
        assert os.environ.get("OTEL_METRICS_EXPORTER") == during
    assert arguments["metric_exporter_names"] == names
    assert os.environ.get("OTEL_METRICS_EXPORTER") == value  # put back


# --- The two paths, end to end: the SDK path is the oracle of the native one -----------------

# The document's request and client metrics, and one of each other kind.
COMPARED = {
    "http_requests_total",
    "http_request_duration_seconds",
    "database_query_duration_seconds",
    "redis_operation_duration_seconds",
    "websocket_connections_active",
    "errors_total",
    "active_agents_count",
    "ticket_transitions_total",
}


def _otlp_shape(metric: Any) -> tuple[Any, ...]:
    """What must not differ between the paths: not times, and of a duration its count alone."""
    kind = metric.WhichOneof("data")
    if kind is None:  # no data points: the SDK's encoder then sets no data kind at all
        return (metric.name, metric.description, metric.unit, None, None, None, [])
    data = getattr(metric, kind)
    points = []
    for p in data.data_points:
        labels = tuple(sorted((kv.key, kv.value.string_value) for kv in p.attributes))
        if kind == "histogram":
            points.append((labels, p.count, sum(p.bucket_counts), tuple(p.explicit_bounds)))
        else:
            points.append((labels, p.as_double or float(p.as_int)))
    monotonic = getattr(data, "is_monotonic", None)
    return (
        metric.name,
        metric.description,
        metric.unit,
        kind,
        data.aggregation_temporality,
        monotonic,
        sorted(points),
    )


def _scrape_shape(body: str) -> dict[str, Any]:
    shaped = {}
    for family in text_string_to_metric_families(body):
        if family.name.removesuffix("_total") not in {n.removesuffix("_total") for n in COMPARED}:
            continue
        samples = sorted(
            (s.name, tuple(sorted(s.labels.items())), s.value)
            for s in family.samples
            if not s.name.endswith("_sum") and not (s.name.endswith("_bucket") and s.labels["le"] != "+Inf")
        )
        shaped[family.name] = (family.type, family.documentation, family.unit, samples)
    return shaped


def _run_both(tmp_path: Any, services: Services, native: str) -> tuple[list[Any], dict[str, Any], str]:
    with OtlpReceiver() as receiver:
        port = free_port()
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint,
            "SERVICE_NAME": "cf-kanban-metrics",
            "CFK_OTEL_NATIVE": native,
            "DATABASE_URL": services.database_url,
            "REDIS_URL": services.redis_url,
        }
        app = launch(tmp_path, uvicorn_command("core_app:app", port), env, port)
        try:
            assert app.get("/boards/7/work")[0] == 200  # one PostgreSQL query, one Redis call
            assert app.get("/boom")[0] == 500
            assert app.get("/teapot")[0] == 418
            assert app.get("/no/such/path")[0] == 404
            status, _, body = app.get("/api/metrics")
            assert status == 200

            def latest() -> dict[str, Any]:
                last = {}
                for received in list(receiver.metrics):
                    if received.scope == "cfk_otel" and received.name in COMPARED:
                        last[received.name] = received.metric
                return last

            def requests_counted() -> float:
                metric = latest().get("http_requests_total")
                return sum(p.as_double for p in metric.sum.data_points) if metric is not None else 0.0

            assert receiver.wait_for(lambda: requests_counted() == 5 and len(latest()) == len(COMPARED))
            shapes = sorted(_otlp_shape(m) for m in latest().values())
        finally:
            app.terminate()
        return shapes, _scrape_shape(body.decode()), app.output()


def test_both_paths_export_and_scrape_the_same_metrics(tmp_path: Any, services: Services) -> None:
    native, native_scrape, native_out = _run_both(tmp_path, services, "true")
    sdk, sdk_scrape, sdk_out = _run_both(tmp_path, services, "false")
    assert "native core for log records, native core for metrics" in native_out
    assert "OpenTelemetry SDK (CFK_OTEL_NATIVE=false) for metrics" in sdk_out
    assert native == sdk
    assert native_scrape == sdk_scrape
    by_name = {shape[0]: shape for shape in native}
    # What the document asks for arrived: a PostgreSQL query and a Redis command were timed.
    assert by_name["database_query_duration_seconds"][-1][0][1] >= 1
    assert by_name["redis_operation_duration_seconds"][-1][0][1] >= 1
    assert by_name["errors_total"][-1]  # the 500 was counted
    assert by_name["active_agents_count"][-1] == []  # declared, no made-up series
    assert set(native_scrape) >= {"http_requests", "http_request_duration_seconds", "active_agents_count"}


def test_nothing_to_send_sends_nothing_and_the_sdks_own_metrics_only_when_asked() -> None:
    """SDK 1.40 and 1.41 record metrics about themselves unasked (scope "opentelemetry-sdk");
    the push leaves them out there, as the SDK does from 1.42. With nothing left, no request."""
    from opentelemetry.sdk.metrics.export import Metric, ResourceMetrics, ScopeMetrics, Sum
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from cfk_otel._metrics.reader import SDK_SELF

    capture = Capture()
    exporter = OtlpMetricExporter(inner=capture, source=lambda: ())
    own = Metric("otel.sdk.span.live", "", "{span}", Sum([], CUMULATIVE, False))
    scope = ScopeMetrics(InstrumentationScope("opentelemetry-sdk"), [own], "")
    data = MetricsData([ResourceMetrics(Resource.create(), [scope], "")])
    assert exporter.export(data) is MetricExportResult.SUCCESS
    assert len(capture.exports) == (0 if SDK_SELF else 1)
    assert exporter.export(MetricsData([])) is MetricExportResult.SUCCESS
    assert len(capture.exports) == (0 if SDK_SELF else 1)  # nothing at all: no request
