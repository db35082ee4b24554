"""Tickets and agents in PostgreSQL, through asyncpg."""

from __future__ import annotations

from typing import Any

import asyncpg

STATES = ("todo", "doing", "review", "done")
# The board's workflow: forward one column at a time; a review may send a ticket back.
TRANSITIONS: dict[str, frozenset[str]] = {
    "todo": frozenset({"doing"}),
    "doing": frozenset({"review"}),
    "review": frozenset({"done", "doing"}),
    "done": frozenset(),
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS kanban_tickets (
    id          bigserial PRIMARY KEY,
    board_id    text NOT NULL,
    title       text NOT NULL,
    description text NOT NULL DEFAULT '',
    assignee    text,
    state       text NOT NULL DEFAULT 'todo' CHECK (state IN ('todo', 'doing', 'review', 'done')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS kanban_tickets_board ON kanban_tickets (board_id, id);
CREATE TABLE IF NOT EXISTS kanban_agents (
    id          bigserial PRIMARY KEY,
    type        text NOT NULL,
    ticket_id   bigint REFERENCES kanban_tickets (id) ON DELETE SET NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
"""
# Two workers starting together would race on CREATE ... IF NOT EXISTS (a unique
# violation in pg_type); a transaction-scoped advisory lock serialises them.
_SCHEMA_LOCK = 0x6B616E62616E


async def connect(dsn: str) -> asyncpg.Pool:
    """A connection pool, with the schema created if it is not there yet (idempotent)."""
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=10)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
        await conn.execute(SCHEMA)
    return pool


def ticket_json(row: asyncpg.Record) -> dict[str, Any]:
    """A ticket row as the API returns it."""
    return {
        "id": row["id"],
        "boardId": row["board_id"],
        "title": row["title"],
        "description": row["description"],
        "assignee": row["assignee"],
        "state": row["state"],
        "createdAt": row["created_at"].isoformat(),
        "updatedAt": row["updated_at"].isoformat(),
    }


async def create_ticket(
    pool: asyncpg.Pool, board_id: str, title: str, description: str, assignee: str | None
) -> dict[str, Any]:
    row = await pool.fetchrow(
        "INSERT INTO kanban_tickets (board_id, title, description, assignee) "
        "VALUES ($1, $2, $3, $4) RETURNING *",
        board_id,
        title,
        description,
        assignee,
    )
    return ticket_json(row)


async def get_ticket(pool: asyncpg.Pool, ticket_id: int) -> dict[str, Any] | None:
    row = await pool.fetchrow("SELECT * FROM kanban_tickets WHERE id = $1", ticket_id)
    return ticket_json(row) if row else None


async def update_ticket(pool: asyncpg.Pool, ticket_id: int, changes: dict[str, Any]) -> dict[str, Any] | None:
    """Apply ``changes`` (title, description, assignee); None when there is no such ticket.

    A key left out keeps its value; ``assignee: None`` unassigns.
    """
    row = await pool.fetchrow(
        "UPDATE kanban_tickets SET title = coalesce($2, title), description = coalesce($3, description),"
        " assignee = CASE WHEN $5 THEN $4 ELSE assignee END, updated_at = now()"
        " WHERE id = $1 RETURNING *",
        ticket_id,
        changes.get("title"),
        changes.get("description"),
        changes.get("assignee"),
        "assignee" in changes,
    )
    return ticket_json(row) if row else None


async def delete_ticket(pool: asyncpg.Pool, ticket_id: int) -> str | None:
    """Delete a ticket; returns its board, or None when there was no such ticket."""
    return await pool.fetchval("DELETE FROM kanban_tickets WHERE id = $1 RETURNING board_id", ticket_id)


async def move_ticket(
    pool: asyncpg.Pool, ticket_id: int, from_state: str, to_state: str
) -> dict[str, Any] | None:
    """Compare-and-set the state: None when the ticket is no longer in ``from_state``."""
    row = await pool.fetchrow(
        "UPDATE kanban_tickets SET state = $3, updated_at = now() WHERE id = $1 AND state = $2 RETURNING *",
        ticket_id,
        from_state,
        to_state,
    )
    return ticket_json(row) if row else None


async def board_tickets(pool: asyncpg.Pool, board_id: str) -> list[dict[str, Any]]:
    rows = await pool.fetch("SELECT * FROM kanban_tickets WHERE board_id = $1 ORDER BY id", board_id)
    return [ticket_json(row) for row in rows]


def agent_json(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": row["id"],
        "type": row["type"],
        "ticketId": row["ticket_id"],
        "startedAt": row["started_at"].isoformat(),
        "finishedAt": row["finished_at"].isoformat() if row["finished_at"] else None,
    }


async def start_agent(pool: asyncpg.Pool, agent_type: str, ticket_id: int | None) -> dict[str, Any]:
    row = await pool.fetchrow(
        "INSERT INTO kanban_agents (type, ticket_id) VALUES ($1, $2) RETURNING *", agent_type, ticket_id
    )
    return agent_json(row)


async def finish_agent(pool: asyncpg.Pool, agent_id: int) -> dict[str, Any] | None:
    """Mark an active agent finished; None when it is unknown or already finished."""
    row = await pool.fetchrow(
        "UPDATE kanban_agents SET finished_at = now() WHERE id = $1 AND finished_at IS NULL RETURNING *",
        agent_id,
    )
    return agent_json(row) if row else None


async def agent_exists(pool: asyncpg.Pool, agent_id: int) -> bool:
    return bool(await pool.fetchval("SELECT EXISTS (SELECT 1 FROM kanban_agents WHERE id = $1)", agent_id))


async def active_agents(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    rows = await pool.fetch("SELECT * FROM kanban_agents WHERE finished_at IS NULL ORDER BY id")
    return [agent_json(row) for row in rows]
