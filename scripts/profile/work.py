"""In-process cost of one work-route request (/boards/{id}: asyncpg fetchval + redis set)
through cfk_otel's default set-up, against real PostgreSQL and Redis (no uvicorn, no sockets to the app).

Usage (services started; `eval "$(scripts/services env)"`):
  taskset -c 0 .venv/bin/python scripts/profile/work.py [--runs 7 --n 2000]
Bare = the bare app with asyncpg and redis uninstrumented; cfk_otel = instrument_app(app) with the
cfk_asyncpg/cfk_redis instrumentations on (toggled between runs); app-only = instrument_app(app), the
client libraries uninstrumented, so 'client calls' is the two client spans and their metrics.
Thread CPU per request, min of runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from typing import Any

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    closed = s.getsockname()[1]
os.environ.setdefault("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{closed}")
os.environ.setdefault("OTEL_SERVICE_NAME", "inproc-work")

import asyncpg
import redis.asyncio as aioredis
from harness import http_scope, per_request
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import cfk_otel
from cfk_otel import instrument_app
from cfk_otel._instrumentation.db import AsyncpgInstrumentor, RedisInstrumentor

STATE: dict[str, object] = {}


async def work(request: Request) -> JSONResponse:
    board = request.path_params["board_id"]
    count = await STATE["pool"].fetchval(
        "SELECT count(*) FROM generate_series(1, 200) WHERE $1::int > 0", board
    )
    await STATE["cache"].set(f"bench:board:{board}", count, ex=60)
    return JSONResponse({"board": board, "count": count})


def app() -> Starlette:
    return Starlette(routes=[Route("/boards/{board_id:int}", work)])


SCOPE = http_scope("/boards/7")


async def run(target: Any, n: int) -> float:
    return await per_request(target, SCOPE, n)


def instrumented(on: bool) -> None:
    for inst in (AsyncpgInstrumentor(), RedisInstrumentor()):
        if on and not inst.is_instrumented_by_opentelemetry:
            inst.instrument()
        elif not on and inst.is_instrumented_by_opentelemetry:
            inst.uninstrument()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    devnull = open(os.devnull, "w")  # noqa: SIM115
    real_stdout = sys.stdout
    sys.stdout = devnull
    cfk_otel.configure()
    bare = app()
    wrapped = instrument_app(app())
    loop = asyncio.new_event_loop()

    async def setup() -> None:
        STATE["pool"] = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=4, max_size=4)
        STATE["cache"] = aioredis.from_url(os.environ["REDIS_URL"], max_connections=8)

    loop.run_until_complete(setup())
    instrumented(True)
    loop.run_until_complete(run(wrapped, 300))
    instrumented(False)
    loop.run_until_complete(run(bare, 300))
    b, w, a = [], [], []
    for _ in range(args.runs):
        instrumented(False)
        b.append(loop.run_until_complete(run(bare, args.n)))
        a.append(loop.run_until_complete(run(wrapped, args.n)))
        instrumented(True)
        w.append(loop.run_until_complete(run(wrapped, args.n)))
    cfk_otel.flush()  # the request lines still held go to /dev/null too
    sys.stdout = real_stdout
    print(
        f"bare {min(b):.1f} us/req  cfk_otel {min(w):.1f} us/req  added {min(w) - min(b):.1f} us/req"
        f"  (of which client calls {min(w) - min(a):.1f}: app-only {min(a):.1f})"
    )


if __name__ == "__main__":
    main()
