"""cfk_otel/_bootstrap/api.py: configure() and shutdown() without opentelemetry-instrument."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from cfk_otel.testing import OtlpReceiver
from tests.conftest import ROOT

SCRIPT = textwrap.dedent(
    """
    import logging, sys
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    import cfk_otel
    from opentelemetry import trace

    cfk_otel.configure()
    cfk_otel.configure()
    with trace.get_tracer("manual").start_as_current_span("manual-work"):
        logging.getLogger("manual").warning("inside the span")
    print("flushed", cfk_otel.shutdown(), flush=True)
    print("again", cfk_otel.shutdown(), flush=True)
    """
)


def run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(
        [sys.executable, "-c", SCRIPT], env=full, capture_output=True, text=True, timeout=60, check=False
    )


def test_configure_is_idempotent_and_exports(receiver: OtlpReceiver) -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint,
        "SERVICE_NAME": "manual-app",
        "LOG_LEVEL": "debug",
    }
    result = run(env)
    assert result.returncode == 0, result.stderr
    assert "flushed True" in result.stdout
    assert "again True" in result.stdout
    # cfk_otel owns the root logger: the app's lines, ours included, are JSON on stdout.
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert any(line["message"] == "cfk_otel.configure() was already called; ignoring" for line in lines)
    [warning] = [line for line in lines if line["message"] == "inside the span"]
    assert warning["level"] == "warn"
    assert warning["logger"] == "manual"
    span = receiver.wait_for_span(lambda s: s.name == "manual-work")
    assert span.resource["service.name"] == "manual-app"
    assert receiver.wait_for(lambda: any(r.body == "inside the span" for r in receiver.logs))


def test_configure_raises_in_strict_mode() -> None:
    result = run({"CFK_OTEL_STRICT": "true", "OTEL_TRACES_SAMPLER": "sometimes"})
    assert result.returncode == 1
    assert "cfk_otel.ConfigurationError" in result.stderr or "ConfigurationError" in result.stderr
    assert "OTEL_TRACES_SAMPLER='sometimes' is not valid" in result.stderr


def test_disabling_ours_without_the_upstream_instrumentations_is_quiet() -> None:
    # The upstream asyncpg and redis instrumentations are optional (issue 18): absent,
    # disabling ours loads nothing in their place, and says nothing about it.
    script = textwrap.dedent(
        """
        import logging, sys
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        hidden = sys.argv[1] == "hidden"
        if hidden:  # as if not installed: find_spec() answers None
            sys.modules["opentelemetry.instrumentation.asyncpg"] = None
            sys.modules["opentelemetry.instrumentation.redis"] = None
        import asyncpg, redis, cfk_otel
        from cfk_otel._instrumentation.db import AsyncpgInstrumentor, RedisInstrumentor
        cfk_otel.configure()
        loaded = [AsyncpgInstrumentor().is_instrumented_by_opentelemetry]
        if not hidden:
            from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
            from opentelemetry.instrumentation.redis import RedisInstrumentor as Upstream
            loaded += [AsyncPGInstrumentor().is_instrumented_by_opentelemetry,
                       Upstream().is_instrumented_by_opentelemetry]
        print(*loaded)
        """
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "cfk_asyncpg,cfk_redis",
    }
    for mode, expected in (("hidden", "False"), ("installed", "False True True")):
        result = subprocess.run(
            [sys.executable, "-c", script, mode],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == expected
        assert "instrumenting" not in result.stderr, result.stderr  # no failure to instrument
