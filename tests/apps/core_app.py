"""An app that uses the OpenTelemetry API inside its requests: the interop the request path
must keep on both of its implementations (tests/test_core.py)."""

from __future__ import annotations

import logging
import os

from opentelemetry import trace
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

tracer = trace.get_tracer("tests.core_app")
log = logging.getLogger("tests.core_app")


async def hello(request):
    return PlainTextResponse("hello")


async def work(request):
    import asyncpg
    import redis.asyncio as aioredis

    current = trace.get_current_span()  # the request's span
    current.set_attribute("app.board", "b-1")
    current.add_event("work started", {"app.items": 3})
    with tracer.start_as_current_span("own work") as own:
        own.set_attribute("app.step", "query")
        conn = await asyncpg.connect(os.environ["DATABASE_URL"])
        try:
            value = await conn.fetchval("SELECT $1::int + 1", 41)
        finally:
            await conn.close()
    client = aioredis.from_url(os.environ["REDIS_URL"])
    try:
        await client.set("cfk:core", value)
        cached = await client.get("cfk:core")
    finally:
        await client.aclose()
    log.warning("work done for board %s", request.path_params["board_id"], extra={"items": 3, "tags": ["a"]})
    return JSONResponse({"db": value, "redis": int(cached)})


async def boom(request):
    raise RuntimeError("boom on purpose")


async def teapot(request):
    trace.get_current_span().update_name("renamed by the app")
    return PlainTextResponse("short and stout", status_code=418)


app = Starlette(
    routes=[
        Route("/hello", hello),
        Route("/boards/{board_id}/work", work),
        Route("/boom", boom),
        Route("/teapot", teapot),
    ]
)
