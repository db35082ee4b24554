"""A Starlette app that fails in every way the document's Sentry section lists."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import sys
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

import cfk_otel

log = logging.getLogger("tests.sentry_app")
_background: set[asyncio.Task[None]] = set()


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


async def boom(request: Request) -> PlainTextResponse:
    password = "hunter2-local"  # a local variable Sentry would show next to the stack frame
    dsn = os.environ.get("SENTRY_DSN", "")
    raise RuntimeError(f"boom {request.path_params['ticket_id']} ({len(password) + len(dsn)})")


async def unavailable(request: Request) -> PlainTextResponse:
    return PlainTextResponse("down", status_code=503)


async def status(request: Request) -> PlainTextResponse:
    return PlainTextResponse("status", status_code=request.path_params["code"])


async def capture(request: Request) -> JSONResponse:
    try:
        raise KeyError("ticket-7")
    except KeyError as exc:
        event_id = cfk_otel.capture_error(
            exc,
            level=request.query_params.get("level", "error"),
            tags={"component": "tickets-api"},
            extra={
                "ticketId": 7,
                "headers": {
                    "Authorization": "Bearer sk-live-abcdef",
                    "Cookie": "sid=s3cr3t",
                    "Accept": "*/*",
                },
                "nested": {"db": {"password": "p4ss", "user": "app"}},
                # Deeper than Sentry keeps as a structure: it sends the repr, scrubbed too.
                "deep": {
                    "a": {"b": {"c": {"d": {"e": {"password": "p4ss", "apiKey": "k3y", "note": "ok"}}}}}
                },
                "connection": "postgresql://app:db-pass@db:5432/cfk",
                "sentry": os.environ.get("SENTRY_DSN", ""),
            },
        )
    return JSONResponse({"event_id": event_id})


async def message(request: Request) -> JSONResponse:
    event_id = cfk_otel.capture_message(
        "User completed onboarding", "info", {"userId": "user-123"}, duration=45000, token="t0k3n"
    )
    return JSONResponse({"event_id": event_id})


async def user(request: Request) -> PlainTextResponse:
    n = request.path_params["n"]
    cfk_otel.set_user({"id": str(n), "email": f"user{n}@example.com"})
    await asyncio.sleep(random.uniform(0, 0.05))  # interleave the concurrent requests
    if request.query_params.get("raise"):
        raise ValueError(f"user {n} failed")
    cfk_otel.capture_error(ValueError(f"user {n}"), tags={"n": str(n)})
    return PlainTextResponse(f"user {n}")


async def log_then_raise(request: Request) -> PlainTextResponse:
    try:
        raise ConnectionError("upstream reset")
    except ConnectionError:
        log.exception("upstream failed")  # an error log line with the exception...
        raise  # ...and then the same exception, unhandled: still one event


async def background(request: Request) -> PlainTextResponse:
    cfk_otel.set_user({"id": "background-owner"})

    async def fail() -> None:
        await asyncio.sleep(0.05)
        raise LookupError("background job failed")

    task = asyncio.get_running_loop().create_task(fail(), name="nightly-export")
    _background.add(task)
    task.add_done_callback(_background.discard)  # the documented pattern: nobody awaits it
    return PlainTextResponse("started")


async def slow_query(request: Request) -> JSONResponse:
    import asyncpg

    conn = await asyncpg.connect(os.environ["DATABASE_URL"])
    try:
        value = await conn.fetchval("SELECT $2::text FROM pg_sleep($1::float)", 0.3, "param-s3cr3t")
    finally:
        await conn.close()
    return JSONResponse({"ok": value == "param-s3cr3t"})


async def marker(request: Request) -> PlainTextResponse:
    cfk_otel.capture_message(f"marker {request.query_params['id']}")
    return PlainTextResponse("marked")


async def sentry_loaded(request: Request) -> JSONResponse:
    event_id = cfk_otel.capture_error(ValueError("counted only"))
    return JSONResponse({"loaded": "sentry_sdk" in sys.modules, "event_id": event_id})


async def board(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            text = await websocket.receive_text()
            if text == "raise":
                raise RuntimeError("websocket handler failed")
            if text == "close1011":
                await websocket.close(code=1011, reason="backend gone")
                return
            if text == "bye":
                await websocket.close(code=1000)
                return
            await websocket.send_text(text)
    except WebSocketDisconnect:
        pass


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    if os.environ.get("FAIL_STARTUP"):
        raise RuntimeError("startup failed: database unreachable")
    yield


app = Starlette(
    lifespan=lifespan,
    routes=[
        Route("/hello", hello),
        Route("/api/tickets/{ticket_id}/boom", boom),
        Route("/unavailable", unavailable),
        Route("/status/{code:int}", status),
        Route("/capture", capture),
        Route("/message", message),
        Route("/users/{n:int}", user),
        Route("/log-then-raise", log_then_raise),
        Route("/background", background),
        Route("/slow-query", slow_query),
        Route("/marker", marker),
        Route("/sentry-loaded", sentry_loaded),
        WebSocketRoute("/ws/board", board),
    ],
)
