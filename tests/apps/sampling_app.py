"""Healthy, failed and slow requests, each with a PostgreSQL query, a Redis call and a span
of the app's own: the traffic of tests/test_sampling.py."""

from __future__ import annotations

import asyncio
import os

from opentelemetry import trace
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

tracer = trace.get_tracer("tests.sampling_app")
_clients: dict[str, object] = {}


async def _work() -> None:
    import asyncpg
    import redis.asyncio as aioredis

    if "pg" not in _clients:
        _clients["pg"] = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=1, max_size=2)
        _clients["redis"] = aioredis.from_url(os.environ["REDIS_URL"])
    with tracer.start_as_current_span("own work"):
        await _clients["pg"].fetchval("SELECT 1")  # type: ignore[attr-defined]
    await _clients["redis"].get("cfk:sampling")  # type: ignore[attr-defined]


async def hello(request):
    return PlainTextResponse("hello")


async def ok(request):
    await _work()
    return PlainTextResponse("ok")


async def failed(request):
    await _work()
    return PlainTextResponse("failed", status_code=500)


async def boom(request):
    await _work()
    raise RuntimeError("boom on purpose")


async def slow(request):
    await _work()
    await asyncio.sleep(float(os.environ["CFK_TRACES_KEEP_SLOWER_THAN"]) * 1.5)
    return PlainTextResponse("slow")


app = Starlette(
    routes=[
        Route("/hello", hello),
        Route("/ok", ok),
        Route("/failed", failed),
        Route("/boom", boom),
        Route("/slow", slow),
    ]
)
