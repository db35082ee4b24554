"""Malformed environment values on a running app (the parsing itself is tests/test_settings.py):
the app starts, serves and exports; stderr names each variable, its value and what is
accepted; with CFK_OTEL_STRICT=true it refuses to start, with status 78, naming them all."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from cfk_otel._settings import VARIABLES
from cfk_otel.testing import OtlpReceiver
from tests.conftest import APPS, RunningApp, free_port, uvicorn_command
from tests.failure.conftest import (
    RSS_BOUND_MIB,
    SHUTDOWN_BOUND_S,
    StartApp,
    app_rss,
    assert_served,
    figures,
    hammer,
    otlp_env,
)

pytestmark = pytest.mark.timeout(60)

ACCEPTED = {v.name: v.accepted for v in VARIABLES}
# Bad values of variables cfk_otel declares (the README's table).
BAD = {
    "CFK_OTEL_SHUTDOWN_TIMEOUT": "soon",
    "CFK_OTEL_DEFER_INIT": "sometimes",
    "OTEL_TRACES_SAMPLER_ARG": "2.5",
    "LOG_REQUESTS_SAMPLE_RATE": "lots",
    "HEALTH_CACHE_TTL": "-1",
    "HEALTH_CHECK_TIMEOUT": "0",
    "METRICS_PATH": "metrics",
    "OTEL_SDK_DISABLED": "maybe",
    "OTEL_TRACES_EXPORTER": "jaeger",
}


def named(stderr: str, name: str, value: str) -> list[str]:
    return [line for line in stderr.splitlines() if f"{name}={value!r}" in line]


def start_strict(values: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The app started with ``CFK_OTEL_STRICT=true`` and ``values``; it is expected to refuse."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "SENTRY_", "CFK_OTEL"))}
    env |= {"PYTHONPATH": str(APPS), "CFK_OTEL_STRICT": "true", **values}
    return subprocess.run(
        uvicorn_command("starlette_app:app", free_port()),
        env=env,
        cwd=APPS,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def serves_with_telemetry(app: RunningApp, receiver: OtlpReceiver, prefix: str) -> tuple[float, float]:
    """Load, /api/metrics, the health probes and spans; returns VmRSS before and after the load."""
    assert_served(hammer(app.port, [f"/api/tickets/{prefix}-warm-{i}" for i in range(100)]), lambda _: 200)
    before = app_rss(app)
    assert_served(hammer(app.port, [f"/api/tickets/{prefix}-{i}" for i in range(600)]), lambda _: 200)
    after = app_rss(app)
    assert app.get("/api/metrics")[0] == 200
    assert app.get("/api/health/live")[0] == 200
    receiver.wait_for_span(
        lambda s: str(s.attributes.get("url.path", "")).startswith(f"/api/tickets/{prefix}-")
    )
    return before, after


def test_bad_values_are_named_and_the_app_serves_with_defaults(
    run_app: StartApp, receiver: OtlpReceiver
) -> None:
    port = free_port()
    env = otlp_env(receiver.http_endpoint, "http/protobuf", OTEL_TRACES_SAMPLER="traceidratio", **BAD)
    app = run_app(uvicorn_command("starlette_app:app", port), env, port, separate_stderr=True)
    before, after = serves_with_telemetry(app, receiver, "defaults")
    exited_in = app.terminate()
    stderr = app.errors()
    figures("bad-environment", rss_before_mib=before, rss_after_mib=after, shutdown_s=exited_in)

    for name, value in BAD.items():
        lines = named(stderr, name, value)
        assert len(lines) == 1, f"{name}: {lines}\n{stderr}"
        assert f"(accepted: {ACCEPTED[name]})" in lines[0]
    assert after - before < RSS_BOUND_MIB
    assert exited_in < SHUTDOWN_BOUND_S


def test_strict_mode_refuses_to_start_naming_every_bad_value() -> None:
    started = time.monotonic()
    result = start_strict({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json", **BAD})
    figures("strict-mode", exit_status=result.returncode, exit_s=time.monotonic() - started)
    assert result.returncode == 78, result.stderr
    assert "refuses to start" in result.stderr
    for name, value in {**BAD, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}.items():
        assert len(named(result.stderr, name, value)) == 1, f"{name} not named:\n{result.stderr}"
        assert ACCEPTED[name] in result.stderr
    assert "Uvicorn running" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("OTEL_BSP_MAX_QUEUE_SIZE", "abc"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "0"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "-1"),
    ],
)
def test_bad_sdk_variable_leaves_the_app_and_its_telemetry_running(
    run_app: StartApp, receiver: OtlpReceiver, name: str, value: str
) -> None:
    # Variables the OpenTelemetry SDK reads itself (README: they "work as documented by
    # OpenTelemetry"); a bad one must not switch off everything cfk_otel does.
    port = free_port()
    env = otlp_env(receiver.http_endpoint, "http/protobuf", **{name: value})
    app = run_app(uvicorn_command("starlette_app:app", port), env, port, separate_stderr=True)
    assert app.get("/hello")[0] == 200
    stderr = app.errors()
    # The distro's own endpoints answer only while cfk_otel runs.
    assert app.get("/api/health/live")[0] == 200, f"cfk_otel is not running:\n{stderr[-2500:]}"
    assert name in stderr, stderr
    assert value in stderr, stderr
    before, after = serves_with_telemetry(app, receiver, "sdk")
    exited_in = app.terminate()
    figures(
        f"bad-sdk-variable[{name}={value}]", rss_before_mib=before, rss_after_mib=after, shutdown_s=exited_in
    )
    assert any('"route":"/api/tickets/{ticket_id}"' in line for line in app.output().splitlines())
    assert after - before < RSS_BOUND_MIB
    assert exited_in < SHUTDOWN_BOUND_S


# One of each kind of tests/test_settings.py's hostile values, on a real app (issue 20):
# brackets, bad ports, userinfo, control characters, bytes that are not UTF-8 (passed as
# os.environ holds them; subprocess writes them back as the raw bytes), a huge value
# (Linux caps one variable at 128 KiB, so 100 KB), a queue under the SDK's batch size.
SECRET = "S3CRET"
HOSTILE = {
    "DATABASE_URL": f"postgresql://u:{SECRET}@[::1/db",
    "REDIS_URL": f"redis://:{SECRET}@cache:6x79/0",
    "SENTRY_DSN": f"https://{SECRET}@[::1/42",
    "OTEL_EXPORTER_OTLP_HEADERS": f"authorization=Bearer {SECRET}\x1b[2J",
    "SERVICE_VERSION": "caf\udcc3",
    "K8S_POD_NAME": "pod\n2026-01-01 ERROR forged",
    "OTEL_RESOURCE_ATTRIBUTES": "team=" + "x" * 100_000,
    "HEALTH_LIVE_PATH": "/api/\x01live",
    "OTEL_BSP_MAX_QUEUE_SIZE": "100",
}


def test_hostile_values_are_named_and_the_app_serves_every_endpoint(
    run_app: StartApp, receiver: OtlpReceiver
) -> None:
    port = free_port()
    env = otlp_env(receiver.http_endpoint, "http/protobuf", **HOSTILE)
    app = run_app(uvicorn_command("starlette_app:app", port), env, port, separate_stderr=True)
    stderr = app.errors()
    for path in ("/hello", "/api/health/live", "/api/health/ready", "/api/health", "/api/metrics"):
        assert app.get(path)[0] == 200, f"{path}:\n{stderr[-2500:]}"
    before, after = serves_with_telemetry(app, receiver, "hostile")
    exited_in = app.terminate()
    figures("hostile-environment", rss_before_mib=before, rss_after_mib=after, shutdown_s=exited_in)

    stderr = app.errors()
    assert SECRET not in stderr
    for name in HOSTILE:
        lines = [line for line in stderr.splitlines() if line.startswith(f"cfk_otel: {name}=")]
        assert len(lines) == 1, f"{name}: {lines}\n{stderr[-2500:]}"
        assert len(lines[0]) < 400
    lines = [line for line in app.output().splitlines() if line.startswith("{")]
    assert any('"route":"/api/tickets/{ticket_id}"' in line for line in lines)  # the JSON log lines
    # The defaults are used: SERVICE_VERSION's and K8S_POD_NAME's values reach no line.
    assert all('"version":"unknown"' in line and "forged" not in line for line in lines)
    assert after - before < RSS_BOUND_MIB


def test_strict_mode_refuses_hostile_values_naming_each() -> None:
    result = start_strict(HOSTILE)
    assert result.returncode == 78, result.stderr[-2500:]
    assert SECRET not in result.stderr
    for name in HOSTILE:
        assert f"  - {name}=" in result.stderr, f"{name} not named:\n{result.stderr[-2500:]}"
