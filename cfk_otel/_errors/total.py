"""``errors_total{type,severity}``: its one writer, and the findings that feed it.

Every error source the document names counts here, with Sentry or without: requests
(exceptions, 5xx, the 4xx of ``SENTRY_CAPTURE_4XX``, WebSocket closes 1011/1014), slow
queries, uncaught exceptions (threads, top level, asyncio tasks) and ``capture_error``.

Instrumentation reports what it finds (:func:`slow_query`, :func:`unhandled`) here and
knows nothing of error tracking: error tracking subscribes to the findings at start-up
(:data:`FINDINGS`), as it observes requests. So no module below error tracking imports it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from cfk_otel._asgi.routes import UNMATCHED
from cfk_otel._guard import guard
from cfk_otel._metrics import catalogue as _metrics
from cfk_otel._settings import status_set, variable

# ``errors_total{severity}`` uses the document's names, like LOG_LEVEL.
SEVERITY: Final = {"debug": "debug", "info": "info", "warning": "warn", "error": "error", "fatal": "fatal"}
# WebSocket close codes that mean the server failed (RFC 6455: 1011 internal error, 1014
# bad gateway). Others are normal, client faults or the client going away.
ABNORMAL_CLOSE_CODES: Final = frozenset({1011, 1014})
_COUNTED: Final = "__cfk_otel_counted__"


@dataclass
class Findings:
    """Who hears of what instrumentation found, besides the counter (error tracking)."""

    # (sql, operation, seconds) of a query slower than SLOW_QUERY_THRESHOLD
    slow_query: list[Callable[[str, str, float], None]] = field(default_factory=list)
    # (error, mechanism) of an exception nobody caught
    unhandled: list[Callable[[BaseException, str], None]] = field(default_factory=list)


FINDINGS = Findings()


def count(error_type: str, severity: str, registry: _metrics.Metrics | None = None) -> None:
    """Count one error in ``errors_total{type,severity}`` (the document's severity names)."""
    with guard("counting an error"):
        _add(registry or _metrics.default(), error_type, SEVERITY.get(severity, severity))


def _add(registry: _metrics.Metrics, error_type: str, severity: str) -> None:
    registry.errors.add_by_key((error_type, severity), 1.0)


def count_exception(
    error: BaseException, severity: str = "error", registry: _metrics.Metrics | None = None
) -> None:
    """Count an exception once, however many of our hooks see it (a task's exception
    reaches both the loop handler of :mod:`cfk_otel._errors.uncaught` and Sentry's)."""
    if getattr(error, _COUNTED, False):
        return
    with contextlib.suppress(AttributeError, TypeError):  # exceptions with __slots__
        setattr(error, _COUNTED, True)
    count(type(error).__qualname__, severity, registry)


@dataclass(frozen=True, slots=True)
class RequestErrors:
    """Which finished requests are errors: built from the settings by ``instrument_app`` and
    given to the middleware (which counts) and to error tracking (which reports), so both
    follow one rule."""

    # The 4xx reported and counted (SENTRY_CAPTURE_4XX).
    capture_4xx: frozenset[int] = status_set(variable("SENTRY_CAPTURE_4XX").default)

    def count(
        self,
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
            elif self.reportable_4xx(status, route):
                count(f"http_{status}", "warn", registry)
        elif close_code in ABNORMAL_CLOSE_CODES:
            count(f"websocket_{close_code}", "error", registry)

    def reportable_4xx(self, status: int, route: str) -> bool:
        """A 4xx the document reports: its status is in ``SENTRY_CAPTURE_4XX``, and it is not
        a 404 for a path no route matches (scanners and typos, not the app's errors)."""
        return status in self.capture_4xx and not (status == 404 and route == UNMATCHED)


def slow_query(sql: str, operation: str, seconds: float) -> None:
    """A query slower than ``SLOW_QUERY_THRESHOLD``: counted (warn), then told to the
    subscribers (a Sentry warning with its SQL, never its arguments)."""
    count("slow_query", "warn")
    for subscriber in FINDINGS.slow_query:
        with guard("reporting a slow query"):
            subscriber(sql, operation, seconds)


def unhandled(error: BaseException, mechanism: str, severity: str = "error") -> None:
    """An exception nobody caught (a thread, the main program, an asyncio task): counted
    once, then told to the subscribers (Sentry, as unhandled)."""
    count_exception(error, severity)
    for subscriber in FINDINGS.unhandled:
        with guard("reporting an uncaught exception"):
            subscriber(error, mechanism)
