"""One histogram record and one counter increment: cfk_otel's metrics API vs the SDK's.

Both sides record into identical meter providers carrying the two readers cfk_otel
attaches (the scrape reader and the periodic OTLP reader): an SDK synchronous
instrument does its work once per reader, so the reader count is part of the price.
"""

from __future__ import annotations

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from pytest_benchmark.fixture import BenchmarkFixture

from cfk_otel._metrics.catalogue import DURATION_BUCKETS, Metrics

from .conftest import describe

LABELS = {"method": "GET", "path": "/boards/{board_id}"}
STATUS_LABELS = {**LABELS, "status": "200"}
SECONDS = 0.0123

HISTOGRAM = "Histogram record (http_request_duration_seconds)"


@pytest.mark.benchmark(group=HISTOGRAM)
def test_histogram_ours(benchmark: BenchmarkFixture, meter_provider: MeterProvider) -> None:
    histogram = Metrics(meter_provider).http_request_duration
    describe(benchmark, "ours", "Histogram.observe(value, labels)", primary=True)
    benchmark(histogram.observe, SECONDS, LABELS)
    assert not histogram._warned  # the labels were the documented ones: no misuse logged


@pytest.mark.benchmark(group=HISTOGRAM)
def test_histogram_upstream(benchmark: BenchmarkFixture, meter_provider: MeterProvider) -> None:
    histogram = meter_provider.get_meter("bench").create_histogram(
        "http_request_duration_seconds", unit="s", explicit_bucket_boundaries_advisory=DURATION_BUCKETS
    )
    describe(benchmark, "upstream", "SDK Histogram.record(value, attributes)", primary=True)
    benchmark(histogram.record, SECONDS, LABELS)


COUNTER = "Counter increment (http_requests_total)"


@pytest.mark.benchmark(group=COUNTER)
def test_counter_ours(benchmark: BenchmarkFixture, meter_provider: MeterProvider) -> None:
    counter = Metrics(meter_provider).http_requests
    describe(benchmark, "ours", "Counter.inc(labels)", primary=True)
    benchmark(counter.inc, STATUS_LABELS)
    assert not counter._warned  # no misuse was logged


@pytest.mark.benchmark(group=COUNTER)
def test_counter_ours_by_key(benchmark: BenchmarkFixture, meter_provider: MeterProvider) -> None:
    counter = Metrics(meter_provider).http_requests
    describe(benchmark, "ours", "Counter.add_by_key(key, 1) (the middleware's path)")
    benchmark(counter.add_by_key, ("GET", "/boards/{board_id}", "200"), 1.0)


@pytest.mark.benchmark(group=COUNTER)
def test_counter_upstream(benchmark: BenchmarkFixture, meter_provider: MeterProvider) -> None:
    counter = meter_provider.get_meter("bench").create_counter("http_requests_total")
    describe(benchmark, "upstream", "SDK Counter.add(1, attributes)", primary=True)
    benchmark(counter.add, 1, STATUS_LABELS)
