"""A small CF-Kanban-like service with no telemetry code at all.

Run it as a user would: ``opentelemetry-instrument uvicorn app:app --port 3000``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator

import asyncpg
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

log = logging.getLogger("kanban")


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[dict[str, object]]:
    pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=1, max_size=4)
    cache = aioredis.from_url(os.environ["REDIS_URL"])
    await pool.execute("CREATE TABLE IF NOT EXISTS demo_tickets (id serial PRIMARY KEY, title text NOT NULL)")
    yield {"pool": pool, "cache": cache}
    await cache.aclose()
    await pool.close()


async def create_ticket(request: Request) -> JSONResponse:
    body = await request.json()
    ticket_id = await request.state.pool.fetchval(
        "INSERT INTO demo_tickets (title) VALUES ($1) RETURNING id", body["title"]
    )
    await request.state.cache.delete("tickets:count")
    log.info("ticket %s created", ticket_id)
    return JSONResponse({"id": ticket_id}, status_code=201)


async def get_ticket(request: Request) -> JSONResponse:
    row = await request.state.pool.fetchrow(
        "SELECT id, title FROM demo_tickets WHERE id = $1", int(request.path_params["ticket_id"])
    )
    if row is None:
        return JSONResponse({"error": "not found"}, status_code=404)
    return JSONResponse(dict(row))


async def count_tickets(request: Request) -> JSONResponse:
    cached = await request.state.cache.get("tickets:count")
    if cached is None:
        cached = await request.state.pool.fetchval("SELECT count(*) FROM demo_tickets")
        await request.state.cache.set("tickets:count", cached, ex=5)
    return JSONResponse({"count": int(cached)})


async def fail(request: Request) -> JSONResponse:
    raise RuntimeError("this route fails on purpose")


app = Starlette(
    routes=[
        Route("/api/tickets", create_ticket, methods=["POST"]),
        Route("/api/tickets/count", count_tickets),
        Route("/api/tickets/{ticket_id:int}", get_ticket),
        Route("/api/fail", fail),
    ],
    lifespan=lifespan,
)
