"""The built-in health checks against real PostgreSQL and Redis: healthy, refused, stopped,
wrong password, hung; connection reuse and recovery; no secret in any answer."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis.asyncio as aioredis

from cfk_otel import _settings
from cfk_otel._health import registry as _health
from tests.conftest import Services, free_port
from tests.test_health import Response, call

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

SECRETS = ("cfk-test-password", "cfk-redis-password")
HUMAN_SIZE = re.compile(r"^\d+(\.\d+)?[BKMGT]$")


@pytest.fixture(autouse=True)
def fresh_process_state() -> Iterator[None]:
    _health._reset_for_tests()
    yield
    _health._reset_for_tests()


def with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit(":", 1)[0] + f":{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{parts.hostname}:{parts.port}"))


class Probes:
    """The zero-code endpoints built from the settings, called in process."""

    def __init__(self, **env: str) -> None:
        env.setdefault("HEALTH_CACHE_TTL", "0")
        self.settings = _settings.load(env)
        assert not self.settings.problems, self.settings.problems
        self.endpoints = _health.build_endpoints(self.settings)
        self.bodies: list[bytes] = []

    async def get(self, probe: str = "health") -> Response:
        path = {
            "health": self.settings.health_path,
            "live": self.settings.health_live_path,
            "ready": self.settings.health_ready_path,
        }[probe]
        response = await call(self.endpoints[path], path)
        self.bodies.append(response.body)
        return response

    async def checks(self) -> dict[str, dict[str, Any]]:
        return {c["name"]: c for c in (await self.get()).json()["checks"]}

    async def close(self) -> None:
        await _health.health_registry().aclose()

    def assert_no_secret(self, *more: str) -> None:
        assert self.bodies
        for body in self.bodies:
            for secret in (*SECRETS, *more):
                assert secret.encode() not in body, body


# --- TCP stand-ins -----------------------------------------------------------------------------


class SilentListener:
    """Accepts connections and never says a word: a hung dependency."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.05)
        self.port = self._server.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._server.close()
        for conn in self.accepted:
            conn.close()


class Proxy:
    """A TCP proxy in front of a real service, stopped and started again on the same port,
    as a dependency that restarts would be."""

    def __init__(self, target_port: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self.port = free_port()
        self._sockets: list[socket.socket] = []
        self._server: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._server = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: same port again
        self._server.settimeout(0.05)
        self._thread = threading.Thread(target=self._accept, args=(self._server,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._server is not None:
            self._server.close()
        for sock in self._sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._sockets.clear()

    def _accept(self, server: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                client, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            upstream = socket.create_connection(self._target, timeout=5)
            upstream.settimeout(None)
            self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        with suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


@contextmanager
def proxy(target_port: int) -> Iterator[Proxy]:
    p = Proxy(target_port)
    p.start()
    try:
        yield p
    finally:
        p.stop()


# --- tests -------------------------------------------------------------------------------------


def test_healthy(services: Services) -> None:
    probes = Probes(DATABASE_URL=services.database_url, REDIS_URL=services.redis_url, SERVICE_VERSION="1.0.0")

    async def scenario() -> None:
        try:
            full = await probes.get()
            assert full.status == 200
            body = full.json()
            assert body["status"] == "healthy"
            assert body["version"] == "1.0.0"
            database, cache = body["checks"]
            assert database == {
                "name": "database",
                "status": "healthy",
                "latencyMs": database["latencyMs"],
                "message": "PostgreSQL connection OK",
            }
            assert isinstance(database["latencyMs"], int)
            assert cache["message"] == "Redis connection OK"
            memory = cache["details"]["memory"]
            assert HUMAN_SIZE.match(memory["used"]), memory
            assert HUMAN_SIZE.match(memory["peak"]), memory
            assert isinstance(cache["details"]["clients"], int)
            assert cache["details"]["clients"] >= 1
            assert (await probes.get("ready")).status == 200
            assert (await probes.get("live")).status == 200
        finally:
            await probes.close()

    asyncio.run(scenario())
    probes.assert_no_secret()


def test_connections_are_reused_and_recovered_after_being_killed(services: Services) -> None:
    probes = Probes(DATABASE_URL=services.database_url, REDIS_URL=services.redis_url)
    count_sql = "SELECT pid FROM pg_stat_activity WHERE application_name = 'cfk-otel-health'"

    async def scenario() -> None:
        admin = await asyncpg.connect(services.database_url)
        client = aioredis.from_url(services.redis_url)
        try:
            for _ in range(3):
                assert (await probes.get()).status == 200
            pids = [r["pid"] for r in await admin.fetch(count_sql)]
            assert len(pids) == 1, "one connection, reused by every run"
            clients_before = (await probes.checks())["redis"]["details"]["clients"]

            # Both servers drop the health connections, as a restart or a proxy timeout would.
            await admin.execute("SELECT pg_terminate_backend($1)", pids[0])
            await client.client_kill_filter(skipme=True, _type="normal")
            await asyncio.sleep(0.1)

            checks = await probes.checks()
            assert checks["database"]["status"] == "healthy", checks
            assert checks["redis"]["status"] == "healthy", checks
            new_pids = [r["pid"] for r in await admin.fetch(count_sql)]
            assert len(new_pids) == 1
            assert new_pids != pids
            assert (await probes.checks())["redis"]["details"]["clients"] <= clients_before + 1
        finally:
            await probes.close()
            await admin.close()
            await client.aclose()

    asyncio.run(scenario())
    probes.assert_no_secret()


@pytest.mark.parametrize("down", ["database", "redis"])
def test_an_unreachable_dependency(services: Services, down: str) -> None:
    closed = free_port()
    database_url = with_port(services.database_url, closed) if down == "database" else services.database_url
    redis_url = with_port(services.redis_url, closed) if down == "redis" else services.redis_url
    probes = Probes(DATABASE_URL=database_url, REDIS_URL=redis_url)

    async def scenario() -> None:
        try:
            full = await probes.get()
            assert full.status == 503
            body = full.json()
            assert body["status"] == "unhealthy"
            checks = {c["name"]: c for c in body["checks"]}
            assert checks[down]["status"] == "unhealthy"
            assert checks[down]["message"] == "connection refused"
            assert "details" not in checks[down]
            up = "redis" if down == "database" else "database"
            assert checks[up]["status"] == "healthy"
            assert (await probes.get("ready")).status == 503
            live = await probes.get("live")
            assert (live.status, live.json()["status"]) == (200, "healthy")
        finally:
            await probes.close()

    asyncio.run(scenario())
    probes.assert_no_secret()


def test_wrong_passwords_say_so_without_showing_any_password(services: Services) -> None:
    probes = Probes(
        DATABASE_URL=with_password(services.database_url, "not-the-pg-pw"),
        REDIS_URL=with_password(services.redis_url, "not-the-redis-pw"),
    )

    async def scenario() -> None:
        try:
            checks = await probes.checks()
            assert "password authentication failed" in checks["database"]["message"]
            assert checks["redis"]["message"].startswith("AuthenticationError")
            assert (await probes.get("ready")).status == 503
        finally:
            await probes.close()

    asyncio.run(scenario())
    probes.assert_no_secret("not-the-pg-pw", "not-the-redis-pw")


def test_a_stopped_dependency_then_its_recovery(services: Services) -> None:
    pg_port = urlsplit(services.database_url).port
    redis_port = urlsplit(services.redis_url).port
    assert pg_port is not None
    assert redis_port is not None
    with proxy(pg_port) as pg, proxy(redis_port) as cache:
        probes = Probes(
            DATABASE_URL=with_port(services.database_url, pg.port),
            REDIS_URL=with_port(services.redis_url, cache.port),
            HEALTH_CHECK_TIMEOUT="2",
        )

        async def scenario() -> None:
            try:
                assert (await probes.get()).status == 200
                pg.stop()
                cache.stop()
                full = await probes.get()
                assert full.status == 503
                for check in full.json()["checks"]:
                    assert check["status"] == "unhealthy"
                    assert check["message"] == "connection refused", check
                assert (await probes.get("ready")).status == 503
                assert (await probes.get("live")).status == 200

                pg.start()
                cache.start()
                recovered = await probes.get()
                assert recovered.status == 200, recovered.json()
                assert (await probes.get("ready")).status == 200
            finally:
                await probes.close()

        asyncio.run(scenario())
    probes.assert_no_secret()


def test_a_hung_dependency_answers_within_the_timeout(services: Services) -> None:
    listener = SilentListener()
    timeout = 0.5
    probes = Probes(
        DATABASE_URL=with_port(services.database_url, listener.port),
        REDIS_URL=with_port(services.redis_url, listener.port),
        HEALTH_CHECK_TIMEOUT=str(timeout),
    )

    async def scenario() -> None:
        try:
            started = time.monotonic()
            pending = asyncio.create_task(probes.get())
            await asyncio.sleep(0.05)
            live_started = time.monotonic()
            live = await probes.get("live")
            assert live.status == 200
            assert time.monotonic() - live_started < 0.1, "liveness waited for the checks"
            assert not pending.done()

            full = await pending
            elapsed = time.monotonic() - started
            assert full.status == 503
            assert elapsed < timeout + 0.3, elapsed
            for check in full.json()["checks"]:
                assert check["message"] == f"timed out after {timeout}s"
                assert timeout * 1000 - 20 <= check["latencyMs"] < (timeout + 0.3) * 1000

            started = time.monotonic()
            ready = await probes.get("ready")
            assert ready.status == 503
            assert time.monotonic() - started < timeout + 0.3
        finally:
            await probes.close()

    try:
        asyncio.run(scenario())
    finally:
        listener.close()
    probes.assert_no_secret()


def test_probe_storm_on_a_hung_dependency_costs_one_connection_each(services: Services) -> None:
    listener = SilentListener()
    probes = Probes(
        DATABASE_URL=with_port(services.database_url, listener.port),
        REDIS_URL=with_port(services.redis_url, listener.port),
        HEALTH_CHECK_TIMEOUT="0.5",
        HEALTH_CACHE_TTL="30",
    )

    async def scenario() -> None:
        try:
            started = time.monotonic()
            answers = await asyncio.gather(*(probes.get("ready" if i % 2 else "health") for i in range(40)))
            assert time.monotonic() - started < 0.5 + 0.4
            assert {a.status for a in answers} == {503}
            assert len({a.json()["timestamp"] for a in answers}) == 1
            # Cached: answered at once, no new connection attempt.
            started = time.monotonic()
            again = await probes.get()
            assert time.monotonic() - started < 0.05
            assert again.json()["timestamp"] == answers[0].json()["timestamp"]
        finally:
            await probes.close()

    try:
        asyncio.run(scenario())
        assert len(listener.accepted) == 2, "one connection per dependency, whatever the probe count"
    finally:
        listener.close()
    probes.assert_no_secret()
