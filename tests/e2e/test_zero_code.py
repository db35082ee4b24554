"""``opentelemetry-instrument uvicorn app:app`` on apps that contain no telemetry code."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cfk_otel.testing import OtlpReceiver
from tests.conftest import APPS, BIN, Services, free_port, gunicorn_command, launch, uvicorn_command

pytestmark = pytest.mark.timeout(180)


def otlp_env(receiver: OtlpReceiver, protocol: str = "http/protobuf", **extra: str) -> dict[str, str]:
    endpoint = receiver.grpc_endpoint if protocol == "grpc" else receiver.http_endpoint
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "SERVICE_NAME": "cf-kanban-test",
        **extra,
    }


def websocket_echo(url: str, text: str) -> str:
    from websockets.sync.client import connect

    with connect(url) as ws:
        ws.send(text)
        return str(ws.recv())


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_starlette_spans_metrics_logs_and_resource(run_app, receiver: OtlpReceiver, protocol: str) -> None:
    port = free_port()
    env = otlp_env(
        receiver,
        protocol,
        SERVICE_VERSION="1.2.3",
        SERVICE_ENVIRONMENT="staging",
        K8S_POD_NAME="kanban-7d9",
        K8S_NAMESPACE_NAME="apps",
        K8S_NODE_NAME="node-1",
    )
    app = run_app(uvicorn_command("starlette_app:app", port), env, port)
    for path in (
        "/hello",
        "/api/tickets/7",
        "/api/v1/boards/1/cards/2",
        "/orgs/acme/cards/3",
        "/no/such/path",
    ):
        app.get(path)

    expected = {
        "GET /hello": "/hello",
        "GET /api/tickets/{ticket_id}": "/api/tickets/{ticket_id}",
        "GET /api/v1/boards/{board_id}/cards/{card_id}": "/api/v1/boards/{board_id}/cards/{card_id}",
        "GET /orgs/{org}/cards/{card_id}": "/orgs/{org}/cards/{card_id}",
    }
    for name, route in expected.items():
        span = receiver.wait_for_span(lambda s, n=name: s.name == n)
        assert span.attributes["http.route"] == route
        assert span.span.kind == span.span.SPAN_KIND_SERVER
    unmatched = receiver.wait_for_span(lambda s: s.attributes.get("url.path") == "/no/such/path")
    assert unmatched.name == "GET"
    assert "http.route" not in unmatched.attributes
    assert unmatched.attributes["http.response.status_code"] == 404

    ticket = receiver.wait_for_span(lambda s: s.name == "GET /api/tickets/{ticket_id}")
    assert ticket.attributes["url.path"] == "/api/tickets/7"
    assert ticket.attributes["http.request.method"] == "GET"
    assert ticket.attributes["http.response.status_code"] == 200
    resource = ticket.resource
    assert resource["service.name"] == "cf-kanban-test"
    assert resource["service.version"] == "1.2.3"
    assert resource["deployment.environment.name"] == "staging"
    assert resource["k8s.pod.name"] == "kanban-7d9"
    assert resource["k8s.namespace.name"] == "apps"
    assert resource["k8s.node.name"] == "node-1"
    assert len(resource["service.instance.id"]) == 36
    assert resource["host.name"]
    assert resource["process.pid"] == app.process.pid

    assert receiver.wait_for(
        lambda: {"http_requests_total", "http_request_duration_seconds"} <= {m.name for m in receiver.metrics}
    )
    # The app's own logging call arrives as an OTLP log record, correlated with its span.
    assert receiver.wait_for(lambda: any(r.body == "ticket 7 requested" for r in receiver.logs))
    record = next(r for r in receiver.logs if r.body == "ticket 7 requested")
    assert record.record.trace_id.hex() == ticket.trace_id
    assert record.record.span_id.hex() == ticket.span_id
    assert record.record.severity_text == "INFO"


def test_app_behaviour_is_unchanged(run_app, receiver: OtlpReceiver) -> None:
    port = free_port()
    app = run_app(uvicorn_command("starlette_app:app", port), otlp_env(receiver), port)

    status, headers, body = app.get("/hello")
    assert (status, headers["x-app"], body) == (200, "starlette", b"hello")
    request = urllib.request.Request(app.url + "/created", data=b"abcdef", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert (response.status, response.headers["x-len"], response.read()) == (201, "6", b"fedcba")
    assert app.get("/state")[2] == b'{"started":"yes"}'  # lifespan state reached the handler
    assert app.get("/boom")[0] == 500
    assert websocket_echo(f"ws://127.0.0.1:{port}/ws/echo", "ping") == "PING"

    error = receiver.wait_for_span(lambda s: s.name == "GET /boom")
    assert error.span.status.code == error.span.status.STATUS_CODE_ERROR
    assert error.attributes["error.type"] == "RuntimeError"
    assert error.attributes["http.response.status_code"] == 500
    assert [e.name for e in error.span.events] == ["exception"]
    ws = receiver.wait_for_span(lambda s: s.name == "WEBSOCKET /ws/echo")
    assert ws.attributes["http.response.status_code"] == 101
    app.terminate()
    assert "lifespan: shutdown" in app.output()


def test_fastapi_router_templates(run_app, receiver: OtlpReceiver) -> None:
    port = free_port()
    app = run_app(uvicorn_command("fastapi_app:app", port), otlp_env(receiver), port)
    assert app.get("/api/boards/3/cards/4")[0] == 200
    assert app.get("/api/tickets/missing")[0] == 404
    span = receiver.wait_for_span(lambda s: s.name == "GET /api/boards/{board_id}/cards/{card_id}")
    assert span.attributes["url.path"] == "/api/boards/3/cards/4"
    # A handler's own 404 keeps its route: the route matched.
    missing = receiver.wait_for_span(lambda s: s.name == "GET /api/tickets/{ticket_id}")
    assert missing.attributes["http.response.status_code"] == 404


def test_bare_asgi_callable(run_app, receiver: OtlpReceiver) -> None:
    port = free_port()
    app = run_app(uvicorn_command("bare_app:app", port), otlp_env(receiver), port)
    assert app.get("/anything/42")[2] == b"bare /anything/42"
    span = receiver.wait_for_span(lambda s: s.attributes.get("url.path") == "/anything/42")
    assert span.name == "GET"  # no router, no template: one fixed name


def test_asyncpg_and_redis_are_children_of_the_request(
    run_app, receiver: OtlpReceiver, services: Services
) -> None:
    port = free_port()
    env = otlp_env(receiver, DATABASE_URL=services.database_url, REDIS_URL=services.redis_url)
    app = run_app(uvicorn_command("starlette_app:app", port), env, port)
    status, _, body = app.get("/db")
    assert (status, json.loads(body)) == (200, {"db": 42, "redis": 42})

    server = receiver.wait_for_span(lambda s: s.name == "GET /db")

    def children() -> list[str]:
        return [s.name for s in receiver.spans if s.parent_span_id == server.span_id]

    assert receiver.wait_for(
        lambda: any(n.startswith("SELECT") for n in children()) and {"SET", "GET"} <= set(children())
    ), children()
    for span in receiver.spans:
        if span.parent_span_id == server.span_id:
            assert span.trace_id == server.trace_id
            assert span.span.kind == span.span.SPAN_KIND_CLIENT
    # The password in DATABASE_URL / REDIS_URL never reaches a span.
    dumped = repr([s.span for s in receiver.spans])
    assert "cfk-test-password" not in dumped
    assert "cfk-redis-password" not in dumped


def _instances_seen(app, receiver: OtlpReceiver, path: str) -> set[str]:
    """The instance ids of the workers that served ``path``, once two have or after 30 s of requests.

    The app answers as soon as its first worker listens; the second may still be importing, and
    spans arrive a batch delay after their request, so this keeps asking for a while rather than
    for a fixed count of requests.
    """

    def seen() -> set[str]:
        return {
            s.resource["service.instance.id"] for s in receiver.spans if s.attributes.get("url.path") == path
        }

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for _ in range(20):
            assert app.get(path)[0] == 200
        if receiver.wait_for(lambda: len(seen()) >= 2, timeout=0.3):
            break
    return seen()


def test_uvicorn_workers_each_initialise(run_app, receiver: OtlpReceiver) -> None:
    port = free_port()
    app = run_app(uvicorn_command("starlette_app:app", port, "--workers", "2"), otlp_env(receiver), port)
    receiver.wait_for(lambda: False, timeout=0.5)
    ids = _instances_seen(app, receiver, "/hello")
    assert len(ids) == 2, ids
    pids = {s.resource["process.pid"] for s in receiver.spans}
    assert len(pids) == 2
    assert all(s.name == "GET /hello" for s in receiver.spans if s.attributes.get("url.path") == "/hello")


def test_gunicorn_uvicorn_worker_is_fork_safe(run_app, receiver: OtlpReceiver) -> None:
    port = free_port()
    command = gunicorn_command("starlette_app:app", port)
    app = run_app(command, otlp_env(receiver), port)
    ids = _instances_seen(app, receiver, "/api/tickets/5")
    assert len(ids) == 2, ids
    # Metrics and logs flow from the workers too: exporter threads survived the fork.
    assert receiver.wait_for(
        lambda: len({m.resource["service.instance.id"] for m in receiver.metrics} & ids) == 2
    )
    assert receiver.wait_for(lambda: any(r.body == "ticket 5 requested" for r in receiver.logs))
    assert app.terminate() < 10
    # gunicorn's own lines (master and workers) come out as JSON like everything else.
    lines = [x for x in app.output().splitlines() if x and not x.startswith("lifespan:")]
    assert all(x.startswith("{") for x in lines), [x for x in lines if not x.startswith("{")][:5]
    assert any('"logger":"gunicorn.error"' in x and "Booting worker" in x for x in lines)


def test_collector_down_costs_the_app_nothing(run_app, tmp_path: Path) -> None:
    port = free_port()
    closed = free_port()  # nothing listens here
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{closed}"}
    app = run_app(uvicorn_command("starlette_app:app", port), env, port)
    started = time.monotonic()
    statuses = [app.get(f"/api/tickets/{i}")[0] for i in range(300)]
    elapsed = time.monotonic() - started
    assert statuses == [200] * 300
    assert elapsed < 30, f"300 requests took {elapsed:.1f}s with the collector down"
    assert app.terminate() < 5


def test_last_batch_is_flushed_on_sigterm(run_app, receiver: OtlpReceiver) -> None:
    port = free_port()
    # Batches would wait 60 s: only the shutdown flush can deliver these spans.
    env = otlp_env(receiver, OTEL_BSP_SCHEDULE_DELAY="60000", OTEL_METRIC_EXPORT_INTERVAL="60000")
    app = run_app(uvicorn_command("starlette_app:app", port), env, port)
    for i in range(5):
        app.get(f"/api/tickets/final-{i}")
    assert not any(s.name == "GET /api/tickets/{ticket_id}" for s in receiver.spans)
    assert app.terminate() < 5
    paths = {s.attributes["url.path"] for s in receiver.spans}
    assert {f"/api/tickets/final-{i}" for i in range(5)} <= paths
    assert any(m.name == "http_requests_total" for m in receiver.metrics)


def test_invalid_values_are_reported_and_defaulted(run_app, receiver: OtlpReceiver) -> None:
    port = free_port()
    env = otlp_env(
        receiver,
        "carrier-pigeon",
        LOG_LEVEL="verbose",
        SENTRY_TRACES_SAMPLE_RATE="1.5",
    )
    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.http_endpoint  # the default protocol is http/protobuf
    app = run_app(uvicorn_command("starlette_app:app", port), env, port)
    app.get("/hello")
    receiver.wait_for_span(lambda s: s.name == "GET /hello")  # telemetry still flows, over http/protobuf
    output = app.output()
    for line in (
        "OTEL_EXPORTER_OTLP_PROTOCOL='carrier-pigeon' is not valid (accepted: grpc, http/protobuf); "
        "using the default http/protobuf",
        "LOG_LEVEL='verbose' is not valid (accepted: debug, info, warn, error, fatal); "
        "using the default info",
        "SENTRY_TRACES_SAMPLE_RATE='1.5' is not valid (accepted: a number from 0 to 1); "
        "using the default (unset)",
    ):
        assert output.count(line) == 1, output


def test_strict_mode_refuses_to_start(tmp_path: Path) -> None:
    port = free_port()
    with pytest.raises(AssertionError, match="exited with 78") as info:
        launch(
            tmp_path,
            uvicorn_command("starlette_app:app", port),
            {"CFK_OTEL_STRICT": "true", "LOG_LEVEL": "loud"},
            port,
        )
    assert "LOG_LEVEL='loud' is not valid" in str(info.value)
    assert "refuses to start" in str(info.value)


def test_sdk_disabled_sends_nothing(run_app, receiver: OtlpReceiver) -> None:
    port = free_port()
    app = run_app(
        uvicorn_command("starlette_app:app", port), otlp_env(receiver, OTEL_SDK_DISABLED="true"), port
    )
    assert app.get("/hello")[0] == 200
    assert not receiver.wait_for(lambda: bool(receiver.spans or receiver.metrics), timeout=2)


def test_disabled_instrumentation_and_sampler_keep_their_meaning(run_app, receiver: OtlpReceiver) -> None:
    port = free_port()
    env = otlp_env(receiver, OTEL_TRACES_SAMPLER="always_off")
    app = run_app(uvicorn_command("starlette_app:app", port), env, port)
    app.get("/hello")
    assert receiver.wait_for(lambda: any(m.name == "http_requests_total" for m in receiver.metrics))
    assert not receiver.spans  # always_off: metrics yes, spans no

    receiver.clear()
    port = free_port()
    env = otlp_env(receiver, OTEL_PYTHON_DISABLED_INSTRUMENTATIONS="cfk_uvicorn")
    app = run_app(uvicorn_command("starlette_app:app", port), env, port)
    app.get("/hello")
    assert not receiver.wait_for(lambda: any(s.name.startswith("GET") for s in receiver.spans), timeout=2)


def test_another_distro_installed_is_named(tmp_path: Path) -> None:
    # A second distro whose metadata is found first: opentelemetry-instrument picks it.
    site = tmp_path / "site"
    info = site / "other_distro-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: other-distro\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[opentelemetry_distro]\nother = other_distro:Distro\n")
    (site / "other_distro.py").write_text(
        "from opentelemetry.instrumentation.distro import BaseDistro\n"
        "class Distro(BaseDistro):\n    def _configure(self, **kwargs):\n        pass\n"
    )
    command = [str(BIN / "opentelemetry-instrument"), sys.executable, "-c", "print('app ran')"]
    env = {"PYTHONPATH": f"{site}:{APPS}", "PATH": str(BIN)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert "app ran" in result.stdout
    assert "set OTEL_PYTHON_DISTRO=cfk_otel to select it" in result.stderr

    env["OTEL_PYTHON_DISTRO"] = "cfk_otel"
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert "OTEL_PYTHON_DISTRO" not in result.stderr
