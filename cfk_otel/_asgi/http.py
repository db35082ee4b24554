"""What cfk_otel's own endpoints (``/api/metrics``, the health probes) send, and the one
UTC timestamp format of log lines and health bodies."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Final

from .types import Send

TEXT: Final = b"text/plain; charset=utf-8"
JSON: Final = b"application/json"


async def respond(
    send: Send,
    status: int,
    body: bytes,
    *,
    content_type: bytes = TEXT,
    headers: Iterable[tuple[bytes, bytes]] = (),
    head: bool = False,
) -> None:
    """One complete response. Never cached (live numbers and probes); for ``head`` the
    headers are a GET's, with no body."""
    start = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        *headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": start})
    await send({"type": "http.response.body", "body": b"" if head else body})


_last_second: list[Any] = [-1, ""]  # (epoch second, its formatted prefix): one strftime per second


def utc_timestamp(created: float) -> str:
    """``created`` (epoch seconds) as ``2026-01-31T12:00:00.123Z``: UTC, milliseconds."""
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    cached_second, prefix = _last_second
    if seconds != cached_second:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _last_second[:] = [seconds, prefix]
    return f"{prefix}.{millis:03d}Z"
