"""The ASGI middleware: one server span and two metric records per request.

Pure ASGI and deliberately lean (it runs on every request): one span per request
rather than one per ``send``/``receive`` message, attributes set once at the end, the
route template resolved from what the framework's router left in the scope.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from opentelemetry import context, metrics, propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.semconv.attributes.client_attributes import CLIENT_ADDRESS
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.semconv.attributes.http_attributes import (
    HTTP_REQUEST_METHOD,
    HTTP_RESPONSE_STATUS_CODE,
    HTTP_ROUTE,
)
from opentelemetry.semconv.attributes.network_attributes import NETWORK_PROTOCOL_VERSION
from opentelemetry.semconv.attributes.server_attributes import SERVER_ADDRESS, SERVER_PORT
from opentelemetry.semconv.attributes.url_attributes import URL_PATH, URL_SCHEME
from opentelemetry.semconv.attributes.user_agent_attributes import USER_AGENT_ORIGINAL
from opentelemetry.trace import Status, StatusCode

from cfk_otel._core.sampling import exemplar_ids
from cfk_otel._core.seam import CoreSpan, Ended, Sender, ServerSpan, Spans
from cfk_otel._errors import total as _errors_total
from cfk_otel._guard import guard
from cfk_otel._logs.requests import RequestLog
from cfk_otel._metrics import catalogue as _metrics
from cfk_otel._redact import Known, exception_attributes, scrub_text, scrub_url

from .routes import UNMATCHED, RouteResolver
from .types import ASGIApp, Message, Receive, RequestInfo, RequestObserver, Scope, Send

__all__ = [
    "ASGIApp",
    "Message",
    "Receive",
    "RequestInfo",
    "RequestObserver",
    "Scope",
    "Send",
    "TelemetryMiddleware",
]


_RECORD_REQUEST: Final = guard("recording a request")
_WRITE_LINE: Final = guard("writing a request line", then="the request's span and metrics are recorded")
_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
_FASTAPI_TELEMETRY: Final = "fastapi.telemetry"  # the scope key of FastAPI's own telemetry


class _HeaderGetter(Getter[list[tuple[bytes, bytes]]]):
    """Reads propagation headers straight from the ASGI header list."""

    def get(self, carrier: list[tuple[bytes, bytes]], key: str) -> list[str] | None:
        wanted = key.encode("latin-1")
        values = [v.decode("latin-1") for k, v in carrier if k == wanted]
        return values or None

    def keys(self, carrier: list[tuple[bytes, bytes]]) -> list[str]:
        return [k.decode("latin-1") for k, _ in carrier]


_GETTER: Final = _HeaderGetter()


class _Incoming:
    """The incoming trace context, looked for only when a propagation header is there.

    Most requests carry none (no ``traceparent``, no ``baggage``): then there is nothing
    to extract and the propagators' work is skipped. The header names are the global
    propagator's declared ``fields``, re-read whenever another propagator is set.
    """

    __slots__ = ("_fields", "_propagator")

    def __init__(self) -> None:
        self._propagator: object = None
        self._fields: frozenset[bytes] = frozenset()

    def extract(self, headers: list[tuple[bytes, bytes]]) -> context.Context | None:
        propagator = propagate.get_global_textmap()
        if propagator is not self._propagator:
            self._fields = frozenset(f.lower().encode("latin-1") for f in propagator.fields)
            self._propagator = propagator
        fields = self._fields
        for key, _ in headers:
            if key in fields:
                return propagate.extract(headers, getter=_GETTER)
        return None


class _WebSocketMessages:
    """``websocket_messages_total`` for one connection; its route resolved at the first message."""

    __slots__ = ("_metrics", "_resolve", "_route")

    def __init__(self, metrics: _metrics.Metrics, resolve: Callable[[], str]) -> None:
        self._metrics = metrics
        self._resolve = resolve
        self._route: str | None = None

    def count(self, direction: str) -> None:
        if self._route is None:
            self._route = self._resolve()
        self._metrics.websocket_messages.add_by_key((self._route, direction), 1.0)

    def wrap(self, receive: Receive) -> Receive:
        async def receive_counted() -> Message:
            message = await receive()
            if message["type"] == "websocket.receive":
                self.count("received")
            return message

        return receive_counted


class TelemetryMiddleware:
    """Wraps an ASGI app with a server span and the request metrics.

    >>> app = TelemetryMiddleware(my_starlette_app)  # doctest: +SKIP

    Lifespan and other non-HTTP scopes pass through untouched. The providers default to
    the global ones that :func:`cfk_otel.configure` (or ``opentelemetry-instrument``) set.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        endpoints: Mapping[str, ASGIApp] | None = None,
        endpoint_telemetry: bool = False,
        observers: Sequence[RequestObserver] = (),
        errors: _errors_total.RequestErrors | None = None,
        secrets: Known | None = None,
    ) -> None:
        self.app = app
        # Called once per finished request or websocket (error reports, the app's own). The
        # request line is written first, and its OTLP record joins the request's one call
        # into the core (see _record).
        self._request_log = next((o for o in observers if isinstance(o, RequestLog)), None)
        self._observers = tuple(o for o in observers if o is not self._request_log)
        # Which finished requests count in errors_total (SENTRY_CAPTURE_4XX's statuses).
        self._errors = errors or _errors_total.RequestErrors()
        # The configured secret values, withheld from an error's message on the span.
        self._known = secrets or Known()
        # Paths the distro serves itself (/api/metrics, health); by default they are
        # answered before any span or metric is recorded.
        self._endpoints = dict(endpoints or {})
        self._endpoint_telemetry = endpoint_telemetry
        self._routes = RouteResolver(app)
        self._spans = Spans(tracer_provider)
        self._first = True  # no request yet: Spans has not chosen a path
        self._incoming = _Incoming()
        self.metrics = _metrics.Metrics(meter_provider) if meter_provider is not None else _metrics.default()

    async def __call__(  # noqa: PLR0912, PLR0915  (one body per request, on purpose: see below)
        self, scope: Scope, receive: Receive, send: Send
    ) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":  # noqa: PLR1714  (cheaper than a set here)
            await self.app(scope, receive, send)
            return
        app, fixed_route = self.app, None
        if self._endpoints and kind == "http":
            endpoint = self._endpoints.get(scope["path"])
            if endpoint is not None:
                if not self._endpoint_telemetry:
                    await endpoint(scope, receive, send)
                    return
                app, fixed_route = endpoint, scope["path"]
        # One body for every traced request (no coroutine of ours in between): the app's
        # frames are the same whichever path records the span, and so are the exception
        # events' stack traces.
        start = time.perf_counter()
        http = kind == "http"
        method = scope.get("method", "GET") if http else "GET"
        if method not in _METHODS:
            method = "_OTHER"
        root_path = scope.get("root_path", "")
        # The incoming trace context, else the current one: given to both the span's start
        # and set_span_in_context, which would each look the current one up.
        parent = self._incoming.extract(scope.get("headers") or [])
        if parent is None:
            parent = context.get_current()
        # An HTTP request's span starts in one call into the core when the set-up allows
        # (Spans.server; its start answers None once the set-up changed), else Spans.start.
        server = self._spans.server if http else None
        span: Any = server.start(method, parent) if server is not None else None
        if span is None and http and (server is not None or self._first):
            # The set-up changed since (Spans decides again), or the first request.
            self._first = False
            server = self._spans.refresh()
            span = server.start(method, parent) if server is not None else None
        if span is None:
            span = self._spans.start(method, parent)
        token = context.attach(trace.set_span_in_context(span, parent))
        status = 0
        close_code: int | None = None
        ws: _WebSocketMessages | None = None
        # An HTTP request's send notes the response's status and returns the server's own
        # send(message) (the core's Sender: no coroutine of ours per message).
        sender = Sender(send) if http and Sender is not None else None
        if sender is None:
            if not http:
                ws = _WebSocketMessages(
                    self.metrics, lambda: fixed_route or self._routes.template(scope, root_path, 101)
                )
                receive = ws.wrap(receive)

            async def send_wrapper(message: Message) -> None:
                nonlocal status, close_code
                mtype = message["type"]
                if mtype == "http.response.start":
                    status = message["status"]
                elif mtype == "websocket.send" and ws is not None:
                    ws.count("sent")
                elif mtype == "websocket.accept":
                    await send(message)
                    status = 101
                    self.metrics.websocket_connections.inc()
                    return
                elif mtype == "websocket.close":
                    close_code = message.get("code") or 1000
                    if not status:
                        status = 403
                await send(message)

        # FastAPI (0.165 and later) has telemetry of its own: a second server span, rooted
        # at the request's headers rather than ours, and its own HTTP metrics. A request
        # that already carries this key is one FastAPI treats as observed by an outer layer.
        scope.setdefault(_FASTAPI_TELEMETRY, None)
        error: BaseException | None = None
        try:
            await app(scope, receive, sender or send_wrapper)
        except BaseException as exc:
            error = exc
            raise
        finally:
            context.detach(token)
            if sender is not None:
                status = sender.status
            if error is not None and not status:
                status = 500
            if status == 101:  # every way a websocket ends comes through here, exactly once
                self._websocket_ended(
                    scope, fixed_route or self._routes.template(scope, root_path, 101), start
                )
            try:  # telemetry must never fail a request: _RECORD_REQUEST's rule, without its calls
                route = fixed_route or self._routes.template(scope, root_path, status)
                elapsed = time.perf_counter() - start
                if type(span) is ServerSpan:
                    self._record_server(span, scope, method, route, status, elapsed, error)
                else:
                    self._record(span, scope, kind, method, route, status, elapsed, error, close_code)
            except Exception as failure:  # logged once by the guard, as inside it
                _RECORD_REQUEST.failed(failure)

    def _websocket_ended(self, scope: Scope, route: str, start: float) -> None:
        self.metrics.websocket_connections.finish()
        with _RECORD_REQUEST:
            self.metrics.websocket_duration.observe(time.perf_counter() - start, {"path": route})

    def _record(
        self,
        span: trace.Span,
        scope: Scope,
        kind: str,
        method: str,
        route: str,
        status: int,
        elapsed: float,
        error: BaseException | None,
        close_code: int | None = None,
    ) -> None:
        ended = self._finish(span, scope, kind, method, route, status, error)
        request_log, observers = self._request_log, self._observers
        info: RequestInfo | None = None
        if request_log is not None or observers:
            info = RequestInfo(scope, kind, method, route, status, elapsed, error, span.get_span_context())
        if kind == "http":
            # One call into the core on the native path: span, request metrics (with the
            # exemplar's ids: the span has ended, so a trace kept for failing or being slow is
            # known here) and the OTLP request line.
            log = None
            if request_log is not None and info is not None:
                with _WRITE_LINE:  # a failing line must not cost the span and the metrics
                    log = request_log.write(info)
            # The core's span answers without making its context (nobody may have asked for it).
            trace_id, span_id = (
                span.exemplar_ids() if type(span) is CoreSpan else exemplar_ids(span.get_span_context())
            )
            self.metrics.record_request(method, route, str(status), elapsed, trace_id, span_id, ended, log)
        if error is not None or status >= 400 or close_code is not None:  # one test on a 2xx
            self._errors.count(self.metrics, kind, route, status, error, close_code)
        if info is not None:
            for observer in observers:
                observer(info)

    def _record_server(
        self,
        span: Any,
        scope: Scope,
        method: str,
        route: str,
        status: int,
        elapsed: float,
        error: BaseException | None,
    ) -> None:
        """:meth:`_record` for a server span of the core (``seam.ServerSpan``): a failure
        goes through the span's API, then one call ends it all (the span's own attributes
        read from the scope there, as :meth:`_finish` sets them)."""
        if (error is not None or status >= 500) and span.is_recording():
            self._failed(span, status, error)
        request_log = self._request_log
        log = None
        if request_log is not None:
            try:  # the line from the span's own ids: no RequestInfo nor span context
                log = request_log.write_span(scope, method, route, status, elapsed, span)
            except Exception as failure:  # _WRITE_LINE's rule (a failing line must not cost
                _WRITE_LINE.failed(failure)  # the span and the metrics), without its calls
        metrics = self.metrics
        requests, duration = metrics.http_requests, metrics.http_request_duration
        # end_request never raises: a failing part is logged once ("recording the end of a
        # request"), and the others are still done.
        if requests.family is not None and duration.family is not None and elapsed >= 0.0:
            counted, observed = span.end_request(
                scope, method, route, status, elapsed, requests.family, duration.family, log
            )
            if counted:
                requests._overflowed()  # the catalogue's own, as in record_request
            if observed:
                duration._overflowed()
        else:  # the SDK's meter provider records the metrics (see Metrics.record_request)
            span.end_request(scope, method, route, status, elapsed, None, None, log)
            trace_id, span_id = span.exemplar_ids()
            requests.add_by_key((method, route, str(status)), 1.0)
            duration.record_by_key((method, route), elapsed, trace_id, span_id)
        if error is not None or status >= 400:
            self._errors.count(metrics, "http", route, status, error, None)
        if self._observers:
            info = RequestInfo(scope, "http", method, route, status, elapsed, error, span.get_span_context())
            for observer in self._observers:
                observer(info)

    def _finish(
        self,
        span: trace.Span,
        scope: Scope,
        kind: str,
        method: str,
        route: str,
        status: int,
        error: BaseException | None,
    ) -> Ended | None:
        """Set the span's attributes and status and end it. An HTTP request's span of the
        core is left to queue (returned) with the request's metrics, in one call."""
        if not span.is_recording():
            span.end()
            return None
        server = scope.get("server")
        client = scope.get("client")
        attributes: dict[str, Any] = {
            HTTP_REQUEST_METHOD: method,
            # An absolute-form target (GET http://user:pw@host/...) loses its userinfo.
            URL_PATH: scrub_url(scope.get("path", "")),
            URL_SCHEME: scope.get("scheme", "http"),
            NETWORK_PROTOCOL_VERSION: scope.get("http_version", "1.1"),
        }
        if route != UNMATCHED:
            span.update_name(f"{method} {route}" if kind == "http" else f"WEBSOCKET {route}")
            attributes[HTTP_ROUTE] = route
        if status:
            attributes[HTTP_RESPONSE_STATUS_CODE] = status
        if server:
            attributes[SERVER_ADDRESS] = server[0]
            if server[1] is not None:
                attributes[SERVER_PORT] = server[1]
        if client:
            attributes[CLIENT_ADDRESS] = client[0]
        for key, value in scope.get("headers") or ():
            if key == b"user-agent":
                attributes[USER_AGENT_ORIGINAL] = value.decode("latin-1")
                break
        core = type(span) is CoreSpan
        if core:
            span.set_own(attributes)  # type: ignore[attr-defined]  # a CoreSpan, as tested
        else:
            span.set_attributes(attributes)
        if error is not None or status >= 500:
            self._failed(span, status, error)
        if core and kind == "http":
            return span.ending()  # type: ignore[attr-defined, no-any-return]
        span.end()
        return None

    def _failed(self, span: trace.Span, status: int, error: BaseException | None) -> None:
        """The span of a request that raised ``error`` or answered a 5xx ``status``."""
        if error is not None:
            span.record_exception(error, exception_attributes(error, self._known))
            span.set_attribute(ERROR_TYPE, type(error).__qualname__)
            span.set_status(Status(StatusCode.ERROR, scrub_text(str(error), self._known)))
        else:
            span.set_attribute(ERROR_TYPE, str(status))
            span.set_status(Status(StatusCode.ERROR))
