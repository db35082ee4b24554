"""Server metrics the collector collects itself (CFK_RECEIVERS), end to end: the real Redis
and PostgreSQL behind Debian's redis_exporter / postgres_exporter, the real collector started
by collector/run with the shipped redis.yaml / postgresql.yaml, and a real Prometheus scraping
it with deploy/prometheus/prometheus.yml's otel-collector job. The outage halves run the alert
rules' own expressions on real data."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import yaml

from tests.collector.conftest import Collector, Prometheus, start_redis_exporter, stop_process
from tests.conftest import ROOT, Services, free_port, unavailable

pytestmark = pytest.mark.timeout(90)

RULES = ROOT / "deploy" / "prometheus" / "alerting-rules.yml"
REDIS_SERIES = {  # what the dashboard's Redis row, RedisDown and the brief need
    "redis_up",
    "redis_memory_used_bytes",
    "redis_connected_clients",
    "redis_keyspace_hits_total",
    "redis_keyspace_misses_total",
    "redis_uptime_in_seconds",
}


def wait_for_value(
    prometheus: Prometheus, promql: str, accept: Callable[[float], bool], timeout: float = 20
) -> float:
    """Poll ``promql`` (one series) until ``accept(value)``; the last value in the failure."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        result = prometheus.query(promql)
        if len(result) == 1:
            value = float(result[0]["value"][1])
            if accept(value):
                return value
        time.sleep(0.5)
    raise AssertionError(f"{promql}: last value {value}\n{prometheus.log_path.read_text()[-1500:]}")


def alert_expr(name: str, **windows: str) -> str:
    """An alert's expression from deploy/prometheus/alerting-rules.yml, its range windows
    shortened (e.g. ``{"1m": "5s"}``) for a test that cannot wait minutes."""
    [expr] = [
        r["expr"]
        for g in yaml.safe_load(RULES.read_text())["groups"]
        for r in g["rules"]
        if r.get("alert") == name
    ]
    for old, new in windows.items():
        expr = expr.replace(f"[{old}]", f"[{new}]")
    return str(expr)


@pytest.fixture
def redis_exporter(services: Services, tmp_path: Path) -> Iterator[int]:
    """Debian's prometheus-redis-exporter on a free loopback port, against the test Redis."""
    port, process = start_redis_exporter(services.redis_url, tmp_path / "redis-exporter.log")
    yield port
    stop_process(process)


def test_redis_server_metrics_reach_prometheus(
    collector: Collector,
    services: Services,
    redis_exporter: int,
    start_prometheus: Callable[[str], Prometheus],
) -> None:
    collector.start(
        "prometheus",
        CFK_RECEIVERS="redis",
        REDIS_EXPORTER_ENDPOINT=f"127.0.0.1:{redis_exporter}",
        CFK_RECEIVER_INTERVAL="1s",
    )
    assert "cfk-redis-password" not in collector.output()
    prometheus = start_prometheus(f"127.0.0.1:{collector.prometheus_port}")
    where = f'job="otel-collector", exported_job="redis", exported_instance="127.0.0.1:{redis_exporter}"'

    assert wait_for_value(prometheus, f"redis_up{{{where}}}", lambda v: v == 1) == 1
    assert wait_for_value(prometheus, f"up{{{where}}}", lambda v: v == 1) == 1
    hits_before = wait_for_value(prometheus, f"redis_keyspace_hits_total{{{where}}}", lambda v: v >= 0)
    misses_before = wait_for_value(prometheus, f"redis_keyspace_misses_total{{{where}}}", lambda v: v >= 0)
    client = redis.Redis.from_url(services.redis_url)
    try:
        key = f"cfk-otel-test:{time.time_ns()}"
        client.set(key, "1", ex=60)
        for _ in range(5):
            assert client.get(key) == b"1"
        for i in range(3):
            assert client.get(f"{key}:missing:{i}") is None
        stats = client.info()
        # Other tests may share this Redis: what we did is a lower bound, INFO right after it
        # (which the exporter reads too) the value Prometheus must reach.
        hits = wait_for_value(
            prometheus, f"redis_keyspace_hits_total{{{where}}}", lambda v: v >= stats["keyspace_hits"]
        )
        misses = wait_for_value(
            prometheus, f"redis_keyspace_misses_total{{{where}}}", lambda v: v >= stats["keyspace_misses"]
        )
        assert hits - hits_before >= 5
        assert misses - misses_before >= 3
        # Our client and the exporter's own connection, at least.
        wait_for_value(prometheus, f"redis_connected_clients{{{where}}}", lambda v: v >= 2)
    finally:
        client.close()
    memory = wait_for_value(prometheus, f"redis_memory_used_bytes{{{where}}}", lambda v: v > 0)
    assert stats["used_memory"] / 4 < memory < stats["used_memory"] * 4
    uptime = wait_for_value(prometheus, f"redis_uptime_in_seconds{{{where}}}", lambda v: v > 0)
    assert abs(uptime - stats["uptime_in_seconds"]) < 30

    names = {r["metric"]["__name__"] for r in prometheus.query(f'{{{where}, __name__=~"redis_.*"}}')}
    assert names >= REDIS_SERIES, sorted(names)
    [series] = prometheus.query(f"redis_memory_used_bytes{{{where}}}")
    assert series["metric"]["deployment_environment_name"] == "production"  # CFK_DEFAULT_ENVIRONMENT


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of our own (the shared one must not be stopped): (REDIS_URL, process)."""
    binary = shutil.which("redis-server") or unavailable("redis-server is not installed")
    port, password = free_port(), "own-redis-pw"
    args = ["--bind", "127.0.0.1", "--port", str(port), "--requirepass", password]
    args += ["--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
    process = subprocess.Popen([str(binary), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert process.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "redis-server did not answer within 10 s"
            time.sleep(0.1)
    client.close()
    yield url, process
    process.kill()
    process.wait()


@pytest.mark.parametrize("failure", ["redis-stopped", "exporter-stopped"])
def test_redis_down_fires_the_alert_expression(
    collector: Collector,
    services: Services,  # `scripts/services start` installs the exporter when missing
    own_redis: tuple[str, subprocess.Popen[bytes]],
    start_prometheus: Callable[[str], Prometheus],
    tmp_path: Path,
    failure: str,
) -> None:
    url, server = own_redis
    port, exporter = start_redis_exporter(url, tmp_path / "redis-exporter.log")
    try:
        collector.start(
            "prometheus",
            CFK_RECEIVERS="redis",
            REDIS_EXPORTER_ENDPOINT=f"127.0.0.1:{port}",
            CFK_RECEIVER_INTERVAL="1s",
        )
        prometheus = start_prometheus(f"127.0.0.1:{collector.prometheus_port}")
        redis_down = alert_expr("RedisDown")
        where = f'exported_job="redis", exported_instance="127.0.0.1:{port}"'
        wait_for_value(prometheus, f"redis_up{{{where}}}", lambda v: v == 1)
        assert prometheus.query(redis_down) == []  # up

        stopped = server if failure == "redis-stopped" else exporter
        stopped.kill()  # redis_up 0 (the exporter's view), or up 0 (the collector's scrape)
        stopped.wait()
        deadline = time.monotonic() + 20
        while not (firing := prometheus.query(redis_down)):
            assert time.monotonic() < deadline, collector.output()[-2000:]
            time.sleep(0.5)
        assert [(f["metric"]["exported_job"], f["metric"]["exported_instance"]) for f in firing] == [
            ("redis", f"127.0.0.1:{port}")
        ], firing
        assert collector.health() == 200
    finally:
        stop_process(exporter)


@pytest.fixture
def postgres_exporter(services: Services, tmp_path: Path) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """Debian's prometheus-postgres-exporter on a free loopback port, against our PostgreSQL."""
    binary = shutil.which("prometheus-postgres-exporter") or unavailable(
        "prometheus-postgres-exporter is not installed (scripts/services install)"
    )
    port = free_port()
    log = (tmp_path / "postgres-exporter.log").open("wb")
    process = subprocess.Popen(
        [str(binary), f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        env={"DATA_SOURCE_NAME": f"{services.database_url}?sslmode=disable", "PATH": "/usr/bin:/bin"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    yield port, process
    process.kill()
    process.wait()
    log.close()


def test_postgresql_through_postgres_exporter_and_its_outage(
    collector: Collector,
    postgres_exporter: tuple[int, subprocess.Popen[bytes]],
    start_prometheus: Callable[[str], Prometheus],
) -> None:
    port, exporter = postgres_exporter
    collector.start(
        "prometheus",
        CFK_RECEIVERS="postgresql",
        POSTGRES_EXPORTER_ENDPOINT=f"127.0.0.1:{port}",
        CFK_RECEIVER_INTERVAL="1s",
    )
    prometheus = start_prometheus(f"127.0.0.1:{collector.prometheus_port}")
    where = f'job="otel-collector", exported_job="postgresql", exported_instance="127.0.0.1:{port}"'
    assert wait_for_value(prometheus, f"pg_up{{{where}}}", lambda v: v == 1) == 1
    assert wait_for_value(prometheus, f"up{{{where}}}", lambda v: v == 1) == 1
    # Real numbers from the server: our own database has at least the exporter's connection.
    backends = wait_for_value(
        prometheus, f'sum(pg_stat_database_numbackends{{{where}, datname="cfk"}})', lambda v: v >= 1
    )
    assert backends < 500
    database_down = alert_expr("DatabaseDown")
    assert prometheus.query(database_down) == []

    exporter.kill()  # the collector's scrape of the exporter now fails: its `up` says so
    exporter.wait()
    assert wait_for_value(prometheus, f"up{{{where}}}", lambda v: v == 0) == 0
    firing = prometheus.query(database_down)
    assert [f["metric"]["exported_job"] for f in firing] == ["postgresql"], firing
