"""Sentry, with OpenTelemetry as the one tracer. Imported only when ``SENTRY_DSN`` is set.

- **No second tracer.** Sentry's framework integrations (Starlette, FastAPI, asyncpg,
  redis, httpx, ...) and its own request tracing stay off; every event carries the
  current OpenTelemetry trace and span ids in ``contexts.trace``, so an issue links to
  its trace.
- **One event per failure.** An exception is reported once, whoever reports it first
  (our middleware observer, ``capture_error``, a ``logging`` call with ``exc_info``):
  later events for the same exception object are dropped; uvicorn's error logger and the
  distro's request line, which only repeat what the observer reports, are ignored.
- **Bounded cost.** At most :data:`EVENT_BURST` events at once, :data:`EVENTS_PER_SECOND`
  on average: an error storm cannot spend the app's CPU on building events.
- **A scope per request.** :class:`RequestScopes` gives each HTTP request and WebSocket
  session its own Sentry isolation scope, so users, tags and breadcrumbs set while
  serving one request never reach another's events.
- **Nothing secret leaves.** Every event is scrubbed with the shared key rule of
  :mod:`cfk_otel._redact`, at any depth, and credentials are cut out of text (URLs with
  user info such as DSNs, ``Bearer`` tokens, ``password=...``). No IP addresses, cookies
  or request bodies are collected.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any, Final

import sentry_sdk
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, format_span_id, format_trace_id
from sentry_sdk.integrations.dedupe import DedupeIntegration
from sentry_sdk.integrations.logging import LoggingIntegration, ignore_logger
from sentry_sdk.integrations.modules import ModulesIntegration
from sentry_sdk.integrations.threading import ThreadingIntegration
from sentry_sdk.scope import Scope as SentryScope
from sentry_sdk.scope import use_isolation_scope
from sentry_sdk.types import Event, Hint
from sentry_sdk.utils import event_from_exception

from cfk_otel._asgi.routes import UNMATCHED, RouteResolver
from cfk_otel._asgi.types import ASGIApp, Message, Receive, RequestInfo, Scope, Send
from cfk_otel._guard import guard, warn_once
from cfk_otel._redact import Known, scrub
from cfk_otel._settings import Settings

from .total import ABNORMAL_CLOSE_CODES, RequestErrors, count_exception

_log = logging.getLogger("cfk_otel.errors")
_OBSERVE: Final = guard("reporting a request to Sentry")

# One issue (method, route, status) sends at most ISSUE_BURST events at once and
# ISSUE_EVENTS_PER_MINUTE on average: a client hammering one failing route costs one
# trickle of events, while errors_total counts every response.
ISSUE_EVENTS_PER_MINUTE: Final = 6.0
ISSUE_BURST: Final = 10.0
_MAX_ISSUES: Final = 1024
# Lines about failures we report ourselves (uvicorn's "Exception in ASGI application", the
# request line of a 5xx) or that carry client addresses (access logs).
_IGNORED_LOGGERS: Final = ("uvicorn.error", "cfk_otel.requests", "uvicorn.access", "gunicorn.access")
# An error storm must not cost the app its capacity: building an event takes milliseconds of
# CPU on the request's thread, so at most this many are built (errors_total counts them all).
EVENTS_PER_SECOND: Final = 10.0
EVENT_BURST: Final = 100.0
# The only request headers sent: none of them identifies or authenticates anyone.
_HEADERS: Final = frozenset({b"host", b"user-agent", b"accept", b"content-type", b"content-length"})
_SCOPE_KEY: Final = "cfk_otel.sentry"
_REPORTED: Final = "__cfk_otel_reported__"
_LOOP_HANDLER: Final = "_cfk_otel_sentry"
_processor_added = False


class Budget:
    """A token bucket: ``burst`` events at once, ``rate`` a second on average.

    >>> budget = Budget(rate=1.0, burst=2.0)
    >>> budget.take(), budget.take(), budget.take()
    (True, True, False)
    """

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate
        self._burst = burst
        self._clock = clock
        self._tokens = burst
        self._last = clock()
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            now = self._clock()
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
            self._last = now
            if self._tokens < 1.0:
                return False
            self._tokens -= 1.0
            return True


budget = Budget(EVENTS_PER_SECOND, EVENT_BURST)


class IssueBudgets:
    """A :class:`Budget` per issue fingerprint, for the reports built from a status code.

    Fingerprints are bounded (method x route template x status), but past
    :data:`_MAX_ISSUES` of them the oldest budget is forgotten.

    >>> budgets = IssueBudgets(rate=0.0, burst=1.0)
    >>> a, b = ("GET", "/a", "404"), ("GET", "/b", "404")
    >>> budgets.take(a), budgets.take(a), budgets.take(b)
    (True, False, True)
    """

    def __init__(self, rate: float = ISSUE_EVENTS_PER_MINUTE / 60.0, burst: float = ISSUE_BURST) -> None:
        self._rate = rate
        self._burst = burst
        self._budgets: dict[tuple[str, ...], Budget] = {}
        self._lock = threading.Lock()

    def take(self, fingerprint: tuple[str, ...]) -> bool:
        with self._lock:
            issue = self._budgets.get(fingerprint)
            if issue is None:
                if len(self._budgets) >= _MAX_ISSUES:
                    del self._budgets[next(iter(self._budgets))]
                issue = self._budgets[fingerprint] = Budget(self._rate, self._burst)
        return issue.take()


def _within_budget() -> bool:
    if budget.take():
        return True
    warn_once(
        "budget",
        "cfk_otel: more than %d Sentry events in a burst; dropping some (errors_total counts them all)",
        int(EVENT_BURST),
    )
    return False


def init(settings: Settings) -> bool:
    """Start the Sentry client from the settings. Returns True once it runs."""
    global _processor_added, budget  # noqa: PLW0603  (one processor and one budget per process)
    budget = Budget(EVENTS_PER_SECOND, EVENT_BURST)
    profiles = settings.sentry_profiles_sample_rate
    sentry_sdk.init(
        dsn=settings.sentry_dsn,
        environment=settings.sentry_environment,
        release=settings.sentry_release or _release(settings),
        # Only what we choose: no framework, database or HTTP-client integration tracing
        # requests a second time, no outgoing sentry-trace headers, no argv (secrets).
        default_integrations=False,
        auto_enabling_integrations=False,
        integrations=[
            DedupeIntegration(),
            # No ExcepthookIntegration: cfk_otel._errors.uncaught owns sys.excepthook (one JSON
            # record, and the report through _errors_total.unhandled); Sentry's hook would
            # print Python's raw traceback after ours.
            ModulesIntegration(),
            ThreadingIntegration(propagate_scope=False),
            LoggingIntegration(level=logging.INFO, event_level=logging.ERROR, sentry_logs_level=None),
        ],
        traces_sample_rate=None,  # OpenTelemetry traces; see docs/sentry.md
        profile_session_sample_rate=profiles,
        profile_lifecycle="manual",
        before_send=functools.partial(before_send, known=Known(settings.secret_values())),
        max_breadcrumbs=50,
        # Stack frames without their local variables: they are where secrets hide under
        # names no rule can guess, and serializing them doubles the cost of an event.
        include_local_variables=False,
        shutdown_timeout=2.0,
    )
    for name in _IGNORED_LOGGERS:
        ignore_logger(name)
    if not _processor_added:
        sentry_sdk.get_global_scope().add_event_processor(_link_trace)
        _processor_added = True
    if profiles:
        sentry_sdk.profiler.start_profiler()  # runs only in the sampled share of processes
    return True


def _release(settings: Settings) -> str | None:
    if settings.service_version and settings.service_version != "unknown":
        return f"{settings.service_name}@{settings.service_version}"
    return None


def close(timeout: float) -> None:
    """Stop the profiler, send what is queued within ``timeout`` seconds, drop the client."""
    with guard("stopping the profiler"):
        sentry_sdk.profiler.stop_profiler()  # sends its last chunk
    with guard("flushing Sentry"):
        sentry_sdk.get_client().close(timeout=max(0.0, timeout - 0.1))
    sentry_sdk.get_global_scope().set_client(None)


# --- the public API's Sentry side ----------------------------------------------------------


def capture_error(
    error: BaseException, level: str, tags: Mapping[str, object] | None, extra: Mapping[str, object] | None
) -> str | None:
    if not _within_budget():
        _mark_reported(error)
        return None
    with guard("capture_error"), sentry_sdk.new_scope() as scope:
        scope.set_level(level)  # type: ignore[arg-type]
        for key, value in (tags or {}).items():
            scope.set_tag(str(key), str(value))
        for key, value in (extra or {}).items():
            scope.set_extra(str(key), value)
        return sentry_sdk.capture_exception(error)
    return None


def capture_message(message: str, level: str, data: Mapping[str, object]) -> str | None:
    if not _within_budget():
        return None
    with guard("capture_message"), sentry_sdk.new_scope() as scope:
        for key, value in data.items():
            scope.set_extra(str(key), value)
        return sentry_sdk.capture_message(message, level=level)  # type: ignore[arg-type]
    return None


def set_user(user: Mapping[str, object] | None) -> None:
    with guard("set_user"):
        sentry_sdk.set_user(dict(user) if user else None)


def capture_slow_query(sql: str, operation: str, seconds: float) -> None:
    if not _within_budget():
        return
    first_line = sql.strip().splitlines()[0][:120] if sql.strip() else "?"
    sentry_sdk.capture_event(
        {
            "message": f"Slow query ({seconds:.3f}s): {first_line}",
            "level": "warning",
            "logger": "cfk_otel.db",
            "fingerprint": ["slow-query", sql],
            "tags": {"db.operation.name": operation},
            # The statement only: its arguments are never recorded (user data, secrets).
            "extra": {"db.query.text": sql, "duration_s": round(seconds, 3)},
        }
    )


# --- one event per failure, nothing secret ------------------------------------------------


def before_send(event: Event, hint: Hint, known: Known | None = None) -> Event | None:
    """Drop events about an exception already reported; scrub the rest (with the ``known``
    secret values the process was configured with)."""
    exc_info = hint.get("exc_info")
    error = exc_info[1] if isinstance(exc_info, tuple) and len(exc_info) == 3 else None
    if error is not None and getattr(error, _REPORTED, False):
        return None
    scrubbed: Event = scrub(event, known=known)
    if error is not None:
        _mark_reported(error)
    return scrubbed


def _mark_reported(error: BaseException) -> None:
    with contextlib.suppress(AttributeError, TypeError):  # exceptions with __slots__
        setattr(error, _REPORTED, True)


def _link_trace(event: Event, hint: Hint) -> Event:
    # Every event points at the OpenTelemetry span current where it was captured.
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:
        event.setdefault("contexts", {})["trace"] = {
            "trace_id": format_trace_id(span_context.trace_id),
            "span_id": format_span_id(span_context.span_id),
        }
    return event


# --- per request: an isolation scope, and the reports when it ends -------------------------


class _RequestState:
    __slots__ = ("close_code", "close_reason", "scope")

    def __init__(self, scope: SentryScope) -> None:
        self.scope = scope
        self.close_code: int | None = None
        self.close_reason = ""


class _RequestEvents:
    """Event processor of one request's scope: what the request was, never who sent it."""

    __slots__ = ("asgi", "root_path", "routes")

    def __init__(self, asgi: Scope, root_path: str, routes: RouteResolver) -> None:
        self.asgi = asgi
        self.root_path = root_path
        self.routes = routes

    def __call__(self, event: Event, hint: Hint) -> Event:
        asgi = self.asgi
        method = asgi.get("method", "GET")
        if "request" not in event:
            headers = {
                k.decode("latin-1"): v.decode("latin-1")
                for k, v in asgi.get("headers") or ()
                if k in _HEADERS
            }
            host = headers.get("host", "")
            event["request"] = {
                "method": method,
                "url": f"{asgi.get('scheme', 'http')}://{host}{asgi.get('path', '')}",  # no query string
                "headers": headers,
            }
        tags = event.setdefault("tags", {})
        tags.setdefault("http.method", method)
        if not event.get("transaction"):
            route = self.routes.template(asgi, self.root_path, 0)
            if route != UNMATCHED:
                event["transaction"] = route
                event["transaction_info"] = {"source": "route"}
                tags.setdefault("http.route", route)
        return event


class RequestScopes:
    """ASGI wrapper: a Sentry isolation scope per HTTP request and WebSocket session.

    Installed by :func:`cfk_otel.instrument_app` inside the telemetry middleware when
    Sentry is on. It also watches WebSocket close codes, and hooks the event loop's
    exception handler the first time it runs, for background tasks that fail.

    >>> app = RequestScopes(starlette_app)  # doctest: +SKIP
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app  # followed by the route resolver, like any middleware
        self._routes = RouteResolver(app)
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop = loop
            with guard("hooking the loop's exception handler"):
                watch_background_tasks(loop)
        kind = scope["type"]
        if kind != "http" and kind != "websocket":  # noqa: PLR1714
            try:
                await self.app(scope, receive, send)
            except Exception as exc:  # a start-up or shutdown failure: uvicorn.error is ignored
                if kind == "lifespan":
                    with guard("reporting a lifespan failure"):
                        capture_unhandled(exc, "cfk_otel.lifespan")
                        count_exception(exc)
                raise
            return
        with sentry_sdk.isolation_scope() as isolation:
            isolation.clear_breadcrumbs()  # only this request's
            isolation.add_event_processor(_RequestEvents(scope, scope.get("root_path", ""), self._routes))
            state = _RequestState(isolation)
            scope[_SCOPE_KEY] = state
            if kind == "websocket":
                send = _watch_close(send, state)
            await self.app(scope, receive, send)


def _watch_close(send: Send, state: _RequestState) -> Send:
    async def send_wrapper(message: Message) -> None:
        if message["type"] == "websocket.close":
            state.close_code = message.get("code") or 1000
            state.close_reason = message.get("reason") or ""
        await send(message)

    return send_wrapper


class ErrorObserver:
    """Reports each finished request that failed, once, with its route, method and status.

    - an unhandled exception (HTTP or WebSocket): an ``error`` event with its stack;
    - a 5xx response without one: an ``error`` event ``HTTP 503 Service Unavailable``;
    - a 4xx response, when its status is in ``SENTRY_CAPTURE_4XX`` (all by default) and it
      is not a 404 for a path no route matches: a ``warning``;
    - a WebSocket the app closed with 1011 or 1014: an ``error``.

    Reports built from a status are grouped into one issue per method, route template and
    status (their fingerprint), and limited per issue (:class:`IssueBudgets`). Events carry
    the request span's trace and span ids. The middleware counts them all in
    ``errors_total`` (through :meth:`cfk_otel._errors.total.RequestErrors.count`), reported or not.
    """

    def __init__(self, errors: RequestErrors | None = None) -> None:
        self._errors = errors or RequestErrors()
        self._issues = IssueBudgets()

    def __call__(self, info: RequestInfo) -> None:
        with _OBSERVE:
            self._observe(info)

    def _observe(self, info: RequestInfo) -> None:
        state = info.scope.get(_SCOPE_KEY)
        if not isinstance(state, _RequestState):
            state = None
        error = info.error
        if error is not None:
            if isinstance(error, Exception):  # not cancellations or exits
                self._report(info, state, error=error)
            return
        status = info.status
        if info.kind == "http":
            if status >= 500:
                self._report(info, state, message=f"HTTP {status} {_phrase(status)}", level="error")
            elif self._errors.reportable_4xx(status, info.route):  # the rule errors_total counts by
                self._report(info, state, message=f"HTTP {status} {_phrase(status)}", level="warning")
        elif state is not None and state.close_code in ABNORMAL_CLOSE_CODES:
            code = state.close_code
            reason = f": {state.close_reason}" if state.close_reason else ""
            self._report(info, state, message=f"WebSocket closed with {code}{reason}", level="error")

    def _report(
        self,
        info: RequestInfo,
        state: _RequestState | None,
        *,
        error: BaseException | None = None,
        message: str = "",
        level: str = "error",
    ) -> None:
        # One issue per method + route template + status (+ close code for a WebSocket).
        fingerprint = (info.kind, info.method, info.route, str(info.status), message)
        if error is None and not (self._issues.take(fingerprint) and _within_budget()):
            return
        # The request's span is no longer current here: make it so for _link_trace.
        token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(info.span_context)))
        try:
            with _isolation(state), sentry_sdk.new_scope() as scope:
                scope.set_transaction_name(info.route, source="route")
                scope.set_tag("http.method", info.method)
                scope.set_tag("http.route", info.route)
                scope.set_tag("http.status_code", str(info.status))
                scope.set_tag("request.kind", info.kind)
                if error is not None:
                    capture_unhandled(error, f"cfk_otel.{info.kind}")
                else:
                    event = {"message": message, "level": level, "fingerprint": list(fingerprint)}
                    sentry_sdk.capture_event(event)  # type: ignore[arg-type]
        finally:
            otel_context.detach(token)


def _isolation(state: _RequestState | None) -> contextlib.AbstractContextManager[object]:
    return use_isolation_scope(state.scope) if state is not None else contextlib.nullcontext()


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


# --- background tasks ----------------------------------------------------------------------


def watch_background_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Report exceptions the loop would otherwise only log ("Task exception was never retrieved").

    The previous handler (or the default, which logs) still runs afterwards.
    """
    previous = loop.get_exception_handler()
    if getattr(previous, _LOOP_HANDLER, False):
        return

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        with guard("reporting a background task"):
            _report_background(context)
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    setattr(handler, _LOOP_HANDLER, True)
    loop.set_exception_handler(handler)


def _report_background(context: Mapping[str, Any]) -> None:
    error = context.get("exception")
    if not isinstance(error, Exception) or getattr(error, _REPORTED, False):
        return
    task = context.get("task") or context.get("future")
    # The handler runs wherever the task happened to be collected, possibly inside another
    # request: report from the task's own context (Python 3.12+) or from an empty one,
    # never from whichever request is current.
    get_context: Callable[[], contextvars.Context] | None = getattr(task, "get_context", None)
    run_in = get_context() if callable(get_context) else contextvars.Context()
    name = task.get_name() if isinstance(task, asyncio.Task) else ""
    try:
        run_in.run(_capture_background, error, str(context.get("message", "")), name)
    except RuntimeError:  # that context is running right now
        contextvars.Context().run(_capture_background, error, str(context.get("message", "")), name)
    count_exception(error)


def _capture_background(error: Exception, message: str, task_name: str) -> None:
    with sentry_sdk.new_scope() as scope:
        scope.set_tag("asyncio.task", task_name or "unnamed")
        scope.set_extra("asyncio.message", message)
        capture_unhandled(error, "asyncio")


def capture_unhandled(error: BaseException, mechanism: str) -> None:
    """An exception nobody handled (Sentry's ``handled: false``), once, within the budget."""
    if getattr(error, _REPORTED, False):
        return  # already reported, e.g. logged with exc_info before it was re-raised
    if not _within_budget():
        _mark_reported(error)
        return
    event, hint = event_from_exception(
        error, client_options=sentry_sdk.get_client().options, mechanism={"type": mechanism, "handled": False}
    )
    sentry_sdk.capture_event(event, hint=hint)
