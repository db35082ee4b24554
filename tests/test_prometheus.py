"""cfk_otel/_prometheus.py: rendering, and summing a worker group's shares."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from cfk_otel._metrics import Metrics
from cfk_otel._prometheus import GROUP_ENV, Scrape, ScrapeReader, group_directory, reader_arguments


def registry_with_requests(count: int) -> tuple[CollectorRegistry, Metrics, MeterProvider]:
    registry = CollectorRegistry()
    provider = MeterProvider(metric_readers=[ScrapeReader(**reader_arguments(registry))])
    m = Metrics(provider)
    for _ in range(count):
        m.http_requests.inc({"method": "GET", "path": "/a", "status": "200"})
    m.websocket_connections.inc()
    return registry, m, provider


def samples(body: bytes) -> dict[str, float]:
    return {
        s.name + str(sorted(s.labels.items())): s.value
        for f in text_string_to_metric_families(body.decode())
        for s in f.samples
    }


def test_exact_names_no_scope_labels_no_target_info() -> None:
    registry, _, provider = registry_with_requests(2)
    body, content_type = Scrape(registry).render(openmetrics_format=False)
    text = body.decode()
    assert 'http_requests_total{method="GET",path="/a",status="200"} 2.0' in text
    assert "otel_scope" not in text
    assert "target_info" not in text
    assert content_type.startswith("text/plain")
    body, content_type = Scrape(registry).render(openmetrics_format=True)
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    provider.shutdown()


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_group_scrape_sums_workers_and_drops_dead_gauges(tmp_path: Path) -> None:
    registry, _, provider = registry_with_requests(3)
    other_registry, _, other_provider = registry_with_requests(4)
    directory = tmp_path / "group"
    directory.mkdir()
    other = Scrape(other_registry)
    # A live worker (our parent process stands in) and a worker that has exited.
    (directory / f"{os.getppid()}.prom").write_bytes(other.render(False)[0])
    (directory / f"{dead_pid()}.prom").write_bytes(other.render(False)[0])
    scrape = Scrape(registry, directory)
    merged = samples(scrape.render(False)[0])
    assert merged["http_requests_total[('method', 'GET'), ('path', '/a'), ('status', '200')]"] == 3 + 4 + 4
    assert merged["websocket_connections_active[]"] == 1 + 1  # the exited worker's gauge is gone
    scrape.stop()
    assert (directory / f"{os.getpid()}.prom").exists()  # its last numbers stay for the group
    provider.shutdown()
    other_provider.shutdown()


def test_group_membership(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(GROUP_ENV, f"{os.getpid()}-abcd")
    assert group_directory() is None  # the leader itself is not a worker
    monkeypatch.setenv(GROUP_ENV, f"{os.getppid()}-abcd")
    directory = group_directory()
    assert directory is not None
    assert directory.name == f"{os.getppid()}-abcd"
    monkeypatch.setenv(GROUP_ENV, "garbage")
    assert group_directory() is None
