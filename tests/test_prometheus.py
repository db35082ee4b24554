"""cfk_otel/_metrics/scrape.py: rendering, and summing a worker group's shares."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.parser import text_string_to_metric_families

from cfk_otel._metrics.catalogue import Metrics
from cfk_otel._metrics.scrape import (
    GROUP_ENV,
    MetricsEndpoint,
    Scrape,
    ScrapeReader,
    group_directory,
    reader_arguments,
)


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
    registry, m, provider = registry_with_requests(2)
    body, content_type = Scrape(registry, direct=m.direct).render(openmetrics_format=False)
    text = body.decode()
    assert 'http_requests_total{method="GET",path="/a",status="200"} 2.0' in text
    assert "otel_scope" not in text
    assert "target_info" not in text
    assert content_type.startswith("text/plain")
    body, content_type = Scrape(registry, direct=m.direct).render(openmetrics_format=True)
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    provider.shutdown()


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_group_scrape_sums_workers_and_drops_dead_gauges(tmp_path: Path) -> None:
    registry, m, provider = registry_with_requests(3)
    other_registry, other_m, other_provider = registry_with_requests(4)
    directory = tmp_path / "group"
    directory.mkdir()
    other = Scrape(other_registry, direct=other_m.direct)
    # A live worker (our parent process stands in) and a worker that has exited.
    (directory / f"{os.getppid()}.prom").write_bytes(other.render(False)[0])
    (directory / f"{dead_pid()}.prom").write_bytes(other.render(False)[0])
    scrape = Scrape(registry, directory, m.direct)
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


def scrape_status(endpoint: MetricsEndpoint, headers: list[tuple[bytes, bytes]]) -> int:
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/api/metrics", "headers": headers}
    asyncio.run(endpoint(scope, receive, send))  # type: ignore[arg-type]
    status = sent[0]["status"]
    assert isinstance(status, int)
    return status


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([(b"authorization", b"Bearer s3cret")], 200),
        ([(b"authorization", b"bearer s3cret")], 200),  # RFC 7235: the scheme is case-insensitive
        ([(b"authorization", b"BEARER s3cret")], 200),
        ([(b"authorization", b"Bearer  s3cret")], 200),  # 1*SP between scheme and token
        ([(b"authorization", b"Bearer S3CRET")], 401),  # the token itself is not
        ([(b"authorization", b"Basic s3cret")], 401),
        ([(b"authorization", b"Bearers3cret")], 401),
        ([(b"authorization", b"s3cret")], 401),
        ([(b"authorization", b"Bearer ")], 401),
        ([], 401),
        # Two headers: refused whichever comes first, even when one of them is right.
        ([(b"authorization", b"Bearer s3cret"), (b"authorization", b"Bearer s3cret")], 401),
        ([(b"authorization", b"Bearer wrong"), (b"authorization", b"Bearer s3cret")], 401),
        ([(b"authorization", b"Bearer s3cret"), (b"authorization", b"Bearer wrong")], 401),
    ],
)
def test_bearer_token_check(headers: list[tuple[bytes, bytes]], status: int) -> None:
    registry, m, provider = registry_with_requests(1)
    endpoint = MetricsEndpoint(lambda: Scrape(registry, direct=m.direct), bearer_token="s3cret")
    assert scrape_status(endpoint, headers) == status
    assert (
        scrape_status(MetricsEndpoint(lambda: Scrape(registry, direct=m.direct)), headers) == 200
    )  # no token set
    provider.shutdown()


def test_the_first_scrape_shows_every_metric_as_prometheus_client_would() -> None:
    registry = CollectorRegistry()
    provider = MeterProvider(metric_readers=[ScrapeReader(**reader_arguments(registry))])
    m = Metrics(provider)
    m.register_counter("my_feature_usage", "Feature usage count", ["feature"])
    m.register_counter("jobs_done", "Jobs done")
    text = Scrape(registry, direct=m.direct).render(openmetrics_format=False)[0].decode()
    # Unlabelled: a sample at 0.
    assert "\nwebsocket_connections_active 0.0\n" in text
    assert "\njobs_done_total 0.0\n" in text
    # Labelled, never used: HELP and TYPE lines, no sample under made-up labels.
    for name, kind in (
        ("http_requests_total", "counter"),
        ("http_request_duration_seconds", "histogram"),
        ("database_query_duration_seconds", "histogram"),
        ("redis_operation_duration_seconds", "histogram"),
        ("active_agents_count", "gauge"),
        ("ticket_transitions_total", "counter"),
        ("errors_total", "counter"),
        ("my_feature_usage_total", "counter"),
    ):
        assert f"# TYPE {name} {kind}\n" in text, name
        assert f"# HELP {name} " in text, name
        assert f"\n{name}{{" not in text, name
        assert f"\n{name}_bucket{{" not in text, name
    # Once used, the family is the same one, with its sample (no second HELP/TYPE).
    m.errors.inc({"type": "ValueError", "severity": "error"})
    text = Scrape(registry, direct=m.direct).render(openmetrics_format=False)[0].decode()
    assert text.count("# TYPE errors_total counter") == 1
    assert 'errors_total{severity="error",type="ValueError"} 1.0' in text
    provider.shutdown()


def record_the_same(m: Metrics) -> None:
    """Every kind of metric, labels declared out of order, a help text with quotes."""
    for status in ("200", "500", "200"):
        m.http_requests.inc({"method": "GET", "path": '/a"b\\c', "status": status})
    for seconds in (0.0, 0.004, 0.1, 2.5, 11.0):
        m.http_request_duration.observe(seconds, {"method": "POST", "path": "/b"})
    m.database_query_duration.observe(0.0004, {"operation": "SELECT"})
    m.websocket_connections.inc()
    m.active_agents.set(3, {"type": "triage"})
    m.active_agents.finish({"type": "triage"})
    m.register_counter("jobs", 'Jobs "done"', ["zone", "kind"]).inc({"zone": "eu", "kind": "x"}, 2.5)
    m.register_gauge("depth", "Queue depth", ["queue"]).dec({"queue": "q"}, 1.5)
    m.register_histogram("export_seconds", "Export", ["format"], [0.1, 1]).observe(0.5, {"format": "csv"})


@pytest.mark.parametrize("openmetrics_format", [False, True])
@pytest.mark.parametrize("native_oracle", [True, False], ids=["collector", "sdk"])
def test_the_cores_scrape_text_equals_prometheus_clients(
    openmetrics_format: bool, native_oracle: bool
) -> None:
    """The core writes our metrics' text in one call (Metrics on the native path). The
    oracles: our collector's prometheus_client families over the same core families, and
    the SDK path (SDK instruments through the SDK's Prometheus reader)."""
    bodies = []
    for native in (True, False):
        registry = CollectorRegistry()
        provider = MeterProvider(metric_readers=[ScrapeReader(**reader_arguments(registry))])
        m = Metrics(provider, native=native or native_oracle)
        assert (m.http_requests.family is not None) is (native or native_oracle)
        record_the_same(m)
        if not native and native_oracle:  # the collector over the core's families
            scrape = Scrape(registry, direct=m.direct)
            body = scrape._registry  # the slow path: prometheus_client's own writer
            text = (
                openmetrics.generate_latest(body) if openmetrics_format else generate_latest(body)
            ).decode()
            bodies.append(
                "\n".join(x for x in text.split("\n") if not x.startswith("process_resident_memory"))
            )
            provider.shutdown()
            continue
        body = Scrape(registry, direct=m.direct).render(openmetrics_format)[0].decode()
        # The process's memory moves between the two scrapes; the rest must not.
        bodies.append("\n".join(x for x in body.split("\n") if not x.startswith("process_resident_memory")))
        provider.shutdown()
    fast, oracle = bodies
    assert "# TYPE active_agents_count gauge" in fast
    assert 'jobs_total{kind="x",zone="eu"} 2.5' in fast
    if native_oracle:
        assert fast == oracle
    else:  # the SDK reader's families come in another order; each is the same
        assert families(fast) == families(oracle)


def families(text: str) -> dict[str, tuple[object, ...]]:
    return {
        f.name: (
            f.type,
            f.documentation,
            f.unit,
            sorted((s.name, sorted(s.labels.items()), s.value) for s in f.samples),
        )
        for f in text_string_to_metric_families(text)
    }
