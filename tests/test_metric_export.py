"""cfk_otel/_metric_export.py: our metrics joining the SDK's OTLP push through its public exporter."""

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

from cfk_otel import _settings
from cfk_otel._metric_export import OtlpMetricExporter, in_place_of_otlp, preferred_temporality
from cfk_otel._metrics import Metrics

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
    assert temporalities(OtlpMetricExporter(inner=ours, preference=preference), ours.exports) == expected


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
    metrics = Metrics(MeterProvider())
    exporter = OtlpMetricExporter(inner=capture, preference="delta", source=metrics.direct)
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
    provider = MeterProvider(metric_readers=[reader])
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
