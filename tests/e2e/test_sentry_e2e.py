"""Sentry, as the document describes it: the real sentry-sdk against a stand-in for Sentry's ingest.

The app runs under ``opentelemetry-instrument uvicorn`` with no Sentry code of its own
besides the document's calls; spans go to an OTLP receiver, so each event's trace
context can be compared with the request's span.
"""

from __future__ import annotations

import json
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

from cfk_otel.testing import OtlpReceiver, SentryReceiver
from tests.conftest import RunningApp, Services, free_port, launch, uvicorn_command

pytestmark = pytest.mark.timeout(180)

Event = dict[str, Any]
SECRETS = ("hunter2-local", "sk-live-abcdef", "s3cr3t", "p4ss", "k3y", "db-pass", "t0k3n", "publickey")


@pytest.fixture(scope="module")
def sentry() -> Iterator[SentryReceiver]:
    with SentryReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def otlp() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def app(
    tmp_path_factory: pytest.TempPathFactory, sentry: SentryReceiver, otlp: OtlpReceiver
) -> Iterator[RunningApp]:
    """One app for the tests that only make requests (each start costs about 2 s)."""
    port = free_port()
    env = {
        "SENTRY_DSN": sentry.dsn,
        "SENTRY_ENVIRONMENT": "staging",
        "SENTRY_RELEASE": "cf-kanban@1.2.3",
        "SENTRY_CAPTURE_4XX": "401,429",
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.http_endpoint,
        "OTEL_LOGS_EXPORTER": "none",
    }
    running = launch(tmp_path_factory.mktemp("sentry"), uvicorn_command("sentry_app:app", port), env, port)
    yield running
    running.terminate()


@pytest.fixture
def fresh(sentry: SentryReceiver, otlp: OtlpReceiver) -> None:
    sentry.clear()
    otlp.clear()


def settle(app: RunningApp, sentry: SentryReceiver) -> list[Event]:
    """Every event sent before now: a marker event goes last through the SDK's one queue."""
    marker = uuid.uuid4().hex
    assert app.get(f"/marker?id={marker}")[0] == 200
    sentry.wait_for_events(1, lambda e: e.get("message") == f"marker {marker}")
    events = sentry.events
    return events[: next(i for i, e in enumerate(events) if e.get("message") == f"marker {marker}")]


def exception(event: Event) -> dict[str, Any]:
    return event["exception"]["values"][-1]


def trace_of(otlp: OtlpReceiver, name: str) -> dict[str, str]:
    span = otlp.wait_for_span(lambda s: s.name == name)
    return {"trace_id": span.trace_id, "span_id": span.span_id}


def errors_total(app: RunningApp) -> dict[tuple[str, str], float]:
    status, _, body = app.get("/api/metrics")
    assert status == 200
    return {
        (s.labels["type"], s.labels["severity"]): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
        if s.name == "errors_total"
    }


def assert_no_secrets(event: Event) -> None:
    text = json.dumps(event)
    leaked = [s for s in SECRETS if s in text]
    assert not leaked, f"{leaked} in {text}"


# --- unhandled errors, 5xx, 4xx ------------------------------------------------------------


@pytest.mark.usefixtures("fresh")
def test_unhandled_exception_is_one_event_linked_to_its_trace(
    app: RunningApp, sentry: SentryReceiver, otlp: OtlpReceiver
) -> None:
    assert app.get("/api/tickets/7/boom?token=abc", {"Cookie": "sid=s3cr3t"})[0] == 500

    [event] = settle(app, sentry)  # not a second one from uvicorn's error log line
    assert event["level"] == "error"
    assert exception(event)["type"] == "RuntimeError"
    assert exception(event)["mechanism"] == {"type": "cfk_otel.http", "handled": False}
    assert event["transaction"] == "/api/tickets/{ticket_id}/boom"
    assert event["tags"] == {
        "http.method": "GET",
        "http.route": "/api/tickets/{ticket_id}/boom",
        "http.status_code": "500",
        "request.kind": "http",
    }
    assert event["contexts"]["trace"] == trace_of(otlp, "GET /api/tickets/{ticket_id}/boom")
    assert (event["environment"], event["release"]) == ("staging", "cf-kanban@1.2.3")
    assert "user" not in event
    assert event["request"]["url"].endswith("/api/tickets/7/boom")  # no query string
    assert set(event["request"]["headers"]) <= {"host", "user-agent", "accept"}
    frame = exception(event)["stacktrace"]["frames"][-1]
    assert frame["function"] == "boom"
    assert "vars" not in frame  # no local variables
    assert 'password = "[REDACTED]"' in frame["pre_context"][-2]  # source lines are scrubbed too
    assert_no_secrets(event)


@pytest.mark.usefixtures("fresh")
def test_5xx_response_without_exception(app: RunningApp, sentry: SentryReceiver, otlp: OtlpReceiver) -> None:
    assert app.get("/unavailable")[0] == 503
    [event] = settle(app, sentry)
    assert (event["level"], event["message"]) == ("error", "HTTP 503 Service Unavailable")
    assert event["transaction"] == "/unavailable"
    assert event["tags"]["http.status_code"] == "503"
    assert event["contexts"]["trace"] == trace_of(otlp, "GET /unavailable")


@pytest.mark.usefixtures("fresh")
def test_4xx_only_as_configured(app: RunningApp, sentry: SentryReceiver) -> None:
    for code in (400, 401, 403, 404, 409, 429):
        assert app.get(f"/status/{code}")[0] == code
    assert app.get("/no/such/page")[0] == 404

    events = settle(app, sentry)
    assert [(e["level"], e["message"]) for e in events] == [
        ("warning", "HTTP 401 Unauthorized"),
        ("warning", "HTTP 429 Too Many Requests"),
    ]
    assert all(e["transaction"] == "/status/{code}" for e in events)
    counts = errors_total(app)
    assert counts[("http_401", "warn")] == 1
    assert counts[("http_429", "warn")] == 1
    assert ("http_404", "warn") not in counts


@pytest.mark.usefixtures("fresh")
def test_no_event_when_nothing_is_wrong(app: RunningApp, sentry: SentryReceiver) -> None:
    for _ in range(3):
        assert app.get("/hello")[0] == 200
    assert app.get("/status/404")[0] == 404
    with connect(f"ws://127.0.0.1:{app.port}/ws/board") as ws:
        ws.send("ping")
        assert ws.recv() == "ping"
        ws.send("bye")
    assert settle(app, sentry) == []


@pytest.mark.usefixtures("fresh")
def test_logged_then_reraised_exception_is_reported_once(app: RunningApp, sentry: SentryReceiver) -> None:
    assert app.get("/log-then-raise")[0] == 500
    [event] = settle(app, sentry)
    assert exception(event)["type"] == "ConnectionError"
    assert event["transaction"] == "/log-then-raise"


# --- the document's API --------------------------------------------------------------------


@pytest.mark.usefixtures("fresh")
def test_capture_error_with_tags_extra_and_scrubbing(
    app: RunningApp, sentry: SentryReceiver, otlp: OtlpReceiver
) -> None:
    before = errors_total(app).get(("KeyError", "warn"), 0)
    assert app.get("/capture?level=warn")[0] == 200

    [event] = settle(app, sentry)
    assert event["level"] == "warning"
    assert exception(event)["type"] == "KeyError"
    assert exception(event)["mechanism"]["handled"] is True
    assert event["tags"]["component"] == "tickets-api"
    assert event["transaction"] == "/capture"
    assert event["contexts"]["trace"] == trace_of(otlp, "GET /capture")
    extra = event["extra"]
    assert extra["ticketId"] == 7
    assert extra["headers"] == {"Authorization": "[REDACTED]", "Cookie": "[REDACTED]", "Accept": "*/*"}
    assert extra["nested"] == {"db": {"password": "[REDACTED]", "user": "app"}}
    # Sentry's serializer turns what lies deeper than five levels into its repr.
    assert extra["deep"]["a"]["b"]["c"]["d"] == (
        "{'e': {'password': '[REDACTED]', 'apiKey': '[REDACTED]', 'note': 'ok'}}"
    )
    assert extra["connection"] == "postgresql://[REDACTED]@db:5432/cfk"
    assert extra["sentry"] == "[REDACTED]"  # the configured DSN: a known secret, withheld whole
    assert_no_secrets(event)
    assert errors_total(app)[("KeyError", "warn")] == before + 1


@pytest.mark.usefixtures("fresh")
def test_unknown_level_becomes_error(app: RunningApp, sentry: SentryReceiver) -> None:
    assert app.get("/capture?level=loud")[0] == 200
    [event] = settle(app, sentry)
    assert event["level"] == "error"
    assert "capture_error(): unknown level 'loud'" in app.output()


@pytest.mark.usefixtures("fresh")
def test_capture_message_with_context(app: RunningApp, sentry: SentryReceiver) -> None:
    assert app.get("/message")[0] == 200
    [event] = settle(app, sentry)
    assert (event["level"], event["message"]) == ("info", "User completed onboarding")
    assert event["extra"] == {"userId": "user-123", "duration": 45000, "token": "[REDACTED]"}


@pytest.mark.usefixtures("fresh")
def test_users_never_cross_requests(app: RunningApp, sentry: SentryReceiver) -> None:
    # 50 requests in flight at once, each setting its user, sleeping, then capturing.
    with ThreadPoolExecutor(max_workers=50) as pool:
        statuses = list(pool.map(lambda n: app.get(f"/users/{n}")[0], range(50)))
        failing = list(pool.map(lambda n: app.get(f"/users/{n}?raise=1")[0], range(100, 120)))
    assert statuses == [200] * 50
    assert failing == [500] * 20

    events = settle(app, sentry)
    assert len(events) == 70
    for event in events:
        n = exception(event)["value"].split()[1]
        assert event["user"] == {"id": n, "email": f"user{n}@example.com"}, event
    handled = [e for e in events if exception(e)["mechanism"]["handled"]]
    assert sorted(int(e["tags"]["n"]) for e in handled) == list(range(50))

    assert app.get("/capture")[0] == 200  # a later request that sets no user
    [later] = settle(app, sentry)[-1:]
    assert "user" not in later


@pytest.mark.usefixtures("fresh")
def test_failed_background_task_is_reported(app: RunningApp, sentry: SentryReceiver) -> None:
    assert app.get("/background")[0] == 200
    time.sleep(0.3)  # the task fails 50 ms after the response
    [event] = settle(app, sentry)
    assert exception(event)["type"] == "LookupError"
    assert exception(event)["mechanism"] == {"type": "asyncio", "handled": False}
    assert event["tags"]["asyncio.task"] == "nightly-export"
    # Attributed to the task's own request (Python 3.12+) or to none, never to another one.
    assert event.get("user") in (None, {"id": "background-owner"})
    assert errors_total(app)[("LookupError", "error")] == 1


# --- WebSockets ----------------------------------------------------------------------------


@pytest.mark.usefixtures("fresh")
def test_websocket_handler_errors_and_abnormal_closes(
    app: RunningApp, sentry: SentryReceiver, otlp: OtlpReceiver
) -> None:
    url = f"ws://127.0.0.1:{app.port}/ws/board"
    with connect(url) as ws:
        ws.send("raise")
        with pytest.raises(Exception):  # noqa: B017, PT011  (the server closes with 1011)
            ws.recv()
    with connect(url) as ws:
        ws.send("close1011")
        with pytest.raises(Exception):  # noqa: B017, PT011
            ws.recv()
    with connect(url) as ws:
        ws.send("bye")

    crashed, closed = settle(app, sentry)
    assert exception(crashed)["type"] == "RuntimeError"
    assert exception(crashed)["mechanism"] == {"type": "cfk_otel.websocket", "handled": False}
    assert crashed["transaction"] == "/ws/board"
    assert crashed["tags"]["request.kind"] == "websocket"
    span = otlp.wait_for_span(lambda s: s.name == "WEBSOCKET /ws/board")
    assert crashed["contexts"]["trace"]["trace_id"] in {s.trace_id for s in otlp.iter_spans()}
    assert span.trace_id
    assert (closed["level"], closed["message"]) == ("error", "WebSocket closed with 1011: backend gone")
    assert closed["transaction"] == "/ws/board"
    assert errors_total(app)[("websocket_1011", "error")] == 1


# --- separate launches ---------------------------------------------------------------------


def test_slow_query_is_a_warning_with_sql_and_no_arguments(
    run_app: Callable[..., RunningApp], services: Services
) -> None:
    port = free_port()
    with SentryReceiver() as sentry:
        env = {
            "SENTRY_DSN": sentry.dsn,
            "DATABASE_URL": services.database_url,
            "SLOW_QUERY_THRESHOLD": "0.2",
            "OTEL_TRACES_EXPORTER": "none",
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_LOGS_EXPORTER": "none",
        }
        app = run_app(uvicorn_command("sentry_app:app", port), env, port)
        assert json.loads(app.get("/slow-query")[2]) == {"ok": True}
        [event] = settle(app, sentry)
    assert event["level"] == "warning"
    assert event["message"].startswith("Slow query (0.3")
    assert event["extra"]["db.query.text"] == "SELECT $2::text FROM pg_sleep($1::float)"
    assert event["tags"]["db.operation.name"] == "SELECT"
    assert event["transaction"] == "/slow-query"
    assert "param-s3cr3t" not in json.dumps(event)
    assert errors_total(app)[("slow_query", "warn")] == 1


def test_without_a_dsn_sentry_is_not_even_imported(run_app: Callable[..., RunningApp]) -> None:
    port = free_port()
    env = {"OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none", "OTEL_LOGS_EXPORTER": "none"}
    app = run_app(uvicorn_command("sentry_app:app", port), env, port)
    assert json.loads(app.get("/sentry-loaded")[2]) == {"loaded": False, "event_id": None}
    assert app.get("/api/tickets/1/boom")[0] == 500
    assert errors_total(app)[("ValueError", "error")] == 1  # capture_error still counts


def test_startup_failure_is_reported(tmp_path: Path) -> None:
    with SentryReceiver() as sentry:
        port = free_port()
        env = {"SENTRY_DSN": sentry.dsn, "FAIL_STARTUP": "1", "OTEL_TRACES_EXPORTER": "none"}
        with pytest.raises(AssertionError, match="exited"):
            launch(tmp_path, uvicorn_command("sentry_app:app", port), env, port)
        [event] = sentry.wait_for_events(1)
    assert exception(event)["value"] == "startup failed: database unreachable"
    assert exception(event)["mechanism"] == {"type": "cfk_otel.lifespan", "handled": False}


def _latencies(app: RunningApp, count: int = 25) -> list[float]:
    out = []
    for i in range(count):
        start = time.perf_counter()
        assert app.get(f"/api/tickets/{i}/boom")[0] == 500
        out.append(time.perf_counter() - start)
    return out


def test_sentry_down_or_slow_never_slows_or_fails_requests(run_app: Callable[..., RunningApp]) -> None:
    quiet = {
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        "CFK_OTEL_SHUTDOWN_TIMEOUT": "2",
    }

    def start(dsn: str | None) -> RunningApp:
        port = free_port()
        env = {**quiet, "SENTRY_DSN": dsn} if dsn else quiet
        return run_app(uvicorn_command("sentry_app:app", port), env, port)

    without = _latencies(start(None))
    with SentryReceiver() as healthy_sentry:
        healthy = _latencies(start(healthy_sentry.dsn))
    down_app = start(f"http://publickey@127.0.0.1:{free_port()}/42")  # nothing listens there
    down = _latencies(down_app)
    with SentryReceiver() as slow_sentry:
        slow_sentry.delay = 5.0  # answers every envelope 5 s late
        slow_app = start(slow_sentry.dsn)
        slow = _latencies(slow_app)
        assert slow_sentry.wait_for_events(1)  # the SDK did try to send
        slow_exit = slow_app.terminate()
    down_exit = down_app.terminate()

    # Reporting costs the same whether Sentry answers, is down or is slow: sending never
    # happens on the request's path.
    limit = statistics.median(healthy) + 0.03
    assert statistics.median(down) < limit, (healthy, down)
    assert statistics.median(slow) < limit, (healthy, slow)
    assert max(down + slow) < 1.0, (down, slow)
    assert statistics.median(healthy) < statistics.median(without) + 0.05, (without, healthy)
    # The exit waits for Sentry at most the shutdown bound (2 s), plus uvicorn's own exit.
    assert slow_exit < 2 + 3, slow_exit
    assert down_exit < 2 + 3, down_exit


def test_last_events_are_delivered_on_sigterm(run_app: Callable[..., RunningApp]) -> None:
    with SentryReceiver() as sentry:
        sentry.delay = 0.4  # a queue builds up: four events take 1.6 s to send
        port = free_port()
        env = {
            "SENTRY_DSN": sentry.dsn,
            "OTEL_TRACES_EXPORTER": "none",
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_LOGS_EXPORTER": "none",
            "CFK_OTEL_SHUTDOWN_TIMEOUT": "5",
        }
        app = run_app(uvicorn_command("sentry_app:app", port), env, port)
        for i in range(4):
            assert app.get(f"/api/tickets/{i}/boom")[0] == 500
        app.terminate()  # SIGTERM right away
        values = sorted(exception(e)["value"].split()[1] for e in sentry.events)
    assert values == ["0", "1", "2", "3"]


def test_sample_rates(run_app: Callable[..., RunningApp], receiver: OtlpReceiver) -> None:
    with SentryReceiver() as sentry:
        port = free_port()
        env = {
            "SENTRY_DSN": sentry.dsn,
            "SENTRY_TRACES_SAMPLE_RATE": "0",
            # Failed traces are kept at any ratio unless the bias is off (issue 24, tests/test_sampling.py).
            "CFK_TRACES_KEEP_SLOWER_THAN": "off",
            "SENTRY_PROFILES_SAMPLE_RATE": "1",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint,
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_LOGS_EXPORTER": "none",
        }
        app = run_app(uvicorn_command("sentry_app:app", port), env, port)
        assert app.get("/api/tickets/1/boom")[0] == 500
        [event] = settle(app, sentry)
        app.terminate()
        chunk = sentry.wait_for_item("profile_chunk")

    # SENTRY_TRACES_SAMPLE_RATE=0 made the OpenTelemetry sampler drop every trace, while
    # errors still carry the trace id they happened in.
    trace = event["contexts"]["trace"]
    assert len(trace["trace_id"]) == 32
    assert len(trace["span_id"]) == 16
    assert not any(s.trace_id == trace["trace_id"] for s in receiver.iter_spans())
    assert not any(s.name.startswith("GET ") for s in receiver.iter_spans())
    # SENTRY_PROFILES_SAMPLE_RATE=1: this process ran Sentry's continuous profiler.
    assert chunk["platform"] == "python"
    assert chunk["profile"]["samples"]
