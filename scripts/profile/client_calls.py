"""The work route's two client calls' own cost, without the network: cfk_otel's asyncpg
and redis wrappers around calls that return at once (a fetchval on a connection-like object,
a SET on a redis client-like object), inside a sampled request span, through the default
set-up (native core). Thread CPU per pair of calls (min of runs), minus the same calls unwrapped.

Usage: taskset -c 0 .venv/bin/python scripts/profile/client_calls.py [--runs 9 --n 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time
from typing import ClassVar

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    closed = s.getsockname()[1]
os.environ.setdefault("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{closed}")
os.environ.setdefault("OTEL_SERVICE_NAME", "micro-work")

from opentelemetry import context, trace

import cfk_otel
from cfk_otel._core.seam import Spans
from cfk_otel._instrumentation import db


class Params:
    database = "cfk"
    user = "cfk"


class Connection:
    _params = Params()
    _addr = ("127.0.0.1", 55432)
    _reset_query = "RESET ALL"


class Pool:
    connection_kwargs: ClassVar[dict[str, object]] = {"host": "127.0.0.1", "port": 56379, "db": 0}


class Redis:
    connection_pool = Pool()


SQL = "SELECT count(*) FROM generate_series(1, 200) WHERE $1::int > 0"


async def fetchval(self, *args, **kwargs):
    return 200


async def execute_command(self, *args, **kwargs):
    return True


fetchval_unbound, execute_command_unbound = fetchval, execute_command  # the calls unwrapped


async def run(pg, rd, n: int) -> float:
    conn, cache = Connection(), Redis()
    start = time.thread_time()
    for _ in range(n):
        await pg(conn, SQL, 7)
        await rd(cache, "SET", "bench:board:7", 200, "EX", 60)
    return (time.thread_time() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--n", type=int, default=20000)
    args = parser.parse_args()
    devnull = open(os.devnull, "w")  # noqa: SIM115
    real_stdout = sys.stdout
    sys.stdout = devnull
    cfk_otel.configure()
    client = db._Client(None)
    # The patched methods as AsyncpgInstrumentor and RedisInstrumentor install them.
    pg = db._asyncpg_patch(client, "connection")(fetchval)
    rd = db._redis_method_async(client, False, execute_command)

    loop = asyncio.new_event_loop()
    # The request's span as the middleware starts it: the core's server span where the
    # set-up allows (the calls are then timed in the core), else the SDK's.
    spans = Spans()
    server = spans.refresh()
    parent = context.get_current()
    request = server.start("GET", parent) if server is not None else None
    if request is None:
        request = spans.start("GET", parent)
    token = context.attach(trace.set_span_in_context(request, parent))
    try:
        loop.run_until_complete(run(pg, rd, 2000))
        b, w = [], []
        for _ in range(args.runs):
            b.append(loop.run_until_complete(run(fetchval_unbound, execute_command_unbound, args.n)))
            w.append(loop.run_until_complete(run(pg, rd, args.n)))
    finally:
        context.detach(token)
    cfk_otel.flush()  # the request lines still held go to /dev/null too
    sys.stdout = real_stdout
    print(
        f"two client calls: {min(w) - min(b):.1f} us added (wrapped {min(w):.1f}, bare {min(b):.1f}; "
        f"parent {type(request).__name__})"
    )


if __name__ == "__main__":
    main()
