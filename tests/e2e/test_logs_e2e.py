"""Everything that logs in the app process comes out as the document's JSON, once, and over OTLP."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from cfk_otel.testing import OtlpReceiver
from tests.conftest import free_port, uvicorn_command

pytestmark = pytest.mark.timeout(120)


def json_lines(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_one_format_one_line_and_otlp(run_app, receiver: OtlpReceiver) -> None:
    port = free_port()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint,
        "SERVICE_NAME": "cf-kanban",
        "SERVICE_VERSION": "1.0.0",
        "PYTHONWARNINGS": "default",
    }
    app = run_app(uvicorn_command("starlette_app:app", port), env, port)
    assert app.get("/api/tickets/7")[0] == 200
    assert app.get("/boom")[0] == 500
    assert app.get("/warn")[0] == 200
    span = receiver.wait_for_span(lambda s: s.name == "GET /api/tickets/{ticket_id}")
    assert receiver.wait_for(lambda: any(r.body == "ticket 7 requested" for r in receiver.logs))
    app.terminate()
    output = app.output()
    lines = json_lines(output)

    # Nothing else on stdout/stderr but our JSON and the test app's own print() calls.
    others = [x for x in output.splitlines() if x and not x.startswith("{") and not x.startswith("lifespan:")]
    assert others == [], others

    for line in lines:
        assert list(line)[:6] == ["timestamp", "level", "message", "service", "environment", "version"]
        assert (line["service"], line["version"]) == ("cf-kanban", "1.0.0")
    messages = [x["message"] for x in lines]
    assert any(m.startswith("Started server process") for m in messages)  # uvicorn's own lines
    [app_line] = [x for x in lines if x["message"] == "ticket 7 requested"]
    assert app_line["logger"] == "tests.app"
    assert app_line["trace_id"] == span.trace_id

    # One request line per request (uvicorn's access log is replaced), with the route and ids.
    request_lines = [x for x in lines if x.get("route")]
    # The launcher's readiness probe (/hello), then the three requests of this test.
    assert [x["message"].rsplit(" ", 1)[0] for x in request_lines] == [
        "GET /hello 200",
        "GET /api/tickets/7 200",
        "GET /boom 500",
        "GET /warn 200",
    ]
    ticket = next(x for x in request_lines if x["path"] == "/api/tickets/7")
    assert ticket["route"] == "/api/tickets/{ticket_id}"
    assert ticket["status"] == 200
    assert ticket["level"] == "info"
    assert ticket["duration_ms"] > 0
    assert ticket["trace_id"] == span.trace_id
    assert ticket["span_id"] == span.span_id
    assert not any('"GET /api/tickets/7 HTTP/1.1"' in m for m in messages)

    # The unhandled error: uvicorn's error line with the stack, and our request line at error level.
    [crash] = [x for x in lines if x["message"].startswith("Exception in ASGI application")]
    assert crash["level"] == "error"
    assert crash["error"]["type"] == "RuntimeError"
    assert "boom on purpose" in crash["error"]["stack"]
    assert next(x for x in request_lines if x["path"] == "/boom")["level"] == "error"
    # Python warnings come through logging too; LOG_LEVEL=info drops the app's debug line.
    assert any(x.get("logger") == "py.warnings" and "deprecated call" in x["message"] for x in lines)
    assert "debug detail" not in messages

    # OTLP: each record once, with trace context.
    otlp = [r for r in receiver.logs if r.body == "ticket 7 requested"]
    assert len(otlp) == 1
    assert otlp[0].record.trace_id.hex() == span.trace_id
    assert otlp[0].record.severity_text == "INFO"
    request_records = [r for r in receiver.logs if r.attributes.get("route") == "/api/tickets/{ticket_id}"]
    assert len(request_records) == 1
    assert request_records[0].record.span_id.hex() == span.span_id
    assert request_records[0].record.flags & 1 == 1  # the trace flags: sampled
    assert request_records[0].resource["service.name"] == "cf-kanban"


def test_level_filter_datadog_and_switches(run_app, receiver: OtlpReceiver) -> None:
    port = free_port()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint,
        "LOG_LEVEL": "warn",
        "DD_LOGS_INJECTION": "true",
        "DD_ENV": "prod",
    }
    app = run_app(uvicorn_command("starlette_app:app", port), env, port)
    app.get("/api/tickets/1")
    app.get("/nowhere")
    app.terminate()
    lines = json_lines(app.output())
    assert all(x["level"] in ("warn", "error", "fatal") for x in lines)
    [missing] = [x for x in lines if x.get("path") == "/nowhere"]
    assert missing["level"] == "warn"
    assert missing["dd.trace_id"] == str(int(missing["trace_id"], 16) & (2**64 - 1))
    assert missing["dd.span_id"] == str(int(missing["span_id"], 16))
    assert (missing["dd.env"], missing["dd.service"]) == ("prod", "cf-kanban")

    port = free_port()
    receiver.clear()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint,
        "LOG_OUTPUT": "otlp",
        "LOG_REQUESTS": "false",
    }
    app = run_app(uvicorn_command("starlette_app:app", port), env, port)
    app.get("/api/tickets/2")
    assert receiver.wait_for(lambda: any(r.body == "ticket 2 requested" for r in receiver.logs))
    app.terminate()
    assert json_lines(app.output()) == []  # OTLP only
    assert not any(r.attributes.get("route") for r in receiver.logs)  # request lines off


def test_pretty_format(run_app) -> None:
    # Issue 19: colours only on a terminal. The app's output goes to a file here, so none,
    # unless FORCE_COLOR asks for them.
    for force, coloured in (("", False), ("1", True)):
        port = free_port()
        env = {"LOG_FORMAT": "pretty", "OTEL_SDK_DISABLED": "true", "FORCE_COLOR": force}
        app = run_app(uvicorn_command("starlette_app:app", port), env, port)
        app.get("/api/tickets/3")
        app.terminate()
        output = app.output()
        assert json_lines(output) == []
        line = next(x for x in output.splitlines() if "ticket 3 requested" in x)
        assert ("\x1b[32m" in line) is coloured
        assert ("\x1b" in output) is coloured
        assert "INFO" in line


def _app_lines(output: str) -> list[dict[str, Any]]:
    """Every line the app wrote (stdout and stderr), each parsed as JSON: the test fails on any other."""
    return [json.loads(line) for line in output.splitlines() if line]


def test_the_documents_logger_usage_runs_in_a_request(run_app, receiver: OtlpReceiver) -> None:
    """The document's logger "Usage" section, ported line for line (tests/apps/logs_app.py),
    inside a request of an app under opentelemetry-instrument: each call's data on stdout
    and over OTLP."""
    port = free_port()
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint, "SERVICE_NAME": "cf-kanban"}
    app = run_app(uvicorn_command("logs_app:app", port), env, port)
    assert app.get("/usage")[0] == 200
    span = receiver.wait_for_span(lambda s: s.name == "GET /usage")
    messages = ("User logged in", "Rate limit approaching", "Failed to create ticket", "Processing request")
    assert receiver.wait_for(
        lambda: {*messages, "POST /api/tickets 201 45ms"} <= {r.body for r in receiver.logs}
    )
    app.terminate()
    lines = {x["message"]: x for x in _app_lines(app.output())}

    login = lines["User logged in"]
    assert (login["level"], login["userId"], login["ip"]) == ("info", "user-123", "127.0.0.1")
    rate = lines["Rate limit approaching"]
    assert (rate["level"], rate["userId"], rate["remaining"]) == ("warn", "user-123", 5)
    failed = lines["Failed to create ticket"]
    assert failed["level"] == "error"
    assert failed["ticketData"] == {"title": "Fix login", "columnId": "col-1"}
    assert (failed["error"]["type"], failed["error"]["message"]) == ("ValueError", "column is full")
    assert 'raise ValueError("column is full")' in failed["error"]["stack"]
    request = lines["POST /api/tickets 201 45ms"]
    assert (request["level"], request["method"], request["path"], request["status"]) == (
        "info",
        "POST",
        "/api/tickets",
        201,
    )
    assert (request["duration_ms"], request["userId"]) == (45, "user-123")
    processing = lines["Processing request"]
    assert processing["userId"] == "user-123"
    assert re.fullmatch(r"[0-9a-f-]{36}", processing["requestId"])
    for message in (*messages, "POST /api/tickets 201 45ms"):
        assert lines[message]["trace_id"] == span.trace_id, message  # inside the request's span

    otlp = {r.body: r for r in receiver.logs}
    assert otlp["User logged in"].attributes["userId"] == "user-123"
    assert otlp["User logged in"].attributes["ip"] == "127.0.0.1"
    assert otlp["Rate limit approaching"].attributes["remaining"] == 5
    assert otlp["Rate limit approaching"].record.severity_text == "WARN"
    error = otlp["Failed to create ticket"]
    assert json.loads(error.attributes["ticketData"]) == {"title": "Fix login", "columnId": "col-1"}
    assert (error.attributes["exception.type"], error.attributes["exception.message"]) == (
        "ValueError",
        "column is full",
    )
    assert error.record.severity_text == "ERROR"
    logged = otlp["POST /api/tickets 201 45ms"].attributes
    assert (logged["method"], logged["status"], logged["duration_ms"], logged["userId"]) == (
        "POST",
        201,
        45,
        "user-123",
    )
    assert otlp["Processing request"].attributes["requestId"] == processing["requestId"]
    for message in (*messages, "POST /api/tickets 201 45ms"):
        assert otlp[message].record.trace_id.hex() == span.trace_id, message


def test_uncaught_exceptions_and_uvicorns_lines_are_json_only(run_app, receiver: OtlpReceiver) -> None:
    """Issue 19: a thread's and an asyncio task's uncaught exceptions under uvicorn, and
    uvicorn's own lines: nothing but JSON on stdout and stderr, no colour codes."""
    port = free_port()
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint, "SERVICE_NAME": "cf-kanban"}
    app = run_app(uvicorn_command("logs_app:app", port, "--use-colors"), env, port)
    assert app.get("/thread-crash")[0] == 200
    assert app.get("/task-crash")[0] == 200
    assert receiver.wait_for(
        lambda: sum(r.attributes.get("mechanism") is not None for r in receiver.logs) == 2
    )
    app.terminate()
    output = app.output()
    lines = _app_lines(output)  # every line JSON
    assert "\x1b" not in output
    assert not any("color_message" in x for x in lines)
    assert any(x["message"].startswith("Uvicorn running on") for x in lines)

    thread, task = (x for x in lines if x.get("logger") == "cfk_otel.uncaught")
    assert (thread["level"], thread["message"], thread["thread.name"]) == (
        "error",
        "Uncaught exception in thread ticket-sync",
        "ticket-sync",
    )
    assert (thread["error"]["type"], thread["mechanism"]) == ("LookupError", "threading")
    assert 'raise LookupError("thread lost its ticket")' in thread["error"]["stack"]
    assert (task["level"], task["message"], task["task"], task["mechanism"]) == (
        "error",
        "Task exception was never retrieved",
        "board-sync",
        "asyncio",
    )
    assert 'raise KeyError("task lost its board")' in task["error"]["stack"]
    assert not any(x.get("logger") == "asyncio" for x in lines)  # one line, not the default's too

    records = {r.attributes["mechanism"]: r for r in receiver.logs if r.attributes.get("mechanism")}
    assert records["threading"].attributes["exception.type"] == "LookupError"
    assert "thread lost its ticket" in records["threading"].attributes["exception.stacktrace"]
    assert records["asyncio"].attributes["exception.type"] == "KeyError"
