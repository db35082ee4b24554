"""The benchmark app: a hello-world route and a route doing about 1 ms of real work.

No telemetry code: the scenarios differ only in how the app is launched.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

import asyncpg
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[dict[str, object]]:
    pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=4, max_size=4)
    cache = aioredis.from_url(os.environ["REDIS_URL"], max_connections=8)
    yield {"pool": pool, "cache": cache}
    await cache.aclose()
    await pool.close()


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


async def work(request: Request) -> JSONResponse:
    board = request.path_params["board_id"]
    count = await request.state.pool.fetchval(
        "SELECT count(*) FROM generate_series(1, 200) WHERE $1::int > 0", board
    )
    await request.state.cache.set(f"bench:board:{board}", count, ex=60)
    return JSONResponse({"board": board, "count": count})


app = Starlette(routes=[Route("/hello", hello), Route("/boards/{board_id:int}", work)], lifespan=lifespan)
