"""cfk_otel/_health/registry.py in process: the probes' answers, checks, timeouts, cache and shutdown."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

from cfk_otel import (
    HealthCheckResult,
    HealthRegistry,
    _settings,
    health_app,
    mark_shutting_down,
    register_health_check,
)
from cfk_otel._health import registry as _health

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture(autouse=True)
def fresh_process_state() -> Iterator[None]:
    _health._reset_for_tests()
    yield
    _health._reset_for_tests()


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, Any]:
        return json.loads(self.body)  # type: ignore[no-any-return]


async def call(app: Any, path: str, method: str = "GET", root_path: str = "") -> Response:
    """One HTTP request straight into an ASGI app."""
    messages: list[dict[str, Any]] = []
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "root_path": root_path,
        "headers": [],
        "query_string": b"",
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    await app(scope, receive, send)
    start, body = messages[0], messages[1]
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return Response(start["status"], headers, body["body"])


def run(coro: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(coro())  # type: ignore[arg-type]


def registry(**kwargs: Any) -> HealthRegistry:
    kwargs.setdefault("cache_ttl", 0)
    kwargs.setdefault("timeout", 0.5)
    return HealthRegistry(**kwargs)


class Counter:
    """A check that counts its calls and answers what it is told."""

    def __init__(self, answer: object = True) -> None:
        self.calls = 0
        self.answer = answer

    def __call__(self) -> Any:
        self.calls += 1
        return self.answer


# --- endpoints from the settings -------------------------------------------------------------


def test_build_endpoints_serves_the_configured_paths() -> None:
    endpoints = _health.build_endpoints(_settings.load({}))
    assert sorted(endpoints) == ["/api/health", "/api/health/live", "/api/health/ready"]

    _health._reset_for_tests()
    custom = _settings.load(
        {"HEALTH_PATH": "/healthz", "HEALTH_LIVE_PATH": "/livez", "HEALTH_READY_PATH": "/readyz"}
    )
    endpoints = _health.build_endpoints(custom)
    assert sorted(endpoints) == ["/healthz", "/livez", "/readyz"]
    assert run(lambda: call(endpoints["/readyz"], "/readyz")).status == 200

    assert _health.build_endpoints(_settings.load({"HEALTH_ENABLED": "false"})) == {}


def test_registered_checks_appear_in_the_zero_code_endpoints() -> None:
    endpoints = _health.build_endpoints(_settings.load({"SERVICE_VERSION": "1.0.0"}))
    register_health_check("queue", lambda: "3 jobs waiting")
    body = run(lambda: call(endpoints["/api/health"], "/api/health")).json()
    assert body["version"] == "1.0.0"
    assert body["checks"][0]["name"] == "queue"
    assert body["checks"][0]["message"] == "3 jobs waiting"


def test_no_urls_no_builtin_checks() -> None:
    assert _health._from_settings(_settings.load({})).names == ()
    with_urls = _settings.load({"DATABASE_URL": "postgresql://h/db", "REDIS_URL": "redis://h:6379/0"})
    assert _health._from_settings(with_urls).names == ("database", "redis")


# --- the report ------------------------------------------------------------------------------


def test_report_has_the_documented_shape() -> None:
    reg = registry(version="1.0.0")

    async def cache() -> HealthCheckResult:
        return HealthCheckResult("healthy", "Cache OK", {"memory": {"used": "10M"}, "clients": 5})

    reg.register("db", lambda: True)
    reg.register("cache", cache)
    response = run(lambda: call(health_app(reg), ""))
    assert response.status == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["content-length"] == str(len(response.body))
    body = response.json()
    assert list(body) == ["status", "checks", "timestamp", "version", "uptime"]
    assert body["status"] == "healthy"
    assert TIMESTAMP.match(body["timestamp"]), body["timestamp"]
    assert body["version"] == "1.0.0"
    assert isinstance(body["uptime"], int)
    assert body["uptime"] >= 0
    db, cached = body["checks"]
    assert list(db) == ["name", "status", "latencyMs", "message"]
    assert (db["name"], db["status"], db["message"]) == ("db", "healthy", "OK")
    assert isinstance(db["latencyMs"], int)
    assert cached["details"] == {"memory": {"used": "10M"}, "clients": 5}
    assert list(cached) == ["name", "status", "latencyMs", "message", "details"]


@pytest.mark.parametrize(
    ("answer", "status", "message"),
    [
        (True, "healthy", "OK"),
        (None, "healthy", "OK"),
        ("12 workers", "healthy", "12 workers"),
        ("", "healthy", "OK"),
        (False, "unhealthy", "check failed"),
        (HealthCheckResult("degraded", "replica lag 12s"), "degraded", "replica lag 12s"),
        (HealthCheckResult("unhealthy", "disk full"), "unhealthy", "disk full"),
        (42, "unhealthy", "check returned int; expected bool, str or HealthCheckResult"),
    ],
)
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_what_a_check_returns(answer: object, status: str, message: str, kind: str) -> None:
    reg = registry()

    async def async_check() -> Any:
        return answer

    reg.register("c", async_check if kind == "async" else (lambda: answer))
    _, body = run(reg.report)
    assert (body["checks"][0]["status"], body["checks"][0]["message"]) == (status, message)


class Boom(Exception):
    pass


def chained() -> Exception:
    try:
        raise ConnectionResetError(104, "Connection reset by peer")
    except OSError as exc:
        try:
            raise RuntimeError("the driver gave up") from exc
        except RuntimeError as outer:
            return outer


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (ConnectionRefusedError(111, "Connection refused"), "connection refused"),
        (chained(), "connection reset by peer"),
        (socket.gaierror(-2, "Name or service not known"), "host name could not be resolved"),
        (OSError(113, "No route to host"), "no route to host"),
        (TimeoutError(), "timed out after 0.5s"),
        (ValueError("bad value\nsecond line with more"), "ValueError: bad value"),
        (Boom(), "Boom"),
    ],
)
def test_a_raising_check_is_unhealthy_with_a_summary(error: Exception, message: str) -> None:
    reg = registry()

    def check() -> bool:
        raise error

    reg.register("c", check)
    status, body = run(reg.report)
    assert status == 503
    assert body["checks"][0]["status"] == "unhealthy"
    assert body["checks"][0]["message"] == message


def test_bad_result_objects_are_refused() -> None:
    with pytest.raises(ValueError, match="status must be one of"):
        HealthCheckResult("ok")  # type: ignore[arg-type]


def test_critical_and_non_critical_failures() -> None:
    async def scenario() -> dict[str, tuple[int, str]]:
        reg = registry()
        reg.register("db", lambda: True)
        reg.register("search", lambda: False, critical=False)
        seen = {}
        for probe in ("health", "ready", "live"):
            code, body = await reg.report(probe)  # type: ignore[arg-type]
            seen[probe] = (code, body["status"])
        reg.register("queue", lambda: False)
        seen["critical"] = (await reg.report("ready"))[0], (await reg.report())[1]["status"]
        return seen

    seen = run(scenario)
    assert seen["health"] == (200, "degraded")
    assert seen["ready"] == (200, "degraded")
    assert seen["live"] == (200, "healthy")
    assert seen["critical"] == (503, "unhealthy")


def test_a_critical_check_saying_degraded_keeps_200() -> None:
    reg = registry()
    reg.register("db", lambda: HealthCheckResult("degraded", "replica lag"))
    assert run(reg.report)[0:2][0] == 200
    assert run(reg.report)[1]["status"] == "degraded"


def test_liveness_never_runs_a_check() -> None:
    reg = registry()
    check = Counter(False)
    reg.register("db", check)
    response = run(lambda: call(health_app(reg), "/live"))
    assert response.status == 200
    body = response.json()
    assert (body["status"], body["checks"]) == ("healthy", [])
    assert check.calls == 0


# --- timeouts and concurrency ----------------------------------------------------------------


def test_hung_checks_time_out_and_the_report_still_answers() -> None:
    release = threading.Event()

    async def hangs() -> bool:
        await asyncio.Event().wait()
        return True

    async def ignores_cancellation() -> bool:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await asyncio.sleep(0.3)  # misbehaves once, then ends
        return True

    def blocks() -> bool:
        return release.wait(5)

    reg = registry(timeout=0.2)
    reg.register("async", hangs)
    reg.register("stubborn", ignores_cancellation)
    reg.register("sync", blocks)
    reg.register("own-timeout", hangs, timeout=0.1)
    try:
        started = time.monotonic()
        status, body = run(reg.report)
        elapsed = time.monotonic() - started
    finally:
        release.set()
    assert status == 503
    messages = {c["name"]: c["message"] for c in body["checks"]}
    assert messages == {
        "async": "timed out after 0.2s",
        "stubborn": "timed out after 0.2s",
        "sync": "timed out after 0.2s",
        "own-timeout": "timed out after 0.1s",
    }
    # asyncio.run also waited for the stubborn check's 0.3 s; the report itself did not.
    assert elapsed < 0.2 + 0.3 + 0.3, elapsed
    assert all(150 <= c["latencyMs"] < 450 for c in body["checks"] if c["name"] != "own-timeout")


def test_a_hung_sync_check_is_not_started_twice() -> None:
    release = threading.Event()
    calls = []

    def blocks() -> bool:
        calls.append(1)
        return release.wait(5)

    async def scenario() -> list[str]:
        reg = registry(timeout=0.1)
        reg.register("sync", blocks)
        first = (await reg.report())[1]["checks"][0]["message"]
        second = (await reg.report())[1]["checks"][0]["message"]
        assert len(calls) == 1  # the second run waited on the same thread
        release.set()
        for thread in threading.enumerate():
            if thread.name == "cfk-otel-health-sync":
                thread.join(5)
        third = (await reg.report())[1]["checks"][0]["status"]
        return [first, second, third]

    assert run(scenario) == ["timed out after 0.1s", "timed out after 0.1s", "healthy"]
    assert len(calls) == 2  # once the thread had returned, the next run called it afresh


def test_checks_run_concurrently() -> None:
    async def slow_async() -> bool:
        await asyncio.sleep(0.3)
        return True

    def slow_sync() -> bool:
        time.sleep(0.3)
        return True

    reg = registry(timeout=2)
    for i in range(3):
        reg.register(f"async-{i}", slow_async)
        reg.register(f"sync-{i}", slow_sync)
    started = time.monotonic()
    status, _ = run(reg.report)
    assert status == 200
    assert time.monotonic() - started < 0.6


def test_a_sync_check_does_not_block_the_event_loop() -> None:
    def slow_sync() -> bool:
        time.sleep(0.3)
        return True

    async def scenario() -> int:
        reg = registry(timeout=2)
        reg.register("sync", slow_sync)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(ticker())
        await reg.report()
        task.cancel()
        return ticks

    assert run(scenario) > 10


# --- cache and stampede ----------------------------------------------------------------------


def test_results_are_cached_for_the_ttl() -> None:
    check = Counter()

    async def scenario() -> list[str]:
        reg = registry(cache_ttl=0.3)
        reg.register("db", check)
        stamps = [(await reg.report(p))[1]["timestamp"] for p in ("health", "ready", "health")]
        assert check.calls == 1
        await asyncio.sleep(0.35)
        await reg.report()
        return stamps

    stamps = run(scenario)
    assert len(set(stamps)) == 1
    assert check.calls == 2


def test_ttl_zero_runs_every_time_and_registration_invalidates_the_cache() -> None:
    check = Counter()

    async def scenario() -> tuple[str, ...]:
        reg = registry(cache_ttl=0)
        reg.register("db", check)
        await reg.report()
        await reg.report()
        assert check.calls == 2

        cached = registry(cache_ttl=60)
        cached.register("db", lambda: True)
        await cached.report()
        cached.register("late", lambda: True)
        names = tuple(c["name"] for c in (await cached.report())[1]["checks"])
        cached.unregister("late")
        return names + tuple(c["name"] for c in (await cached.report())[1]["checks"])

    assert run(scenario) == ("db", "late", "db")


def test_concurrent_probes_share_one_run() -> None:
    calls = 0

    async def slow() -> bool:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.1)
        return True

    async def scenario() -> list[int]:
        reg = registry(cache_ttl=0)
        reg.register("db", slow)
        results = await asyncio.gather(*(reg.report("ready" if i % 2 else "health") for i in range(25)))
        return [code for code, _ in results]

    assert run(scenario) == [200] * 25
    assert calls == 1


def test_a_probe_that_goes_away_does_not_cancel_the_shared_run() -> None:
    check = Counter()

    async def slow() -> bool:
        await asyncio.sleep(0.1)
        return check()  # type: ignore[no-any-return]

    async def scenario() -> int:
        reg = registry(cache_ttl=0)
        reg.register("db", slow)
        first = asyncio.create_task(reg.report())
        await asyncio.sleep(0.02)
        second = asyncio.create_task(reg.report())
        await asyncio.sleep(0.02)
        first.cancel()
        code, _ = await second
        return code

    assert run(scenario) == 200
    assert check.calls == 1


# --- registration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "check", "timeout", "error"),
    [
        ("", lambda: True, None, ValueError),
        ("  ", lambda: True, None, ValueError),
        ("shutdown", lambda: True, None, ValueError),
        ("db", "not callable", None, TypeError),
        ("db", lambda: True, 0, ValueError),
        ("db", lambda: True, -1.0, ValueError),
    ],
)
def test_registration_is_validated(name: str, check: Any, timeout: float | None, error: type) -> None:
    with pytest.raises(error):
        registry().register(name, check, timeout=timeout)


def test_a_name_is_registered_once() -> None:
    reg = registry()
    reg.register("db", lambda: True)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("db", lambda: True)
    reg.unregister("db")
    reg.register("db", lambda: False)
    with pytest.raises(KeyError):
        reg.unregister("nope")


@pytest.mark.parametrize(("timeout", "ttl"), [(0, 1), (-1, 1), (1, -0.5)])
def test_registry_settings_are_validated(timeout: float, ttl: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        HealthRegistry(timeout=timeout, cache_ttl=ttl)


def test_an_async_callable_object_is_awaited() -> None:
    class Check:
        async def __call__(self) -> str:
            return "awaited"

    reg = registry()
    reg.register("obj", Check())
    assert run(reg.report)[1]["checks"][0]["message"] == "awaited"


def test_a_check_cancelling_itself_is_a_failure_not_a_crash() -> None:
    async def cancels() -> bool:
        raise asyncio.CancelledError

    reg = registry()
    reg.register("c", cancels)
    reg.register("ok", lambda: True)
    status, body = run(reg.report)
    assert status == 503
    assert body["checks"][0]["message"] == "RuntimeError: the check was cancelled"
    assert body["checks"][1]["status"] == "healthy"


# --- secrets ---------------------------------------------------------------------------------


def test_secrets_never_reach_a_body() -> None:
    dsn = "postgresql://kanban:hunter2-pw@db.internal:5432/kanban?sslpassword=qs-secret"
    reg = registry(secrets=(dsn, None, "redis://:r3dis-pw@cache:6379/0"))

    def leaks_in_message() -> bool:
        raise ConnectionError(f"could not connect to {dsn} (password=hunter2-pw)")

    def leaks_in_details() -> HealthCheckResult:
        return HealthCheckResult(
            "unhealthy",
            "r3dis-pw was rejected; also try redis://user:other-pw@elsewhere/1",
            {"url": dsn, "nested": [{"pw": "hunter2-pw"}, ("r3dis-pw",)], "n": 3, "obj": object()},
        )

    reg.register("message", leaks_in_message)
    reg.register("details", leaks_in_details)
    response = run(lambda: call(health_app(reg), ""))
    text = response.body.decode()
    for secret in ("hunter2-pw", "r3dis-pw", "other-pw", "qs-secret", dsn):
        assert secret not in text
    body = response.json()
    assert body["checks"][0]["message"].startswith("ConnectionError: could not connect to [REDACTED]")
    details = body["checks"][1]["details"]
    assert details["n"] == 3
    assert details["nested"] == [{"pw": "[REDACTED]"}, ["[REDACTED]"]]
    assert details["obj"].startswith("<object object")


def test_a_short_password_neither_garbles_nor_reveals() -> None:
    """Issue 21: with the password "x", "does not exist" used to become "does not e***ist"."""
    reg = registry(secrets=("postgresql://app:x@db/kanban",))
    reg.register("c", lambda: HealthCheckResult("unhealthy", "database does not exist"))
    assert run(reg.report)[1]["checks"][0]["message"] == "database does not exist"


def test_long_messages_are_truncated() -> None:
    reg = registry()
    reg.register("c", lambda: "x" * 5000)
    assert len(run(reg.report)[1]["checks"][0]["message"]) == 300


# --- shutdown --------------------------------------------------------------------------------


def test_readiness_fails_once_shutting_down() -> None:
    check = Counter()

    async def scenario() -> dict[str, tuple[int, dict[str, Any]]]:
        reg = registry()
        reg.register("db", check)
        assert (await reg.report("ready"))[0] == 200
        reg.mark_shutting_down()
        return {probe: await reg.report(probe) for probe in ("ready", "health", "live")}  # type: ignore[misc]

    answers = run(scenario)
    code, ready = answers["ready"]
    assert code == 503
    assert ready["status"] == "unhealthy"
    assert ready["checks"] == [
        {
            "name": "shutdown",
            "status": "unhealthy",
            "latencyMs": 0,
            "message": "shutting down; not accepting new traffic",
        }
    ]
    code, full = answers["health"]
    assert code == 503
    assert [c["name"] for c in full["checks"]] == ["db", "shutdown"]
    assert answers["live"][0] == 200
    assert check.calls == 2  # the ready probe during shutdown did not run it


def test_mark_shutting_down_applies_to_the_whole_process() -> None:
    reg = registry()
    assert not reg.shutting_down
    mark_shutting_down()
    assert reg.shutting_down
    assert HealthRegistry().shutting_down
    assert run(lambda: call(health_app(reg), "/ready")).status == 503


def test_uvicorns_signal_handler_marks_the_process_shutting_down() -> None:
    from uvicorn import Config, Server

    from cfk_otel._instrumentation.uvicorn import UvicornInstrumentor

    instrumentor = UvicornInstrumentor()
    already = instrumentor.is_instrumented_by_opentelemetry
    if not already:
        instrumentor.instrument()
    try:
        server = Server(Config(app=health_app()))
        server.handle_exit(signal.SIGTERM, None)
        assert server.should_exit
        assert HealthRegistry().shutting_down
    finally:
        if not already:
            instrumentor.uninstrument()
    assert "_cfk_originalhandle_exit" not in Server.__dict__ or already


# --- the mountable app -----------------------------------------------------------------------


def test_health_app_mounted_in_starlette() -> None:
    reg = registry(version="2.0.0")
    reg.register("db", lambda: True)
    app = Starlette(routes=[Mount("/internal/health", app=health_app(reg))])
    with TestClient(app) as client:
        full = client.get("/internal/health/")
        assert (full.status_code, full.json()["checks"][0]["name"]) == (200, "db")
        assert client.get("/internal/health").json()["version"] == "2.0.0"  # via Starlette's redirect
        assert client.get("/internal/health/live").json()["checks"] == []
        assert client.get("/internal/health/ready").status_code == 200
        assert client.get("/internal/health/nope").status_code == 404
        posted = client.post("/internal/health/ready")
        assert (posted.status_code, posted.headers["allow"]) == (405, "GET, HEAD")
        head = client.head("/internal/health/ready")
        assert head.status_code == 200
        assert head.content == b""
        assert int(head.headers["content-length"]) > 0


def test_health_app_speaks_lifespan_and_refuses_websockets() -> None:
    async def scenario() -> list[dict[str, Any]]:
        app = health_app(registry())
        inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return inbox.pop(0)

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await app({"type": "lifespan"}, receive, send)
        await app({"type": "websocket", "path": "/live"}, receive, send)
        return sent

    assert [m["type"] for m in run(scenario)] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
        "websocket.close",
    ]


def test_a_failing_report_answers_503_and_logs_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    reg = registry(version="3")

    async def broken(probe: str = "health") -> tuple[int, dict[str, Any]]:
        raise RuntimeError("bug")

    monkeypatch.setattr(reg, "report", broken)
    app = health_app(reg)
    with caplog.at_level(logging.WARNING, logger="cfk_otel"):
        first = run(lambda: call(app, "/ready"))
        run(lambda: call(app, ""))
    assert first.status == 503
    assert first.json()["status"] == "unhealthy"
    assert first.json()["version"] == "3"
    assert len([r for r in caplog.records if "health report failed" in r.message]) == 1


# --- the built-in checks without their libraries ---------------------------------------------


def test_missing_client_libraries_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "asyncpg", None)
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    settings = _settings.load(
        {"DATABASE_URL": "postgresql://u:pw-x1@127.0.0.1:1/db", "REDIS_URL": "redis://:pw-x2@127.0.0.1:1/0"}
    )
    status, body = run(_health._from_settings(settings).report)
    assert status == 503
    assert {c["name"]: c["message"] for c in body["checks"]} == {
        "database": "asyncpg is not installed (pip install asyncpg)",
        "redis": "redis is not installed (pip install redis)",
    }


def test_last_statuses_feed_health_check_up() -> None:
    checks = registry()
    checks.register("database", lambda: True)
    checks.register("redis", lambda: False)
    assert checks.last_statuses() == {}  # nothing reported before the first probe
    asyncio.run(checks.report("health"))
    assert checks.last_statuses() == {"database": "healthy", "redis": "unhealthy"}
    values = {obs.attributes["check"]: obs.value for obs in checks._observe(None)}  # type: ignore[arg-type]
    assert values == {"database": 1, "redis": 0}
