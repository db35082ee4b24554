"""Every sample of the document's "Usage in Code" and "Custom Metrics" sections, ported line
for line (tests/apps/document_app.py), run inside a request of an app under
``opentelemetry-instrument``: each call's data arrives in the Sentry stand-in, over OTLP and
on ``/api/metrics``."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cfk_otel.testing import OtlpReceiver, SentryReceiver
from tests.conftest import free_port, uvicorn_command

pytestmark = pytest.mark.timeout(120)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(app: Any) -> tuple[str, Samples]:
    status, _, body = app.get("/api/metrics")
    assert status == 200, body
    text = body.decode()
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    return text, samples


def otlp_value(receiver: OtlpReceiver, name: str, labels: dict[str, str]) -> float | None:
    """The last exported value of one series (a sum's value, a histogram's count)."""
    found: float | None = None
    for m in receiver.metrics:
        if m.name != name:
            continue
        data = m.metric.sum if m.metric.HasField("sum") else m.metric.histogram
        for p in data.data_points:
            if {a.key: a.value.string_value for a in p.attributes} == labels:
                if m.metric.HasField("histogram"):
                    found = float(p.count)  # type: ignore[union-attr]
                else:
                    found = p.as_double if p.HasField("as_double") else float(p.as_int)  # type: ignore[union-attr]
    return found


def test_the_documents_samples_arrive_everywhere(run_app: Any) -> None:
    with SentryReceiver() as sentry, OtlpReceiver() as otlp:
        port = free_port()
        env = {
            "SENTRY_DSN": sentry.dsn,
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.http_endpoint,
            "OTEL_METRIC_EXPORT_INTERVAL": "500",
            "OTEL_LOGS_EXPORTER": "none",
        }
        app = run_app(uvicorn_command("document_app:app", port), env, port)

        # Before any use, the catalogue is on the first scrape (issue 19 point 3).
        text, first = scrape(app)
        assert first[("websocket_connections_active", frozenset())] == 0
        for name in (
            "http_requests_total",
            "errors_total",
            "active_agents_count",
            "ticket_transitions_total",
        ):
            assert f"# TYPE {name} " in text, name

        # Over OTLP, the first export carries the unlabelled gauge at 0, and each labelled
        # metric without series as a metric with no data points (OTLP has no HELP-only form).
        assert otlp.wait_for(lambda: otlp_value(otlp, "websocket_connections_active", {}) == 0)
        unused = [m for m in otlp.metrics if m.name == "ticket_transitions_total"]
        assert unused
        assert [len(m.metric.sum.data_points) for m in unused] == [0] * len(unused)
        assert unused[0].metric.description == "Ticket state transitions"

        status, _, body = app.get("/samples")
        assert (status, body) == (200, b"ok")

        # Sentry: captureError's level, tags and extra; captureMessage's level and context;
        # setUser's user on the request's later event.
        events = sentry.wait_for_events(3)
        by_message = {e.get("message") or e["exception"]["values"][-1]["type"]: e for e in events}
        error = by_message["LookupError"]
        assert error["level"] == "error"
        assert error["tags"]["component"] == "tickets-api"
        assert error["extra"] == {"ticketId": "ticket-456", "userId": "user-123"}
        assert error["transaction"] == "/samples"
        message = by_message["User completed onboarding"]
        assert message["level"] == "info"
        assert message["extra"] == {"userId": "user-123", "duration": 45000}
        assert "user" not in message  # set_user came after it
        assert by_message["samples done"]["user"] == {"id": "user-123", "email": "ann@example.com"}

        # /api/metrics: the timer, the custom counter, captureError's count, setUser's user.
        _, samples = scrape(app)
        timer = frozenset({("method", "GET"), ("path", "/api/tickets")})
        assert samples[("http_request_duration_seconds_count", timer)] == 1
        assert samples[("my_feature_usage_total", frozenset({("feature", "bulk-update")}))] == 1
        assert samples[("errors_total", frozenset({("type", "LookupError"), ("severity", "error")}))] == 1
        assert samples[("active_users", frozenset())] == 1

        # OTLP: the same numbers.
        series = (
            ("http_request_duration_seconds", {"method": "GET", "path": "/api/tickets"}),
            ("my_feature_usage", {"feature": "bulk-update"}),
            ("errors_total", {"type": "LookupError", "severity": "error"}),
        )
        for name, labels in series:
            assert otlp.wait_for(lambda n=name, lb=labels: otlp_value(otlp, n, lb) == 1), name
