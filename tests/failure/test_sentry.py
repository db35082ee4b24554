"""Sentry unreachable while the app fails on purpose: the only 500s are the app's own, nothing
hangs, errors_total counts every error, events flow once a Sentry answers on that port, and
SIGTERM exits within the bound while Sentry is gone again."""

from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cfk_otel.testing import OtlpReceiver, SentryReceiver
from tests.conftest import RunningApp, free_port, uvicorn_command
from tests.failure.conftest import (
    RSS_BOUND_MIB,
    SHUTDOWN_BOUND_S,
    StartApp,
    app_rss,
    assert_served,
    figures,
    hammer,
    latency,
    otlp_env,
)

pytestmark = pytest.mark.timeout(60)


def expected(path: str) -> int:
    return 500 if path.endswith("/boom") else 200


def mixed(prefix: str, count: int) -> list[str]:
    """Every other request fails with the app's RuntimeError; the rest say hello."""
    return [f"/api/tickets/{prefix}-{i}/boom" if i % 2 else "/hello" for i in range(count)]


def runtime_errors(app: RunningApp) -> float:
    status, _, body = app.get("/api/metrics")
    assert status == 200
    return sum(
        s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
        if s.name == "errors_total" and s.labels.get("type") == "RuntimeError"
    )


def test_sentry_down_then_up(run_app: StartApp, receiver: OtlpReceiver) -> None:
    sentry_port = free_port()  # nothing listens here until the second phase
    env = otlp_env(
        receiver.http_endpoint, "http/protobuf", SENTRY_DSN=f"http://publickey@127.0.0.1:{sentry_port}/42"
    )
    port = free_port()
    app = run_app(uvicorn_command("sentry_app:app", port), env, port)
    warm = hammer(app.port, mixed("warm", 200))
    assert_served(warm, expected)
    before = app_rss(app)

    replies = hammer(app.port, mixed("down", 800))
    after = app_rss(app)
    assert_served(replies, expected)
    failed = sum(1 for r in warm + replies if r.status == 500)
    assert runtime_errors(app) == failed  # counted even when Sentry gets none of them

    with SentryReceiver(http_port=sentry_port) as sentry:
        # Sentry drops what it could not send; new errors must reach it now. The event
        # budget (10 a second after a burst of 100) was spent by the outage, so ask a few times.
        deadline = time.monotonic() + 15
        sent_up = 0
        while not sentry.wait_for(lambda: bool(sentry.events), timeout=0.3):
            assert time.monotonic() < deadline, "no event reached Sentry after it came up"
            assert app.get(f"/api/tickets/up-{sent_up}/boom")[0] == 500
            sent_up += 1
        values = [e["exception"]["values"][-1]["value"] for e in sentry.events]
        assert all(v.startswith("boom up-") for v in values), values

    # Gone again: errors queue up for a Sentry that no longer answers, then SIGTERM.
    assert_served(hammer(app.port, mixed("gone", 40)), expected)
    exited_in = app.terminate()
    figures(
        "sentry-down",
        requests=len(warm) + len(replies),
        errors=failed,
        up_requests_until_event=sent_up,
        rss_before_mib=before,
        rss_after_mib=after,
        shutdown_s=exited_in,
        **latency(replies),
    )
    assert after - before < RSS_BOUND_MIB
    assert exited_in < SHUTDOWN_BOUND_S
