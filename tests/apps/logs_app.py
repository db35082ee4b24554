"""The document's logger "Usage" section, ported line for line and run inside a request;
and exceptions nobody catches (a thread, an asyncio task). No telemetry set-up here."""

from __future__ import annotations

import asyncio
import gc
import threading
import uuid

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from cfk_otel import logger


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


async def usage(request: Request) -> JSONResponse:
    user_id = "user-123"
    ticket_data = {"title": "Fix login", "columnId": "col-1"}
    try:
        raise ValueError("column is full")
    except ValueError as exc:
        error = exc

    # --- monitoring-setup.md, "Logging" > "Usage", line for line ---
    # Basic logging
    logger.info("User logged in", {"userId": user_id, "ip": request.client.host if request.client else None})
    logger.warn("Rate limit approaching", {"userId": user_id, "remaining": 5})
    logger.error("Failed to create ticket", error, {"ticketData": ticket_data})

    # Request logging
    logger.log_request("POST", "/api/tickets", 201, 45, {"userId": user_id})

    # Child logger with context
    request_logger = logger.create_child_logger(
        {
            "requestId": str(uuid.uuid4()),
            "userId": user_id,
        }
    )
    request_logger.info("Processing request")
    # --- end of the document's lines ---

    return JSONResponse({"ran": "usage"})


def _fail_in_thread() -> None:
    raise LookupError("thread lost its ticket")


async def thread_crash(request: Request) -> PlainTextResponse:
    thread = threading.Thread(target=_fail_in_thread, name="ticket-sync")
    thread.start()
    thread.join()
    return PlainTextResponse("thread ran")


async def _fail_in_task() -> None:
    raise KeyError("task lost its board")


async def task_crash(request: Request) -> PlainTextResponse:
    task = asyncio.get_running_loop().create_task(_fail_in_task(), name="board-sync")
    await asyncio.sleep(0.05)
    del task  # nobody retrieves its exception
    gc.collect()
    return PlainTextResponse("task ran")


app = Starlette(
    routes=[
        Route("/hello", hello),
        Route("/usage", usage),
        Route("/thread-crash", thread_crash),
        Route("/task-crash", task_crash),
    ]
)
