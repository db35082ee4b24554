"""Log calls with values that cannot be serialised (failing ``__repr__``/``__str__``, bytes,
sets, circular and very deep structures, huge strings, NaN, non-string keys), through
``logging`` with ``extra=`` and through ``cfk_otel.logger``: the request succeeds and one
JSON line still comes out, and the same record over OTLP; nothing crashes."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cfk_otel.testing import OtlpReceiver
from tests.apps.failure_app import ERRORS, KINDS, MESSAGES, VALUES, marker
from tests.conftest import RunningApp, free_port, uvicorn_command
from tests.failure.conftest import (
    RSS_BOUND_MIB,
    SHUTDOWN_BOUND_S,
    StartApp,
    app_rss,
    assert_served,
    figures,
    hammer,
    otlp_env,
)

pytestmark = pytest.mark.timeout(60)

APIS = ("logging", "logger")
MAX_MESSAGE = 16_384  # README: messages over 16 KiB are truncated with a marker


@pytest.fixture(scope="module")
def otlp() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def app(module_apps: StartApp, otlp: OtlpReceiver) -> RunningApp:
    port = free_port()
    env = otlp_env(otlp.http_endpoint, "http/protobuf")
    return module_apps(uvicorn_command("failure_app:app", port), env, port)


def json_line(app: RunningApp, start: str, timeout: float = 2.0) -> dict[str, Any]:
    """The JSON line whose message starts with ``start``; every '{' line met must parse.

    The app writes the line before it answers, so it is there at once; the wait is a margin.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in app.output().splitlines():
            if line.startswith("{") and start in line[:400]:
                document: dict[str, Any] = json.loads(line)
                if str(document.get("message", "")).startswith(start):
                    return document
        time.sleep(0.05)
    raise AssertionError(f"no JSON line for {start!r}; the output ends:\n{app.output()[-1500:]}")


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("kind", KINDS)
def test_unserialisable_values_still_make_a_json_line(
    app: RunningApp, otlp: OtlpReceiver, kind: str, api: str
) -> None:
    expected = marker(kind, api)
    status, _, body = app.get(f"/logs/{kind}/{api}")
    assert (status, json.loads(body)) == (200, {"logged": expected})

    line = json_line(app, expected)
    assert line["level"] == ("error" if kind in ERRORS else "info")
    if kind in VALUES:
        assert "value" in line, line.keys()
    if kind in ERRORS:
        assert line["error"]["type"] == "UnprintableError"
    if kind in MESSAGES:
        assert len(line["message"]) < MAX_MESSAGE + 100
        assert "truncated" in line["message"][MAX_MESSAGE:]
    # logging's last resort ("--- Logging error ---" on stderr) never had to step in.
    assert f"Message: {expected!r}" not in app.output()
    # The same record over OTLP.
    assert otlp.wait_for(
        lambda: any(str(r.body).startswith(expected) for r in list(otlp.logs)), timeout=10
    ), f"no OTLP log record for {expected!r}"
    assert app.get("/hello")[0] == 200


def test_hostile_logging_under_load_keeps_memory_bounded(app: RunningApp) -> None:
    kinds = [k for k in KINDS if k not in ("deep", "huge-value", "huge-message")]
    paths = [f"/logs/{kinds[i % len(kinds)]}/{APIS[i % 2]}" for i in range(len(kinds) * 2 * 20)]
    assert_served(hammer(app.port, paths[:100]), lambda _: 200)
    before = app_rss(app)
    replies = hammer(app.port, paths * 2)
    after = app_rss(app)
    exited_in = app.terminate()
    figures(
        "hostile-log-values",
        requests=len(replies),
        rss_before_mib=before,
        rss_after_mib=after,
        shutdown_s=exited_in,
        logging_errors=app.output().count("--- Logging error ---"),
    )
    assert_served(replies, lambda _: 200)
    assert after - before < RSS_BOUND_MIB
    assert exited_in < SHUTDOWN_BOUND_S
