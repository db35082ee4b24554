"""cfk_otel/_errors/api.py and _sentry.py: the document's API, scrubbing, per-request scopes.

Sentry runs for real here, in process, sending to cfk_otel.testing.SentryReceiver.
"""

from __future__ import annotations

import asyncio
import gc
import gzip
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

import cfk_otel
from cfk_otel import _settings
from cfk_otel._asgi.middleware import RequestInfo, TelemetryMiddleware
from cfk_otel._core import sampling as _sampling
from cfk_otel._errors import api as _errors
from cfk_otel._errors import total as _errors_total
from cfk_otel.testing import SentryReceiver, parse_envelope

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "sentry"


@pytest.fixture(autouse=True)
def _clean_state() -> Iterator[None]:
    yield
    _errors._reset_for_tests()


@pytest.fixture
def sentry() -> Iterator[SentryReceiver]:
    with SentryReceiver() as receiver:
        _errors.start(_settings.load({"SENTRY_DSN": receiver.dsn, "SENTRY_CAPTURE_4XX": "401"}))
        assert _errors.STATE.active
        yield receiver
        _errors._reset_for_tests()  # flush while the receiver still listens


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(_errors_total, "_add", lambda registry, t, s: calls.append((t, s)))
    return calls


# --- levels and the API without Sentry -----------------------------------------------------


def test_levels_map_to_sentry_and_unknown_ones_log_once(caplog: pytest.LogCaptureFixture) -> None:
    assert [_errors.sentry_level(x) for x in ("debug", "info", "warn", "warning", "error", "fatal")] == [
        "debug",
        "info",
        "warning",
        "warning",
        "error",
        "fatal",
    ]
    assert _errors.sentry_level("WARN") == "warning"
    with caplog.at_level(logging.WARNING, "cfk_otel.errors"):
        assert _errors.sentry_level("loud") == "error"
        assert _errors.sentry_level("loud") == "error"
        assert _errors.sentry_level(3) == "error"
    assert [r.getMessage() for r in caplog.records] == [
        "cfk_otel: capture_error(): unknown level 'loud' (use debug, info, warn, error or fatal); "
        "using 'error'",
        "cfk_otel: capture_error(): unknown level 3 (use debug, info, warn, error or fatal); using 'error'",
    ]


def test_without_a_dsn_the_api_only_counts(counted: list[tuple[str, str]]) -> None:
    assert cfk_otel.capture_error(KeyError("x"), level="warn") is None
    assert cfk_otel.capture_message("hello", "info", {"a": 1}, b=2) is None
    cfk_otel.set_user({"id": "1"})
    assert counted == [("KeyError", "warn")]  # messages are not errors

    observers: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    assert _errors.instrument(app, observers, _errors_total.RequestErrors()) is app
    assert observers == []


def test_without_a_dsn_sentry_sdk_is_never_imported() -> None:
    code = (
        "import sys, cfk_otel; from cfk_otel import _settings; from cfk_otel._errors import api as _errors; "
        "_errors.start(_settings.load({})); cfk_otel.capture_error(ValueError()); "
        "cfk_otel.capture_message('m'); cfk_otel.set_user({'id': 1}); "
        "print('sentry_sdk' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SENTRY_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"


# --- settings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "codes"),
    [
        ("none", set()),
        ("all", set(range(400, 500))),
        ("429, 401,403", {401, 403, 429}),
        ("ALL", set(range(400, 500))),
    ],
)
def test_capture_4xx_values(value: str, codes: set[int]) -> None:
    settings = _settings.load({"SENTRY_CAPTURE_4XX": value})
    assert settings.sentry_capture_4xx == codes
    assert not settings.problems


@pytest.mark.parametrize("value", ["500", "401,abc", "", "399", "some"])
def test_capture_4xx_rejects_other_values(value: str) -> None:
    settings = _settings.load({"SENTRY_CAPTURE_4XX": value})
    assert settings.sentry_capture_4xx == frozenset(range(400, 500))  # the default, all
    assert [p.variable for p in settings.problems] == ["SENTRY_CAPTURE_4XX"]


def test_capture_4xx_is_in_the_variable_table() -> None:
    assert "| `SENTRY_CAPTURE_4XX` | `all` |" in _settings.markdown_table()
    assert "| `SENTRY_CAPTURE_4XX` | `all` |" in (ROOT / "README.md").read_text()


def test_traces_sample_rate_is_the_opentelemetry_sampler(monkeypatch: pytest.MonkeyPatch) -> None:
    mapped = _settings.load({"SENTRY_TRACES_SAMPLE_RATE": "0.1"})
    assert (mapped.sampler, mapped.sampler_arg) == ("parentbased_traceidratio", 0.1)
    explicit = _settings.load({"SENTRY_TRACES_SAMPLE_RATE": "0.1", "OTEL_TRACES_SAMPLER": "always_on"})
    assert (explicit.sampler, explicit.sampler_arg) == ("always_on", None)
    assert _settings.load({}).sampler == "parentbased_always_on"

    # Set-up gives the provider the sampler the settings chose; the environment the SDK
    # reads is left as it was (the error tracker no longer writes it).
    for name in ("OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG"):
        monkeypatch.setenv(name, "")  # recorded, so that both are restored afterwards
        monkeypatch.delenv(name)
    _errors.start(mapped)
    assert "OTEL_TRACES_SAMPLER" not in os.environ
    assert "OTEL_TRACES_SAMPLER_ARG" not in os.environ
    assert (
        _sampling.head_sampler(mapped).get_description()
        == ParentBased(TraceIdRatioBased(0.1)).get_description()
    )


@pytest.mark.parametrize("name", _settings.SAMPLERS)
@pytest.mark.parametrize("arg", [None, "0.25"])
def test_each_sampler_is_the_one_the_sdk_would_build(name: str, arg: str | None) -> None:
    # The SDK's own factories, by their public entry points, are the oracle.
    [entry] = entry_points(group="opentelemetry_traces_sampler", name=name)
    ratio = name.endswith("traceidratio")
    expected = entry.load()((float(arg) if arg else 1.0) if ratio else arg)
    env = {"OTEL_TRACES_SAMPLER": name, **({"OTEL_TRACES_SAMPLER_ARG": arg} if arg else {})}
    assert _sampling.head_sampler(_settings.load(env)).get_description() == expected.get_description()


def test_the_provider_samples_at_the_sentry_rate() -> None:
    script = (
        "import cfk_otel\n"
        "from opentelemetry import trace\n"
        "cfk_otel.configure()\n"
        "print(trace.get_tracer_provider().sampler.get_description())\n"
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "SENTRY_TRACES_SAMPLE_RATE": "0.2",
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
    }
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "ParentBased{root:TraceIdRatioBased{0.2}" in result.stdout.strip().splitlines()[-1]


# --- scrubbing -------------------------------------------------------------------------------


def test_scrub_withholds_secret_keys_at_any_depth() -> None:
    from cfk_otel._redact import scrub

    deep: dict[str, Any] = {"password": "p", "author": "ann", "ticketId": 7}
    for _ in range(20):
        deep = {"list": [{"level": deep}]}
    event = {
        "request": {"headers": {"Authorization": "Bearer abc", "Cookie": "a=b", "Accept": "*/*"}},
        "extra": {
            "api_key": "k",
            "X-Api-Key": "k",
            "accessToken": "t",
            "sentry_dsn": "https://key@o1.ingest.sentry.io/1",
            "pairs": [["set-cookie", "s"], ["content-type", "json"], ("authorization", "x")],
            "deep": deep,
        },
    }
    original = json.dumps(event)
    scrubbed = scrub(event)
    assert json.dumps(event) == original  # a copy: the input is untouched
    assert scrubbed["request"]["headers"] == {
        "Authorization": "[REDACTED]",
        "Cookie": "[REDACTED]",
        "Accept": "*/*",
    }
    extra = scrubbed["extra"]
    assert [extra[k] for k in ("api_key", "X-Api-Key", "accessToken", "sentry_dsn")] == ["[REDACTED]"] * 4
    assert json.loads(json.dumps(extra["pairs"])) == [  # a tuple stays one: both are arrays
        ["set-cookie", "[REDACTED]"],
        ["content-type", "json"],
        ["authorization", "[REDACTED]"],
    ]
    leaf = extra["deep"]
    for _ in range(20):
        leaf = leaf["list"][0]["level"]
    assert leaf == {"password": "[REDACTED]", "author": "ann", "ticketId": 7}


def test_scrub_text_removes_credentials() -> None:
    from cfk_otel._redact import scrub, scrub_text

    assert scrub_text("could not connect to postgresql://app:pw@db:5432/cfk") == (
        "could not connect to postgresql://[REDACTED]@db:5432/cfk"
    )
    cases = {
        "DSN https://abc123@o1.ingest.sentry.io/42": "DSN https://[REDACTED]@o1.ingest.sentry.io/42",
        "header Authorization: Bearer eyJhbGciOi.x.y": "header Authorization: [REDACTED]",  # all of it
        "GET /cb?code=1&access_token=abc&page=2": "GET /cb?code=1&access_token=[REDACTED]&page=2",
    }
    for text, expected in cases.items():
        assert scrub_text(text) == expected
    assert scrub_text("{'password': 'hunter2', 'user': 'ann'}") == "{'password': '[REDACTED]', 'user': 'ann'}"
    assert scrub_text('password = "hunter2"  # a source line') == 'password = "[REDACTED]"  # a source line'
    assert scrub_text("ticket 7 moved: todo -> done at 12:30") == "ticket 7 moved: todo -> done at 12:30"
    assert scrub_text("see https://example.com/a@b") == "see https://example.com/a@b"  # not user info
    # An exception's class name before its message is not a secret key: the message stays.
    failed = 'InvalidPasswordError: password authentication failed for user "cfk"'
    assert scrub_text(failed) == failed
    nested = 70 * [0]
    value: Any = "x"
    for _ in nested:
        value = [value]
    assert "[REDACTED]" in json.dumps(scrub(value))  # bounded: deeper than 64 levels is withheld


def test_before_send_drops_an_exception_already_reported() -> None:
    from cfk_otel._errors.sentry import before_send

    error = ValueError("once")
    hint: Any = {"exc_info": (ValueError, error, None)}
    first = before_send({"extra": {"token": "t"}}, hint)
    assert first == {"extra": {"token": "[REDACTED]"}}
    assert before_send({"message": "again"}, hint) is None
    other: Any = {"exc_info": (ValueError, ValueError("other"), None)}
    assert before_send({"message": "other"}, other) is not None


def test_budget_refills_over_time() -> None:
    from cfk_otel._errors.sentry import Budget

    now = [0.0]
    budget = Budget(rate=10.0, burst=3.0, clock=lambda: now[0])
    assert [budget.take() for _ in range(4)] == [True, True, True, False]
    now[0] += 0.25  # 2.5 tokens back
    assert [budget.take() for _ in range(3)] == [True, True, False]
    now[0] += 100.0  # never more than the burst
    assert sum(budget.take() for _ in range(10)) == 3


# --- the API with Sentry ---------------------------------------------------------------------


def test_an_error_storm_stays_within_the_event_budget(
    sentry: SentryReceiver, counted: list[tuple[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    from cfk_otel._errors import sentry as _sentry

    _sentry.budget = _sentry.Budget(rate=0.0, burst=5.0)
    with caplog.at_level(logging.WARNING, "cfk_otel.errors"):
        ids = [cfk_otel.capture_error(ValueError(str(i))) for i in range(20)]
    assert sum(i is not None for i in ids) == 5
    assert len(counted) == 20  # errors_total still counts every one
    assert len(sentry.wait_for_events(5)) == 5
    assert caplog.text.count("Sentry events in a burst") == 1


def test_capture_error_sends_level_tags_extra(sentry: SentryReceiver, counted: list[tuple[str, str]]) -> None:
    try:
        raise KeyError("ticket-7")
    except KeyError as exc:
        event_id = cfk_otel.capture_error(
            exc, level="warn", tags={"component": "tickets-api"}, extra={"ticketId": 7, "password": "p"}
        )
    [event] = sentry.wait_for_events(1)
    assert event["event_id"] == event_id
    assert event["level"] == "warning"
    assert event["tags"] == {"component": "tickets-api"}
    assert event["extra"] == {"ticketId": 7, "password": "[REDACTED]"}
    assert event["exception"]["values"][-1]["type"] == "KeyError"
    assert "user" not in event
    assert counted == [("KeyError", "warn")]


def test_capture_message_with_context_and_fields(sentry: SentryReceiver) -> None:
    cfk_otel.capture_message("User completed onboarding", "info", {"userId": "u-1"}, duration=45000)
    [event] = sentry.wait_for_events(1)
    assert (event["level"], event["message"]) == ("info", "User completed onboarding")
    assert event["extra"] == {"userId": "u-1", "duration": 45000}


def test_set_user_outside_requests_applies_until_cleared(sentry: SentryReceiver) -> None:
    cfk_otel.set_user({"id": "42", "email": "ann@example.com"})
    cfk_otel.capture_message("with user")
    cfk_otel.set_user(None)
    cfk_otel.capture_message("without")
    first, second = sentry.wait_for_events(2)
    assert first["user"] == {"id": "42", "email": "ann@example.com"}
    assert "user" not in second


def test_close_flushes_and_stops(sentry: SentryReceiver) -> None:
    sentry.delay = 0.2
    for i in range(3):
        cfk_otel.capture_message(f"m{i}")
    _errors.close(3.0)
    assert [e["message"] for e in sentry.events] == ["m0", "m1", "m2"]
    assert cfk_otel.capture_message("after") is None


# --- per request: isolation, automatic reports ------------------------------------------------


async def _user_endpoint(request: Request) -> PlainTextResponse:
    n = request.path_params["n"]
    cfk_otel.set_user({"id": str(n)})
    await asyncio.sleep((n * 7 % 10) / 1000)  # interleave
    cfk_otel.capture_error(ValueError(str(n)))
    if request.query_params.get("raise"):
        raise RuntimeError(str(n))
    return PlainTextResponse("ok")


async def _status_endpoint(request: Request) -> PlainTextResponse:
    return PlainTextResponse("", status_code=request.path_params["code"])


async def _cancelled(request: Request) -> PlainTextResponse:
    raise asyncio.CancelledError


def _errors_rule() -> _errors_total.RequestErrors:
    """The 4xx rule of the settings the test started error tracking with (instrument_app's)."""
    settings = _errors.STATE.settings
    return _errors_total.RequestErrors(*([settings.sentry_capture_4xx] if settings else []))


def _instrumented(spans: InMemorySpanExporter) -> Any:
    inner = Starlette(
        routes=[
            Route("/users/{n:int}", _user_endpoint),
            Route("/status/{code:int}", _status_endpoint),
            Route("/cancelled", _cancelled),
        ]
    )
    tracer_provider = TracerProvider(sampler=ALWAYS_ON)
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    observers: list[Any] = []
    errors = _errors_rule()
    app = _errors.instrument(inner, observers, errors)
    assert app is not inner
    assert len(observers) == 1
    return TelemetryMiddleware(
        app,
        tracer_provider=tracer_provider,
        meter_provider=MeterProvider(),
        observers=observers,
        errors=errors,
    )


async def _get(app: Any, path: str) -> int:
    raw, _, query = path.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": raw,
        "raw_path": raw.encode(),
        "root_path": "",
        "query_string": query.encode(),
        "headers": [(b"host", b"test"), (b"cookie", b"sid=1"), (b"x-forwarded-for", b"10.1.2.3")],
        "client": ("10.9.8.7", 1234),
        "server": ("test", 80),
    }
    status = 0

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    try:
        await app(scope, receive, send)
    except (Exception, asyncio.CancelledError):
        return status or 500
    return status


def test_users_never_leak_between_concurrent_requests(sentry: SentryReceiver) -> None:
    spans = InMemorySpanExporter()
    app = _instrumented(spans)

    async def run() -> list[int]:
        return await asyncio.gather(*(_get(app, f"/users/{n}" + "?raise=1" * (n % 2)) for n in range(50)))

    statuses = asyncio.run(run())
    assert statuses == [500 if n % 2 else 200 for n in range(50)]
    events = sentry.wait_for_events(75)  # 50 captured + 25 unhandled
    assert len(events) == 75
    by_span = {format(s.context.span_id, "016x"): s for s in spans.get_finished_spans()}
    for event in events:
        n = event["exception"]["values"][-1]["value"]
        assert event["user"] == {"id": n}
        assert event["transaction"] == "/users/{n}"
        span = by_span[event["contexts"]["trace"]["span_id"]]
        assert format(span.context.trace_id, "032x") == event["contexts"]["trace"]["trace_id"]
        assert span.attributes is not None
        assert span.attributes["url.path"] == f"/users/{n}"
        assert event["request"]["headers"] == {"host": "test"}  # no cookies, no addresses
        assert "10.1.2.3" not in json.dumps(event)
        assert "10.9.8.7" not in json.dumps(event)


def test_4xx_rule_5xx_and_cancellations(sentry: SentryReceiver, counted: list[tuple[str, str]]) -> None:
    app = _instrumented(InMemorySpanExporter())

    async def run() -> list[int]:
        return [await _get(app, p) for p in ("/status/400", "/status/401", "/status/502", "/cancelled")]

    assert asyncio.run(run()) == [400, 401, 502, 500]
    cfk_otel.capture_message("marker")
    events = sentry.wait_for_events(3)
    assert [(e["level"], e["message"]) for e in events] == [
        ("warning", "HTTP 401 Unauthorized"),
        ("error", "HTTP 502 Bad Gateway"),
        ("info", "marker"),
    ]
    # Every error through the one writer (_errors), reported to Sentry or not: 400 is not
    # in this SENTRY_CAPTURE_4XX, a cancellation counts as the exception it is.
    assert counted == [("http_401", "warn"), ("http_502", "error"), ("CancelledError", "error")]


def test_observer_never_raises(sentry: SentryReceiver, caplog: pytest.LogCaptureFixture) -> None:
    from cfk_otel._errors.sentry import ErrorObserver

    broken: Any = RequestInfo(None, "http", "GET", "/x", 500, 0.1, None, None)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, "cfk_otel.errors"):
        ErrorObserver()(broken)
    assert "reporting a request to Sentry failed" in caplog.text


def test_failed_background_task_is_reported_and_the_previous_handler_still_runs(
    sentry: SentryReceiver,
) -> None:
    from cfk_otel._errors.sentry import watch_background_tasks

    seen: list[str] = []

    async def fail() -> None:
        raise LookupError("nobody awaited me")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda loop, context: seen.append(context["message"]))
        watch_background_tasks(loop)
        watch_background_tasks(loop)  # once is enough
        cfk_otel.set_user({"id": "someone-else"})  # current when the task is collected
        task = loop.create_task(fail(), name="export")
        await asyncio.sleep(0.05)
        del task  # nobody retrieves its exception
        gc.collect()

    asyncio.run(main())
    [event] = sentry.wait_for_events(1)
    assert event["exception"]["values"][-1]["mechanism"] == {"type": "asyncio", "handled": False}
    assert event["tags"]["asyncio.task"] == "export"
    assert event.get("user") != {"id": "someone-else"} or sys.version_info >= (3, 12)
    assert seen == ["Task exception was never retrieved"]


# --- the stand-in and the alert definitions ----------------------------------------------------


def test_parse_envelope_with_and_without_lengths() -> None:
    body = b'{"event_id":"1"}\n{"type":"attachment","length":4}\na\nb\n\n{"type":"event"}\n{"b":2}\n'
    headers, items = parse_envelope(gzip.decompress(gzip.compress(body)))
    assert headers == {"event_id": "1"}
    assert [(h["type"], p) for h, p in items] == [("attachment", b"a\nb\n"), ("event", b'{"b":2}')]


def _alerts(kind: str) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((DOCS / kind).glob("*.json"))]


def test_issue_alerts_are_sentry_issue_alert_payloads() -> None:
    rules = {r["name"]: r for r in _alerts("issue-alerts")}
    known = {
        "sentry.rules.conditions.first_seen_event.FirstSeenEventCondition",
        "sentry.rules.conditions.regression_event.RegressionEventCondition",
    }
    assert len(rules) == 2
    for rule in rules.values():
        assert set(rule) >= {"name", "actionMatch", "filterMatch", "frequency", "conditions", "actions"}
        assert rule["actionMatch"] in ("all", "any", "none")
        assert isinstance(rule["frequency"], int)
        assert 5 <= rule["frequency"] <= 43200
        assert len(rule["conditions"]) == 1
        assert rule["conditions"][0]["id"] in known
        [action] = rule["actions"]
        assert action["id"] == "sentry.integrations.slack.notify_action.SlackNotifyServiceAction"
        assert action["channel"].startswith("#")
        assert action["workspace"] == "${SENTRY_SLACK_INTEGRATION_ID}"
    conditions = {r["conditions"][0]["id"].rsplit(".", 1)[1] for r in rules.values()}
    assert conditions == {"FirstSeenEventCondition", "RegressionEventCondition"}


def test_metric_alerts_are_sentry_metric_alert_payloads() -> None:
    rules = {r["name"]: r for r in _alerts("metric-alerts")}
    assert len(rules) == 2
    for rule in rules.values():
        assert set(rule) >= {"name", "aggregate", "dataset", "query", "timeWindow", "projects", "triggers"}
        assert rule["thresholdType"] == 0  # above
        [trigger] = rule["triggers"]
        assert trigger["label"] == "critical"
        for action in trigger["actions"]:
            assert action["type"] in ("slack", "pagerduty")
            assert action["targetType"] == "specific"
            assert {"targetIdentifier", "integrationId"} <= set(action)
    spike = next(r for r in rules.values() if r["aggregate"] == "count()")
    assert (spike["dataset"], spike["query"], spike["timeWindow"]) == ("events", "event.type:error", 10)
    assert spike["triggers"][0]["alertThreshold"] == 10
    assert {a["type"] for a in spike["triggers"][0]["actions"]} == {"slack", "pagerduty"}
    latency = next(r for r in rules.values() if r["aggregate"].startswith("p95("))
    assert latency["triggers"][0]["alertThreshold"] == 2000  # milliseconds
    assert {a["type"] for a in latency["triggers"][0]["actions"]} == {"slack"}


def test_alert_placeholders_are_documented() -> None:
    guide = (ROOT / "docs" / "sentry.md").read_text()
    text = "".join(p.read_text() for p in DOCS.rglob("*.json"))
    for name in set(re.findall(r"\$\{([A-Z_]+)\}", text)):
        assert f"`{name}`" in guide, name


# --- issue 19: the document's call shapes, errors_total from every source, 4xx -----------------


def test_capture_error_takes_the_documents_context_dict(
    sentry: SentryReceiver, counted: list[tuple[str, str]]
) -> None:
    error = KeyError("ticket-7")
    event_id = cfk_otel.capture_error(
        error,
        {
            "level": "warning",
            "tags": {"component": "tickets-api"},
            "extra": {"ticketId": 7, "userId": "u-1"},
            "attempt": 2,  # not one of the three: kept in extra
        },
    )
    cfk_otel.capture_error(ValueError("old"), "fatal", {"component": "jobs"}, {"job": 3})  # positional
    first, second = sentry.wait_for_events(2)
    assert first["event_id"] == event_id
    assert first["level"] == "warning"
    assert first["tags"] == {"component": "tickets-api"}
    assert first["extra"] == {"ticketId": 7, "userId": "u-1", "attempt": 2}
    assert (second["level"], second["tags"], second["extra"]) == ("fatal", {"component": "jobs"}, {"job": 3})
    assert counted == [("KeyError", "warn"), ("ValueError", "fatal")]


def test_keywords_win_over_the_context_dict(sentry: SentryReceiver) -> None:
    cfk_otel.capture_error(
        ValueError("x"), {"level": "info", "tags": {"a": "1"}}, tags={"b": "2"}, extra={"e": 1}, level="error"
    )
    [event] = sentry.wait_for_events(1)
    assert (event["level"], event["tags"], event["extra"]) == ("error", {"a": "1", "b": "2"}, {"e": 1})


def test_set_user_takes_a_dict_or_keywords(sentry: SentryReceiver) -> None:
    cfk_otel.set_user(id="42", email="ann@example.com")
    cfk_otel.capture_message("keywords")
    cfk_otel.set_user({"id": "43"}, username="bob")
    cfk_otel.capture_message("both")
    first, second = sentry.wait_for_events(2)
    assert first["user"] == {"id": "42", "email": "ann@example.com"}
    assert second["user"] == {"id": "43", "username": "bob"}


def test_bad_arguments_never_raise_and_warn_once_naming_the_call(
    sentry: SentryReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    bad: Any = ["not", "a", "dict"]
    with caplog.at_level(logging.WARNING, "cfk_otel.errors"):
        for _ in range(3):
            cfk_otel.capture_error(ValueError("a"), bad)
            cfk_otel.capture_error(ValueError("b"), {"tags": "component=x", "level": "loud"})
            cfk_otel.capture_message("m", "info", bad)
            cfk_otel.capture_message("m", 42)  # type: ignore[arg-type]
            cfk_otel.set_user(bad)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == len(set(messages)) == 6  # each problem once
    assert sum(m.startswith("cfk_otel: capture_error(): ") for m in messages) == 3
    assert sum(m.startswith("cfk_otel: capture_message(): ") for m in messages) == 2
    assert sum(m.startswith("cfk_otel: set_user(): ") for m in messages) == 1
    events = sentry.wait_for_events(12)
    first, second = events[0], events[1]
    assert first["extra"] == {"context": ["not", "a", "dict"]}  # nothing dropped
    assert (second["level"], second["tags"], second.get("extra")) == ("error", {"tags": "component=x"}, None)


def test_without_sentry_every_source_counts_in_errors_total(counted: list[tuple[str, str]]) -> None:
    _errors_total.slow_query("SELECT pg_sleep(2)", "SELECT", 2.0)
    error = LookupError("never awaited")
    _errors_total.unhandled(error, "asyncio")
    _errors_total.unhandled(error, "asyncio")  # the same exception seen by a second hook
    _errors_total.unhandled(RuntimeError("top"), "excepthook", "fatal")
    cfk_otel.capture_error(TypeError("handled"))
    assert counted == [
        ("slow_query", "warn"),
        ("LookupError", "error"),
        ("RuntimeError", "fatal"),
        ("TypeError", "error"),
    ]


async def _closing_socket(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.close(code=int(websocket.path_params["code"]))


def _counting_app() -> Any:
    inner = Starlette(
        routes=[
            Route("/status/{code:int}", _status_endpoint),
            Route("/boom", _boom),
            WebSocketRoute("/ws/{code:int}", _closing_socket),
        ]
    )
    return TelemetryMiddleware(inner, meter_provider=MeterProvider(), errors=_errors_rule())


async def _boom(request: Request) -> PlainTextResponse:
    raise ZeroDivisionError


async def _websocket(app: Any, path: str) -> None:
    messages = [{"type": "websocket.connect"}]

    async def receive() -> dict[str, Any]:
        return messages.pop() if messages else {"type": "websocket.disconnect", "code": 1000}

    async def send(message: dict[str, Any]) -> None:
        pass

    scope = {"type": "websocket", "path": path, "raw_path": path.encode(), "root_path": "", "headers": []}
    scope |= {"query_string": b"", "scheme": "ws", "subprotocols": [], "asgi": {"version": "3.0"}}
    await app(scope, receive, send)


def test_without_sentry_requests_count_exceptions_5xx_4xx_and_abnormal_closes(
    counted: list[tuple[str, str]],
) -> None:
    app = _counting_app()

    async def run() -> list[int]:
        statuses = [await _get(app, p) for p in ("/status/200", "/status/503", "/boom", "/status/429")]
        statuses += [await _get(app, "/status/404"), await _get(app, "/no/such/route")]
        for code in (1000, 1001, 1011, 1014):
            await _websocket(app, f"/ws/{code}")
        return statuses

    assert asyncio.run(run()) == [200, 503, 500, 429, 404, 404]
    assert counted == [
        ("http_503", "error"),
        ("ZeroDivisionError", "error"),
        ("http_429", "warn"),
        ("http_404", "warn"),  # a route's own 404; the unmatched path's is not counted
        ("websocket_1011", "error"),
        ("websocket_1014", "error"),
    ]


def test_capture_4xx_narrows_or_turns_off_the_4xx(counted: list[tuple[str, str]]) -> None:
    for value, expected in (("429", [("http_429", "warn")]), ("none", [])):
        counted.clear()
        _errors.start(_settings.load({"SENTRY_CAPTURE_4XX": value}))
        app = _counting_app()

        async def run(app: Any = app) -> None:
            for path in ("/status/400", "/status/404", "/status/429"):
                await _get(app, path)

        asyncio.run(run())
        assert counted == expected


def test_4xx_are_reported_by_default_one_issue_per_route_and_rate_limited(sentry: SentryReceiver) -> None:
    from cfk_otel._errors import sentry as _sentry

    _errors._reset_for_tests()
    _errors.start(_settings.load({"SENTRY_DSN": sentry.dsn}))  # SENTRY_CAPTURE_4XX unset: all
    app = _instrumented(InMemorySpanExporter())
    assert _sentry.ISSUE_BURST == 10

    async def run() -> None:
        for _ in range(15):
            await _get(app, "/status/409")
        await _get(app, "/users/x")  # 404: no route matches
        await _get(app, "/status/404")  # a route's own 404

    asyncio.run(run())
    cfk_otel.capture_message("marker")
    events = sentry.wait_for_events(12)
    assert [e["message"] for e in events] == ["HTTP 409 Conflict"] * 10 + ["HTTP 404 Not Found", "marker"]
    conflict = events[0]
    assert conflict["level"] == "warning"
    assert conflict["fingerprint"] == ["http", "GET", "/status/{code}", "409", "HTTP 409 Conflict"]
    assert conflict["tags"]["http.route"] == "/status/{code}"
    assert events[10]["tags"]["http.route"] == "/status/{code}"


def test_without_sentry_a_failed_background_task_counts_once(counted: list[tuple[str, str]]) -> None:
    from cfk_otel._errors import uncaught as _uncaught

    async def fail() -> None:
        raise LookupError("nobody awaited me")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda loop, context: None)
        _uncaught.watch_loop(loop)  # as uvicorn's start-up does (cfk_otel._instrumentation.uvicorn)
        task = loop.create_task(fail())
        await asyncio.sleep(0.05)
        del task
        gc.collect()

    asyncio.run(main())
    assert counted == [("LookupError", "error")]


def test_errors_total_has_one_writer() -> None:
    """Only cfk_otel/_errors/total.py writes errors_total; _metrics/catalogue.py declares it."""
    for path in sorted((ROOT / "cfk_otel").rglob("*.py")):
        if path.relative_to(ROOT / "cfk_otel").as_posix() in ("_errors/total.py", "_metrics/catalogue.py"):
            continue
        text = path.read_text()
        assert not re.search(r"\.errors\.(inc|add_by_key)\b|count_error\(", text), path.name
