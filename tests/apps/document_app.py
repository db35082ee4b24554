"""The monitoring document's "Usage in Code" and "Custom Metrics" samples, ported line for line.

``GET /samples`` runs them inside a request, in the document's order and shapes (the
TypeScript names become Python's: ``captureError`` is ``capture_error``, ...). Only the
last call, marked below, is not the document's: it shows the user that ``set_user`` set.
"""

from __future__ import annotations

from types import SimpleNamespace

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from cfk_otel import (
    capture_error,
    capture_message,
    http_request_duration,
    register_counter,
    register_histogram,
    set_user,
)

assert register_histogram  # imported by the document's sample, not used by it


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


async def samples(request: Request) -> PlainTextResponse:
    ticket_id, user_id = "ticket-456", "user-123"
    user = SimpleNamespace(id="user-123", email="ann@example.com")
    try:
        raise LookupError(f"ticket {ticket_id} not found")
    except LookupError as error:
        # --- Usage in Code ---
        # Capture an error with context
        capture_error(error, {
            "level": "error",
            "tags": {"component": "tickets-api"},
            "extra": {"ticketId": ticket_id, "userId": user_id},
        })  # fmt: skip

    # Capture a message
    capture_message("User completed onboarding", "info", {
        "userId": user_id,
        "duration": 45000,
    })  # fmt: skip

    # Set user context
    set_user({
        "id": user.id,
        "email": user.email,
    })  # fmt: skip

    # --- Custom Metrics ---
    # Track request duration
    end_timer = http_request_duration.start_timer({"method": "GET", "path": "/api/tickets"})
    # ... handle request
    end_timer()

    # Custom counter
    my_counter = register_counter("my_feature_usage", "Feature usage count", ["feature"])
    my_counter.inc({"feature": "bulk-update"})

    capture_message("samples done")  # not the document's: carries the user set above
    return PlainTextResponse("ok")


app = Starlette(routes=[Route("/hello", hello), Route("/samples", samples)])
