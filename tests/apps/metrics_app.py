"""An app that uses only the document's calls: domain metric helpers and a custom metric."""

from __future__ import annotations

import asyncio
import os

import asyncpg
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

import cfk_otel

feature_usage = cfk_otel.register_counter("my_feature_usage", "Feature usage count", ["feature"])
export_seconds = cfk_otel.register_histogram(
    "export_seconds", "Export time", ["format"], buckets=[0.01, 0.1, 1]
)


async def ticket(request: Request) -> JSONResponse:
    return JSONResponse({"id": request.path_params["ticket_id"]})


async def card(request: Request) -> JSONResponse:
    return JSONResponse({"card": request.path_params["card_id"]})


async def move(request: Request) -> JSONResponse:
    cfk_otel.record_ticket_transition(request.query_params["from"], request.query_params["to"])
    return JSONResponse({"moved": True})


async def agents(request: Request) -> JSONResponse:
    kind = request.path_params["kind"]
    if request.method == "POST":
        cfk_otel.agent_started(kind)
    else:
        cfk_otel.agent_finished(kind)
    return JSONResponse({"ok": True})


async def feature(request: Request) -> PlainTextResponse:
    feature_usage.inc({"feature": request.path_params["name"]})
    with export_seconds.start_timer({"format": "csv"}):
        await asyncio.sleep(0.02)
    return PlainTextResponse("ok")


async def fail(request: Request) -> PlainTextResponse:
    raise KeyError("on purpose")


async def unavailable(request: Request) -> PlainTextResponse:
    return PlainTextResponse("down", status_code=503)


async def db(request: Request) -> JSONResponse:
    conn = await asyncpg.connect(os.environ["DATABASE_URL"])
    try:
        await conn.execute("CREATE TEMP TABLE t (v int)")
        await conn.execute("INSERT INTO t VALUES (1), (2)")
        total = await conn.fetchval("SELECT sum(v) FROM t")
        await conn.fetch("UPDATE t SET v = v + 1 RETURNING v")
    finally:
        await conn.close()
    client = aioredis.from_url(os.environ["REDIS_URL"])
    try:
        await client.set("cfk:metrics", total)
        await client.get("cfk:metrics")
        await client.get("cfk:metrics")
        await client.delete("cfk:metrics")
    finally:
        await client.aclose()
    return JSONResponse({"total": total})


async def slow(request: Request) -> JSONResponse:
    conn = await asyncpg.connect(os.environ["DATABASE_URL"])
    try:
        await conn.fetchval("SELECT pg_sleep($1::float)", 0.3)
    finally:
        await conn.close()
    return JSONResponse({"slow": True})


_pool: list[asyncpg.Pool] = []


async def pooled(request: Request) -> JSONResponse:
    # A long-lived pool, as real apps keep one: database_pool_connections reports it.
    if not _pool:
        _pool.append(await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=2, max_size=5))
    async with _pool[0].acquire() as conn:
        value = await conn.fetchval("SELECT 1")
    return JSONResponse({"value": value, "size": _pool[0].get_size()})


async def me(request: Request) -> JSONResponse:
    user_id = request.headers.get("x-user-id", "anonymous")
    cfk_otel.set_user({"id": user_id})
    return JSONResponse({"user": user_id})


async def board(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            text = await websocket.receive_text()
            if text == "raise":
                raise RuntimeError("websocket handler failed")
            await websocket.send_text(text)
    except WebSocketDisconnect:
        pass


app = Starlette(
    routes=[
        Route("/api/tickets/{ticket_id}", ticket),
        Route("/api/tickets/{ticket_id}/move", move, methods=["POST"]),
        Route("/api/agents/{kind}", agents, methods=["POST", "DELETE"]),
        Route("/api/features/{name}", feature),
        Route("/api/fail", fail),
        Route("/api/unavailable", unavailable),
        Route("/api/db", db),
        Route("/api/slow", slow),
        Route("/api/pool", pooled),
        Route("/api/me", me),
        WebSocketRoute("/ws/board", board),
        Mount("/api/v1", routes=[Route("/cards/{card_id}", card)]),
    ]
)
