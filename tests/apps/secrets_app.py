"""An app that puts one secret into every route out, as careless code would (issue 21).

``GET /case/{name}`` runs one row of ``CASES``; each row hides the secret it is given in
a different shape. ``tests/test_secrets.py`` asserts that none of them comes out anywhere.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import os
import urllib.parse
from collections.abc import Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import cfk_otel

log = logging.getLogger("tests.secrets_app")
Credentials = collections.namedtuple("Credentials", "user password")


@dataclasses.dataclass
class Config:
    user: str
    password: str


def _nested(secret: str, depth: int) -> dict[str, object]:
    value: dict[str, object] = {"password": secret}
    for _ in range(depth):
        value = {"level": value}
    return value


def _keyed(key: str, secret: str) -> None:
    cfk_otel.logger.info("keys", {key: secret})


def _raise(message: str) -> None:
    raise RuntimeError(message)


# name -> what the request does with the secret it is given.
CASES: dict[str, Callable[[str], object]] = {
    "exception_database_url": lambda s: _raise(f"cannot connect to postgresql://app:{s}@db/kanban"),
    "exception_bearer": lambda s: _raise(f"upstream refused Authorization: Bearer {s}"),
    "exception_dsn": lambda s: _raise(f"bad DSN https://{s}@o1.ingest.sentry.io/42"),
    "message_key_value": lambda s: log.warning(f"login with password={s} failed"),
    "message_args_dict": lambda s: log.warning("config %s", {"password": s}),
    "message_userinfo": lambda s: log.warning("connecting to redis://:%s@cache:6379/0", s),
    "message_token_scheme": lambda s: log.warning(f"sent Authorization: Token {s}"),
    "message_custom_scheme": lambda s: log.warning(f"sent Authorization: Custom {s}"),
    "message_bearer_alone": lambda s: log.warning(f"retrying with bearer {s}"),
    "message_configured_password": lambda s: log.warning(
        "retrying as %s", urllib.parse.urlsplit(os.environ["DATABASE_URL"]).password
    ),
    # A configured secret in an error's message, in no shape a rule knows: only the known
    # values withhold it (on the span, the stdout and OTLP error fields, and Sentry).
    "exception_configured_password": lambda s: _raise(
        f"login refused for {urllib.parse.urlsplit(os.environ['DATABASE_URL']).password}"
    ),
    "message_quoted_json": lambda s: log.warning('payload {"password": "%s two"}', s),
    "context_userinfo": lambda s: cfk_otel.logger.info(
        "connecting", {"target": f"https://u:{s}@api.example/x"}
    ),
    "context_header_pairs": lambda s: cfk_otel.logger.info(
        "headers", {"headers": [["Authorization", f"Bearer {s}"]]}
    ),
    **{
        f"context_key_{key}": functools.partial(_keyed, key)
        for key in ("auth", "passphrase", "jwt", "bearer", "signature", "key", "refresh", "authHeader")
    },
    "context_nested_14": lambda s: cfk_otel.logger.info("nested", {"config": _nested(s, 14)}),
    "context_nested_70": lambda s: cfk_otel.logger.info("too deep", {"config": _nested(s, 70)}),
    "context_dataclass": lambda s: cfk_otel.logger.info("config", {"config": Config("ann", s)}),
    "context_namedtuple": lambda s: cfk_otel.logger.info("creds", {"creds": Credentials("ann", s)}),
    "message_dataclass_repr": lambda s: log.warning("config %r", Config("ann", s)),
    "context_bytes_key": lambda s: cfk_otel.logger.info("bytes", {"raw": {b"password": s}}),
    "context_non_string_key": lambda s: cfk_otel.logger.info("odd keys", {"raw": {1: "one", "token": s}}),
    "capture_error_extra": lambda s: cfk_otel.capture_error(
        RuntimeError(f"handled, password={s}"), {"level": "error", "extra": {"apiKey": s}}
    ),
    "error_with_exception": lambda s: cfk_otel.logger.error(
        "failed", RuntimeError(f"db postgresql://app:{s}@db/x down"), {"attempt": 2}
    ),
}


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


async def case(request: Request) -> PlainTextResponse:
    secret = request.query_params["secret"]
    CASES[request.path_params["name"]](secret)
    return PlainTextResponse("done")


app = Starlette(routes=[Route("/hello", hello), Route("/case/{name}", case)])


def _failing_check() -> cfk_otel.HealthCheckResult:
    from os import environ

    return cfk_otel.HealthCheckResult(
        "unhealthy", f"cannot reach {environ['CFK_TEST_SECRET_URL']}", {"url": environ["CFK_TEST_SECRET_URL"]}
    )


cfk_otel.register_health_check("upstream", _failing_check)
