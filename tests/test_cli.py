"""cfk_otel/_cli.py: ``cfk-otel doctor`` and ``cfk-otel env``."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from cfk_otel._cli import doctor, main
from cfk_otel._settings import DECLARED, Variable, load, markdown_table
from tests.conftest import BIN, free_port
from tests.test_settings import SECRET, hostile_values


@pytest.fixture
def listening() -> Iterator[int]:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


def test_doctor_passes_with_a_live_endpoint(listening: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert doctor({"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{listening}"}) == 0
    out = capsys.readouterr().out
    assert f"OTLP endpoint 127.0.0.1:{listening} answers (http/protobuf)" in out
    assert "no problems found" in out


def test_doctor_lists_problems_and_masks_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://user:hunter2@127.0.0.1:{free_port()}",
        "SENTRY_DSN": "https://abcdef0123456789@o1.ingest.sentry.io/42",
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer sekrit-token",
        "LOG_LEVEL": "verbose",
        "CFK_OTEL_STRICT": "true",
    }
    assert doctor(env, timeout=0.5) == 1
    out = capsys.readouterr().out
    for secret in ("hunter2", "abcdef0123456789", "sekrit-token"):
        assert secret not in out
    assert "<set, hidden>" in out
    assert "2 problem(s):" in out
    assert "LOG_LEVEL='verbose' is not valid (accepted: debug, info, warn, error, fatal)" in out
    assert "does not answer" in out


def test_doctor_skips_the_endpoint_when_nothing_is_exported(capsys: pytest.CaptureFixture[str]) -> None:
    env = {"OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none", "OTEL_LOGS_EXPORTER": "console"}
    assert doctor(env) == 0
    assert "OTLP endpoint" not in capsys.readouterr().out


def test_env_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["env"]) == 0
    assert capsys.readouterr().out.strip() == markdown_table()


def test_console_script_exit_code() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}", "PATH": str(BIN)}
    result = subprocess.run(
        [str(BIN / "cfk-otel"), "doctor", "--timeout", "0.5"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 problem(s)" in result.stdout
    assert sys.executable  # the script runs in this interpreter's environment


@pytest.mark.parametrize("var", DECLARED, ids=lambda v: v.name)
def test_doctor_never_shows_a_traceback_and_names_every_bad_value(
    var: Variable[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 20, point 4: every hostile value of every declared variable gives a report,
    never a traceback; a rejected value is a failed item naming its variable; no secret,
    no control character and no stray surrogate reaches the terminal."""
    values = hostile_values()
    for value in values:
        env = {var.name: value, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}
        if var.name == "OTEL_EXPORTER_OTLP_ENDPOINT":
            env[var.name] = value
        code = doctor(env, timeout=0.05)
        out = capsys.readouterr().out
        assert code in (0, 1)
        assert SECRET not in out, (var.name, value[:80])
        assert not any(c < " " and c != "\n" for c in out), (var.name, value[:80])
        out.encode("utf-8")  # printable as it is: no lone surrogate
        if any(p.variable == var.name for p in load(env).problems):
            assert code == 1
            assert f"  - {var.name}=" in out, (var.name, value[:80])
    print(f"FIGURES doctor-fuzz[{var.name}]: values={len(values)}")


def test_the_command_reports_a_bad_endpoint_without_a_traceback() -> None:
    env = {"PATH": "/usr/bin:/bin", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://u:{SECRET}@h:43x8"}
    command = [str(BIN / "cfk-otel"), "doctor", "--timeout", "0.2"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "  - OTEL_EXPORTER_OTLP_ENDPOINT=" in result.stdout
    assert SECRET not in result.stdout + result.stderr
