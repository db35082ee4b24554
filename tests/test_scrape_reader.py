"""cfk_otel/_scrape_reader.py: our reader of the SDK's metrics for the scrape, held to the SDK's own
Prometheus reader (opentelemetry-exporter-prometheus, the test extra's oracle)."""

from __future__ import annotations

import inspect
from collections.abc import Iterable

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cfk_otel._scrape_reader import SdkReader, label_name, metric_name, unit_suffix


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
