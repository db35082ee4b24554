"""The health probes of an app with no health code, under ``opentelemetry-instrument uvicorn``."""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request
from typing import Any

import pytest

from cfk_otel.testing import OtlpReceiver, attributes
from tests.conftest import Services, free_port, uvicorn_command
from tests.integration.test_health import SilentListener, with_port

pytestmark = pytest.mark.timeout(180)

SECRETS = ("cfk-test-password", "cfk-redis-password")


def env_for(receiver: OtlpReceiver, **extra: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint,
        "SERVICE_NAME": "cf-kanban-health",
        **extra,
    }


def request_paths(receiver: OtlpReceiver) -> set[str]:
    """The ``path`` label of every ``http_requests_total`` point received."""
    paths: set[str] = set()
    for metric in list(receiver.metrics):
        if metric.name == "http_requests_total":
            paths.update(attributes(p.attributes).get("path", "") for p in metric.metric.sum.data_points)
    return paths


def head(url: str) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method="HEAD")
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, dict(response.headers), response.read()


def wait_for_output(app: Any, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in app.output():
        assert time.monotonic() < deadline, f"{text!r} not printed within {timeout}s:\n{app.output()}"
        assert app.process.poll() is None, app.output()
        time.sleep(0.02)


def assert_no_secret(*texts: str | bytes) -> None:
    for text in texts:
        blob = text.encode() if isinstance(text, str) else text
        for secret in SECRETS:
            assert secret.encode() not in blob


def test_zero_code_probes_are_served_and_leave_no_telemetry(
    run_app, receiver: OtlpReceiver, services: Services
) -> None:
    port = free_port()
    env = env_for(
        receiver, DATABASE_URL=services.database_url, REDIS_URL=services.redis_url, SERVICE_VERSION="1.0.0"
    )
    app = run_app(uvicorn_command("health_app:app", port), env, port)

    status, headers, body = app.get("/api/health")
    assert status == 200
    assert headers["content-type"] == "application/json"
    report = json.loads(body)
    assert (report["status"], report["version"]) == ("healthy", "1.0.0")
    assert [(c["name"], c["message"]) for c in report["checks"]] == [
        ("database", "PostgreSQL connection OK"),
        ("redis", "Redis connection OK"),
    ]
    assert set(report["checks"][1]["details"]) == {"memory", "clients"}
    ready, live = app.get("/api/health/ready"), app.get("/api/health/live")
    assert (ready[0], live[0], json.loads(live[2])["checks"]) == (200, 200, [])
    head_status, head_headers, head_body = head(app.url + "/api/health/ready")
    assert (head_status, head_body) == (200, b"")
    assert int(head_headers["content-length"]) == len(ready[2])
    mounted = json.loads(app.get("/internal/health/")[2])  # the same registry, mounted by the app
    assert [c["name"] for c in mounted["checks"]] == ["database", "redis"]
    for _ in range(3):
        app.get("/api/health")
    assert app.get("/hello")[0] == 200

    # Telemetry arrives for /hello; nothing for the probes or the checks' queries.
    receiver.wait_for_span(lambda s: s.name == "GET /hello")
    assert receiver.wait_for(lambda: "/hello" in request_paths(receiver))
    app.terminate()  # flushes everything that was recorded
    assert not [s.name for s in receiver.spans if s.attributes.get("url.path", "").startswith("/api/health")]
    assert not [s.name for s in receiver.spans if s.span.kind == s.span.SPAN_KIND_CLIENT]
    assert not [p for p in request_paths(receiver) if p.startswith("/api/health")]
    assert_no_secret(body, ready[2], app.output(), repr([s.span for s in receiver.spans]))


def test_health_telemetry_opt_in_traces_probes_and_their_queries(
    run_app, receiver: OtlpReceiver, services: Services
) -> None:
    port = free_port()
    env = env_for(receiver, DATABASE_URL=services.database_url, HEALTH_TELEMETRY="true")
    app = run_app(uvicorn_command("health_app:app", port), env, port)
    assert app.get("/api/health")[0] == 200

    server = receiver.wait_for_span(lambda s: s.name == "GET /api/health")
    assert server.attributes["http.route"] == "/api/health"
    assert receiver.wait_for(
        lambda: any(
            s.parent_span_id == server.span_id and s.name.startswith("SELECT") for s in receiver.spans
        )
    ), sorted(s.name for s in receiver.spans)
    assert receiver.wait_for(lambda: "/api/health" in request_paths(receiver))
    assert_no_secret(repr([s.span for s in receiver.spans]))


def test_paths_are_configurable_and_the_probes_can_be_switched_off(run_app, receiver: OtlpReceiver) -> None:
    port = free_port()
    env = env_for(receiver, HEALTH_PATH="/healthz", HEALTH_LIVE_PATH="/livez", HEALTH_READY_PATH="/readyz")
    app = run_app(uvicorn_command("health_app:app", port), env, port)
    assert [app.get(p)[0] for p in ("/healthz", "/livez", "/readyz", "/api/health")] == [200, 200, 200, 404]
    app.terminate()

    port = free_port()
    app = run_app(uvicorn_command("health_app:app", port), env_for(receiver, HEALTH_ENABLED="false"), port)
    assert app.get("/api/health")[0] == 404  # the app's own 404: nothing answered for it
    assert app.get("/internal/health/ready")[0] == 200  # an explicit mount still serves


def test_refused_and_hung_dependencies_answer_503_within_the_timeout(
    run_app, receiver: OtlpReceiver, services: Services
) -> None:
    listener = SilentListener()
    try:
        port = free_port()
        env = env_for(
            receiver,
            DATABASE_URL=with_port(services.database_url, free_port()),  # nothing listens
            REDIS_URL=with_port(services.redis_url, listener.port),  # accepts, never answers
            HEALTH_CHECK_TIMEOUT="1",
            HEALTH_CACHE_TTL="0",
        )
        app = run_app(uvicorn_command("health_app:app", port), env, port)
        started = time.monotonic()
        status, _, body = app.get("/api/health")
        elapsed = time.monotonic() - started
        assert status == 503
        assert elapsed < 1.0 + 0.5, elapsed
        report = json.loads(body)
        assert report["status"] == "unhealthy"
        assert {c["name"]: c["message"] for c in report["checks"]} == {
            "database": "connection refused",
            "redis": "timed out after 1.0s",
        }
        ready = app.get("/api/health/ready")
        live = app.get("/api/health/live")
        assert (ready[0], live[0]) == (503, 200)
        app.terminate()
        logs = repr([r.record for r in receiver.logs])
        assert_no_secret(body, ready[2], app.output(), logs)
    finally:
        listener.close()


def test_readiness_turns_503_on_sigterm_while_the_server_drains(run_app, receiver: OtlpReceiver) -> None:
    """uvicorn closes its listening socket at once on SIGTERM, so the probe that sees the
    503 is one already in flight: held by a check until the signal arrives."""
    port = free_port()
    env = env_for(receiver, HEALTH_APP_DRAIN_GATE="1", HEALTH_CHECK_TIMEOUT="15", HEALTH_CACHE_TTL="0")
    command = uvicorn_command("health_app:app", port, "--timeout-graceful-shutdown", "10")
    app = run_app(command, env, port)
    answers: dict[str, Any] = {}

    def fetch(name: str, path: str) -> None:
        try:
            answers[name] = app.get(path)
        except Exception as exc:
            answers[name] = exc

    probe = threading.Thread(target=fetch, args=("ready", "/api/health/ready"))
    probe.start()
    wait_for_output(app, "drain gate: waiting")
    work = threading.Thread(target=fetch, args=("slow", "/slow?seconds=0.5"))
    work.start()
    wait_for_output(app, "slow: started")
    assert app.get("/api/health/live")[0] == 200

    app.process.send_signal(signal.SIGTERM)
    probe.join(20)
    work.join(20)
    assert app.process.wait(15) is not None

    assert isinstance(answers["ready"], tuple), f"the in-flight probe got no answer: {answers['ready']!r}"
    status, _, body = answers["ready"]
    assert status == 503, body
    report = json.loads(body)
    assert report["status"] == "unhealthy"
    assert [(c["name"], c["status"], c["message"]) for c in report["checks"]] == [
        ("drain-gate", "healthy", "released by shutdown"),
        ("shutdown", "unhealthy", "shutting down; not accepting new traffic"),
    ]
    # The in-flight request was still served: the server was draining, not gone.
    assert answers["slow"][0] == 200
    assert answers["slow"][2] == b"slow done"
