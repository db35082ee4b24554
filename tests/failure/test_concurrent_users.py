"""Hundreds of requests in flight at once, each setting its own user (``set_user``) and
binding it to a child logger: every JSON line, OTLP log record and Sentry event carries its
own request's user and trace, never another's."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from cfk_otel.testing import OtlpReceiver, SentryReceiver
from tests.conftest import free_port, uvicorn_command
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

pytestmark = pytest.mark.timeout(90)

CROWD = 200  # requests released together, per round
ROUNDS = 2
MESSAGES = ("user request started", "user request via logging", "user request finished")


def test_each_request_keeps_its_own_user_and_trace(run_app: StartApp, receiver: OtlpReceiver) -> None:
    with SentryReceiver() as sentry:
        port = free_port()
        env = otlp_env(receiver.http_endpoint, "http/protobuf", SENTRY_DSN=sentry.dsn)
        app = run_app(uvicorn_command("failure_app:app", port), env, port)
        # A short warm-up: Sentry's event budget (a burst of 100) is kept for the crowd.
        assert_served(
            hammer(app.port, [f"/users/warm-{i}" for i in range(30)], concurrency=30), lambda _: 200
        )
        before = app_rss(app)

        users = [f"u{r}-{i:03d}-{uuid.uuid4().hex[:8]}" for r in range(ROUNDS) for i in range(CROWD)]
        replies = []
        for r in range(ROUNDS):
            crowd = users[r * CROWD : (r + 1) * CROWD]
            replies += hammer(app.port, [f"/users/{u}" for u in crowd], concurrency=CROWD)
        after = app_rss(app)
        assert_served(replies, lambda _: 200)
        bodies = [json.loads(r.body) for r in replies]
        assert [b["user"] for b in bodies] == users
        peak = max(b["peak"] for b in bodies)
        assert peak >= 20, f"only {peak} requests were ever in flight together"

        # The request's own trace, from its server span.
        wanted = {f"/users/{u}" for u in users}
        assert receiver.wait_for(
            lambda: wanted <= {s.attributes.get("url.path") for s in receiver.spans}, timeout=30
        ), "not every request's span arrived"
        trace = {
            str(s.attributes["url.path"]).removeprefix("/users/"): s.trace_id
            for s in receiver.iter_spans()
            if s.attributes.get("url.path") in wanted
        }

        # OTLP log records: three per request, each with its request's user and trace.
        def records() -> list[Any]:
            return [
                r for r in list(receiver.logs) if r.body in MESSAGES and r.attributes.get("userId") in trace
            ]

        assert receiver.wait_for(lambda: len(records()) >= len(MESSAGES) * len(users), timeout=30), len(
            records()
        )
        crossed = [
            (r.attributes["userId"], r.body)
            for r in records()
            if r.record.trace_id.hex() != trace[r.attributes["userId"]]
        ]
        assert not crossed, f"{len(crossed)} OTLP records carry another request's trace: {crossed[:5]}"
        assert len(records()) == len(MESSAGES) * len(users)

        # Sentry: set_user per request. The event budget (a burst of 100, then 10 a second)
        # keeps only part of the 400 messages; every one kept must be its request's own.
        events = sentry.wait_for_events(50, lambda e: str(e.get("message", "")).startswith("user u"))
        exited_in = app.terminate()

    lines = [json.loads(x) for x in app.output().splitlines() if x.startswith("{")]
    request_trace = {x["path"]: x["trace_id"] for x in lines if x.get("route") == "/users/{user_id}"}
    by_user: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        if line["message"] in MESSAGES and str(line.get("userId", "")).startswith("u"):
            by_user.setdefault(line["userId"], []).append(line)
    assert set(by_user) == set(users)
    # Every request has its request line (if one is missing, show what the app said about it).
    missing = [u for u in users if f"/users/{u}" not in request_trace]
    assert not missing, (
        missing[:3],
        [x for x in lines if missing[0] in json.dumps(x) and x["message"] not in MESSAGES][:5],
        [x for x in app.output().splitlines() if not x.startswith("{")][:10],
    )
    for user, mine in by_user.items():
        assert sorted(x["message"] for x in mine) == sorted(MESSAGES), (user, mine)
        assert {x["trace_id"] for x in mine} == {trace[user]} == {request_trace[f"/users/{user}"]}, mine

    wrong = [
        e["message"]
        for e in events
        if e.get("user", {}).get("id") != e["message"].split()[1]
        or e.get("contexts", {}).get("trace", {}).get("trace_id") != trace[e["message"].split()[1]]
    ]
    figures(
        "concurrent-users",
        requests=len(replies),
        peak_in_flight=peak,
        sentry_events=len(events),
        rss_before_mib=before,
        rss_after_mib=after,
        shutdown_s=exited_in,
        **latency(replies),
    )
    assert not wrong, f"{len(wrong)} Sentry events with another request's user or trace: {wrong[:5]}"
    assert after - before < RSS_BOUND_MIB
    assert exited_in < SHUTDOWN_BOUND_S
