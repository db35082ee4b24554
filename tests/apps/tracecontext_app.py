"""The W3C Trace Context harness's test service: ``POST /test`` with a JSON array of
``{"url": ..., "arguments": [...]}``; each element becomes an outgoing ``POST url`` with
its arguments as the body, made with httpx (instrumented by the upstream httpx
instrumentation under opentelemetry-instrument), inside the request's trace."""

from __future__ import annotations

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


async def test(request: Request) -> PlainTextResponse:
    calls = await request.json()
    async with httpx.AsyncClient(timeout=5.0) as client:
        for call in calls if isinstance(calls, list) else ():
            await client.post(call["url"], json=call["arguments"])
    return PlainTextResponse("ok")


app = Starlette(routes=[Route("/hello", hello), Route("/test", test, methods=["POST"])])
