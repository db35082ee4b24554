"""What the in-process harnesses share: a request's scope and its cost in thread CPU."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def http_scope(path: str) -> dict[str, Any]:
    """A GET of ``path`` as uvicorn would hand it to the app (wrk's headers)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"wrk"), (b"accept", b"*/*")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def per_request(
    target: Any, scope: dict[str, Any], n: int, clock: Callable[[], float] = time.thread_time
) -> float:
    """Thread CPU per request (µs) of ``n`` requests of ``scope`` through ``target`` (with
    ``clock=time.process_time``: the whole process's, the core's threads included)."""

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        return None

    start = clock()
    for _ in range(n):
        await target(dict(scope), receive, send)
    return (clock() - start) / n * 1e6
