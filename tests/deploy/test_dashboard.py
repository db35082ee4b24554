"""docs/dashboards/cf-kanban.json: importable, and every query runs on real data.

The real app (tests/apps/metrics_app.py under opentelemetry-instrument, real PostgreSQL and
Redis) serves /api/metrics; the real collector runs its shipped redis receiver
(CFK_RECEIVERS=redis: Debian's redis_exporter on the real Redis, scraped by the collector); a
real Prometheus scrapes both with the jobs of
deploy/prometheus/prometheus.yml.
Every panel's query must parse, and return data unless it is listed in EXPECTED_EMPTY.
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from websockets.sync.client import connect

from tests.collector.conftest import (
    Collector,
    Prometheus,
    launch_prometheus,
    start_redis_exporter,
    stop_process,
    stop_prometheus,
)
from tests.conftest import Services, free_port, uvicorn_command
from tests.deploy.conftest import DASHBOARD, PROMETHEUS_DIR, load_yaml

pytestmark = pytest.mark.timeout(60)

# Panels whose metric the app does not export yet (the instrument to add is named in the
# panel's description). When one starts returning data, this test fails: move it out.
EXPECTED_EMPTY: dict[str, str] = {}
DOCUMENT_ROWS = {
    "Overview": {
        "Request Rate",
        "Error rate (%)",
        "Response time (p50, p95, p99)",
        "Response Time (p95)",
        "Active users",
    },
    "API Performance": {"Endpoint latency heatmap", "Slowest endpoints (p95)", "Errors by endpoint"},
    "WebSocket": {"Active connections", "Messages per second", "Connection duration (p50, p95)"},
    "Database": {"Query latency (p95)", "Connection pool usage", "Slow queries (> 1 s)"},
    "Redis": {"Operations per second", "Hit rate", "Memory"},
}


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def panels_by_row() -> dict[str, list[dict[str, Any]]]:
    rows: dict[str, list[dict[str, Any]]] = {}
    current = ""
    for panel in dashboard()["panels"]:
        if panel["type"] == "row":
            current = panel["title"]
            rows[current] = []
        else:
            rows[current].append(panel)
    return rows


def queries() -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for row in panels_by_row().values()
        for panel in row
        for target in panel["targets"]
    ]


def concrete(expr: str) -> str:
    """Grafana's variables as Grafana would fill them for this test's 1 s scrapes."""
    return expr.replace("$__rate_interval", "30s").replace("$job", "cf-kanban")


def test_importable_with_a_datasource_input() -> None:
    board = dashboard()
    assert board["__inputs"][0]["name"] == "DS_PROMETHEUS"
    assert board["__inputs"][0]["pluginId"] == "prometheus"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["job"]["current"]["value"] == "cf-kanban"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
            assert panel["targets"], panel["title"]
            assert all(t["datasource"]["uid"] == "${DS_PROMETHEUS}" for t in panel["targets"])
        x, w = panel["gridPos"]["x"], panel["gridPos"]["w"]
        assert x >= 0, panel["title"]
        assert x + w <= 24, panel["title"]


def test_the_documents_rows_and_panels() -> None:
    rows = panels_by_row()
    assert list(rows) == list(DOCUMENT_ROWS)
    for row, titles in DOCUMENT_ROWS.items():
        assert titles <= {p["title"] for p in rows[row]}, row
    assert set(EXPECTED_EMPTY) <= {title for title, _ in queries()}


def test_the_documents_example_panels_as_written() -> None:
    panels = {p["title"]: p for p in dashboard()["panels"]}
    [rate] = panels["Request Rate"]["targets"]
    assert rate["legendFormat"] == "{{method}} {{path}}"
    assert "rate(http_requests_total{" in rate["expr"]
    assert "by (method, path)" in rate["expr"]
    gauge = panels["Response Time (p95)"]
    assert gauge["type"] == "gauge"
    [p95] = gauge["targets"]
    assert p95["expr"].startswith("histogram_quantile(0.95, ")
    assert "rate(http_request_duration_seconds_bucket{" in p95["expr"]
    assert "[5m]" in p95["expr"]
    steps = gauge["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [(s["value"], s["color"]) for s in steps[1:]] == [(0.1, "green"), (0.5, "yellow"), (1, "red")]
    # The error rate is what errors_total counts (every source), per request.
    [errors] = panels["Error rate (%)"]["targets"]
    assert errors["expr"].startswith('100 * sum(rate(errors_total{job="$job"}')
    assert "http_requests_total" in errors["expr"]


# The latency panels, whose histograms carry exemplars (issue 24): Grafana shows them as
# points that open the trace. Not the gauge, the table or the slow-query count (its
# exemplars would be those of the fast buckets).
EXEMPLAR_PANELS = {"Response time (p50, p95, p99)", "Endpoint latency heatmap", "Query latency (p95)"}
WITH_EXEMPLARS = (
    "http_request_duration_seconds_bucket",
    "database_query_duration_seconds_bucket",
    "redis_operation_duration_seconds_bucket",
)


def test_the_latency_panels_show_exemplars() -> None:
    shown = set()
    for row in panels_by_row().values():
        for panel in row:
            for target in panel["targets"]:
                if target.get("exemplar"):
                    assert panel["type"] in ("timeseries", "heatmap"), panel["title"]
                    assert any(name in target["expr"] for name in WITH_EXEMPLARS), panel["title"]
                    shown.add(panel["title"])
                elif panel["title"] in EXEMPLAR_PANELS:
                    raise AssertionError(f"{panel['title']}: target {target['refId']} without exemplars")
    assert shown == EXEMPLAR_PANELS


def test_app_queries_read_one_job_only() -> None:
    """App metrics are filtered by $job: the collector path must never be added in."""
    app_metrics = (
        "http_",
        "websocket_",
        "database_",
        "redis_operation",
        "active_users",
        "process_",
        "errors_",
    )
    for title, expr in queries():
        for metric, matchers in re.findall(r"\b([a-z_]+)\{([^}]*)\}", expr):
            if metric.startswith(app_metrics):
                assert 'job="$job"' in matchers, (title, metric)


# --- real data ---------------------------------------------------------------------------


def start_prometheus(tmp_path: Path, app_target: str, collector_target: str) -> Prometheus:
    """Prometheus with deploy/prometheus/prometheus.yml's two jobs, pointed at loopback."""
    jobs = {job["job_name"]: job for job in load_yaml(PROMETHEUS_DIR / "prometheus.yml")["scrape_configs"]}
    scrape = []
    for name, target in (("cf-kanban", app_target), ("otel-collector", collector_target)):
        job = {k: v for k, v in jobs[name].items() if k != "dns_sd_configs"}
        job.update(scrape_interval="1s", static_configs=[{"targets": [target]}])
        scrape.append(job)
    config = yaml.safe_dump({"global": {"scrape_interval": "1s"}, "scrape_configs": scrape})
    return launch_prometheus(tmp_path, config)


@pytest.fixture
def redis_collector(collector_bin: Path, services: Services, tmp_path: Path) -> Iterator[int]:
    """The real collector with the shipped redis receiver (CFK_RECEIVERS=redis,
    collector/config/redis.yaml: a redis_exporter on the test Redis); yields its exporter port."""
    exporter_port, exporter = start_redis_exporter(services.redis_url, tmp_path / "redis-exporter.log")
    collector = Collector(collector_bin, tmp_path)
    try:
        collector.start(
            "prometheus",
            CFK_RECEIVERS="redis",
            REDIS_EXPORTER_ENDPOINT=f"127.0.0.1:{exporter_port}",
            CFK_RECEIVER_INTERVAL="1s",
        )
        yield collector.prometheus_port
    finally:
        collector.stop()
        stop_process(exporter)


def query(prometheus: Prometheus, expr: str) -> tuple[bool, list[dict[str, Any]] | str]:
    """(True, result) or (False, Prometheus's parse/execution error)."""
    url = f"http://127.0.0.1:{prometheus.port}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return True, list(json.loads(response.read())["data"]["result"])
    except urllib.error.HTTPError as exc:
        return False, exc.read().decode()


def traffic(app: Any, port: int) -> None:
    for i in range(5):
        assert app.get(f"/api/tickets/{i}")[0] == 200
    assert app.get("/api/fail")[0] == 500
    assert app.get("/api/unavailable")[0] == 503
    assert app.get("/api/db")[0] == 200
    assert app.get("/api/slow")[0] == 200
    assert app.get("/api/pool")[0] == 200
    for user in ("ann", "bob", "ann"):
        assert app.get("/api/me", {"X-User-Id": user})[0] == 200
    with connect(f"ws://127.0.0.1:{port}/ws/board") as ws:
        ws.send("ping")
        assert ws.recv() == "ping"


def test_every_panel_query_on_real_data(
    run_app: Any, services: Services, redis_collector: int, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        "DATABASE_URL": services.database_url,
        "REDIS_URL": services.redis_url,
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
    }
    app = run_app(uvicorn_command("metrics_app:app", port), env, port, wait_path="/api/metrics")
    prometheus = start_prometheus(tmp_path, f"127.0.0.1:{port}", f"127.0.0.1:{redis_collector}")
    try:
        wait_until(lambda: bool(query(prometheus, 'up{job="cf-kanban"} == 1')[1]), prometheus)
        traffic(app, port)
        time.sleep(2.5)  # a few 1 s scrapes: every series has samples before the next round
        traffic(app, port)
        time.sleep(2.5)

        pending = {title for title, _ in queries()} - set(EXPECTED_EMPTY)
        results: dict[str, list[dict[str, Any]]] = {}

        def all_pending_have_numbers() -> bool:
            for title, expr in queries():
                ok, result = query(prometheus, concrete(expr))
                assert ok, f"{title}: {expr}\n{result}"  # every query parses and runs
                assert isinstance(result, list)
                results[title] = result
            return not {t for t in pending if not numbers(results[t])}

        wait_until(
            all_pending_have_numbers,
            prometheus,
            why=lambda: (
                f"panels without data: {sorted(t for t in pending if not numbers(results.get(t, [])))}"
            ),
        )
        for title, reason in EXPECTED_EMPTY.items():
            assert results[title] == [], (
                f"{title} returns data now ({reason}?): remove it from EXPECTED_EMPTY"
            )
        # A few values that must be right, not merely present.
        [errors] = query(prometheus, concrete(queries_by_title()["Error rate (%)"]))[1]
        assert 0 < float(errors["value"][1]) < 100
        [redis_memory] = query(prometheus, "max(redis_memory_used_bytes)")[1]
        assert float(redis_memory["value"][1]) > 0
        by_path = {
            r["metric"]["path"]
            for r in query(prometheus, concrete(queries_by_title()["Errors by endpoint"]))[1]  # type: ignore[union-attr]
        }
        assert by_path == {"/api/fail", "/api/unavailable"}
    finally:
        stop_prometheus(prometheus)


def numbers(result: list[dict[str, Any]]) -> list[float]:
    values = [float(r["value"][1]) for r in result]
    return [v for v in values if not math.isnan(v)]  # NaN (0/0: nothing in the window) is not data


def wait_until(predicate: Any, prometheus: Prometheus, timeout: float = 20, why: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, why() if why else prometheus.log_path.read_text()[-2000:]
        time.sleep(0.5)


def queries_by_title() -> dict[str, str]:
    return {title: expr for title, expr in reversed(queries())}
