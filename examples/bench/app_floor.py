"""The floor: the same app under an empty pure-ASGI middleware.

It does only what any telemetry middleware must (time the request, read the response
status through a wrapped ``send``, set and reset a context variable), and records
nothing: what wrapping the app costs before any span, metric or log line.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from app import app as _app

Message = MutableMapping[str, Any]
_current: contextvars.ContextVar[object] = contextvars.ContextVar("current", default=None)


class EmptyMiddleware:
    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app
        self.last = (0, 0.0)

    async def __call__(
        self, scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[Message]], send: Any
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 0
        token = _current.set(scope)

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            _current.reset(token)
            self.last = (status, time.perf_counter() - start)


app = EmptyMiddleware(_app)
