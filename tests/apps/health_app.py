"""A Starlette app that mounts cfk_otel's health app itself and may add a check of its own."""

from __future__ import annotations

import asyncio
import os

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

import cfk_otel


async def hello(request):
    return PlainTextResponse("hello")


async def slow(request):
    print("slow: started", flush=True)
    await asyncio.sleep(float(request.query_params.get("seconds", "1")))
    return PlainTextResponse("slow done")


async def drain_gate():
    # Holds a readiness probe in flight until SIGTERM arrives, so that the test sees the
    # answer the draining server gives to a probe it is still serving.
    print("drain gate: waiting", flush=True)
    registry = cfk_otel.health_registry()
    for _ in range(1000):  # at most 10 s
        if registry.shutting_down:
            return "released by shutdown"
        await asyncio.sleep(0.01)
    return False


if os.environ.get("HEALTH_APP_DRAIN_GATE") == "1":
    cfk_otel.register_health_check("drain-gate", drain_gate)

app = Starlette(
    routes=[
        Route("/hello", hello),
        Route("/slow", slow),
        Mount("/internal/health", app=cfk_otel.health_app()),
    ]
)
