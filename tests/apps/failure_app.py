"""The failure suite's app (tests/failure/): log calls whose values cannot be serialised, and
requests that each bind their own user while many others run at the same time."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

import cfk_otel

log = logging.getLogger("tests.failure_app")


class Unrepresentable:
    """Both ``repr()`` and ``str()`` raise, as a half-initialised ORM object's might."""

    def __repr__(self) -> str:
        raise RuntimeError("__repr__ fails on purpose")

    __str__ = __repr__


class ReprValueError:
    def __repr__(self) -> str:
        raise ValueError("__repr__ fails on purpose")


class UnprintableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ fails on purpose")


def _circular() -> dict[str, Any]:
    loop: dict[str, Any] = {"name": "loop"}
    loop["self"] = loop
    items: list[Any] = [loop]
    items.append(items)
    return {"dict": loop, "list": items}


def _deep() -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(100_000):  # deeper than any recursion limit
        value = {"inner": value}
    return value


# name -> a value for the log call's context
VALUES: dict[str, Callable[[], object]] = {
    "unrepresentable": Unrepresentable,
    "repr-value-error": ReprValueError,
    "bytes": lambda: b"\xff\xfe\x00 binary \x1b[31m",
    "set": lambda: {1, "two", (3, 4), frozenset({5})},
    "set-of-unrepresentable": lambda: {Unrepresentable()},
    "circular": _circular,
    "deep": _deep,
    "huge-value": lambda: "v" * 2_000_000,
    "nan": lambda: float("nan"),
    "non-str-keys": lambda: {(1, 2): "tuple key", None: "none key", 3.5: "float key"},
}
# name -> the extra part of the message (the marker comes first)
MESSAGES: dict[str, str] = {"huge-message": " " + "m" * 1_000_000}
# name -> an exception attached to the record
ERRORS: dict[str, Callable[[], BaseException]] = {"unprintable-error": UnprintableError}
KINDS = (*VALUES, *MESSAGES, *ERRORS)


def marker(kind: str, api: str) -> str:
    return f"hostile {kind} via {api}"


async def hostile(request: Request) -> JSONResponse:
    kind, api = request.path_params["kind"], request.path_params["api"]
    message = marker(kind, api) + MESSAGES.get(kind, "")
    context = {"value": VALUES[kind]()} if kind in VALUES else {}
    error = ERRORS[kind]() if kind in ERRORS else None
    if api == "logger":
        if error is not None:
            cfk_otel.logger.error(message, error, **context)
        else:
            cfk_otel.logger.info(message, **context)
    elif error is not None:
        try:
            raise error
        except UnprintableError:
            log.exception(message, extra=context)
    else:
        log.info(message, extra=context)
    return JSONResponse({"logged": marker(kind, api)})


_in_flight = [0, 0]  # now, peak


async def user(request: Request) -> JSONResponse:
    user_id = request.path_params["user_id"]
    _in_flight[0] += 1
    _in_flight[1] = max(_in_flight)
    try:
        cfk_otel.set_user({"id": user_id})
        request_log = cfk_otel.logger.bind(userId=user_id)
        await asyncio.sleep(random.uniform(0, 0.05))  # interleave the concurrent requests
        request_log.info("user request started")
        log.info("user request via logging", extra={"userId": user_id})
        await asyncio.sleep(random.uniform(0, 0.05))
        cfk_otel.capture_message(f"user {user_id}")
        request_log.info("user request finished")
    finally:
        _in_flight[0] -= 1
    return JSONResponse({"user": user_id, "peak": _in_flight[1]})


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


app = Starlette(
    routes=[
        Route("/hello", hello),
        Route("/logs/{kind}/{api}", hostile),
        Route("/users/{user_id}", user),
    ]
)
