"""One scrape of /api/metrics with 10,000 counter series: ours vs the stock Prometheus exporter.

Ours: the ``MetricsEndpoint`` ASGI app over ``Scrape``: the ``cfk_prometheus`` reader's
registry (the SDK's instruments) and a ``prometheus_client`` collector reading cfk_otel's
dict-backed counters directly. Upstream:
``prometheus_client.make_asgi_app`` over a ``PrometheusMetricReader`` fed by SDK
counters, once with the exporter's defaults (``target_info`` and ``otel_scope_*``
labels on every series) and once with cfk_otel's reader options, which isolates the
cost of the counters' design from that of the extra labels.

The 10,000 series are ten families of 1,000 label sets each: cfk_otel caps a metric at
``MAX_SERIES`` (2,000) label sets, past which it folds new ones into an overflow series.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, make_asgi_app
from pytest_benchmark.fixture import BenchmarkFixture

from cfk_otel._asgi.middleware import ASGIApp
from cfk_otel._metrics.catalogue import MAX_SERIES, Metrics
from cfk_otel._metrics.scrape import MetricsEndpoint, Scrape

from .conftest import Exchange, cfk_meter_provider, describe

FAMILIES = 10
SERIES_PER_FAMILY = 1_000
LABELS = ("method", "path", "status")
METHODS = ("GET", "POST", "PUT", "DELETE")
SCRAPE_SCOPE: dict[str, Any] = {
    "type": "http",
    "method": "GET",
    "path": "/api/metrics",
    "query_string": b"",
    "headers": [(b"host", b"127.0.0.1:8000"), (b"accept", b"text/plain")],
}

assert SERIES_PER_FAMILY < MAX_SERIES


def family_name(index: int) -> str:
    return "http_requests_total" if index == 0 else f"http_requests_{index}_total"


def label_sets() -> Iterator[tuple[str, str, str]]:
    for n in range(SERIES_PER_FAMILY):
        yield METHODS[n % 4], f"/api/resource{n // 4}/{{id}}", ("200", "201", "404", "500")[n % 4]


def scrape(loop: asyncio.AbstractEventLoop, app: ASGIApp) -> bytes:
    exchange = Exchange()
    loop.run_until_complete(app(dict(SCRAPE_SCOPE), exchange.receive, exchange.send))
    assert exchange.status == 200
    return exchange.body


def series_count(body: bytes) -> int:
    return sum(1 for line in body.splitlines() if line.startswith(b"http_requests_"))


GROUP = "Scrape of /api/metrics, 10,000 series"


@pytest.mark.benchmark(group=GROUP)
def test_scrape_ours(
    benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, resource: Resource
) -> None:
    registry = CollectorRegistry(auto_describe=True)
    provider = cfk_meter_provider(resource, registry)
    metrics = Metrics(provider)
    counters = [metrics.http_requests] + [
        metrics.register_counter(family_name(i), "Requests", LABELS) for i in range(1, FAMILIES)
    ]
    for counter in counters:
        for key in label_sets():
            counter.add_by_key(key, 1.0)
    scrape_state = Scrape(registry, direct=metrics.direct)  # as _sdk keeps it in STATE.scrape
    endpoint = MetricsEndpoint(lambda: scrape_state)
    describe(
        benchmark, "ours", "MetricsEndpoint (Scrape: cfk_prometheus reader + our collector)", primary=True
    )
    body = benchmark(scrape, loop, endpoint)
    provider.shutdown()
    assert series_count(body) == FAMILIES * SERIES_PER_FAMILY


def upstream_app(resource: Resource, reader_options: dict[str, Any]) -> tuple[ASGIApp, MeterProvider]:
    registry = CollectorRegistry(auto_describe=True)
    provider = MeterProvider(
        metric_readers=[PrometheusMetricReader(**reader_options, registry=registry)], resource=resource
    )
    meter = provider.get_meter("bench")
    for i in range(FAMILIES):
        counter = meter.create_counter(family_name(i), description="Requests")
        for method, path, status in label_sets():
            counter.add(1, {"method": method, "path": path, "status": status})
    app: ASGIApp = make_asgi_app(registry)
    return app, provider


@pytest.mark.benchmark(group=GROUP)
def test_scrape_upstream(
    benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, resource: Resource
) -> None:
    app, provider = upstream_app(resource, {})
    describe(benchmark, "upstream", "make_asgi_app + PrometheusMetricReader (defaults)", primary=True)
    body = benchmark(scrape, loop, app)
    provider.shutdown()
    assert series_count(body) == FAMILIES * SERIES_PER_FAMILY


@pytest.mark.benchmark(group=GROUP)
def test_scrape_upstream_like_ours(
    benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, resource: Resource
) -> None:
    # The options that make its text ours: no target_info, no otel_scope_* labels.
    app, provider = upstream_app(resource, {"disable_target_info": True, "scope_info_enabled": False})
    describe(benchmark, "upstream", "make_asgi_app + PrometheusMetricReader (cfk_otel's reader options)")
    body = benchmark(scrape, loop, app)
    provider.shutdown()
    assert series_count(body) == FAMILIES * SERIES_PER_FAMILY
