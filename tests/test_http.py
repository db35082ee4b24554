"""The one response writer of our endpoints and the one timestamp format (issue 21)."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

from cfk_otel._asgi.http import JSON, respond, utc_timestamp


def _sent(**kwargs: Any) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        messages.append(message)

    asyncio.run(respond(send, 200, b'{"status":"healthy"}', **kwargs))
    return messages


def test_a_head_response_has_the_get_headers_and_no_body() -> None:
    get, head = _sent(content_type=JSON), _sent(content_type=JSON, head=True)
    assert get[0] == head[0]
    assert dict(get[0]["headers"]) == {
        b"content-type": b"application/json",
        b"content-length": b"20",
        b"cache-control": b"no-store",
    }
    assert (get[1]["body"], head[1]["body"]) == (b'{"status":"healthy"}', b"")


def test_extra_headers_follow_and_text_is_the_default() -> None:
    start = _sent(headers=[(b"allow", b"GET, HEAD")])[0]
    assert start["headers"][0] == (b"content-type", b"text/plain; charset=utf-8")
    assert start["headers"][-1] == (b"allow", b"GET, HEAD")


def test_timestamps_are_utc_with_milliseconds() -> None:
    assert utc_timestamp(0.5) == "1970-01-01T00:00:00.500Z"
    assert utc_timestamp(1767225599.999) == "2025-12-31T23:59:59.999Z"
    now = utc_timestamp(time.time())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", now)
