"""Health endpoints for Kubernetes probes: liveness, readiness and the full report.

``opentelemetry-instrument`` serves them with no code in the app (``HEALTH_*``
variables); :func:`health_app` mounts the same answers anywhere. Checks run
concurrently, each within ``HEALTH_CHECK_TIMEOUT``; a run is reused for
``HEALTH_CACHE_TTL`` seconds and concurrent probes share the run in flight, so a probe
storm costs each dependency one round trip. A check that fails, hangs or raises is a
result, never an exception: the endpoints always answer.

=========  ====  ===============================================================
status     HTTP  when
=========  ====  ===============================================================
healthy    200   every check passed
degraded   200   only non-critical checks failed, or a check said ``degraded``
unhealthy  503   a critical check failed, or (ready and full report) the process
                 is shutting down
=========  ====  ===============================================================

The liveness probe never runs a check: it answers 200 while the process can serve.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import importlib
import inspect
import json
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar, Final, Literal, TypeAlias

from opentelemetry import metrics
from opentelemetry.instrumentation.utils import suppress_instrumentation

from cfk_otel import _redact
from cfk_otel._asgi.http import JSON, respond, utc_timestamp
from cfk_otel._asgi.types import ASGIApp, Message, Receive, Scope, Send
from cfk_otel._bootstrap import setup as _sdk
from cfk_otel._core import seam as _core
from cfk_otel._guard import guard
from cfk_otel._settings import Settings

__all__ = [
    "HealthCheckResult",
    "HealthRegistry",
    "build_endpoints",
    "health_app",
    "health_registry",
    "mark_shutting_down",
    "register_health_check",
]

HealthStatus: TypeAlias = Literal["healthy", "degraded", "unhealthy"]
Probe: TypeAlias = Literal["health", "live", "ready"]

_log = logging.getLogger("cfk_otel")
_REPORT: Final = guard("the health report", then="answering 503")
_STATUSES: Final = ("healthy", "degraded", "unhealthy")
_SHUTDOWN: Final = "shutdown"
_MAX_MESSAGE: Final = 300
_STARTED: Final = time.monotonic()  # cfk_otel is imported first thing under opentelemetry-instrument


@dataclass(frozen=True, slots=True)
class HealthCheckResult:
    """What a check returns to say more than pass or fail.

    >>> HealthCheckResult("degraded", "replica lag 12s", {"lagSeconds": 12}).status
    'degraded'
    """

    status: HealthStatus = "healthy"
    message: str = "OK"
    details: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.status not in _STATUSES:
            raise ValueError(f"status must be one of {', '.join(_STATUSES)}, not {self.status!r}")


CheckReturn: TypeAlias = bool | str | HealthCheckResult | None
HealthCheck: TypeAlias = Callable[[], CheckReturn | Awaitable[CheckReturn]]


@dataclass(eq=False)
class _Check:
    name: str
    run: HealthCheck
    critical: bool
    timeout: float | None
    is_async: bool
    # A synchronous check's thread that has not returned yet: reused, never doubled.
    pending: concurrent.futures.Future[Any] | None = None
    last_status: str = "healthy"


@dataclass(frozen=True, slots=True)
class _Outcome:
    name: str
    status: HealthStatus
    latency_ms: int
    message: str
    details: Mapping[str, Any] | None = None
    critical: bool = True

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "name": self.name,
            "status": self.status,
            "latencyMs": self.latency_ms,
            "message": self.message,
        }
        if self.details is not None:
            body["details"] = self.details
        return body


@dataclass(frozen=True, slots=True)
class _Run:
    outcomes: tuple[_Outcome, ...]
    finished: float  # time.monotonic(), for the cache
    timestamp: str
    generation: int


@dataclass
class _Process:
    # A plain flag: it is set from a signal handler, where taking a lock could deadlock.
    shutting_down: bool = False


_PROCESS = _Process()
_SHUTDOWN_OUTCOME: Final = _Outcome(_SHUTDOWN, "unhealthy", 0, "shutting down; not accepting new traffic")


class HealthRegistry:
    """Health checks, the last run's results and the shutdown state.

    The process has one, built from the settings (:func:`health_registry`); make your
    own for tests or for a second set of checks:

    >>> registry = HealthRegistry(version="1.0.0", timeout=0.5, cache_ttl=0)
    >>> registry.register("disk", lambda: shutil.disk_usage("/").free > 1 << 30)  # doctest: +SKIP
    >>> app = health_app(registry)
    """

    def __init__(
        self,
        *,
        version: str = "unknown",
        timeout: float = 1.0,
        cache_ttl: float = 2.0,
        traced: bool = False,
        secrets: Iterable[str | None] = (),
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be more than 0 seconds, not {timeout!r}")
        if not cache_ttl >= 0:
            raise ValueError(f"cache_ttl must be 0 or more seconds, not {cache_ttl!r}")
        self.version = version
        self.timeout = float(timeout)
        self.cache_ttl = float(cache_ttl)
        # Untraced by default: a probe every few seconds would otherwise fill traces with
        # root "SELECT 1" and "PING" spans from the asyncpg and redis instrumentations.
        self._traced = traced
        self._scrub = _Scrubber(secrets)
        self._checks: dict[str, _Check] = {}
        self._lock = threading.Lock()
        self._generation = 0
        self._cached: _Run | None = None
        self._inflight: asyncio.Task[_Run] | None = None
        self._abandoned: set[asyncio.Future[Any]] = set()
        self._shutting_down = False

    # --- registration -------------------------------------------------------------------

    def register(
        self, name: str, check: HealthCheck, *, critical: bool = True, timeout: float | None = None
    ) -> None:
        """Add a check: a sync or async callable returning ``True``/``None`` (healthy),
        ``False`` (unhealthy), a message string (healthy) or a :class:`HealthCheckResult`.
        Raising makes it unhealthy with a summary of the error. A failing non-critical
        check makes the report ``degraded`` (still 200) instead of ``unhealthy``.

        Synchronous checks run in a thread of their own, so they cannot block the loop.

        >>> registry.register("search", ping_search, critical=False, timeout=0.5)  # doctest: +SKIP
        """
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"a health check needs a non-empty name, not {name!r}")
        if name == _SHUTDOWN:
            raise ValueError(f"{_SHUTDOWN!r} is reserved for the shutdown state")
        if not callable(check):
            raise TypeError(f"health check {name!r} must be callable, not {type(check).__name__}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout of health check {name!r} must be more than 0 seconds")
        is_async = inspect.iscoroutinefunction(check) or inspect.iscoroutinefunction(
            getattr(check, "__call__", None)  # noqa: B004  (an instance with an async __call__)
        )
        with self._lock:
            if name in self._checks:
                raise ValueError(f"a health check named {name!r} is already registered")
            self._checks[name] = _Check(name, check, critical, timeout, is_async)
            self._generation += 1

    def unregister(self, name: str) -> None:
        """Remove the check called ``name`` (``KeyError`` when there is none).

        >>> health_registry().unregister("redis")  # doctest: +SKIP
        """
        with self._lock:
            del self._checks[name]
            self._generation += 1

    @property
    def names(self) -> tuple[str, ...]:
        """The registered checks, in the order they are reported."""
        with self._lock:
            return tuple(self._checks)

    # --- shutdown -----------------------------------------------------------------------

    def mark_shutting_down(self) -> None:
        """Make readiness answer 503 from now on (see :func:`mark_shutting_down`)."""
        self._shutting_down = True

    @property
    def shutting_down(self) -> bool:
        """True once this registry or the whole process was marked as shutting down."""
        return self._shutting_down or _PROCESS.shutting_down

    async def aclose(self) -> None:
        """Close the connections the built-in checks keep open (they reopen when needed).

        >>> await registry.aclose()  # doctest: +SKIP
        """
        with self._lock:
            checks = tuple(self._checks.values())
        for check in checks:
            if isinstance(check.run, _Dependency):
                await check.run.aclose()

    def last_statuses(self) -> dict[str, HealthStatus]:
        """Each check's status at the last run (empty before the first probe).

        >>> registry.last_statuses()  # doctest: +SKIP
        {'database': 'healthy', 'redis': 'unhealthy'}
        """
        cached = self._cached
        return {o.name: o.status for o in cached.outcomes} if cached is not None else {}

    def _observe(self, options: metrics.CallbackOptions) -> list[metrics.Observation]:
        return [
            metrics.Observation(0 if status == "unhealthy" else 1, {"check": name})
            for name, status in self.last_statuses().items()
        ]

    # --- reports ------------------------------------------------------------------------

    async def report(self, probe: Probe = "health") -> tuple[int, dict[str, Any]]:
        """The HTTP status and JSON body of one probe: ``health``, ``live`` or ``ready``.

        >>> status, body = await registry.report("ready")  # doctest: +SKIP
        >>> status, body["status"]  # doctest: +SKIP
        (200, 'healthy')
        """
        if probe == "live":
            return 200, self._body("healthy", (), utc_timestamp(time.time()))
        if probe == "ready" and self.shutting_down:
            # Draining: no reason to touch the dependencies.
            return 503, self._body("unhealthy", (_SHUTDOWN_OUTCOME,), utc_timestamp(time.time()))
        run = await self._results()
        outcomes = run.outcomes
        if self.shutting_down:  # SIGTERM may have arrived while the checks ran
            outcomes = (*outcomes, _SHUTDOWN_OUTCOME)
        status = _overall(outcomes)
        body = self._body(status, outcomes, run.timestamp)
        if probe == "health":
            telemetry = _core.health()  # what the compiled core exported and dropped
            if telemetry:
                body["telemetry"] = telemetry
        return (503 if status == "unhealthy" else 200), body

    def _body(self, status: HealthStatus, outcomes: Iterable[_Outcome], timestamp: str) -> dict[str, Any]:
        return {
            "status": status,
            "checks": [o.as_json() for o in outcomes],
            "timestamp": timestamp,
            "version": self.version,
            "uptime": int(time.monotonic() - _STARTED),
        }

    async def _results(self) -> _Run:
        cached = self._cached
        if (
            cached is not None
            and cached.generation == self._generation
            and time.monotonic() - cached.finished < self.cache_ttl
        ):
            return cached
        loop = asyncio.get_running_loop()
        task = self._inflight
        if task is None or task.done() or task.get_loop() is not loop:
            task = self._inflight = loop.create_task(self._run(), name="cfk-otel-health")
        # Shielded: a probe that disconnects must not cancel the run other probes await.
        return await asyncio.shield(task)

    async def _run(self) -> _Run:
        with self._lock:
            checks = tuple(self._checks.values())
            generation = self._generation
        with contextlib.nullcontext() if self._traced else suppress_instrumentation():
            outcomes = await asyncio.gather(*(self._run_check(c) for c in checks))
        run = _Run(tuple(outcomes), time.monotonic(), utc_timestamp(time.time()), generation)
        if generation == self._generation:
            self._cached = run
        for check, outcome in zip(checks, outcomes, strict=True):
            if outcome.status != check.last_status:
                level = logging.INFO if outcome.status == "healthy" else logging.WARNING
                _log.log(
                    level, "cfk_otel: health check %r is %s: %s", check.name, outcome.status, outcome.message
                )
                check.last_status = outcome.status
        return run

    async def _run_check(self, check: _Check) -> _Outcome:
        timeout = check.timeout or self.timeout
        start = time.perf_counter()
        details: Mapping[str, Any] | None = None
        try:
            status, message, details = _interpret(await self._call(check, timeout))
        except Exception as exc:
            status, message = "unhealthy", _summarise(exc, timeout)
        latency = round((time.perf_counter() - start) * 1000)
        return _Outcome(
            check.name,
            status,
            latency,
            self._scrub.text(message) or "OK",
            None if details is None else self._scrub.details(details),
            check.critical,
        )

    async def _call(self, check: _Check, timeout: float) -> object:
        deadline = time.monotonic() + timeout
        result: object
        if check.is_async:
            result = check.run()
        else:
            if check.pending is None or check.pending.done():
                check.pending = _in_thread(check.run, check.name)
            result = await self._wait(asyncio.wrap_future(check.pending), deadline)
        if inspect.isawaitable(result):
            result = await self._wait(asyncio.ensure_future(result), deadline)
        return result

    async def _wait(self, future: asyncio.Future[Any], deadline: float) -> object:
        # asyncio.wait rather than wait_for: a check that swallows its cancellation
        # cannot hold the report past the deadline.
        done: set[Any] = set()
        try:
            done, _ = await asyncio.wait((future,), timeout=max(0.0, deadline - time.monotonic()))
        finally:
            if not future.done():
                future.cancel()
                self._abandoned.add(future)
                future.add_done_callback(self._forget)
        if not done:
            raise TimeoutError
        if future.cancelled():  # the check cancelled itself; CancelledError must not end the run
            raise RuntimeError("the check was cancelled")
        return future.result()

    def _forget(self, future: asyncio.Future[Any]) -> None:
        self._abandoned.discard(future)
        if not future.cancelled():
            future.exception()  # retrieved, so asyncio does not log it as lost


def _in_thread(check: HealthCheck, name: str) -> concurrent.futures.Future[Any]:
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()
    future.set_running_or_notify_cancel()
    context = contextvars.copy_context()

    def target() -> None:
        try:
            result = context.run(check)
        except Exception as exc:
            future.set_exception(exc)
        except BaseException as exc:  # never let SystemExit from a thread reach the loop
            future.set_exception(RuntimeError(type(exc).__name__))
        else:
            future.set_result(result)

    # A daemon thread, not the loop's executor: asyncio.run joins the executor's threads
    # at exit, so one check that never returns would keep the process from stopping.
    threading.Thread(target=target, name=f"cfk-otel-health-{name}", daemon=True).start()
    return future


def _interpret(raw: object) -> tuple[HealthStatus, str, Mapping[str, Any] | None]:
    if isinstance(raw, HealthCheckResult):
        return raw.status, raw.message, raw.details
    if raw is True or raw is None:
        return "healthy", "OK", None
    if raw is False:
        return "unhealthy", "check failed", None
    if isinstance(raw, str):
        return "healthy", raw, None
    return "unhealthy", f"check returned {type(raw).__name__}; expected bool, str or HealthCheckResult", None


def _overall(outcomes: Iterable[_Outcome]) -> HealthStatus:
    status: HealthStatus = "healthy"
    for outcome in outcomes:
        if outcome.status == "unhealthy" and outcome.critical:
            return "unhealthy"
        if outcome.status != "healthy":
            status = "degraded"
    return status


# --- what a failure may say -------------------------------------------------------------------


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 8:
        yield current
        seen += 1
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)


def _summarise(exc: BaseException, timeout: float) -> str:
    """A short, stable reason: the kind of failure rather than the library's full text."""
    for cause in _causes(exc):
        # By name too: redis has a TimeoutError of its own, unrelated to the builtin.
        if isinstance(cause, TimeoutError) or type(cause).__name__ == "TimeoutError":
            return f"timed out after {timeout}s"
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, ConnectionResetError):
            return "connection reset by peer"
        if isinstance(cause, socket.gaierror):
            return "host name could not be resolved"
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror[:1].lower() + cause.strerror[1:]
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# Whatever the secret, user:password@ in a URL is never shown.
class _Scrubber:
    """Health messages and details through the one secrets policy, with the configured
    connection strings' secrets as known values."""

    def __init__(self, secrets: Iterable[str | None]) -> None:
        self._known = _redact.Known(secrets)

    def text(self, value: str) -> str:
        return _redact.scrub_text(value, self._known)[:_MAX_MESSAGE]

    def details(self, value: Mapping[str, Any]) -> dict[str, Any]:
        return {str(k): self._value(k, v, 8) for k, v in value.items()}

    def _value(self, key: object, value: object, depth: int) -> object:
        if _redact.is_secret_key(key):
            return _redact.REDACTED
        if value is None or isinstance(value, bool | int | float):
            return value
        if depth and isinstance(value, Mapping):
            return {str(k): self._value(k, v, depth - 1) for k, v in value.items()}
        if depth and isinstance(value, list | tuple | set | frozenset):
            return [self._value(None, v, depth - 1) for v in value]
        return self.text(str(value))


# --- the built-in dependency checks ----------------------------------------------------------


class _Dependency:
    """One reused connection to a dependency: opened on first use, dropped after any
    failure, and tried once afresh when the reused one fails (it may predate a restart)."""

    library: ClassVar[str]
    package: ClassVar[str]

    def __init__(self, url: str, timeout: float) -> None:
        self._url = url
        self._timeout = timeout
        self._conn: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self) -> HealthCheckResult:
        try:
            module = importlib.import_module(self.library)
        except ImportError:
            return HealthCheckResult(
                "unhealthy", f"{self.package} is not installed (pip install {self.package})"
            )
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._conn = None  # opened on an event loop that is gone; it cannot be used or closed here
        if self._conn is not None:
            try:
                return await self._probe(self._conn)
            except Exception:
                await self.aclose()
            except BaseException:
                await self.aclose()
                raise
        self._conn, self._loop = await self._open(module), loop
        try:
            return await self._probe(self._conn)
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await self._close(conn)

    async def _open(self, module: ModuleType) -> Any:
        raise NotImplementedError

    async def _probe(self, conn: Any) -> HealthCheckResult:
        raise NotImplementedError

    async def _close(self, conn: Any) -> None:
        raise NotImplementedError


class _Postgres(_Dependency):
    library = "asyncpg"
    package = "asyncpg"

    async def _open(self, module: ModuleType) -> Any:
        return await module.connect(
            self._url, timeout=self._timeout, server_settings={"application_name": "cfk-otel-health"}
        )

    async def _probe(self, conn: Any) -> HealthCheckResult:
        await conn.fetchval("SELECT 1")
        return HealthCheckResult("healthy", "PostgreSQL connection OK")

    async def _close(self, conn: Any) -> None:
        conn.terminate()


class _Redis(_Dependency):
    library = "redis.asyncio"
    package = "redis"

    async def _open(self, module: ModuleType) -> Any:
        retry = importlib.import_module("redis.asyncio.retry").Retry
        no_backoff = importlib.import_module("redis.backoff").NoBackoff
        # No retries: a refused connection should say so now, not after backing off.
        return module.Redis.from_url(
            self._url,
            socket_connect_timeout=self._timeout,
            socket_timeout=self._timeout,
            retry=retry(no_backoff(), 0),
        )

    async def _probe(self, conn: Any) -> HealthCheckResult:
        await conn.ping()
        response_error = importlib.import_module("redis.exceptions").ResponseError
        try:
            info = await conn.info()
        except response_error:  # INFO may be denied by an ACL; PING answered
            return HealthCheckResult("healthy", "Redis connection OK")
        details = {
            "memory": {"used": info.get("used_memory_human"), "peak": info.get("used_memory_peak_human")},
            "clients": info.get("connected_clients"),
        }
        return HealthCheckResult("healthy", "Redis connection OK", details)

    async def _close(self, conn: Any) -> None:
        await conn.aclose()


# --- ASGI -------------------------------------------------------------------------------------

_PROBES: Final[dict[str, Probe]] = {"": "health", "/": "health", "/live": "live", "/ready": "ready"}


class _ProbeEndpoint:
    """One probe as an ASGI app: GET and HEAD get the JSON report, other methods 405."""

    def __init__(self, probe: Probe, registry: HealthRegistry | None = None) -> None:
        self.probe = probe
        self._registry = registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        registry = self._registry or health_registry()
        if scope.get("method", "GET") not in ("GET", "HEAD"):
            await respond(send, 405, b"method not allowed\n", headers=[(b"allow", b"GET, HEAD")])
            return
        status, payload = 503, b""
        with _REPORT:  # a bug here must not take the app down: report it, answer 503
            status, body = await registry.report(self.probe)
            payload = json.dumps(body, separators=(",", ":"), default=str).encode()
        if not payload:
            status = 503
            payload = json.dumps(registry._body("unhealthy", (), utc_timestamp(time.time()))).encode()
        await respond(send, status, payload, content_type=JSON, head=scope.get("method") == "HEAD")


class _HealthApp:
    """The three probes under one mount point: ``""``, ``"/live"`` and ``"/ready"``."""

    def __init__(self, registry: HealthRegistry | None) -> None:
        self._endpoints = {path: _ProbeEndpoint(probe, registry) for path, probe in _PROBES.items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await _lifespan(receive, send)
        elif kind == "http":
            path, root = scope.get("path", ""), scope.get("root_path", "")
            endpoint = self._endpoints.get(path[len(root) :] if root and path.startswith(root) else path)
            if endpoint is None:
                await respond(send, 404, b"not found\n")
            else:
                await endpoint(scope, receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1000})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


# --- the process's registry -------------------------------------------------------------------

_DEFAULT: list[HealthRegistry] = []  # a list so it is set once without a global statement
_DEFAULT_LOCK = threading.Lock()


def _from_settings(settings: Settings) -> HealthRegistry:
    registry = HealthRegistry(
        version=settings.service_version,
        timeout=settings.health_check_timeout,
        cache_ttl=settings.health_cache_ttl,
        traced=settings.health_telemetry,
        secrets=settings.secret_values(),  # the connection strings, DSN, tokens
    )
    if settings.database_url:
        registry.register("database", _Postgres(settings.database_url, settings.health_check_timeout))
    if settings.redis_url:
        registry.register("redis", _Redis(settings.redis_url, settings.health_check_timeout))
    return registry


def _default(settings: Settings | None = None) -> HealthRegistry:
    with _DEFAULT_LOCK:
        if not _DEFAULT:
            registry = _from_settings(settings or _sdk.settings())
            # health_check_up{check}: 1 unless the check was unhealthy at the last probe.
            # DatabaseDown / RedisDown fire on it where no postgres/redis exporter runs.
            metrics.get_meter("cfk_otel").create_observable_gauge(
                "health_check_up",
                callbacks=[registry._observe],
                description="Health checks at the last probe: 1 up, 0 down",
            )
            _DEFAULT.append(registry)
        return _DEFAULT[0]


def health_registry() -> HealthRegistry:
    """The process's registry: ``database`` and ``redis`` checks from ``DATABASE_URL``
    and ``REDIS_URL``, plus whatever :func:`register_health_check` added.

    >>> cfk_otel.health_registry().names  # doctest: +SKIP
    ('database', 'redis')
    """
    return _default()


def register_health_check(
    name: str, check: HealthCheck, *, critical: bool = True, timeout: float | None = None
) -> None:
    """Add a check to the process's health report (see :meth:`HealthRegistry.register`).

    >>> async def search_ok() -> bool:
    ...     return (await search.ping()) == "pong"
    >>> cfk_otel.register_health_check("search", search_ok, critical=False)  # doctest: +SKIP
    """
    health_registry().register(name, check, critical=critical, timeout=timeout)


def mark_shutting_down() -> None:
    """Turn readiness to 503 for the rest of the process's life.

    Under ``opentelemetry-instrument uvicorn`` this runs when SIGTERM or SIGINT
    arrives; call it yourself from another server's shutdown hook.

    >>> cfk_otel.mark_shutting_down()  # doctest: +SKIP
    """
    _PROCESS.shutting_down = True


def health_app(registry: HealthRegistry | None = None) -> ASGIApp:
    """The health probes as an ASGI app, answering relative to where it is mounted.

    ``""`` is the full report, ``"/live"`` liveness and ``"/ready"`` readiness.

    >>> from starlette.routing import Mount
    >>> routes = [Mount("/internal/health", app=health_app())]
    """
    return _HealthApp(registry)


def build_endpoints(settings: Settings) -> dict[str, ASGIApp]:
    """The health paths the middleware answers itself, mapped to their ASGI apps."""
    if not settings.health_enabled:
        return {}
    registry = _default(settings)
    return {
        settings.health_path: _ProbeEndpoint("health", registry),
        settings.health_live_path: _ProbeEndpoint("live", registry),
        settings.health_ready_path: _ProbeEndpoint("ready", registry),
    }


def _reset_for_tests() -> None:
    """TESTS ONLY: forget the process's registry and its shutdown state."""
    with _DEFAULT_LOCK:
        _DEFAULT.clear()
    _PROCESS.shutting_down = False
