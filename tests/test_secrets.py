"""One secrets policy on every route out (issue 21 point 1): the table.

Each row of ``tests/apps/secrets_app.py``'s ``CASES`` puts its own secret into the app in
one careless shape (an exception message, log text, ``%s`` arguments, context keys,
nested and odd structures, a handled error's extra). The app runs under
``opentelemetry-instrument`` with a Sentry stand-in and an OTLP receiver; then no secret may
come out of any route: stdout and stderr, OTLP log records, span attributes, events and
status, Sentry events, the health body, and ``cfk-otel doctor``.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cfk_otel.testing import OtlpReceiver, SentryReceiver
from tests.apps.secrets_app import CASES
from tests.conftest import ROOT, free_port, launch, uvicorn_command

pytestmark = pytest.mark.timeout(180)


def _secret(index: int) -> str:
    """A distinct secret per row: long enough to be told apart, shaped like a real one."""
    return f"Zq{index:02d}x7S3cr3tK"


CONFIGURED = {
    "DATABASE_URL": "postgresql://app:Cfg0DbPassw0rd@127.0.0.1:1/kanban",
    "REDIS_URL": "redis://:Cfg1RedisPassw0rd@127.0.0.1:1/0",
    "METRICS_BEARER_TOKEN": "Cfg2ScrapeT0ken",
    "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20Cfg3OtlpT0ken,x-team=kanban",
    "CFK_TEST_SECRET_URL": "https://svc:Cfg4UpstreamPw@upstream.internal/api",
    "OTEL_RESOURCE_ATTRIBUTES": "team=kanban,deploy.token=Cfg5ResourceT0ken",
}
CONFIGURED_SECRETS = (
    "Cfg0DbPassw0rd",
    "Cfg1RedisPassw0rd",
    "Cfg2ScrapeT0ken",
    "Cfg3OtlpT0ken",
    "Cfg4UpstreamPw",
    "Cfg5ResourceT0ken",
)
ABSOLUTE_FORM = "Abs0lutePassw0rd"


def _absolute_form_request(port: int) -> None:
    """``GET http://user:password@host/...``: the target uvicorn hands over as the path."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        target = f"http://admin:{ABSOLUTE_FORM}@127.0.0.1:{port}/nowhere"
        connection.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        while connection.recv(65536):
            pass


def test_no_secret_comes_out_of_any_route(tmp_path: Path) -> None:
    secrets = {name: _secret(i) for i, name in enumerate(CASES)}
    with SentryReceiver() as sentry, OtlpReceiver() as otlp:
        port = free_port()
        env = {
            **CONFIGURED,
            "SENTRY_DSN": sentry.dsn,
            "SENTRY_CAPTURE_4XX": "none",
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.http_endpoint,
            "OTEL_METRICS_EXPORTER": "none",
        }
        app = launch(tmp_path, uvicorn_command("secrets_app:app", port), env, port)
        try:
            for name, secret in secrets.items():
                status = app.get(f"/case/{name}?secret={secret}")[0]
                assert status in (200, 500), name
            _absolute_form_request(port)
            health = app.get("/api/health")[2].decode()
            # Everything has arrived: a request line and a server span for each row.
            assert otlp.wait_for(lambda: sum(s.span.kind == 2 for s in otlp.spans) >= len(secrets) + 2)
            assert otlp.wait_for(
                lambda: sum(log.scope == "cfk_otel.requests" for log in otlp.logs) >= len(secrets) + 2
            )
            assert sentry.wait_for_events(1)
        finally:
            app.terminate()
        doctor = subprocess.run(
            [sys.executable, "-m", "cfk_otel._cli.main", "doctor"],
            check=False,
            env={"PATH": "/usr/bin:/bin", **env},
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        routes = {
            "stdout and stderr": app.output(),
            "OTLP log records": "\n".join(str(log.record) for log in otlp.logs),
            "spans": "\n".join(str(span.span) for span in otlp.spans),
            "Sentry events": json.dumps(sentry.events),
            "health": health,
            "cfk-otel doctor": doctor.stdout + doctor.stderr,
        }
    # The rows did arrive (so their absence below means they were withheld, not lost).
    assert "nested" in routes["OTLP log records"]
    assert "cannot connect to postgresql://" in routes["spans"]
    assert "handled, password=" in routes["Sentry events"]
    assert "upstream" in routes["health"]
    assert "DATABASE_URL" in routes["cfk-otel doctor"]
    leaks = [
        f"{case}: {route}"
        for route, text in routes.items()
        for case, secret in [*secrets.items(), ("absolute-form target", ABSOLUTE_FORM)]
        + [(f"configured {s}", s) for s in CONFIGURED_SECRETS]
        if secret in text
    ]
    assert not leaks, "secrets came out:\n" + "\n".join(leaks)


@pytest.mark.parametrize(
    ("variable", "value", "secret"),
    [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:Bad0EndpointPw@127.0.0.1:43x8", "Bad0EndpointPw"),
        # The SDK would print this header three times: ';' is not allowed even liberally.
        ("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer Bad1HeaderT0ken;v=1", "Bad1HeaderT0ken"),
        (
            "OTEL_EXPORTER_OTLP_HEADERS",
            "authorization=Bearer%20Bad2HeaderT0ken,no-equals-sign",
            "Bad2HeaderT0ken",
        ),
    ],
)
def test_a_bad_exporter_variable_is_named_without_its_secret(
    tmp_path: Path, variable: str, value: str, secret: str
) -> None:
    port = free_port()
    app = launch(tmp_path, uvicorn_command("secrets_app:app", port), {variable: value}, port)
    try:
        assert app.get("/hello")[0] == 200
    finally:
        app.terminate()
    output = app.output()
    assert f"{variable}=" in output  # named, with what is accepted
    assert secret not in output
