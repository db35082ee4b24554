"""Error tracking: the document's ``capture_error``, ``capture_message`` and ``set_user``.

Reports go to Sentry when ``SENTRY_DSN`` is set. Without it nothing is sent and
``sentry_sdk`` is never imported (it takes about 0.3 s to import): the calls only count
``errors_total`` where the document says so, and return ``None``.

The Sentry side (what is captured automatically, scrubbing, per-request isolation,
sample rates) lives in :mod:`cfk_otel._sentry` and is described in ``docs/sentry.md``.

These functions are on the hot path of the app: they never raise. A level the document
does not know is logged once and replaced by ``error``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from . import _metrics
from ._settings import Settings

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
_MAX_WARNED: Final = 16


@dataclass
class _State:
    active: bool = False  # Sentry was initialised with a DSN in this process
    settings: Settings | None = None
    warned: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


STATE = _State()


def sentry_level(level: object) -> str:
    """Sentry's name for one of the document's levels; unknown levels become ``error``.

    >>> sentry_level("warn"), sentry_level("FATAL")
    ('warning', 'fatal')
    """
    name = SENTRY_LEVELS.get(level.lower()) if isinstance(level, str) else None
    if name is None:
        _warn_once(f"level:{level!r}", "cfk_otel: unknown error level %r; using 'error'", level)
        return "error"
    return name


def capture_error(
    error: BaseException,
    level: str = "error",
    tags: Mapping[str, object] | None = None,
    extra: Mapping[str, object] | None = None,
) -> str | None:
    """Report a handled exception; returns the Sentry event id (``None`` without Sentry).

    Also counts ``errors_total{type=<exception class>, severity=<level>}``. Tags are short
    strings Sentry can search and group by; ``extra`` is free-form context (scrubbed of
    secrets like everything else sent).

    >>> try:
    ...     move_ticket(ticket_id)
    ... except TicketLocked as exc:  # doctest: +SKIP
    ...     capture_error(exc, level="warn", tags={"component": "tickets-api"}, extra={"ticketId": 7})
    """
    level_name = sentry_level(level)
    if not isinstance(error, BaseException):
        _warn_once("error-type", "cfk_otel: capture_error() needs an exception, got %s", type(error).__name__)
        return capture_message(str(error), level_name, extra)
    _count(type(error).__qualname__, level_name)
    if not STATE.active:
        return None
    from . import _sentry  # noqa: PLC0415  (imported only once Sentry is on)

    return _sentry.capture_error(error, level_name, tags, extra)


def capture_message(
    message: str, level: str = "info", context: Mapping[str, object] | None = None, **fields: object
) -> str | None:
    """Report a message, with context as key/value pairs; returns the Sentry event id.

    Messages are not errors: they are not counted in ``errors_total``.

    >>> capture_message("Onboarding done", "info", {"userId": uid}, duration=45000)  # doctest: +SKIP
    """
    level_name = sentry_level(level)
    if not STATE.active:
        return None
    data = {**(context or {}), **fields}
    from . import _sentry  # noqa: PLC0415

    return _sentry.capture_message(str(message), level_name, data)


def set_user(user: Mapping[str, object] | None) -> None:
    """Attach a user (``id``, ``email``, ``username``, ...) to the events of this request.

    Each HTTP request and WebSocket session has its own Sentry scope, so the user set
    here never shows on another request's events, concurrent or later. Called outside a
    request, it applies to the process's later events outside requests. ``None`` clears it.
    Only what is set here identifies a user: IP addresses and cookies are never sent.

    >>> set_user({"id": "user-123", "email": "ann@example.com"})  # doctest: +SKIP
    """
    if user and user.get("id") is not None:  # active_users counts them, Sentry or not
        _metrics.default().note_user(str(user["id"]))
    if not STATE.active:
        return
    from . import _sentry  # noqa: PLC0415

    _sentry.set_user(user)


# --- the distro's side: start, stop, hooks ------------------------------------------------


def start(settings: Settings) -> None:
    """Apply ``SENTRY_TRACES_SAMPLE_RATE`` to the trace sampler, then start Sentry if a DSN is set.

    Called by the SDK set-up before the tracer provider is built, once per process (in
    each forked worker when start-up is deferred). Never raises.
    """
    _apply_trace_sample_rate(settings)
    STATE.settings = settings
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
    """A query slower than ``SLOW_QUERY_THRESHOLD`` as a Sentry warning: its SQL, never its arguments."""
    if not STATE.active:
        return
    try:
        from . import _sentry  # noqa: PLC0415

        _sentry.capture_slow_query(sql, seconds)
        _count("slow_query", "warning")
    except Exception:
        _warn_once("slow-query", "cfk_otel: reporting a slow query failed", exc_info=True)


def report_unhandled(error: BaseException, mechanism: str) -> None:
    """An exception nobody caught (a thread, the main program, an asyncio task) to Sentry,
    as unhandled, once (see :mod:`cfk_otel._uncaught`). Nothing without Sentry."""
    if not STATE.active:
        return
    try:
        from . import _sentry  # noqa: PLC0415

        _sentry._capture_unhandled(error, mechanism)
    except Exception:
        _warn_once("unhandled", "cfk_otel: reporting an uncaught exception failed", exc_info=True)


def _count(error_type: str, level: str) -> None:
    try:
        _metrics.count_error(error_type, SEVERITY.get(level, "error"))
    except Exception:
        _warn_once("count", "cfk_otel: counting an error failed", exc_info=True)


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
    STATE.warned.clear()
