"""The request line: one record per HTTP request, in place of uvicorn's access log."""

from __future__ import annotations

import logging
import random
import time
from typing import TYPE_CHECKING, Final, NamedTuple

from opentelemetry import trace

from cfk_otel._asgi.types import RequestInfo, Scope
from cfk_otel._core.seam import (
    _GENERATION,
    _LINES,
    LINE_OTLP,
    LINE_OWN_SPAN,
    LINE_STDOUT,
    Ended,
    Line,
    end_request,
    request_line,
)
from cfk_otel._guard import guard
from cfk_otel._redact import scrub_url
from cfk_otel._settings import Settings

from .handlers import _OURS, OtlpHandler, _StdoutHandler
from .record import _REQUESTS_LOGGER, _RequestLine, _RequestRecord
from .render import JsonFormatter, cut

if TYPE_CHECKING:
    from cfk_otel._native import OtlpExporter, RequestLine, ServerSpan

_requests: Final = logging.getLogger(_REQUESTS_LOGGER)
_QUEUE_LINE: Final = guard("queueing a request line in the core", then="the line is lost")


class _Route(NamedTuple):
    """Where request lines go when only our handlers would see them (see ``_route``)."""

    stream: _StdoutHandler | None
    formatter: JsonFormatter | None
    otlp: OtlpHandler | None


def _listeners() -> tuple[object, ...]:
    """Everything ``logging`` would involve in a request line: handlers up the logger
    chain, the requests logger's filters and the handlers' filters."""
    handlers: list[object] = []
    logger: logging.Logger | None = _requests
    while logger is not None:
        if logger.handlers:
            handlers.extend(logger.handlers)
        if not logger.propagate:
            break
        logger = logger.parent
    count = len(handlers)
    handlers.append(None)
    handlers.extend(_requests.filters)
    handlers.append(None)
    for handler in handlers[:count]:
        if handler.filters:  # type: ignore[attr-defined]  # the first `count` are handlers
            handlers.extend(handler.filters)  # type: ignore[attr-defined]
    return tuple(handlers)


def _route(listeners: tuple[object, ...]) -> _Route | None:
    """The direct route for request lines, or None when ``logging`` must dispatch them.

    Direct means: no filters, and no handlers but ours up the logger chain; our stdout
    handler writes JSON without Datadog fields, and our OTLP handler has the sink. Then
    a request line is written exactly as ``logging`` would write it, without the record,
    the dispatch and the per-handler locking; anything else takes the usual way.
    """
    handlers = listeners[: listeners.index(None)]
    if len(listeners) != len(handlers) + 2:  # a filter somewhere
        return None
    stream: _StdoutHandler | None = None
    otlp: OtlpHandler | None = None
    for handler in handlers:
        if type(handler) is _StdoutHandler and stream is None and getattr(handler, _OURS, False):
            stream = handler
        elif (
            type(handler) is OtlpHandler
            and otlp is None
            and handler.direct
            and getattr(handler, _OURS, False)
        ):
            otlp = handler
        else:
            return None
    formatter = stream.formatter if stream is not None else None
    if stream is not None and not (type(formatter) is JsonFormatter and formatter.direct):
        return None
    return _Route(stream, formatter if stream is not None else None, otlp)  # type: ignore[arg-type]


class RequestLog:
    """The request line written for each HTTP request: a request observer.

    Called with a :class:`RequestInfo` it writes the line everywhere it goes. The
    middleware calls :meth:`write` instead, which leaves the OTLP record that goes straight
    into the core to the middleware, to hand over with the request's span and metrics in
    one call (``_core.end_request``).
    """

    __slots__ = (
        "_core_line",
        "_limit",
        "_line_buffer",
        "_line_generation",
        "_line_route",
        "_line_target",
        "_rate",
        "_route",
        "_seen",
    )

    def __init__(self, settings: Settings) -> None:
        self._rate = settings.log_requests_sample_rate
        self._limit = settings.log_value_limit
        self._seen: tuple[object, ...] = ()
        self._route: _Route | None = None
        self._line_route: _Route | None = None
        self._line_target: tuple[OtlpExporter, int] | None = None
        self._line_buffer: object = None
        self._core_line: RequestLine | None = None
        self._line_generation = -1

    def __call__(self, info: RequestInfo) -> None:
        ended = self.write(info)
        if ended is not None:
            with _QUEUE_LINE:  # a log line must never raise into the app
                end_request(None, None, None, info.method, info.route, str(info.status), info.duration, ended)

    def write(self, info: RequestInfo) -> Ended | Line | None:
        """Write the request line of ``info``, or leave it to the core: what queues its OTLP
        record, or writes the whole line (a :data:`~cfk_otel._core.seam.Line`), when that is
        left to the caller's ``end_request`` (None: nothing left to do).

        The line's values are the same either way; the core writes them when the route is
        direct (see :func:`_route`) and the core is there, Python otherwise."""
        if info.kind != "http":
            return None
        span: trace.SpanContext = info.span_context
        return self.write_span(
            info.scope, info.method, info.route, info.status, info.duration, span if span.is_valid else None
        )

    def write_span(  # noqa: PLR0912  (one frame per request, on purpose: see below)
        self,
        scope: Scope,
        method: str,
        route: str,
        status: int,
        duration: float,
        span: ServerSpan | trace.SpanContext | None,
    ) -> Ended | Line | None:
        """:meth:`write` from the request's values and its span: the core's server span (the
        middleware's way, with no :class:`RequestInfo`: the line's time, ids and flags are
        then the span's, filled in as it ends), a valid ``SpanContext``, or None.

        Every request of a server comes through here, so the level, the route to the core and
        the check of the core's line are written out in this one frame."""
        if status < 400:
            if self._rate < 1.0 and random.random() >= self._rate:  # noqa: S311  (sampling, not crypto)
                return None
            level = logging.INFO
        else:
            level = logging.ERROR if status >= 500 else logging.WARNING
        if not _requests.isEnabledFor(level):
            return None
        path = scope.get("path", "")
        if "@" in path:  # an absolute-form target (GET http://user:pw@host/...) loses its userinfo
            path = scrub_url(path)
        if len(path) > self._limit:
            path = cut(path, self._limit)
        listeners = _listeners()
        if listeners != self._seen:
            self._seen, self._route = listeners, _route(listeners)
        lines = self._route
        if lines is not None:
            stream, otlp = lines.stream, lines.otlp
            outputs = (LINE_STDOUT if stream is not None and level >= stream.level else 0) | (
                LINE_OTLP if otlp is not None and level >= otlp.level else 0
            )
            if not outputs:
                return None
            if (path.isascii() or _plain(path)) and (route.isascii() or _plain(route)):
                if lines is not self._line_route or _GENERATION[0] != self._line_generation:
                    self._line(lines)
                line = self._core_line
                if line is not None and (self._line_target is not None or not outputs & LINE_OTLP):
                    if span is None or isinstance(span, trace.SpanContext):
                        return _with_ids(line, level, path, outputs, span)
                    # The core's server span: its time, ids and flags filled in as it ends.
                    return line, 0.0, level, path, 0, 0, 0, outputs | LINE_OWN_SPAN
        context = (
            span.get_span_context() if span is not None and not isinstance(span, trace.SpanContext) else span
        )
        return self._write(lines, level, method, path, route, status, duration, context)

    def _line(self, route: _Route) -> None:
        """Make the core's configuration of the line for ``route`` (``_core_line``; None:
        Python writes the line), and note the records' target (``_line_target``; None: the
        OTLP record takes the SDK's way, and so does the line, whole). Made again when the
        route changes, and when the set-up, the records' exporter (a fork, a shutdown) or the
        process's line buffer (a fork) may have: each bumps the seam's ``_GENERATION``."""
        self._line_generation = _GENERATION[0]
        otlp = route.otlp
        target = otlp.line_target() if otlp is not None else None
        if (
            route is not self._line_route
            or target is not self._line_target
            or _LINES[0] is not self._line_buffer
        ):
            stream = route.stream
            self._core_line = request_line(
                route.formatter._service_fields if route.formatter is not None else "",
                stream.write_held if stream is not None else None,
                target,
            )
            self._line_buffer = _LINES[0]
        self._line_route, self._line_target = route, target

    def _write(
        self,
        lines: _Route | None,
        level: int,
        method: str,
        path: str,
        route: str,
        status: int,
        duration: float,
        span: trace.SpanContext | None,
    ) -> Ended | None:
        """The request line written by Python: through ``logging`` when no direct route, for
        a value the core cannot take (a lone surrogate), or without the core."""
        duration_ms = round(duration * 1_000_000) / 1000  # µs precision; round(x, 3) costs 3x
        request = _RequestLine(
            time.time(),
            level,
            f"{method} {path} {status} {duration_ms:g}ms",
            method,
            path,
            route,
            status,
            duration_ms,
            span,
        )
        if lines is None:
            _requests.handle(_RequestRecord(level, request.message, request.fields, span))
            return None
        stream, otlp = lines.stream, lines.otlp
        if stream is not None and level >= stream.level:
            stream.write_line(lines.formatter._line(request))  # type: ignore[union-attr]
        if otlp is not None and level >= otlp.level:
            return otlp.prepare_request(request)
        return None


def _with_ids(line: RequestLine, level: int, path: str, outputs: int, span: trace.SpanContext | None) -> Line:
    """A line the core writes now, its ids and flags those of ``span`` (None: no span)."""
    if span is None:
        return line, time.time(), level, path, 0, 0, 0, outputs
    return line, time.time(), level, path, span.trace_id, span.span_id, span.trace_flags, outputs


def _plain(text: str) -> bool:
    """Whether ``text`` is valid Unicode for the core (no lone surrogate)."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def request_observer(settings: Settings) -> RequestLog | None:
    """The request line written for each HTTP request, or None when switched off."""
    if not settings.log_requests:
        return None
    return RequestLog(settings)
