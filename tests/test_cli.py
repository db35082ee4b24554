"""cfk_otel/_cli/main.py: ``cfk-otel doctor`` and ``cfk-otel env``."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest
import yaml

from cfk_otel._cli import live as _live
from cfk_otel._cli.main import doctor, main
from cfk_otel._settings import DECLARED, Variable, load, markdown_table
from cfk_otel.testing import OtlpReceiver
from tests.collector.conftest import launch_prometheus, stop_prometheus
from tests.conftest import BIN, Services, free_port, uvicorn_command
from tests.test_settings import SECRET, hostile_values

NO_EXPORT = {"OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none", "OTEL_LOGS_EXPORTER": "none"}


@pytest.fixture
def listening() -> Iterator[int]:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


def test_doctor_passes_with_a_live_endpoint(
    receiver: OtlpReceiver, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 19 point 7 changed this one: a port that merely accepts connections is not an
    OTLP endpoint any more; each signal sends an empty export request and must be answered."""
    assert doctor({"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint}) == 0
    out = capsys.readouterr().out
    for signal in ("traces", "metrics", "logs"):
        assert f"[ok]     OTLP {signal}: {receiver.http_endpoint}/v1/{signal}: accepted an empty" in out
    assert sorted(receiver.paths) == ["/v1/logs", "/v1/metrics", "/v1/traces"]
    assert receiver.spans == receiver.metrics == receiver.logs == []  # empty: nothing stored
    assert "no problems found" in out


def test_a_port_that_never_answers_is_no_otlp_endpoint(
    listening: int, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{listening}"}
    assert doctor(env, timeout=0.3) == 1
    out = capsys.readouterr().out
    assert f"  - OTLP traces, metrics, logs: http://127.0.0.1:{listening}/v1/traces: does not answer (" in out


def test_doctor_lists_problems_and_masks_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://user:hunter2@127.0.0.1:{free_port()}",
        "SENTRY_DSN": "https://abcdef0123456789@o1.ingest.sentry.io/42",
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer sekrit-token",
        "LOG_LEVEL": "verbose",
        "CFK_OTEL_STRICT": "true",
    }
    assert doctor(env, timeout=0.5) == 1
    out = capsys.readouterr().out
    for secret in ("hunter2", "abcdef0123456789", "sekrit-token"):
        assert secret not in out
    assert "<set, hidden>" in out
    # Issue 19 point 7: the DSN's host is asked too (no network here, or nothing at o1...:443).
    assert "3 problem(s):" in out
    assert "  - Sentry: https://<redacted>@o1.ingest.sentry.io/42: " in out
    assert "LOG_LEVEL='verbose' is not valid (accepted: debug, info, warn, error, fatal)" in out
    assert "does not answer" in out


def test_doctor_skips_the_endpoint_when_nothing_is_exported(capsys: pytest.CaptureFixture[str]) -> None:
    env = {"OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none", "OTEL_LOGS_EXPORTER": "console"}
    assert doctor(env) == 0
    assert "OTLP endpoint" not in capsys.readouterr().out


def test_env_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["env"]) == 0
    assert capsys.readouterr().out.strip() == markdown_table()


def test_console_script_exit_code() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}", "PATH": str(BIN)}
    result = subprocess.run(
        [str(BIN / "cfk-otel"), "doctor", "--timeout", "0.5"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 problem(s)" in result.stdout
    assert sys.executable  # the script runs in this interpreter's environment


@pytest.mark.parametrize("var", DECLARED, ids=lambda v: v.name)
def test_doctor_never_shows_a_traceback_and_names_every_bad_value(
    var: Variable[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 20, point 4: every hostile value of every declared variable gives a report,
    never a traceback; a rejected value is a failed item naming its variable; no secret,
    no control character and no stray surrogate reaches the terminal."""
    values = hostile_values()
    for value in values:
        env = {var.name: value, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}
        if var.name == "OTEL_EXPORTER_OTLP_ENDPOINT":
            env[var.name] = value
        code = doctor(env, timeout=0.05)
        out = capsys.readouterr().out
        assert code in (0, 1)
        assert SECRET not in out, (var.name, value[:80])
        assert not any(c < " " and c != "\n" for c in out), (var.name, value[:80])
        out.encode("utf-8")  # printable as it is: no lone surrogate
        if any(p.variable == var.name for p in load(env).problems):
            assert code == 1
            assert f"  - {var.name}=" in out, (var.name, value[:80])
    print(f"FIGURES doctor-fuzz[{var.name}]: values={len(values)}")


def test_the_command_reports_a_bad_endpoint_without_a_traceback() -> None:
    env = {"PATH": "/usr/bin:/bin", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://u:{SECRET}@h:43x8"}
    command = [str(BIN / "cfk-otel"), "doctor", "--timeout", "0.2"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "  - OTEL_EXPORTER_OTLP_ENDPOINT=" in result.stdout
    assert SECRET not in result.stdout + result.stderr


# --- issue 19 point 7: the live checks --------------------------------------------------------


def live_lines(out: str) -> list[str]:
    return out.split("live checks", 1)[1].split("production checklist", 1)[0].strip().splitlines()[1:]


def password(url: str) -> str:
    secret = urlsplit(url).password
    assert secret
    return secret


@pytest.mark.integration
def test_doctor_connects_to_postgres_and_redis(
    services: Services, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {"DATABASE_URL": services.database_url, "REDIS_URL": services.redis_url, **NO_EXPORT}
    assert doctor(env, timeout=2) == 0
    out = capsys.readouterr().out
    assert "[ok]     PostgreSQL: postgresql://<redacted>@127.0.0.1:" in out
    assert "connected with asyncpg and ran SELECT 1 in" in out
    assert "[ok]     Redis: redis://<redacted>@127.0.0.1:" in out
    assert "connected with redis-py and PING answered in" in out
    assert "[ok]     Health endpoints working: live: PostgreSQL, Redis answered" in out
    for url in (services.database_url, services.redis_url):
        assert password(url) not in out


@pytest.mark.integration
def test_a_wrong_password_fails_without_showing_either(
    services: Services, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {
        "DATABASE_URL": services.database_url.replace(password(services.database_url), SECRET),
        "REDIS_URL": services.redis_url.replace(password(services.redis_url), SECRET),
        **NO_EXPORT,
    }
    assert doctor(env, timeout=2) == 1
    out = capsys.readouterr().out
    assert SECRET not in out
    assert password(services.database_url) not in out
    assert "  - PostgreSQL: postgresql://<redacted>@127.0.0.1:" in out
    assert "  - Redis: redis://<redacted>@127.0.0.1:" in out


def test_closed_ports_fail_and_name_what_was_tried(capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's case: DATABASE_URL at a closed port used to pass "Health endpoints working"."""
    pg, rd = free_port(), free_port()
    env = {
        "DATABASE_URL": f"postgresql://cfk:{SECRET}@127.0.0.1:{pg}/cfk",
        "REDIS_URL": f"redis://:{SECRET}@127.0.0.1:{rd}/0",
        **NO_EXPORT,
    }
    assert doctor(env, timeout=0.5) == 1
    out = capsys.readouterr().out
    assert f"  - PostgreSQL: postgresql://<redacted>@127.0.0.1:{pg}/cfk: connection refused" in out
    assert f"  - Redis: redis://<redacted>@127.0.0.1:{rd}/0: connection refused" in out
    assert "[fail]   Health endpoints working: live check failed: PostgreSQL" in out
    assert SECRET not in out


@pytest.mark.integration
def test_without_the_drivers_a_socket_check_says_so(
    services: Services, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(_live, "_installed", lambda module: False)
    env = {"DATABASE_URL": services.database_url, "REDIS_URL": services.redis_url, **NO_EXPORT}
    assert doctor(env, timeout=2) == 0
    out = capsys.readouterr().out
    assert "accepts TCP connections (socket only: asyncpg is not installed" in out
    assert "answered PING (raw socket: redis is not installed)" in out  # AUTH, then PING
    wrong = {**env, "REDIS_URL": services.redis_url.replace(password(services.redis_url), SECRET)}
    assert doctor(wrong, timeout=2) == 1
    out = capsys.readouterr().out
    assert "refused the password (AUTH)" in out
    assert SECRET not in out


def test_otlp_grpc_and_headers(receiver: OtlpReceiver, capsys: pytest.CaptureFixture[str]) -> None:
    grpc_env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.grpc_endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    assert doctor(grpc_env) == 0
    out = capsys.readouterr().out
    assert "[ok]     OTLP logs: " + receiver.grpc_endpoint + ": accepted an empty logs export (gRPC)" in out
    receiver.grpc_status = grpc.StatusCode.UNAUTHENTICATED
    assert doctor(grpc_env) == 1
    assert "refused the export (gRPC UNAUTHENTICATED)" in capsys.readouterr().out


def test_otlp_per_signal_endpoint_and_required_header(capsys: pytest.CaptureFixture[str]) -> None:
    with OtlpReceiver(required_headers={"x-api-key": "k3y-" + SECRET}) as keyed:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": keyed.http_endpoint,
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": keyed.http_endpoint + "/custom/traces",
            "OTEL_METRICS_EXPORTER": "none",
        }
        assert doctor(env) == 1  # no key
        out = capsys.readouterr().out
        assert f"  - OTLP traces: {keyed.http_endpoint}/custom/traces: refused the export (HTTP " in out
        assert f"  - OTLP logs: {keyed.http_endpoint}/v1/logs: refused the export (HTTP 401)" in out
        assert "OTLP metrics" not in out
        env["OTEL_EXPORTER_OTLP_HEADERS"] = f"x-api-key=k3y-{SECRET}"
        env.pop("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        assert doctor(env) == 0
        out = capsys.readouterr().out
        assert SECRET not in out
        assert sorted(keyed.paths[-2:]) == ["/v1/logs", "/v1/traces"]


def test_sentry_host_is_connected_to_never_sent_an_event(
    listening: int, capsys: pytest.CaptureFixture[str]
) -> None:
    dsn = f"http://{SECRET}@127.0.0.1:{listening}/42"
    assert doctor({"SENTRY_DSN": dsn, **NO_EXPORT}, timeout=0.5) == 0
    out = capsys.readouterr().out
    assert (
        f"[ok]     Sentry: http://<redacted>@127.0.0.1:{listening}/42: 127.0.0.1:{listening} accepts TCP"
        in out
    )
    assert "[ok]     Sentry DSN configured: live: Sentry answered" in out
    # https: the TLS handshake must complete; a plain socket never answers it.
    assert doctor({"SENTRY_DSN": dsn.replace("http:", "https:"), **NO_EXPORT}, timeout=0.3) == 1
    out = capsys.readouterr().out
    assert f"  - Sentry: https://<redacted>@127.0.0.1:{listening}/42: timed out after 0.3s" in out
    closed = free_port()
    assert doctor({"SENTRY_DSN": f"https://{SECRET}@127.0.0.1:{closed}/1", **NO_EXPORT}) == 1
    out = capsys.readouterr().out
    assert (
        f"[fail]   Sentry DSN configured: live check failed: Sentry https://<redacted>@127.0.0.1:{closed}/1"
        in out
    )
    assert SECRET not in out


@pytest.mark.integration
def test_app_and_prometheus(
    run_app, services: Services, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A running app, and a real Prometheus scraping it as deploy/prometheus/prometheus.yml's
    job does; a second job scrapes a closed port."""
    port = free_port()
    app_env = {"DATABASE_URL": services.database_url, "REDIS_URL": services.redis_url, **NO_EXPORT}
    app = run_app(uvicorn_command("metrics_app:app", port), app_env, port, wait_path="/api/metrics")
    closed = free_port()
    jobs = [
        {"job_name": name, "metrics_path": "/api/metrics", "static_configs": [{"targets": targets}]}
        for name, targets in (("cf-kanban", [f"127.0.0.1:{port}"]), ("broken", [f"127.0.0.1:{closed}"]))
    ]
    config = yaml.safe_dump({"global": {"scrape_interval": "1s"}, "scrape_configs": jobs})
    prometheus = launch_prometheus(tmp_path, config)
    try:
        deadline = time.monotonic() + 20
        while len(prometheus.query("up")) < 2:
            assert time.monotonic() < deadline, prometheus.log_path.read_text()[-2000:]
            time.sleep(0.3)
        prom_url = f"http://127.0.0.1:{prometheus.port}"
        assert doctor(app_env, app_url=app.url, prometheus_url=prom_url) == 0
        out = capsys.readouterr().out
        lines = live_lines(out)
        assert f"[ok]     app metrics: {app.url}/api/metrics: HTTP 200, " in out
        for path in ("/api/health", "/api/health/live", "/api/health/ready"):
            assert f"[ok]     app health: {app.url}{path}: HTTP 200" in out
        assert f"[ok]     Prometheus: {prom_url}: 1 target(s) of job 'cf-kanban' up" in out
        assert len(lines) == 7, lines  # PostgreSQL, Redis, metrics, 3 health, Prometheus
        assert "[ok]     Prometheus scraping metrics: live: Prometheus answered" in out
        assert "[ok]     Metrics endpoint accessible: /api/metrics, no bearer token; live: app metrics" in out

        assert doctor(app_env, prometheus_url=prom_url, prometheus_job="broken") == 1
        out = capsys.readouterr().out
        assert (
            f"  - Prometheus: {prom_url}: 1 of 1 target(s) of job 'broken' not up; 127.0.0.1:{closed}: "
            in out
        )
        assert doctor(app_env, prometheus_url=prom_url, prometheus_job="nothing") == 1
        assert "no target of job 'nothing'" in capsys.readouterr().out
    finally:
        stop_prometheus(prometheus)

    # The same app, asked with a metrics path it does not serve, and a ready probe that fails.
    moved = {**app_env, "METRICS_PATH": "/prom"}
    assert doctor(moved, app_url=app.url) == 1
    assert f"  - app metrics: {app.url}/prom: HTTP 404" in capsys.readouterr().out


@pytest.mark.integration
def test_an_unready_app_fails_naming_its_failing_check(run_app, capsys: pytest.CaptureFixture[str]) -> None:
    port, closed = free_port(), free_port()
    app_env = {"DATABASE_URL": f"postgresql://cfk:{SECRET}@127.0.0.1:{closed}/cfk", **NO_EXPORT}
    app = run_app(uvicorn_command("metrics_app:app", port), app_env, port, wait_path="/api/metrics")
    assert doctor(NO_EXPORT, app_url=app.url) == 1
    out = capsys.readouterr().out
    assert f"  - app health: {app.url}/api/health/ready: HTTP 503, status 'unhealthy' (" in out
    assert "connection refused" in out
    assert f"[ok]     app health: {app.url}/api/health/live: HTTP 200" in out
    assert SECRET not in out


def test_the_command_takes_the_urls() -> None:
    closed = free_port()
    env = {"PATH": "/usr/bin:/bin", **NO_EXPORT}
    command = [str(BIN / "cfk-otel"), "doctor", "--timeout", "0.5", "--app-url", f"http://127.0.0.1:{closed}"]
    command += ["--prometheus-url", f"http://127.0.0.1:{closed}"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"  - app metrics: http://127.0.0.1:{closed}/api/metrics: connection refused" in result.stdout
    assert f"  - Prometheus: http://127.0.0.1:{closed}: connection refused" in result.stdout
