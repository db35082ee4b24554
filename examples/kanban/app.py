"""The CF-Kanban HTTP and websocket API (FastAPI).

``DATABASE_URL`` and ``REDIS_URL`` come from the environment; ``KANBAN_RATE_LIMIT`` is
the number of API requests a user (or, without ``X-User-Id``, a client address) may make
per minute (default 120). The port is uvicorn's: ``--port 3000``.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import asyncpg
import redis.asyncio as aioredis
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Request, Response, WebSocket
from pydantic import BaseModel, Field
from starlette.websockets import WebSocketDisconnect

import cfk_otel

from . import cache, db
from .ws import BoardHub

log = cfk_otel.logger.create_child_logger(component="tickets-api")
agents_log = cfk_otel.logger.create_child_logger(component="agents")

BoardId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
State = Literal["todo", "doing", "review", "done"]
CACHE_TAGS = {"component": "board-cache"}


@dataclass(frozen=True)
class Kanban:
    """What the handlers share: the pool, the Redis client, the websocket hub."""

    pool: asyncpg.Pool
    redis: aioredis.Redis
    hub: BoardHub
    rate_limit: int


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Kanban]]:
    pool = await db.connect(os.environ["DATABASE_URL"])
    redis = cache.connect(os.environ["REDIS_URL"])
    # The gauge lives in this process; agents still running from before a restart count too.
    for agent_type, count in Counter(a["type"] for a in await db.active_agents(pool)).items():
        cfk_otel.set_active_agents(agent_type, count)
    kanban = Kanban(pool, redis, BoardHub(), int(os.environ.get("KANBAN_RATE_LIMIT", "120")))
    log.info("CF-Kanban started", rateLimit=kanban.rate_limit)
    try:
        yield {"kanban": kanban}
    finally:
        await redis.aclose()
        await pool.close()


# --- dependencies ---------------------------------------------------------------------


async def get_kanban(request: Request) -> Kanban:
    return request.state.kanban  # type: ignore[no-any-return]


async def current_user(x_user_id: Annotated[str | None, Header(max_length=64)] = None) -> str | None:
    """The caller named by ``X-User-Id``, attached to this request's error reports."""
    if x_user_id:
        cfk_otel.set_user({"id": x_user_id})
    return x_user_id


async def rate_limit(
    request: Request,
    response: Response,
    user: Annotated[str | None, Depends(current_user)],
    kanban: Annotated[Kanban, Depends(get_kanban)],
) -> None:
    """429 beyond ``KANBAN_RATE_LIMIT`` requests a minute; Redis trouble lets requests through."""
    bucket = f"user:{user}" if user else f"ip:{request.client.host if request.client else 'unknown'}"
    try:
        outcome = await cache.hit(kanban.redis, bucket, kanban.rate_limit)
    except Exception as exc:  # fail open: an outage of the limiter must not take the API down
        cfk_otel.capture_error(exc, level="warn", tags={"component": "rate-limit"})
        return
    response.headers["X-RateLimit-Remaining"] = str(outcome.remaining)
    if not outcome.allowed:
        log.warn("Rate limit exceeded", userId=user, bucket=bucket, limit=kanban.rate_limit)
        raise HTTPException(429, "rate limit exceeded", headers={"Retry-After": str(outcome.retry_after)})
    if outcome.remaining <= 5:
        log.warn("Rate limit approaching", userId=user, remaining=outcome.remaining)


async def request_log(user: Annotated[str | None, Depends(current_user)]) -> cfk_otel.Logger:
    """A logger whose lines carry this request's id and user.

    Dependencies are async so that FastAPI does not send them to its thread pool.
    """
    return log.create_child_logger(requestId=str(uuid.uuid4()), userId=user)


KanbanDep = Annotated[Kanban, Depends(get_kanban)]
LogDep = Annotated[cfk_otel.Logger, Depends(request_log)]


# --- bodies -----------------------------------------------------------------------------


class NewTicket(BaseModel):
    board_id: BoardId = Field(alias="boardId")
    title: str = Field(min_length=1, max_length=200)
    description: str = Field(default="", max_length=10_000)
    assignee: str | None = Field(default=None, max_length=64)


class TicketChanges(BaseModel):
    title: str | None = Field(default=None, min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=10_000)
    assignee: str | None = Field(default=None, max_length=64)


class Transition(BaseModel):
    to: State


class NewAgent(BaseModel):
    # The type becomes a metric label, so it is kept short and simple.
    type: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")
    ticket_id: int | None = Field(default=None, alias="ticketId")


# --- tickets and boards -------------------------------------------------------------------

api = APIRouter(prefix="/api", dependencies=[Depends(rate_limit)])


async def board_changed(kanban: Kanban, board_id: str, event: str, ticket: dict[str, Any]) -> None:
    """Drop the cached board and tell its websocket clients."""
    try:
        await cache.invalidate_board(kanban.redis, board_id)
    except Exception as exc:  # the TTL bounds how stale the board can get
        cfk_otel.capture_error(exc, level="warn", tags=CACHE_TAGS, extra={"boardId": board_id})
    await kanban.hub.publish(board_id, event, ticket)


async def ticket_or_404(kanban: Kanban, ticket_id: int) -> dict[str, Any]:
    ticket = await db.get_ticket(kanban.pool, ticket_id)
    if ticket is None:
        raise HTTPException(404, f"ticket {ticket_id} not found")
    return ticket


@api.post("/tickets", status_code=201)
async def create_ticket(body: NewTicket, kanban: KanbanDep, rlog: LogDep) -> dict[str, Any]:
    ticket = await db.create_ticket(kanban.pool, body.board_id, body.title, body.description, body.assignee)
    rlog.info("User created ticket", ticketId=ticket["id"], boardId=body.board_id)
    await board_changed(kanban, body.board_id, "ticket.created", ticket)
    return ticket


@api.get("/tickets/{ticket_id}")
async def get_ticket(ticket_id: int, kanban: KanbanDep) -> dict[str, Any]:
    return await ticket_or_404(kanban, ticket_id)


@api.patch("/tickets/{ticket_id}")
async def update_ticket(
    ticket_id: int, body: TicketChanges, kanban: KanbanDep, rlog: LogDep
) -> dict[str, Any]:
    ticket = await db.update_ticket(kanban.pool, ticket_id, body.model_dump(exclude_unset=True))
    if ticket is None:
        raise HTTPException(404, f"ticket {ticket_id} not found")
    rlog.info("User updated ticket", ticketId=ticket_id, fields=sorted(body.model_fields_set))
    await board_changed(kanban, ticket["boardId"], "ticket.updated", ticket)
    return ticket


@api.delete("/tickets/{ticket_id}", status_code=204)
async def delete_ticket(ticket_id: int, kanban: KanbanDep, rlog: LogDep) -> None:
    board_id = await db.delete_ticket(kanban.pool, ticket_id)
    if board_id is None:
        raise HTTPException(404, f"ticket {ticket_id} not found")
    rlog.info("User deleted ticket", ticketId=ticket_id, boardId=board_id)
    await board_changed(kanban, board_id, "ticket.deleted", {"id": ticket_id})


@api.post("/tickets/{ticket_id}/transitions")
async def move_ticket(ticket_id: int, body: Transition, kanban: KanbanDep, rlog: LogDep) -> dict[str, Any]:
    """Move a ticket along todo → doing → review → done (review may go back to doing)."""
    ticket = await ticket_or_404(kanban, ticket_id)
    current = ticket["state"]
    if body.to not in db.TRANSITIONS[current]:
        rlog.warn("Invalid ticket transition", ticketId=ticket_id, **{"from": current, "to": body.to})
        raise HTTPException(
            409,
            {
                "error": f"a ticket in {current} cannot move to {body.to}",
                "allowed": sorted(db.TRANSITIONS[current]),
            },
        )
    moved = await db.move_ticket(kanban.pool, ticket_id, current, body.to)
    if moved is None:  # someone else moved it between our read and our write
        raise HTTPException(409, {"error": "the ticket changed meanwhile; reload it"})
    cfk_otel.record_ticket_transition(current, body.to)
    rlog.info("Ticket moved", ticketId=ticket_id, **{"from": current, "to": body.to})
    await board_changed(kanban, moved["boardId"], "ticket.moved", moved)
    return moved


@api.get("/boards/{board_id}")
async def get_board(board_id: BoardId, response: Response, kanban: KanbanDep) -> dict[str, Any]:
    """The board's tickets by column, from the Redis cache when it has them."""
    tickets = None
    try:
        tickets = await cache.cached_board(kanban.redis, board_id)
    except Exception as exc:  # serve from PostgreSQL; the cache is an optimisation
        cfk_otel.capture_error(exc, level="warn", tags=CACHE_TAGS, extra={"boardId": board_id})
    response.headers["X-Cache"] = "hit" if tickets is not None else "miss"
    if tickets is None:
        tickets = await db.board_tickets(kanban.pool, board_id)
        with contextlib.suppress(Exception):  # a failed refill is not worth a second report
            await cache.store_board(kanban.redis, board_id, tickets)
    columns: dict[str, list[dict[str, Any]]] = {state: [] for state in db.STATES}
    for ticket in tickets:
        columns[ticket["state"]].append(ticket)
    return {"boardId": board_id, "columns": columns, "watchers": kanban.hub.watching(board_id)}


# --- AI agents ------------------------------------------------------------------------------


@api.post("/agents", status_code=201)
async def start_agent(body: NewAgent, kanban: KanbanDep) -> dict[str, Any]:
    try:
        agent = await db.start_agent(kanban.pool, body.type, body.ticket_id)
    except asyncpg.ForeignKeyViolationError:
        raise HTTPException(404, f"ticket {body.ticket_id} not found") from None
    cfk_otel.agent_started(body.type)
    agents_log.info("Agent started", agentId=agent["id"], type=body.type, ticketId=body.ticket_id)
    return agent


@api.post("/agents/{agent_id}/finish")
async def finish_agent(agent_id: int, kanban: KanbanDep) -> dict[str, Any]:
    agent = await db.finish_agent(kanban.pool, agent_id)
    if agent is None:
        if await db.agent_exists(kanban.pool, agent_id):
            raise HTTPException(409, f"agent {agent_id} has already finished")
        raise HTTPException(404, f"agent {agent_id} not found")
    cfk_otel.agent_finished(agent["type"])
    agents_log.info("Agent finished", agentId=agent_id, type=agent["type"])
    return agent


@api.get("/agents")
async def list_agents(kanban: KanbanDep) -> list[dict[str, Any]]:
    """The agents still running."""
    return await db.active_agents(kanban.pool)


@api.get("/debug/fail")
async def fail() -> None:
    """Fails on purpose: an unhandled error, a 500, errors_total and (with Sentry) an event."""
    raise RuntimeError("this route fails on purpose")


# --- the app -----------------------------------------------------------------------------

app = FastAPI(title="CF-Kanban", lifespan=lifespan)
app.include_router(api)


@app.websocket("/ws/boards/{board_id}")
async def board_updates(websocket: WebSocket, board_id: str) -> None:
    """Pushes ``{"event", "boardId", "ticket"}`` for every change of the board."""
    kanban: Kanban = websocket.state.kanban
    await current_user(websocket.headers.get("x-user-id"))
    await websocket.accept()
    kanban.hub.join(board_id, websocket)
    try:
        while True:  # clients only listen; this waits for their close
            await websocket.receive_text()
    except WebSocketDisconnect:
        pass
    finally:
        kanban.hub.leave(board_id, websocket)
