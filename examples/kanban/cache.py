"""Redis: the board cache and the per-user rate limit."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

BOARD_TTL = 30  # seconds; every ticket change also invalidates the board at once


def connect(url: str) -> aioredis.Redis:
    """A Redis client (connections are opened on first use)."""
    return aioredis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


async def cached_board(client: aioredis.Redis, board_id: str) -> list[dict[str, Any]] | None:
    raw = await client.get(f"kanban:board:{board_id}")
    return json.loads(raw) if raw is not None else None


async def store_board(client: aioredis.Redis, board_id: str, tickets: list[dict[str, Any]]) -> None:
    await client.set(f"kanban:board:{board_id}", json.dumps(tickets), ex=BOARD_TTL)


async def invalidate_board(client: aioredis.Redis, board_id: str) -> None:
    await client.delete(f"kanban:board:{board_id}")


@dataclass(frozen=True)
class RateLimit:
    """Outcome of one request against a fixed one-minute window."""

    allowed: bool
    remaining: int
    retry_after: int


async def hit(client: aioredis.Redis, who: str, limit: int, window: int = 60) -> RateLimit:
    """Count one request of ``who`` in the current window (INCR + EXPIRE, one round trip)."""
    now = int(time.time())
    key = f"kanban:ratelimit:{who}:{now // window}"
    async with client.pipeline(transaction=True) as pipe:
        count, _ = await pipe.incr(key).expire(key, window).execute()
    return RateLimit(count <= limit, max(limit - count, 0), window - now % window)
