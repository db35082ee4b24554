"""The document's metric catalogue, scraped at /api/metrics and pushed over OTLP."""

from __future__ import annotations

import contextlib
import json
import socket
import time
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

from cfk_otel.testing import OtlpReceiver
from tests.conftest import Services, free_port, gunicorn_command, uvicorn_command
from tests.test_metrics import CATALOGUE

pytestmark = pytest.mark.timeout(180)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(app: Any, headers: dict[str, str] | None = None) -> tuple[dict[str, str], Samples]:
    status, _, body = app.get("/api/metrics", headers)
    assert status == 200, body
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def post(app: Any, path: str) -> int:
    request = urllib.request.Request(app.url + path, data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status


def delete(app: Any, path: str) -> int:
    request = urllib.request.Request(app.url + path, method="DELETE")
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status


def test_catalogue_at_api_metrics_and_over_otlp(run_app, receiver: OtlpReceiver, services: Services) -> None:
    port = free_port()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint,
        "DATABASE_URL": services.database_url,
        "REDIS_URL": services.redis_url,
        "SLOW_QUERY_THRESHOLD": "0.2",
    }
    app = run_app(uvicorn_command("metrics_app:app", port), env, port, wait_path="/api/metrics")

    for i in range(3):
        assert app.get(f"/api/tickets/{i}")[0] == 200
    assert app.get("/api/v1/cards/9")[0] == 200
    assert app.get("/no/such/thing")[0] == 404
    assert app.get("/api/fail")[0] == 500
    assert app.get("/api/unavailable")[0] == 503
    assert post(app, "/api/tickets/1/move?from=todo&to=doing") == 200
    assert post(app, "/api/tickets/2/move?from=todo&to=doing") == 200
    assert post(app, "/api/tickets/2/move?from=doing&to=done") == 200
    for _ in range(3):
        post(app, "/api/agents/planner")
    delete(app, "/api/agents/planner")
    post(app, "/api/agents/coder")
    assert app.get("/api/features/bulk-update")[0] == 200
    assert json.loads(app.get("/api/db")[2]) == {"total": 3}
    assert app.get("/api/slow")[0] == 200

    ws_url = f"ws://127.0.0.1:{port}/ws/board"
    with contextlib.ExitStack() as stack:
        clean = stack.enter_context(connect(ws_url))
        clean.send("ping")
        assert clean.recv() == "ping"
        held = stack.enter_context(connect(ws_url))
        held.send("x")
        held.recv()
        _, live = scrape(app)
        assert value(live, "websocket_connections_active") == 2
        clean.close()  # a clean close
        broken = stack.enter_context(connect(ws_url))
        broken.send("y")
        broken.recv()
        broken.socket.shutdown(socket.SHUT_RDWR)  # abrupt: dropped without a close frame
        failing = stack.enter_context(connect(ws_url))
        failing.send("raise")  # the handler raises
        time.sleep(0.3)
        held.close()

    deadline = time.monotonic() + 10
    while True:
        types, samples = scrape(app)
        if value(samples, "websocket_connections_active") == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)

    assert value(samples, "websocket_connections_active") == 0  # never negative, every close counted
    # Messages both ways, and one duration per connection, by route template.
    assert value(samples, "websocket_messages_total", path="/ws/board", direction="received") == 4
    assert value(samples, "websocket_messages_total", path="/ws/board", direction="sent") == 3
    assert value(samples, "websocket_connection_duration_seconds_count", path="/ws/board") == 4
    assert types["http_requests"] == "counter"
    assert types["http_request_duration_seconds"] == "histogram"
    assert types["websocket_connections_active"] == "gauge"
    assert types["database_query_duration_seconds"] == "histogram"
    assert types["redis_operation_duration_seconds"] == "histogram"
    assert types["active_agents_count"] == "gauge"
    assert types["ticket_transitions"] == "counter"
    assert types["errors"] == "counter"
    assert "target_info" not in types

    ticket = {"method": "GET", "path": "/api/tickets/{ticket_id}", "status": "200"}
    assert value(samples, "http_requests_total", **ticket) == 3
    assert (
        value(samples, "http_requests_total", method="GET", path="/api/v1/cards/{card_id}", status="200") == 1
    )
    assert value(samples, "http_requests_total", method="GET", path="unmatched", status="404") == 1
    assert value(samples, "http_requests_total", method="GET", path="/api/fail", status="500") == 1
    # The distro's own endpoints are not requests of the app.
    assert not any(dict(labels).get("path") == "/api/metrics" for (_, labels) in samples)

    buckets = {
        float(dict(labels)["le"])
        for (name, labels) in samples
        if name == "http_request_duration_seconds_bucket"
        and dict(labels)["path"] == "/api/tickets/{ticket_id}"
    }
    assert {0.1, 0.5, 1.0, 2.0} <= buckets
    duration_labels = {
        frozenset(k for k, _ in labels)
        for (name, labels) in samples
        if name == "http_request_duration_seconds_count"
    }
    assert duration_labels == {frozenset({"method", "path"})}
    assert (
        value(samples, "http_request_duration_seconds_count", method="GET", path="/api/tickets/{ticket_id}")
        == 3
    )

    for (name, labels), _ in samples.items():
        keys = {k for k, _ in labels} - {"le"}
        expected = {
            "http_requests_total": {"method", "path", "status"},
            "database_query_duration_seconds_count": {"operation"},
            "redis_operation_duration_seconds_count": {"command"},
            "active_agents_count": {"type"},
            "ticket_transitions_total": {"from", "to"},
            "errors_total": {"type", "severity"},
        }.get(name)
        if expected is not None:
            assert keys == expected, (name, keys)

    ops = {dict(labels)["operation"] for (name, labels) in samples if name.startswith("database_query")}
    assert {"CREATE", "INSERT", "SELECT", "UPDATE"} <= ops
    assert all(op.isupper() for op in ops)  # the operation, never SQL text
    assert value(samples, "redis_operation_duration_seconds_count", command="GET") == 2
    assert value(samples, "redis_operation_duration_seconds_count", command="SET") == 1
    assert value(samples, "redis_operation_duration_seconds_count", command="DEL") == 1

    assert value(samples, "active_agents_count", type="planner") == 2
    assert value(samples, "active_agents_count", type="coder") == 1
    assert value(samples, "ticket_transitions_total", **{"from": "todo", "to": "doing"}) == 2
    assert value(samples, "ticket_transitions_total", **{"from": "doing", "to": "done"}) == 1
    assert value(samples, "errors_total", type="KeyError", severity="error") == 1
    assert value(samples, "errors_total", type="http_503", severity="error") == 1
    assert value(samples, "errors_total", type="RuntimeError", severity="error") == 1  # the websocket handler
    assert value(samples, "my_feature_usage_total", feature="bulk-update") == 1
    assert value(samples, "export_seconds_count", format="csv") == 1
    assert value(samples, "export_seconds_bucket", format="csv", le="0.01") == 0
    assert value(samples, "export_seconds_bucket", format="csv", le="1.0") == 1

    # Slow query: a warning with the SQL (never its arguments) and a span event.
    slow = receiver.wait_for_span(lambda s: s.name == "GET /api/slow")
    events = [
        e
        for s in receiver.spans
        if s.trace_id == slow.trace_id
        for e in s.span.events
        if e.name == "slow_query"
    ]
    assert len(events) == 1, [(s.name, [e.name for e in s.span.events]) for s in receiver.spans]
    assert receiver.wait_for(lambda: any("slow query" in str(r.body) for r in receiver.logs))
    assert "SELECT pg_sleep($1::float)" in next(
        str(r.body) for r in receiver.logs if "slow query" in str(r.body)
    )

    # The same counts arrive over OTLP.
    def otlp_requests() -> float:
        points = [
            p
            for m in receiver.metrics
            if m.name == "http_requests_total"
            for p in m.metric.sum.data_points
            if {a.key: a.value.string_value for a in p.attributes} == ticket
        ]
        return (
            points[-1].as_double
            if points and points[-1].HasField("as_double")
            else (points[-1].as_int if points else 0)
        )

    assert receiver.wait_for(lambda: otlp_requests() == 3), otlp_requests()
    # Each collection carries the series that had data by then: one that changed after the
    # third request was counted (the websocket gauge) comes with the next export.

    def exported() -> set[str]:
        return {m.name for m in receiver.metrics}

    assert receiver.wait_for(lambda: exported() >= CATALOGUE), CATALOGUE - exported()


def test_openmetrics_and_bearer_token(run_app) -> None:
    port = free_port()
    env = {
        "METRICS_BEARER_TOKEN": "s3cret-token",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_TRACES_EXPORTER": "none",
    }
    app = run_app(uvicorn_command("metrics_app:app", port), env, port, wait_path="/api/tickets/1")
    status, headers, _ = app.get("/api/metrics")
    assert status == 401
    assert headers["www-authenticate"].startswith("Bearer")
    assert app.get("/api/metrics", {"Authorization": "Bearer wrong"})[0] == 401
    auth = {"Authorization": "Bearer s3cret-token"}
    status, headers, body = app.get("/api/metrics", auth)
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=")
    status, headers, body = app.get("/api/metrics", {**auth, "Accept": "application/openmetrics-text"})
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


def test_endpoint_path_is_configurable_and_can_be_switched_off(run_app) -> None:
    port = free_port()
    app = run_app(
        uvicorn_command("metrics_app:app", port),
        {"METRICS_PATH": "/internal/prom"},
        port,
        wait_path="/api/tickets/1",
    )
    assert app.get("/internal/prom")[0] == 200
    assert app.get("/api/metrics")[0] == 404  # now the app's own (unmatched) path
    port = free_port()
    app = run_app(
        uvicorn_command("metrics_app:app", port),
        {"METRICS_ENABLED": "false"},
        port,
        wait_path="/api/tickets/1",
    )
    assert app.get("/api/metrics")[0] == 404


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
def test_two_workers_add_up(run_app, server: str) -> None:
    port = free_port()
    env = {"OTEL_METRICS_EXPORTER": "none", "OTEL_TRACES_EXPORTER": "none", "OTEL_LOGS_EXPORTER": "none"}
    if server == "uvicorn":
        command = uvicorn_command("metrics_app:app", port, "--workers", "2")
    else:
        command = gunicorn_command("metrics_app:app", port)
    app = run_app(command, env, port, wait_path="/api/tickets/0")
    sent = 120
    for i in range(sent):
        assert app.get(f"/api/tickets/{i}")[0] == 200
    path = {"method": "GET", "path": "/api/tickets/{ticket_id}", "status": "200"}
    # Whichever worker answers the scrape sums both (shares are written every 2 s).
    deadline = time.monotonic() + 15
    seen: set[float] = set()
    while time.monotonic() < deadline:
        _, samples = scrape(app)
        total = value(samples, "http_requests_total", **path)
        seen.add(total)
        if total == sent + 1:  # + the readiness probe of the launcher
            break
        time.sleep(0.3)
    assert total == sent + 1, seen
