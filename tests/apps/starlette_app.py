"""A Starlette app with no telemetry code, used by the subprocess tests."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.websockets import WebSocket

log = logging.getLogger("tests.app")


async def hello(request):
    return PlainTextResponse("hello", headers={"x-app": "starlette"})


async def ticket(request):
    log.info("ticket %s requested", request.path_params["ticket_id"])
    return JSONResponse({"id": request.path_params["ticket_id"], "pid": os.getpid()})


async def warn(request):
    warnings.warn("deprecated call", DeprecationWarning, stacklevel=1)
    log.debug("debug detail")
    return PlainTextResponse("warned")


async def boom(request):
    raise RuntimeError("boom on purpose")


async def db(request):
    import asyncpg
    import redis.asyncio as aioredis

    conn = await asyncpg.connect(os.environ["DATABASE_URL"])
    try:
        value = await conn.fetchval("SELECT $1::int + 1", 41)
    finally:
        await conn.close()
    client = aioredis.from_url(os.environ["REDIS_URL"])
    try:
        await client.set("cfk:test", value)
        cached = await client.get("cfk:test")
    finally:
        await client.aclose()
    return JSONResponse({"db": value, "redis": int(cached)})


async def echo(websocket: WebSocket):
    await websocket.accept()
    text = await websocket.receive_text()
    await websocket.send_text(text.upper())
    await websocket.close()


async def created(request):
    body = await request.body()
    return PlainTextResponse(body[::-1], status_code=201, headers={"x-len": str(len(body))})


async def card(request):
    return JSONResponse(dict(request.path_params))


@contextlib.asynccontextmanager
async def lifespan(app):
    print("lifespan: startup", flush=True)
    yield {"started": "yes"}
    print("lifespan: shutdown", flush=True)


async def state(request):
    return JSONResponse({"started": request.state.started})


routes = [
    Route("/hello", hello),
    Route("/api/tickets/{ticket_id}", ticket),
    Route("/boom", boom),
    Route("/warn", warn),
    Route("/db", db),
    Route("/state", state),
    Route("/created", created, methods=["POST"]),
    WebSocketRoute("/ws/echo", echo),
    Mount("/api/v1", routes=[Route("/boards/{board_id}/cards/{card_id}", card)]),
    Mount("/orgs/{org}", routes=[Route("/cards/{card_id}", card)]),
]


app = Starlette(routes=routes, lifespan=lifespan)
