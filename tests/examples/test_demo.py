"""``make demo``'s own command, non-interactive (``--once``), twice in a row, from the checkout."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

from tests.collector.conftest import prometheus_binary
from tests.conftest import ROOT, Services, free_port, unavailable

pytestmark = pytest.mark.timeout(120)

DEMO = ROOT / "examples" / "kanban" / "demo.py"


def run_demo(port: int) -> tuple[int, str]:
    """The command the Makefile's demo target runs, with this venv's Python."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "SENTRY_"))}
    done = subprocess.run(
        [sys.executable, str(DEMO), "--once", "--port", str(port)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def check_summary(out: str, port: int) -> None:
    served = re.search(r"^requests served: (\d+)  by status  (.*)$", out, re.M)
    assert served, out
    by_status = dict(pair.split(": ") for pair in served[2].split("  "))
    assert {"201", "204", "404", "409", "429", "500"} <= by_status.keys(), out
    assert (by_status["409"], by_status["500"], by_status["429"]) == ("2", "1", "1")
    total = int(served[1])
    assert total == sum(int(n) for n in by_status.values())

    pushed = re.search(r"^websocket /ws/boards/\S+: (\d+) of (\d+) board changes pushed", out, re.M)
    assert pushed, out
    assert pushed[1] == pushed[2] == "27", out

    received = re.search(
        r"^collector received \(its debug exporter\): "
        r"(\d+) spans, (\d+) metric data points, (\d+) log records$",
        out,
        re.M,
    )
    assert received, out
    spans, points, logs = map(int, received.groups())
    assert spans >= total, out  # at least one server span per request
    assert points > 0, out
    assert logs >= total, out  # at least one request line per request: the counts have settled

    prom = re.search(
        r"^Prometheus: http_requests_total (\d+) scraped .*, (\d+) through the collector$", out, re.M
    )
    assert prom, out
    assert int(prom[1]) == int(prom[2]) == total, out
    # errors_total: the one 500, and every 4xx (SENTRY_CAPTURE_4XX defaults to all since
    # issue 19; each of the demo's 4xx comes from a matched route).
    client_errors = sum(int(n) for status, n in by_status.items() if status.startswith("4"))
    assert re.search(
        rf"ticket_transitions_total 17, errors_total {1 + client_errors}, "
        r"active_agents_count coder=1, reviewer=1",
        out,
    ), out

    # One exemplar (issue 24): Prometheus stored it, and it leads to the request's trace as
    # the collector delivered it, its server span first, named after the exemplar's series.
    exemplar = re.search(
        r"^exemplar \(Prometheus /api/v1/query_exemplars: http_request_duration_seconds_bucket"
        r'\{method="(\w+)",path="(\S+)",le="\S+"\}\): [\d.]+ s, trace [0-9a-f]{32} span [0-9a-f]{16}\n'
        r"  the trace it leads to, as the collector delivered it \((\d+) spans\):\n"
        r"    (.+) \(Server\)$",
        out,
        re.M,
    )
    assert exemplar, out
    method, path, count, root = exemplar.groups()
    assert root == f"{method} {path}", out
    assert int(count) >= 1

    logs_at = out.index("a few of the app's JSON log lines")
    lines = [json.loads(line) for line in out[logs_at:].splitlines()[1:6]]
    assert [line["message"] for line in lines][:4] == [
        "User created ticket",
        "Ticket moved",
        "Invalid ticket transition",
        "Rate limit exceeded",
    ]
    assert all(line["service"] == "cf-kanban" and "trace_id" in line for line in lines)

    assert re.search(r"^health \(/api/health\): 200 healthy: database healthy .*redis healthy", out, re.M), (
        out
    )
    assert f"http://127.0.0.1:{port}/api/metrics" in out
    assert re.search(r"Prometheus UI +http://127\.0\.0\.1:\d+/graph", out)
    assert re.search(r"collector health +http://127\.0\.0\.1:\d+/", out)


def test_demo_once_twice_in_a_row(services: Services) -> None:
    prometheus_binary()  # installed, or the test fails in CI and skips elsewhere
    collector = ROOT / "collector" / "bin" / "otelcol-cfk"
    if not os.access(collector, os.X_OK):
        unavailable("collector/bin/otelcol-cfk is not built (make collector)")

    port = free_port()  # not 3000: a developer's own demo may be running there
    for _ in range(2):  # the second run finds the schema, the rows and the ports of the first
        code, out = run_demo(port)
        assert code == 0, out
        assert "FALLBACK" not in out
        check_summary(out, port)
        urls = re.findall(r"http://127\.0\.0\.1:(\d+)/", out)
        assert not [p for p in set(urls) if listening(int(p))], f"still listening after exit:\n{out}"
        tmp = re.search(r"^logs of this run: (\S+)/\{", out, re.M)
        assert tmp, out
        assert not Path(tmp[1]).exists()


def test_demo_keeps_running_until_ctrl_c(services: Services, tmp_path: Path) -> None:
    prometheus_binary()
    port = free_port()
    out_path = tmp_path / "demo.out"
    with out_path.open("w") as out:
        demo = subprocess.Popen(
            [sys.executable, str(DEMO), "--port", str(port)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 60
        while "Ctrl-C stops it all" not in out_path.read_text():
            assert demo.poll() is None, out_path.read_text()
            assert time.monotonic() < deadline, out_path.read_text()
            time.sleep(0.2)
        assert listening(port)  # still serving after the summary
        demo.send_signal(signal.SIGINT)
        assert demo.wait(30) == 0
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    out = out_path.read_text()
    assert "stopping the app, Prometheus and the collector" in out
    urls = re.findall(r"http://127\.0\.0\.1:(\d+)/", out)
    assert not [p for p in set(urls) if listening(int(p))], out


def load_demo(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """demo.py as a module (it is a script, not part of a package)."""
    spec = importlib.util.spec_from_file_location("kanban_demo", DEMO)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "kanban_demo", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def fake_services(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, demo: ModuleType, script: str) -> None:
    """The demo's ROOT with a scripts/services that runs ``script`` (shell) instead."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "services").write_text(f"#!/bin/sh\n{script}")
    (scripts / "services").chmod(0o755)
    monkeypatch.setattr(demo, "ROOT", tmp_path)


def test_without_apt_the_demo_announces_its_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """scripts/services failing (not root, offline): the URLs of the environment, announced."""
    demo = load_demo(monkeypatch)
    fake_services(
        tmp_path, monkeypatch, demo, "echo 'E: Could not open lock file - are you root?' >&2\nexit 100\n"
    )

    monkeypatch.setenv("DATABASE_URL", "postgresql://u:p@127.0.0.1:5432/db")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/0")
    assert demo.start_services() == {
        "DATABASE_URL": "postgresql://u:p@127.0.0.1:5432/db",
        "REDIS_URL": "redis://127.0.0.1:6379/0",
    }
    out = capsys.readouterr().out
    assert "*** demo FALLBACK: scripts/services could not start PostgreSQL and Redis" in out
    assert "are you root?" in out

    monkeypatch.delenv("DATABASE_URL")
    with pytest.raises(demo.DemoError, match="needs root and a network"):
        demo.start_services()


def test_a_taken_port_is_named_with_its_holder(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 19 point 9: the demo names the port, what holds it, and the port it takes."""
    demo = load_demo(monkeypatch)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        chosen = demo.port_or_free(taken, "the app")
    assert chosen != taken
    out = capsys.readouterr().out
    assert f"demo: port {taken} is held by python" in out, out
    assert f"(pid {os.getpid()}, " in out
    assert f"the app uses {chosen} instead" in out
    assert demo.port_or_free(chosen, "the app") == chosen  # free again: kept, and nothing said
    assert capsys.readouterr().out == ""


def test_the_ports_scripts_services_chose_are_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    demo = load_demo(monkeypatch)
    fake_services(
        tmp_path,
        monkeypatch,
        demo,
        "echo 'scripts/services: port 55432 is held by postgres (pid 7, /usr/bin/postgres);"
        " PostgreSQL uses 55433 instead' >&2\n"
        "echo 'scripts/services: PostgreSQL on 127.0.0.1:55433, Redis on 127.0.0.1:56379' >&2\n"
        "echo export DATABASE_URL=postgresql://u:p@127.0.0.1:55433/db\n"
        "echo export REDIS_URL=redis://127.0.0.1:56379/0\n",
    )
    assert demo.start_services()["DATABASE_URL"] == "postgresql://u:p@127.0.0.1:55433/db"
    out = capsys.readouterr().out
    assert "demo: scripts/services: port 55432 is held by postgres (pid 7, /usr/bin/postgres)" in out
    assert "demo: scripts/services: PostgreSQL on 127.0.0.1:55433, Redis on 127.0.0.1:56379" in out
