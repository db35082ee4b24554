"""The ASGI types and what request observers receive: imported by every module that serves
or observes requests, and importing none of them (so no module needs the middleware's)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(slots=True)  # not frozen: that would cost 2 µs per request to build
class RequestInfo:
    """What an observer learns about one finished request or websocket session (read only)."""

    scope: Scope
    kind: str  # "http" or "websocket"
    method: str
    route: str  # the route template, or "unmatched"
    status: int  # 101 for an accepted websocket, 500 for an unhandled exception
    duration: float  # seconds
    error: BaseException | None
    span_context: trace.SpanContext


RequestObserver = Callable[[RequestInfo], None]
