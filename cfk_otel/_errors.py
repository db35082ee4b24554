"""Error tracking: the document's ``capture_error``, ``capture_message`` and ``set_user``.

Reports go to Sentry when ``SENTRY_DSN`` is set. Without it nothing is sent and
``sentry_sdk`` is never imported (it takes about 0.3 s to import): the calls return
``None``. Either way this module is the one writer of ``errors_total{type,severity}``
(:func:`count`): requests, slow queries, uncaught exceptions and ``capture_error`` all
count through it.

The Sentry side (what is captured automatically, scrubbing, per-request isolation,
sample rates) lives in :mod:`cfk_otel._sentry` and is described in ``docs/sentry.md``.

These functions are on the hot path of the app: they never raise. A bad argument (a
level the document does not know, a context that is not a dict) is named once in the log
with its call, and what was given is still sent where it can be.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from . import _metrics
from ._routes import UNMATCHED
from ._settings import SENTRY_CAPTURE_4XX, Settings, status_set

if TYPE_CHECKING:
    from ._asgi import ASGIApp, RequestObserver

_log = logging.getLogger("cfk_otel.errors")

# The document's levels (and two common aliases), as Sentry spells them.
SENTRY_LEVELS: Final = {
    "debug": "debug",
    "info": "info",
    "warn": "warning",
    "warning": "warning",
    "error": "error",
    "fatal": "fatal",
    "critical": "fatal",
}
# ``errors_total{severity}`` uses the document's names, like LOG_LEVEL.
SEVERITY: Final = {"debug": "debug", "info": "info", "warning": "warn", "error": "error", "fatal": "fatal"}
_MAX_WARNED: Final = 64
# WebSocket close codes that mean the server failed (RFC 6455: 1011 internal error, 1014
# bad gateway). Others are normal, client faults or the client going away.
ABNORMAL_CLOSE_CODES: Final = frozenset({1011, 1014})
_COUNTED: Final = "__cfk_otel_counted__"


@dataclass
class _State:
    active: bool = False  # Sentry was initialised with a DSN in this process
    settings: Settings | None = None
    # The 4xx reported and counted (SENTRY_CAPTURE_4XX); the default until start() runs.
    capture_4xx: frozenset[int] = status_set(SENTRY_CAPTURE_4XX.default)
    warned: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


STATE = _State()


def sentry_level(level: object, call: str = "capture_error") -> str:
    """Sentry's name for one of the document's levels; unknown levels become ``error``.

    >>> sentry_level("warn"), sentry_level("FATAL")
    ('warning', 'fatal')
    """
    name = SENTRY_LEVELS.get(level.lower()) if isinstance(level, str) else None
    if name is None:
        _warn_once(
            f"level:{call}:{level!r}",
            "cfk_otel: %s(): unknown level %r (use debug, info, warn, error or fatal); using 'error'",
            call,
            level,
        )
        return "error"
    return name


def capture_error(
    error: BaseException,
    context: Mapping[str, object] | str | None = None,
    tags: Mapping[str, object] | None = None,
    extra: Mapping[str, object] | None = None,
    *,
    level: str | None = None,
) -> str | None:
    """Report a handled exception; returns the Sentry event id (``None`` without Sentry).

    The document's shape is a context dict, ``{"level", "tags", "extra"}``; keywords
    work too, and win over the dict. Other keys of the dict are kept in ``extra``. Also
    counts ``errors_total{type=<exception class>, severity=<level>}``, Sentry or not.
    Tags are short strings Sentry can search and group by; ``extra`` is free-form context
    (scrubbed of secrets like everything else sent). Never raises.

    >>> try:
    ...     move_ticket(ticket_id)
    ... except TicketLocked as exc:  # doctest: +SKIP
    ...     capture_error(exc, {"level": "warn", "tags": {"component": "api"}, "extra": {"ticketId": 7}})
    ...     capture_error(exc, level="warn", tags={"component": "tickets-api"})  # the same
    """
    try:
        level_name, all_tags, all_extra = _error_context(context, level, tags, extra)
        if not isinstance(error, BaseException):
            _warn_once(
                "error-type", "cfk_otel: capture_error() needs an exception, got %s", type(error).__name__
            )
            return capture_message(str(error), level_name, all_extra)
        count_exception(error, SEVERITY[level_name])
        if not STATE.active:
            return None
        from . import _sentry  # noqa: PLC0415  (imported only once Sentry is on)

        return _sentry.capture_error(error, level_name, all_tags, all_extra)
    except Exception:  # error tracking never breaks the app
        _warn_once("capture_error", "cfk_otel: capture_error() failed", exc_info=True)
        return None


def _error_context(
    context: object, level: object, tags: object, extra: object
) -> tuple[str, dict[str, object], dict[str, object]]:
    # Positional since the first versions: capture_error(err, "warn", {tags}, {extra}).
    given_level: object = "error"
    all_tags: dict[str, object] = {}
    all_extra: dict[str, object] = {}
    if isinstance(context, str):
        given_level = context
    elif isinstance(context, Mapping):
        for key, value in context.items():
            if key == "level":
                given_level = value
            elif key == "tags":
                all_tags.update(_mapping(value, "capture_error", "tags"))
            elif key == "extra":
                all_extra.update(_mapping(value, "capture_error", "extra"))
            else:  # kept, where Sentry shows free-form context
                all_extra[str(key)] = value
    elif context is not None:
        _warn_once(
            "capture_error:context",
            "cfk_otel: capture_error(): the context must be a dict such as "
            "{'level': 'error', 'tags': {...}, 'extra': {...}}, got %s; kept in extra",
            type(context).__name__,
        )
        all_extra["context"] = context
    if level is not None:
        given_level = level
    all_tags.update(_mapping(tags, "capture_error", "tags"))
    all_extra.update(_mapping(extra, "capture_error", "extra"))
    return sentry_level(given_level, "capture_error"), all_tags, all_extra


def _mapping(value: object, call: str, what: str) -> Mapping[str, object]:
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    _warn_once(
        f"{call}:{what}",
        "cfk_otel: %s(): %s must be a dict, got %s; kept under %r",
        call,
        what,
        type(value).__name__,
        what,
    )
    return {what: value}


def capture_message(
    message: str, level: str = "info", context: Mapping[str, object] | None = None, **fields: object
) -> str | None:
    """Report a message, with context as key/value pairs; returns the Sentry event id.

    The document's shape is ``capture_message(message, level, context)``; context
    keywords are merged into it. Messages are not errors: they are not counted in
    ``errors_total``. Never raises.

    >>> capture_message("Onboarding done", "info", {"userId": uid, "duration": 45000})  # doctest: +SKIP
    """
    try:
        level_name = sentry_level(level, "capture_message")
        data = {**_mapping(context, "capture_message", "context"), **fields}
        if not STATE.active:
            return None
        from . import _sentry  # noqa: PLC0415

        return _sentry.capture_message(str(message), level_name, data)
    except Exception:
        _warn_once("capture_message", "cfk_otel: capture_message() failed", exc_info=True)
        return None


def set_user(user: Mapping[str, object] | None = None, /, **fields: object) -> None:
    """Attach a user (``id``, ``email``, ``username``, ...) to the events of this request.

    As in the document, ``set_user({"id": ..., "email": ...})``; keywords work too
    (``set_user(id=..., email=...)``). Each HTTP request and WebSocket session has its
    own Sentry scope, so the user set here never shows on another request's events,
    concurrent or later. Called outside a request, it applies to the process's later
    events outside requests. ``set_user(None)`` clears it. Only what is set here
    identifies a user: IP addresses and cookies are never sent. Never raises.

    >>> set_user({"id": "user-123", "email": "ann@example.com"})  # doctest: +SKIP
    """
    try:
        data = {**_mapping(user, "set_user", "user"), **fields} if user is not None or fields else None
        if data and data.get("id") is not None:  # active_users counts them, Sentry or not
            _metrics.default().note_user(str(data["id"]))
        if not STATE.active:
            return
        from . import _sentry  # noqa: PLC0415

        _sentry.set_user(data)
    except Exception:
        _warn_once("set_user", "cfk_otel: set_user() failed", exc_info=True)


# --- errors_total: this module is its one writer -------------------------------------------


def count(error_type: str, severity: str, registry: _metrics.Metrics | None = None) -> None:
    """Count one error in ``errors_total{type,severity}`` (the document's severity names).

    Every source counts through here, with Sentry or without: requests (exceptions, 5xx,
    4xx in ``SENTRY_CAPTURE_4XX``, WebSocket closes 1011/1014), slow queries, uncaught
    exceptions (threads, top level, asyncio tasks) and :func:`capture_error`.
    """
    try:
        _add(registry or _metrics.default(), error_type, SEVERITY.get(severity, severity))
    except Exception:
        _warn_once("count", "cfk_otel: counting an error failed", exc_info=True)


def _add(registry: _metrics.Metrics, error_type: str, severity: str) -> None:
    registry.errors.add_by_key((error_type, severity), 1.0)


def count_exception(
    error: BaseException, severity: str = "error", registry: _metrics.Metrics | None = None
) -> None:
    """Count an exception once, however many of our hooks see it (a task's exception
    reaches both the loop handler of :mod:`cfk_otel._uncaught` and Sentry's)."""
    if getattr(error, _COUNTED, False):
        return
    with contextlib.suppress(AttributeError, TypeError):  # exceptions with __slots__
        setattr(error, _COUNTED, True)
    count(type(error).__qualname__, severity, registry)


def count_request(
    registry: _metrics.Metrics,
    kind: str,
    route: str,
    status: int,
    error: BaseException | None,
    close_code: int | None,
) -> None:
    """The errors one finished request or WebSocket session stands for (the middleware's
    call, made only when it has an error, a status of 400 or more, or a close code)."""
    if error is not None:
        count_exception(error, "error", registry)
    elif kind == "http":
        if status >= 500:
            count(f"http_{status}", "error", registry)
        elif reportable_4xx(status, route):
            count(f"http_{status}", "warn", registry)
    elif close_code in ABNORMAL_CLOSE_CODES:
        count(f"websocket_{close_code}", "error", registry)


def reportable_4xx(status: int, route: str) -> bool:
    """A 4xx the document reports: its status is in ``SENTRY_CAPTURE_4XX``, and it is not a
    404 for a path no route matches (scanners and typos, not the app's errors)."""
    return status in STATE.capture_4xx and not (status == 404 and route == UNMATCHED)


# --- the distro's side: start, stop, hooks ------------------------------------------------


def start(settings: Settings) -> None:
    """Apply ``SENTRY_TRACES_SAMPLE_RATE`` to the trace sampler, then start Sentry if a DSN is set.

    Called by the SDK set-up before the tracer provider is built, once per process (in
    each forked worker when start-up is deferred). Never raises.
    """
    _apply_trace_sample_rate(settings)
    STATE.settings = settings
    STATE.capture_4xx = settings.sentry_capture_4xx
    if not settings.sentry_dsn or STATE.active:
        return
    try:
        from . import _sentry  # noqa: PLC0415

        STATE.active = _sentry.init(settings)
    except Exception:  # an error tracker that fails must not take the app with it
        _log.warning("cfk_otel: Sentry could not be started; continuing without it", exc_info=True)


def _apply_trace_sample_rate(settings: Settings) -> None:
    # OpenTelemetry is the one tracer, so the share of traces Sentry sees is the share the
    # head sampler keeps; _settings.load() already chose the sampler, the SDK reads it here.
    if settings.sentry_traces_sample_rate is None or "OTEL_TRACES_SAMPLER" in os.environ:
        return
    if settings.sampler == "parentbased_traceidratio" and settings.sampler_arg is not None:
        os.environ["OTEL_TRACES_SAMPLER"] = settings.sampler
        os.environ["OTEL_TRACES_SAMPLER_ARG"] = repr(settings.sampler_arg)


def close(timeout: float) -> None:
    """Send what is queued (within ``timeout`` seconds) and stop Sentry. Safe to call again."""
    with STATE.lock:
        if not STATE.active:
            return
        STATE.active = False
    from . import _sentry  # noqa: PLC0415

    _sentry.close(timeout)


def instrument(app: ASGIApp, observers: list[RequestObserver]) -> ASGIApp:
    """With Sentry on: ``app`` with a Sentry scope per request, and our observer appended.

    Without Sentry, ``app`` itself and ``observers`` untouched: nothing runs per request.
    """
    if not STATE.active or STATE.settings is None:
        return app
    try:
        from . import _sentry  # noqa: PLC0415

        wrapped = _sentry.RequestScopes(app)
        observers.append(_sentry.ErrorObserver(STATE.settings.sentry_capture_4xx))
        return wrapped
    except Exception:
        _log.warning("cfk_otel: Sentry request hooks failed; no automatic reports", exc_info=True)
        return app


def report_slow_query(sql: str, seconds: float) -> None:
    """A query slower than ``SLOW_QUERY_THRESHOLD``: counted, and a Sentry warning (its SQL,
    never its arguments) when Sentry is on."""
    count("slow_query", "warn")
    if not STATE.active:
        return
    try:
        from . import _sentry  # noqa: PLC0415

        _sentry.capture_slow_query(sql, seconds)
    except Exception:
        _warn_once("slow-query", "cfk_otel: reporting a slow query failed", exc_info=True)


def report_unhandled(error: BaseException, mechanism: str, severity: str = "error") -> None:
    """An exception nobody caught (a thread, the main program, an asyncio task): counted,
    and to Sentry as unhandled when Sentry is on, once (see :mod:`cfk_otel._uncaught`)."""
    count_exception(error, severity)
    if not STATE.active:
        return
    try:
        from . import _sentry  # noqa: PLC0415

        _sentry._capture_unhandled(error, mechanism)
    except Exception:
        _warn_once("unhandled", "cfk_otel: reporting an uncaught exception failed", exc_info=True)


def _warn_once(key: str, message: str, *args: object, exc_info: bool = False) -> None:
    with STATE.lock:
        if key in STATE.warned or len(STATE.warned) >= _MAX_WARNED:
            return
        STATE.warned.add(key)
    _log.warning(message, *args, exc_info=exc_info)


def _reset_for_tests() -> None:
    """TESTS ONLY: stop Sentry and forget this module's state."""
    close(1.0)
    STATE.settings = None
    STATE.capture_4xx = status_set(SENTRY_CAPTURE_4XX.default)
    STATE.warned.clear()
