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
_LEAKY = (
    "CFK_",
    "SENTRY_",
    "DD_",
    "LOKI_",
    "CLOUDWATCH_",
    "OTEL_",
    "REDIS_",
    "POSTGRES_EXPORTER_",
    "AWS_",
    "K8S_",
)


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


def launch_prometheus(tmp_path: Path, config: str, *flags: str) -> Prometheus:
    """A real Prometheus on 127.0.0.1 with ``config`` (YAML text) and a tmp data dir, once
    ready; ``flags`` are added to its command line (``--enable-feature=...``)."""
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
                *flags,
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


# --- Debian's prometheus-redis-exporter (the collector scrapes it: no redis receiver at 0.165)


def start_redis_exporter(redis_url: str, log_path: Path) -> tuple[int, subprocess.Popen[bytes]]:
    """redis_exporter on a free loopback port for ``redis_url`` (the password goes in its
    environment, REDIS_PASSWORD, never on the command line); (port, process) once it serves."""
    binary = shutil.which("prometheus-redis-exporter") or unavailable(
        "prometheus-redis-exporter is not installed (scripts/services install)"
    )
    from urllib.parse import urlsplit

    url = urlsplit(redis_url)
    port = free_port()
    env = {
        "PATH": "/usr/bin:/bin",
        "REDIS_ADDR": f"redis://{url.hostname}:{url.port or 6379}",
        "REDIS_PASSWORD": url.password or "",
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(binary), f"-web.listen-address=127.0.0.1:{port}"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 10
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1):
                return port, process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise AssertionError(f"redis_exporter did not serve:\n{log_path.read_text()}") from None
            time.sleep(0.1)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()


# --- AWS's OTLP endpoints (CloudWatch Logs, X-Ray, CloudWatch metrics), SigV4 checked ---------


@dataclass
class SigV4Check:
    """Verifies AWS Signature Version 4 on each request with botocore's signer: the signature
    is recomputed from the request (method, path, the headers it says it signed, the body as
    sent, its X-Amz-Date) with the test credentials, for the expected service and region."""

    access_key: str
    secret_key: str
    service: str
    region: str
    session_token: str | None = None
    seen: list[dict[str, str]] = field(default_factory=list)  # parsed Authorization, per request
    failures: list[str] = field(default_factory=list)

    def __call__(self, path: str, headers: dict[str, str], body: bytes) -> bool:
        reason = self.verify(path, headers, body)
        if reason:
            self.failures.append(reason)
        return not reason

    def verify(self, path: str, headers: dict[str, str], body: bytes) -> str:
        import hmac
        import re as re_

        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest, HTTPHeaders
        from botocore.credentials import Credentials

        match = re_.fullmatch(
            r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, "
            r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})",
            headers.get("authorization", ""),
        )
        if not match:
            return "no SigV4 Authorization header"
        key, day, region, service, signed, signature = match.groups()
        self.seen.append({"access_key": key, "region": region, "service": service, "signed": signed})
        amz_date = headers.get("x-amz-date", "")
        if key != self.access_key or region != self.region or service != self.service:
            return f"scope {key}/{region}/{service}, expected {self.access_key}/{self.region}/{self.service}"
        if not amz_date.startswith(day):
            return "X-Amz-Date does not match the credential scope"
        if self.session_token is not None and headers.get("x-amz-security-token") != self.session_token:
            return "session token missing"
        names = signed.split(";")
        if not {"host", "x-amz-date"} <= set(names) or any(n not in headers for n in names):
            return f"signed headers {names} incomplete"

        class Recompute(SigV4Auth):
            def headers_to_sign(self, request: Any) -> Any:
                chosen = HTTPHeaders()
                for name in names:  # exactly what the client says it signed
                    chosen[name] = request.headers[name]
                return chosen

        request = AWSRequest(method="POST", url=f"http://{headers['host']}{path}", data=body, headers=headers)
        request.context["timestamp"] = amz_date
        signer = Recompute(Credentials(self.access_key, self.secret_key, self.session_token), service, region)
        expected = signer.signature(
            signer.string_to_sign(request, signer.canonical_request(request)), request
        )
        return "" if hmac.compare_digest(expected, signature) else "signature mismatch"


AWS_TEST_KEY = "AKIDCFKOTELTEST00001"
AWS_TEST_SECRET = "cfk-otel-test-secret-0123456789abcdefghij"
AWS_TEST_TOKEN = "cfk-otel-test-session-token"


@dataclass
class CloudWatchStandIns:
    """One stand-in per AWS endpoint, as AWS has one host per service."""

    logs: OtlpReceiver
    traces: OtlpReceiver
    metrics: OtlpReceiver
    checks: dict[str, SigV4Check]

    def env(self, region: str = "eu-west-3", secret: str = AWS_TEST_SECRET, **extra: str) -> dict[str, str]:
        return {
            "AWS_REGION": region,
            "AWS_ACCESS_KEY_ID": AWS_TEST_KEY,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_SESSION_TOKEN": AWS_TEST_TOKEN,
            "AWS_EC2_METADATA_DISABLED": "true",  # nothing but the environment's credentials
            "AWS_CONFIG_FILE": "/nonexistent",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
            "CLOUDWATCH_LOGS_ENDPOINT": f"{self.logs.http_endpoint}/v1/logs",
            "CLOUDWATCH_TRACES_ENDPOINT": f"{self.traces.http_endpoint}/v1/traces",
            "CLOUDWATCH_METRICS_ENDPOINT": f"{self.metrics.http_endpoint}/v1/metrics",
            **extra,
        }


@pytest.fixture
def cloudwatch() -> Iterator[CloudWatchStandIns]:
    checks = {
        signal: SigV4Check(AWS_TEST_KEY, AWS_TEST_SECRET, service, "eu-west-3", AWS_TEST_TOKEN)
        for signal, service in (("logs", "logs"), ("traces", "xray"), ("metrics", "monitoring"))
    }
    receivers = {signal: OtlpReceiver(path_prefix="", authorize=check) for signal, check in checks.items()}
    for r in receivers.values():
        r.start()
    try:
        yield CloudWatchStandIns(receivers["logs"], receivers["traces"], receivers["metrics"], checks)
    finally:
        for r in receivers.values():
            r.stop()
