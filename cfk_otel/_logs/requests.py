"""The request line: one record per HTTP request, in place of uvicorn's access log."""

from __future__ import annotations

import logging
import random
import time
from typing import Final, NamedTuple

from opentelemetry import trace

from cfk_otel._asgi.types import RequestInfo
from cfk_otel._core.seam import Ended
from cfk_otel._guard import guard
from cfk_otel._redact import scrub_url
from cfk_otel._settings import Settings

from .handlers import _OURS, OtlpHandler, _StdoutHandler
from .record import _REQUESTS_LOGGER, _RequestLine, _RequestRecord
from .render import JsonFormatter, cut

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
    handlers: list[logging.Handler] = []
    logger: logging.Logger | None = _requests
    while logger is not None:
        handlers += logger.handlers
        if not logger.propagate:
            break
        logger = logger.parent
    return (*handlers, None, *_requests.filters, None, *(f for h in handlers for f in h.filters))


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

    __slots__ = ("_limit", "_rate", "_route", "_seen")

    def __init__(self, settings: Settings) -> None:
        self._rate = settings.log_requests_sample_rate
        self._limit = settings.log_value_limit
        self._seen: tuple[object, ...] = ()
        self._route: _Route | None = None

    def __call__(self, info: RequestInfo) -> None:
        ended = self.write(info)
        if ended is not None:
            with _QUEUE_LINE:  # a log line must never raise into the app
                ended[0].record_log(*ended[1])

    def write(self, info: RequestInfo) -> Ended | None:
        """Write the request line of ``info``; what queues its OTLP record in the core when
        that is left to the caller (None: nothing left to do)."""
        if info.kind != "http":
            return None
        status = info.status
        if status < 400:
            if self._rate < 1.0 and random.random() >= self._rate:  # noqa: S311  (sampling, not crypto)
                return None
            level = logging.INFO
        else:
            level = logging.ERROR if status >= 500 else logging.WARNING
        if not _requests.isEnabledFor(level):
            return None
        span: trace.SpanContext | None = info.span_context
        if not span.is_valid:  # type: ignore[union-attr]  # a RequestInfo always has one
            span = None
        # An absolute-form target (GET http://user:pw@host/...) loses its userinfo.
        method, path = info.method, scrub_url(info.scope.get("path", ""))
        if len(path) > self._limit:
            path = cut(path, self._limit)
        duration_ms = round(info.duration * 1_000_000) / 1000  # µs precision; round(x, 3) costs 3x
        request = _RequestLine(
            time.time(),
            level,
            f"{method} {path} {status} {duration_ms:g}ms",
            method,
            path,
            info.route,
            status,
            duration_ms,
            span,
        )
        listeners = _listeners()
        if listeners != self._seen:
            self._seen, self._route = listeners, _route(listeners)
        route = self._route
        if route is None:
            _requests.handle(_RequestRecord(level, request.message, request.fields, span))
            return None
        stream, otlp = route.stream, route.otlp
        if stream is not None and level >= stream.level:
            stream.write_line(route.formatter._line(request))  # type: ignore[union-attr]
        if otlp is not None and level >= otlp.level:
            return otlp.prepare_request(request)
        return None


def request_observer(settings: Settings) -> RequestLog | None:
    """The request line written for each HTTP request, or None when switched off."""
    if not settings.log_requests:
        return None
    return RequestLog(settings)
