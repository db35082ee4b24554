"""The example app's behaviour, through its HTTP and websocket API, on real PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import pytest
from websockets.sync.client import connect

from cfk_otel.testing import OtlpReceiver
from tests.conftest import Services, free_port, launch
from tests.examples.conftest import RATE_LIMIT, Kanban, kanban_command, kanban_env

pytestmark = pytest.mark.timeout(120)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def new_ticket(kanban: Kanban, board: str, title: str = "Write tests") -> dict[str, object]:
    status, _, ticket = kanban.call("POST", "/api/tickets", {"boardId": board, "title": title})
    assert status == 201, ticket
    return ticket  # type: ignore[no-any-return]


def move(kanban: Kanban, ticket_id: object, to: str) -> tuple[int, object]:
    status, _, body = kanban.call("POST", f"/api/tickets/{ticket_id}/transitions", {"to": to})
    return status, body


def test_ticket_crud_and_board_cache(kanban: Kanban) -> None:
    board = unique("crud")
    ticket = new_ticket(kanban, board, "Login page")
    assert ticket["state"] == "todo"
    assert ticket["boardId"] == board

    status, _, got = kanban.call("GET", f"/api/tickets/{ticket['id']}")
    assert (status, got) == (200, ticket)

    _, head, first = kanban.call("GET", f"/api/boards/{board}")
    _, head2, second = kanban.call("GET", f"/api/boards/{board}")
    assert (head["x-cache"], head2["x-cache"]) == ("miss", "hit")
    assert first == second
    assert [t["id"] for t in first["columns"]["todo"]] == [ticket["id"]]

    status, _, patched = kanban.call("PATCH", f"/api/tickets/{ticket['id']}", {"assignee": "bob"})
    assert status == 200
    assert (patched["assignee"], patched["title"]) == ("bob", "Login page")
    _, head, board_json = kanban.call("GET", f"/api/boards/{board}")
    assert head["x-cache"] == "miss"  # a change drops the cached board
    assert board_json["columns"]["todo"][0]["assignee"] == "bob"

    assert kanban.call("DELETE", f"/api/tickets/{ticket['id']}")[0] == 204
    assert kanban.call("GET", f"/api/tickets/{ticket['id']}")[0] == 404
    assert kanban.call("DELETE", f"/api/tickets/{ticket['id']}")[0] == 404
    assert kanban.call("POST", "/api/tickets", {"boardId": board, "title": ""})[0] == 422


def test_transitions_follow_the_workflow_and_are_counted(kanban: Kanban) -> None:
    ticket = new_ticket(kanban, unique("flow"))
    todo_doing = kanban.metric("ticket_transitions_total", **{"from": "todo", "to": "doing"})
    review_doing = kanban.metric("ticket_transitions_total", **{"from": "review", "to": "doing"})

    status, body = move(kanban, ticket["id"], "done")
    assert status == 409
    assert body["detail"]["allowed"] == ["doing"]  # type: ignore[index]
    for state in ("doing", "review", "doing", "review", "done"):  # one review sends it back
        status, body = move(kanban, ticket["id"], state)
        assert status == 200, body
        assert body["state"] == state  # type: ignore[index]
    assert move(kanban, ticket["id"], "todo")[0] == 409  # done is done
    assert move(kanban, ticket["id"], "archived")[0] == 422
    assert move(kanban, 999_999_999, "doing")[0] == 404

    labels = {"from": "todo", "to": "doing"}
    assert kanban.metric("ticket_transitions_total", **labels) == todo_doing + 1
    assert kanban.metric("ticket_transitions_total", **{"from": "review", "to": "doing"}) == review_doing + 1


def test_agents_drive_the_active_agents_gauge(kanban: Kanban) -> None:
    kind = f"t{uuid.uuid4().hex[:8]}"
    ticket = new_ticket(kanban, unique("agents"))
    started = [
        kanban.call("POST", "/api/agents", {"type": kind, "ticketId": ticket["id"]})[2] for _ in range(2)
    ]
    assert kanban.metric("active_agents_count", type=kind) == 2
    assert {a["id"] for a in kanban.call("GET", "/api/agents")[2]} >= {a["id"] for a in started}

    assert kanban.call("POST", f"/api/agents/{started[0]['id']}/finish")[0] == 200
    assert kanban.metric("active_agents_count", type=kind) == 1
    assert kanban.call("POST", f"/api/agents/{started[0]['id']}/finish")[0] == 409
    assert kanban.call("POST", "/api/agents/999999999/finish")[0] == 404
    assert kanban.call("POST", "/api/agents", {"type": kind, "ticketId": 999_999_999})[0] == 404
    assert kanban.call("POST", "/api/agents", {"type": "Not A Label!"})[0] == 422
    assert kanban.metric("active_agents_count", type=kind) == 1


def test_websocket_clients_get_their_board_updates(kanban: Kanban) -> None:
    board, other = unique("live"), unique("other")
    ws_url = kanban.url.replace("http://", "ws://") + f"/ws/boards/{board}"
    with connect(ws_url, additional_headers={"X-User-Id": "viewer"}) as ws:
        deadline = time.monotonic() + 10
        while kanban.call("GET", f"/api/boards/{board}")[2]["watchers"] < 1:
            assert time.monotonic() < deadline, "the websocket never joined its board"
            time.sleep(0.05)
        assert kanban.metric("websocket_connections_active") >= 1

        new_ticket(kanban, other)  # another board: not sent here
        ticket = new_ticket(kanban, board, "Live update")
        assert move(kanban, ticket["id"], "doing")[0] == 200

        created = json.loads(ws.recv(timeout=5))
        moved = json.loads(ws.recv(timeout=5))
    assert (created["event"], created["boardId"], created["ticket"]["id"]) == (
        "ticket.created",
        board,
        ticket["id"],
    )
    assert (moved["event"], moved["ticket"]["state"]) == ("ticket.moved", "doing")


def test_the_failing_route_is_a_500_counted_and_logged(kanban: Kanban) -> None:
    before = kanban.metric("errors_total", type="RuntimeError", severity="error")
    status, _, _ = kanban.call("GET", "/api/debug/fail")
    assert status == 500
    assert kanban.metric("errors_total", type="RuntimeError", severity="error") == before + 1
    lines = [json.loads(line) for line in kanban.app.output().splitlines() if line.startswith("{")]
    assert any(
        line.get("error", {}).get("message") == "this route fails on purpose" and line["level"] == "error"
        for line in lines
    )


def test_rate_limit_answers_429_per_user(kanban: Kanban) -> None:
    greedy, polite = unique("greedy"), unique("polite")
    statuses = [kanban.call("GET", "/api/agents", user=greedy)[0] for _ in range(RATE_LIMIT)]
    assert statuses == [200] * RATE_LIMIT
    status, head, body = kanban.call("GET", "/api/agents", user=greedy)
    assert status == 429, body
    assert 1 <= int(head["retry-after"]) <= 60
    assert kanban.call("GET", "/api/agents", user=polite)[0] == 200  # one bucket per user


def test_telemetry_arrives_over_otlp_with_no_code_in_the_app(kanban: Kanban) -> None:
    ticket = new_ticket(kanban, unique("otlp"))
    assert move(kanban, ticket["id"], "doing")[0] == 200
    receiver = kanban.receiver
    span = receiver.wait_for_span(lambda s: s.name == "POST /api/tickets/{ticket_id}/transitions")
    assert span.resource["service.name"] == "cf-kanban"
    assert receiver.wait_for(
        lambda: any(
            r.body == "Ticket moved" and r.attributes.get("ticketId") == ticket["id"] for r in receiver.logs
        )
    )
    # asyncpg and Redis calls are children of the request's spans.
    assert receiver.wait_for(
        lambda: any(s.span.trace_id == span.span.trace_id and s is not span for s in receiver.spans)
    )
    # One server span per request: FastAPI's own telemetry does not start a second trace.
    server_scopes = {s.scope for s in receiver.spans if s.span.kind == s.span.SPAN_KIND_SERVER}
    assert server_scopes == {"cfk_otel"}, server_scopes


async def _sql(dsn: str, *statements: str) -> list[object]:
    conn = await asyncpg.connect(dsn)
    try:
        return [await conn.fetchval(statement) for statement in statements]
    finally:
        await conn.close()


def test_two_instances_create_a_fresh_schema_at_once(services: Services, tmp_path: Path) -> None:
    """A fresh schema is created at start-up, by two instances starting at once.

    (The race the advisory lock closes is too narrow to hit reliably here.)
    """
    schema = f"kanban_{uuid.uuid4().hex[:8]}"
    asyncio.run(_sql(services.database_url, f"CREATE SCHEMA {schema}"))
    # asyncpg passes unknown URL parameters on as server settings: an empty schema of our own.
    env_db = f"{services.database_url}?search_path={schema}"
    try:
        with OtlpReceiver() as receiver, ThreadPoolExecutor(2) as pool:
            env = {**kanban_env(services, receiver), "DATABASE_URL": env_db}
            ports = [free_port(), free_port()]
            futures = [
                pool.submit(launch, tmp_path, kanban_command(p), env, p, "/api/health/live") for p in ports
            ]
            apps = [f.result() for f in futures]
            try:
                for app in apps:
                    status, _, body = app.get("/api/health/ready")
                    assert status == 200, body
                    assert "Traceback" not in app.output()
            finally:
                for app in apps:
                    app.terminate()
        [tables] = asyncio.run(
            _sql(
                services.database_url,
                f"SELECT count(*) FROM information_schema.tables WHERE table_schema = '{schema}'",
            )
        )
        assert tables == 2
    finally:
        asyncio.run(_sql(services.database_url, f"DROP SCHEMA {schema} CASCADE"))
