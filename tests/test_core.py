"""The request path's seam (cfk_otel._core.seam): the compiled core against the SDK, its oracle.

The same requests go through an app under ``opentelemetry-instrument`` twice, once on each
path, and what arrives over OTLP must be the same but for ids and times.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cfk_otel import _settings
from cfk_otel._core import seam as _core
from cfk_otel.testing import OtlpReceiver, ReceivedLog, ReceivedSpan
from tests.conftest import Services, free_port, launch, uvicorn_command

INCOMING_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
INCOMING_PARENT = "00f067aa0ba902b7"
# What differs between two runs of the same requests, whatever records them.
VOLATILE = {"service.instance.id", "process.pid", "client.address", "server.port", "network.peer.port"}


def test_otlp_target_reads_the_variables_as_the_sdk_does() -> None:
    target = _core.otlp_target("traces", {})
    assert target == _core.Target("http://localhost:4318/v1/traces", (), False, 10.0)
    target = _core.otlp_target(
        "traces",
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "https://collector:4318/",
            "OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Bearer%20abc, x-team = kanban",
            "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "gzip",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "2.5",
        },
    )
    assert target == _core.Target(
        "https://collector:4318/v1/traces", (("authorization", "Bearer abc"), ("x-team", "kanban")), True, 2.5
    )
    # A signal's own endpoint is used as it is; its own headers replace the shared ones.
    target = _core.otlp_target(
        "traces",
        {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:9999/custom",
            "OTEL_EXPORTER_OTLP_HEADERS": "a=1",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "b=2",
        },
    )
    assert target == _core.Target("http://traces:9999/custom", (("b", "2"),), False, 10.0)


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "OTEL_EXPORTER_OTLP_PROTOCOL=grpc"),
        ({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"}, "OTEL_EXPORTER_OTLP_PROTOCOL=grpc"),
        (
            {"OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE": "/no/such/ca.pem"},
            "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE: cannot read the file (No such file or directory)",
        ),
        (
            {"OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER": "my_session"},
            "OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER (a requests session of the app's)",
        ),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, "OTEL_TRACES_EXPORTER=otlp,console"),
        ({"OTEL_TRACES_EXPORTER": "none"}, "OTEL_TRACES_EXPORTER=none"),
        ({"CFK_OTEL_NATIVE": "false"}, "CFK_OTEL_NATIVE=false"),
    ],
)
def test_what_the_core_cannot_honour_runs_on_the_sdk(env: dict[str, str], reason: str) -> None:
    choice = _core.select(_settings.load(env), env)
    assert not choice.native
    assert choice.reason == reason
    assert choice.describe() == f"OpenTelemetry SDK ({reason})"


def test_the_core_is_chosen_by_default() -> None:
    assert _core.select(_settings.load({}), {}) == _core.Choice(True, "")


def test_a_processor_added_later_moves_our_spans_to_the_sdk() -> None:
    """On the native path our spans bypass the provider's processors; one the app adds
    later must still see them, so they go back to the SDK's tracer."""
    provider = sdk_trace.TracerProvider()
    spans = _core.Spans(provider)
    _core.activate(_core.Choice(True, ""))
    try:
        first = spans.start("GET /a", None)
        assert type(first) is _core.CoreSpan
        first.end()
        memory = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(memory))
        second = spans.start("GET /b", None)
        assert isinstance(second, sdk_trace.ReadableSpan)
        second.end()
        assert [s.name for s in memory.get_finished_spans()] == ["GET /b"]
    finally:
        _core.activate(_core.Choice(False, "not set up"))
        _core.shutdown(1.0)
        provider.shutdown()


def _shape(spans: list[ReceivedSpan]) -> list[tuple[Any, ...]]:
    """Each span as what must not differ between the two paths: ids become names."""
    by_id = {s.span_id: s.name for s in spans}
    shaped = []
    for s in spans:
        parent = s.parent_span_id
        shaped.append(
            (
                s.scope,
                s.name,
                s.span.kind,
                s.span.flags,
                s.span.trace_state,
                "incoming" if parent == INCOMING_PARENT else by_id.get(parent, parent or None),
                s.trace_id == INCOMING_TRACE,
                tuple(sorted((k, repr(v)) for k, v in s.attributes.items() if k not in VOLATILE)),
                tuple(
                    (e.name, tuple(sorted((kv.key, str(kv.value)) for kv in e.attributes)))
                    for e in s.span.events
                ),
                s.span.status.code,
                s.span.status.message,
                s.span.dropped_attributes_count,
                s.span.dropped_events_count,
            )
        )
    return sorted(shaped, key=repr)


def _log_shape(logs: list[ReceivedLog], spans: list[ReceivedSpan]) -> list[tuple[Any, ...]]:
    """Each log record as what must not differ between the two paths; its span by name."""
    by_id = {s.span_id: s.name for s in spans}
    return sorted(
        (
            log.scope,
            re.sub(r"[\d.]+ms$", "", str(log.body)),  # a request line's duration
            log.record.severity_number,
            log.record.severity_text,
            log.record.flags,
            by_id.get(log.record.span_id.hex()),
            log.record.trace_id.hex() == INCOMING_TRACE,
            tuple(
                sorted((k, repr(v)) for k, v in log.attributes.items() if k not in VOLATILE | {"duration_ms"})
            ),
            log.record.time_unix_nano > 0,
            log.record.observed_time_unix_nano > 0,
            log.record.dropped_attributes_count,
        )
        for log in logs
        # uvicorn's own lines name the process and port: only its error report is compared.
        if log.scope != "uvicorn.error" or log.body == "Exception in ASGI application"
    )


def _run(
    tmp_path: Path, services: Services, native: str
) -> tuple[list[ReceivedSpan], list[ReceivedLog], str]:
    with OtlpReceiver() as receiver:
        port = free_port()
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint,
            "SERVICE_NAME": "cf-kanban-core",
            "CFK_OTEL_NATIVE": native,
            "DATABASE_URL": services.database_url,
            "REDIS_URL": services.redis_url,
            "OTEL_METRICS_EXPORTER": "none",
        }
        app = launch(tmp_path, uvicorn_command("core_app:app", port), env, port)
        try:
            app.get("/hello")
            traceparent = f"00-{INCOMING_TRACE}-{INCOMING_PARENT}-01"
            headers = {"traceparent": traceparent, "tracestate": "vendor=opaque"}
            assert app.get("/boards/7/work", headers)[0] == 200
            assert app.get("/boom")[0] == 500
            assert app.get("/teapot")[0] == 418
            assert app.get("/no/such/path")[0] == 404
            # Six server spans (the launcher's first /hello too) and the app's own span; the
            # client spans end before their request's, so they are queued before it.
            assert receiver.wait_for(
                lambda: (
                    sum(s.span.kind == 2 for s in receiver.spans) == 6
                    and any(s.name == "own work" for s in receiver.spans)
                )
            )
            # Six request lines and the app's warning.
            assert receiver.wait_for(
                lambda: (
                    sum(log.scope == "cfk_otel.requests" for log in receiver.logs) == 6
                    and any(log.scope == "tests.core_app" for log in receiver.logs)
                )
            )
        finally:
            app.terminate()
        return list(receiver.spans), list(receiver.logs), app.output()


def test_both_paths_export_the_same_spans(tmp_path: Path, services: Services) -> None:
    native, native_logs, native_out = _run(tmp_path, services, "true")
    sdk, sdk_logs, sdk_out = _run(tmp_path, services, "false")
    assert "request path: native core for spans, native core for log records" in native_out
    assert "request path: OpenTelemetry SDK (CFK_OTEL_NATIVE=false) for spans" in sdk_out
    assert _shape(native) == _shape(sdk)
    assert _log_shape(native_logs, native) == _log_shape(sdk_logs, sdk)
    warning = next(log for log in native_logs if log.scope == "tests.core_app")
    assert warning.body == "work done for board 7"
    assert warning.attributes["items"] == 3
    assert warning.record.trace_id.hex() == INCOMING_TRACE
    for spans in (native, sdk):
        assert {s.scope for s in spans} == {"cfk_otel", "tests.core_app"}
        resources = [{k: v for k, v in s.resource.items() if k not in VOLATILE} for s in spans]
        assert all(r == resources[0] for r in resources)
    assert {k: v for k, v in native[0].resource.items() if k not in VOLATILE} == {
        k: v for k, v in sdk[0].resource.items() if k not in VOLATILE
    }

    # Interop, on the native path: the app's span is a child of the request span, in the
    # incoming trace; what the app set on the request span arrived; the request line names
    # the same trace and span.
    server = next(s for s in native if s.name == "GET /boards/{board_id}/work")
    own = next(s for s in native if s.name == "own work")
    assert server.trace_id == own.trace_id == INCOMING_TRACE
    assert server.parent_span_id == INCOMING_PARENT
    assert own.parent_span_id == server.span_id
    assert server.attributes["app.board"] == "b-1"
    assert server.span.trace_state == "vendor=opaque"
    assert [e.name for e in server.span.events] == ["work started"]
    clients = [s for s in native if s.span.kind == 3]  # CLIENT
    assert clients
    assert all(s.trace_id == INCOMING_TRACE for s in clients)
    lines = [json.loads(line) for line in native_out.splitlines() if line.startswith("{")]
    request_line = next(line for line in lines if line.get("path") == "/boards/7/work")
    assert request_line["trace_id"] == INCOMING_TRACE
    assert request_line["span_id"] == server.span_id


def test_drops_are_counted_said_once_and_shown_in_health(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With the collector refusing, a full queue drops the oldest: counted in
    cfk_otel_telemetry_dropped_total, said once in the log, and in /api/health (issue 23)."""
    from opentelemetry import metrics

    with OtlpReceiver() as receiver:
        receiver.status = 503  # every export is retried, so the queue fills
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.http_endpoint)
        monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "5")
        monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "5")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "10")
        provider = sdk_trace.TracerProvider()
        _core.shutdown(1.0)
        _core.activate(_core.Choice(True, ""), provider)
        try:
            _core._DROPS_SAID[0] = False  # once per process: as if this were the first drop
            spans = _core.Spans(provider)
            for i in range(40):
                spans.start(f"GET /{i}", None).end()
            # An attempt was refused and the core has taken note of it (the receiver counts the
            # request before the core reads the answer).
            assert receiver.wait_for(lambda: _core.stats()["traces"]["failed_attempts"] > 0, timeout=5.0)
            options = metrics.CallbackOptions()
            first = {
                (o.attributes or {})["reason"]: o.value
                for o in _core.observe_drops(options)
                if (o.attributes or {})["signal"] == "traces"
            }
            assert first["queue_full"] >= 40 - 5 - 5  # at most a queue and a batch in flight kept
            assert first["export_failed"] == 0
            _core.observe_drops(options)
            assert caplog.text.count("telemetry was dropped") == 1
            shown = _core.health()["traces"]
            assert shown["dropped"]["queue_full"] >= first["queue_full"]
            assert shown["lastError"] == "HTTP 503"
            assert receiver.http_endpoint not in str(shown)
        finally:
            _core.activate(_core.Choice(False, "not set up"))
            _core.shutdown(0.5)
            provider.shutdown()
