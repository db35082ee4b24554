"""Error tracking: the document's ``capture_error``, ``capture_message`` and ``set_user``.

Reports go to Sentry when ``SENTRY_DSN`` is set. Without it nothing is sent and
``sentry_sdk`` is never imported (it takes about 0.3 s to import): the calls return
``None``. Either way ``capture_error`` counts in ``errors_total{type,severity}``, through
its one writer, :mod:`cfk_otel._errors.total`; with Sentry on, this module subscribes
Sentry to what instrumentation finds there (slow queries, uncaught exceptions).

The Sentry side (what is captured automatically, scrubbing, per-request isolation,
sample rates) lives in :mod:`cfk_otel._errors.sentry` and is described in ``docs/sentry.md``.

These functions are on the hot path of the app: they never raise. A bad argument (a
level the document does not know, a context that is not a dict) is named once in the log
with its call, and what was given is still sent where it can be.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from cfk_otel import _guard
from cfk_otel._guard import guard, warn_once
from cfk_otel._metrics import catalogue as _metrics
from cfk_otel._settings import Settings

from .total import FINDINGS, SEVERITY, RequestErrors, count_exception

if TYPE_CHECKING:
    from cfk_otel._asgi.types import ASGIApp, RequestObserver

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


@dataclass
class _State:
    active: bool = False  # Sentry was initialised with a DSN in this process
    settings: Settings | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


STATE = _State()


def sentry_level(level: object, call: str = "capture_error") -> str:
    """Sentry's name for one of the document's levels; unknown levels become ``error``.

    >>> sentry_level("warn"), sentry_level("FATAL")
    ('warning', 'fatal')
    """
    name = SENTRY_LEVELS.get(level.lower()) if isinstance(level, str) else None
    if name is None:
        warn_once(
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
    with guard("capture_error()"):  # error tracking never breaks the app
        level_name, all_tags, all_extra = _error_context(context, level, tags, extra)
        if not isinstance(error, BaseException):
            warn_once(
                "error-type", "cfk_otel: capture_error() needs an exception, got %s", type(error).__name__
            )
            return capture_message(str(error), level_name, all_extra)
        count_exception(error, SEVERITY[level_name])
        if not STATE.active:
            return None
        from . import sentry as _sentry  # noqa: PLC0415  (imported only once Sentry is on

        return _sentry.capture_error(error, level_name, all_tags, all_extra)
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
        warn_once(
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
    warn_once(
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
    with guard("capture_message()"):
        level_name = sentry_level(level, "capture_message")
        data = {**_mapping(context, "capture_message", "context"), **fields}
        if not STATE.active:
            return None
        from . import sentry as _sentry  # noqa: PLC0415

        return _sentry.capture_message(str(message), level_name, data)
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
    with guard("set_user()"):
        data = {**_mapping(user, "set_user", "user"), **fields} if user is not None or fields else None
        if data and data.get("id") is not None:  # active_users counts them, Sentry or not
            _metrics.default().note_user(str(data["id"]))
        if not STATE.active:
            return
        from . import sentry as _sentry  # noqa: PLC0415

        _sentry.set_user(data)


# --- the distro's side: start, stop, hooks ------------------------------------------------


def start(settings: Settings) -> None:
    """Start Sentry if a DSN is set.

    Called by the SDK set-up, once per process (in each forked worker when start-up is
    deferred). ``SENTRY_TRACES_SAMPLE_RATE`` is the OpenTelemetry sampler's ratio: the
    settings chose it, and the set-up gives it to the tracer provider. Never raises.
    """
    STATE.settings = settings
    if not settings.sentry_dsn or STATE.active:
        return
    with guard("starting Sentry", then="continuing without it"):  # never takes the app with it
        from . import sentry as _sentry  # noqa: PLC0415

        STATE.active = _sentry.init(settings)
        if STATE.active:  # what instrumentation finds reaches Sentry too
            FINDINGS.slow_query.append(_sentry.capture_slow_query)
            FINDINGS.unhandled.append(_sentry.capture_unhandled)


def close(timeout: float) -> None:
    """Send what is queued (within ``timeout`` seconds) and stop Sentry. Safe to call again."""
    with STATE.lock:
        if not STATE.active:
            return
        STATE.active = False
        FINDINGS.slow_query.clear()
        FINDINGS.unhandled.clear()
    from . import sentry as _sentry  # noqa: PLC0415

    _sentry.close(timeout)


def instrument(app: ASGIApp, observers: list[RequestObserver], errors: RequestErrors) -> ASGIApp:
    """With Sentry on: ``app`` with a Sentry scope per request, and our observer appended
    (reporting what ``errors`` counts).

    Without Sentry, ``app`` itself and ``observers`` untouched: nothing runs per request.
    """
    if not STATE.active or STATE.settings is None:
        return app
    with guard("installing Sentry's request hooks", then="no automatic reports"):
        from . import sentry as _sentry  # noqa: PLC0415

        wrapped = _sentry.RequestScopes(app)
        observers.append(_sentry.ErrorObserver(errors))
        return wrapped
    return app


def _reset_for_tests() -> None:
    """TESTS ONLY: stop Sentry and forget this module's state."""
    close(1.0)
    STATE.settings = None
    _guard._reset_for_tests()
