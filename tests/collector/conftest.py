"""The real otelcol-cfk, launched through collector/run, with stand-ins for the backends."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from cfk_otel.testing import OtlpReceiver
from tests.conftest import IN_CI, ROOT, free_port, unavailable

COLLECTOR = ROOT / "collector"
RUN = COLLECTOR / "run"
DEPLOY_PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
# Variables a developer's shell may hold that would leak into the launched collector.
_LEAKY = ("CFK_", "SENTRY_", "DD_", "LOKI_", "CLOUDWATCH_", "OTEL_", "REDIS_", "POSTGRES_EXPORTER_")


@pytest.fixture(scope="session")
def collector_bin() -> Path:
    """collector/build.sh: reuses the cached build (well under a second) or builds it.

    A missing collector fails the run in CI (CI=true) and skips elsewhere.
    """
    explicit = os.environ.get("CFK_COLLECTOR_BIN")
    if explicit:
        return Path(explicit)
    try:
        out = subprocess.run(
            [str(COLLECTOR / "build.sh")], capture_output=True, text=True, timeout=3000, check=True
        )
    except subprocess.CalledProcessError as exc:
        message = f"collector/build.sh failed:\n{exc.stderr[-3000:]}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    except (subprocess.TimeoutExpired, OSError) as exc:
        unavailable(f"collector/build.sh did not finish: {exc}")
    path = Path(out.stdout.strip().splitlines()[-1])
    assert os.access(path, os.X_OK), path
    return path


def clean_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LEAKY)}
    env.update(values)
    return env


def run_launcher(
    collector_bin: Path, *args: str, timeout: float = 30, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(RUN), *args],
        env=clean_env(CFK_COLLECTOR_BIN=str(collector_bin), **env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@dataclass
class Collector:
    """One collector process started by collector/run; ports fixed at creation, so a
    relaunch (another CFK_BACKENDS) listens where the app already sends."""

    bin: Path
    tmp: Path
    grpc_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    health_port: int = field(default_factory=free_port)
    prometheus_port: int = field(default_factory=free_port)
    process: subprocess.Popen[str] | None = None
    runs: int = 0

    @property
    def storage(self) -> Path:
        return self.tmp / "collector-storage"

    @property
    def grpc_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.tmp / f"collector-{self.runs}.log"

    def start(self, backends: str, **env: str) -> Collector:
        assert self.process is None or self.process.poll() is not None, "already running"
        self.runs += 1
        full = clean_env(
            CFK_COLLECTOR_BIN=str(self.bin),
            CFK_BACKENDS=backends,
            CFK_OTLP_GRPC_ENDPOINT=f"127.0.0.1:{self.grpc_port}",
            CFK_OTLP_HTTP_ENDPOINT=f"127.0.0.1:{self.http_port}",
            CFK_HEALTH_CHECK_ENDPOINT=f"127.0.0.1:{self.health_port}",
            CFK_PROMETHEUS_ENDPOINT=f"127.0.0.1:{self.prometheus_port}",
            CFK_STORAGE_DIR=str(self.storage),
            CFK_BATCH_TIMEOUT="200ms",
            CFK_RETRY_INITIAL_INTERVAL="200ms",
            CFK_RETRY_MAX_INTERVAL="1s",
            **env,
        )
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                [str(RUN)], env=full, stdout=log, stderr=subprocess.STDOUT, text=True
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"collector exited with {self.process.returncode}:\n{self.output()}")
            if self.health() == 200:
                return self
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"collector not healthy within 20 s:\n{self.output()}")

    def health(self) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/", timeout=2) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:
            return 0

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM (a graceful shutdown flushes the batch processor into the queues)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"collector ignored SIGTERM for {timeout}s:\n{self.output()}") from None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def scrape(self) -> str:
        url = f"http://127.0.0.1:{self.prometheus_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())


@pytest.fixture
def collector(collector_bin: Path, tmp_path: Path) -> Iterator[Collector]:
    c = Collector(collector_bin, tmp_path)
    yield c
    if c.process is not None and c.process.poll() is None:
        c.process.kill()
        c.process.wait()


@pytest.fixture
def otlp_backend() -> Iterator[OtlpReceiver]:
    """cfk_otel's OtlpReceiver as a stand-in for an OTLP backend (Loki, Datadog Agent, ...)."""
    with OtlpReceiver() as r:
        yield r


# --- Sentry's OTLP intake ----------------------------------------------------------------


class SentryOtlp(OtlpReceiver):
    """Sentry's OTLP intake on 127.0.0.1: /api/<project>/integration/otlp/v1/{traces,logs}.

    Requests without ``x-sentry-auth: sentry sentry_key=<key>`` get 401, as from Sentry.
    """

    def __init__(self, project_id: int = 42, key: str = "f00dfeedf00dfeedf00dfeedf00dfeed") -> None:
        super().__init__(
            path_prefix=f"/api/{project_id}/integration/otlp",
            required_headers={"x-sentry-auth": f"sentry sentry_key={key}"},
        )
        self.project_id = project_id
        self.key = key

    @property
    def dsn(self) -> str:
        return f"http://{self.key}@127.0.0.1:{self.http_port}/{self.project_id}"

    def span_paths(self) -> list[str]:
        return [str(s.attributes.get("url.path")) for s in list(self.spans)]


@pytest.fixture
def sentry() -> Iterator[SentryOtlp]:
    with SentryOtlp() as s:
        yield s


# --- a real Prometheus ---------------------------------------------------------------------


def prometheus_binary() -> str:
    """Debian's prometheus (2.42); installed with apt-get when missing and we are root."""
    found = shutil.which("prometheus")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in (
            ["apt-get", "update", "-q"],
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", "prometheus"],
        ):
            subprocess.run(cmd, env=env, capture_output=True, timeout=600, check=False)
        found = shutil.which("prometheus")
        if found:
            return found
    unavailable("prometheus is not installed (apt-get install prometheus)")
    raise AssertionError("unreachable")


@dataclass
class Prometheus:
    process: subprocess.Popen[str]
    port: int
    log_path: Path

    def query(self, promql: str) -> list[dict[str, Any]]:
        import json
        from urllib.parse import urlencode

        url = f"http://127.0.0.1:{self.port}/api/v1/query?{urlencode({'query': promql})}"
        with urllib.request.urlopen(url, timeout=5) as response:
            data = json.loads(response.read())
        assert data["status"] == "success", data
        return list(data["data"]["result"])


def launch_prometheus(tmp_path: Path, config: str) -> Prometheus:
    """A real Prometheus on 127.0.0.1 with ``config`` (YAML text) and a tmp data dir, once ready."""
    port = free_port()
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(config)
    log_path = tmp_path / "prometheus.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                prometheus_binary(),
                f"--config.file={config_path}",
                f"--storage.tsdb.path={tmp_path / 'prometheus-data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    prom = Prometheus(process, port, log_path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, log_path.read_text()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=1) as r:
                if r.status == 200:
                    return prom
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError(f"prometheus not ready within 30 s:\n{log_path.read_text()}")


def stop_prometheus(prom: Prometheus) -> None:
    prom.process.terminate()
    try:
        prom.process.wait(10)
    except subprocess.TimeoutExpired:
        prom.process.kill()
        prom.process.wait()


def collector_scrape_config(target: str) -> str:
    """deploy/prometheus/prometheus.yml's ``otel-collector`` job (honor_labels: false and all)
    pointed at ``target`` on loopback, scraped every second: the tests see the labels
    production sees (job="otel-collector", exported_job = service.name)."""
    jobs = {j["job_name"]: j for j in yaml.safe_load(DEPLOY_PROMETHEUS.read_text())["scrape_configs"]}
    job = {k: v for k, v in jobs["otel-collector"].items() if k != "dns_sd_configs"}
    job.update(scrape_interval="1s", static_configs=[{"targets": [target]}])
    return yaml.safe_dump(
        {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "scrape_configs": [job]}
    )


@pytest.fixture
def start_prometheus(tmp_path: Path) -> Iterator[Callable[[str], Prometheus]]:
    """Start a Prometheus on 127.0.0.1 scraping the collector at ``target`` (tmp data dir)."""
    started: list[Prometheus] = []

    def start(target: str) -> Prometheus:
        prom = launch_prometheus(tmp_path, collector_scrape_config(target))
        started.append(prom)
        return prom

    yield start
    for prom in started:
        stop_prometheus(prom)
