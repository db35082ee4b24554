"""In-process cost of one hello request through cfk_otel's default set-up (no uvicorn, no sockets).

Usage:  taskset -c 0 .venv/bin/python scripts/profile/hello.py [--runs 7 --n 3000] [--clock process]
Prints the bare app's and the instrumented app's thread CPU per request (min of runs), and the difference
(`--clock process`: the process's CPU, the core's export and stdout threads included).
Env: as the app would have it (defaults: traces+metrics+logs over OTLP/HTTP to a closed port, request line on
stdout, which this script sends to /dev/null).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time
from typing import Any

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    closed = s.getsockname()[1]
os.environ.setdefault("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{closed}")
os.environ.setdefault("OTEL_SERVICE_NAME", "inproc")

from harness import http_scope, per_request
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import cfk_otel
from cfk_otel import instrument_app


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


def app() -> Starlette:
    return Starlette(routes=[Route("/hello", hello)])


SCOPE = http_scope("/hello")


CLOCK = [time.thread_time]


async def run(target: Any, n: int) -> float:
    return await per_request(target, SCOPE, n, CLOCK[0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--clock", choices=("thread", "process"), default="thread")
    args = parser.parse_args()
    CLOCK[0] = time.process_time if args.clock == "process" else time.thread_time
    devnull = open(os.devnull, "w")  # noqa: SIM115
    real_stdout = sys.stdout
    sys.stdout = devnull
    cfk_otel.configure()
    bare = app()
    wrapped = instrument_app(app())  # what opentelemetry-instrument serves
    loop = asyncio.new_event_loop()
    loop.run_until_complete(run(wrapped, 500))
    loop.run_until_complete(run(bare, 500))
    b, w = [], []
    for _ in range(args.runs):
        b.append(loop.run_until_complete(run(bare, args.n)))
        w.append(loop.run_until_complete(run(wrapped, args.n)))
    cfk_otel.flush()  # the request lines still held go to /dev/null too
    sys.stdout = real_stdout
    print(f"bare {min(b):.1f} us/req  cfk_otel {min(w):.1f} us/req  added {min(w) - min(b):.1f} us/req")


if __name__ == "__main__":
    main()
