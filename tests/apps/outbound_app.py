"""A Starlette app that calls another service with httpx, with no telemetry code: the
upstream httpx instrumentation, added beside cfk_otel, traces the call."""

from __future__ import annotations

import os

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


async def inner(request: Request) -> JSONResponse:
    return JSONResponse({"traceparent": request.headers.get("traceparent")})


async def outbound(request: Request) -> JSONResponse:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(os.environ["OUTBOUND_URL"])
    return JSONResponse({"status": response.status_code, "inner": response.json()})


app = Starlette(routes=[Route("/hello", hello), Route("/inner", inner), Route("/outbound", outbound)])
