"""``make demo``: CF-Kanban with its whole telemetry path, on this machine, on 127.0.0.1.

Starts PostgreSQL and Redis (``scripts/services``), our collector (``collector/run`` with
``CFK_BACKENDS=prometheus,debug``), Debian's Prometheus scraping both the app's
``/api/metrics`` (the monitoring document's ``cf-kanban`` job) and the collector's
Prometheus exporter, and the example app under ``opentelemetry-instrument uvicorn`` on port
3000. It then drives a short burst of traffic, prints what arrived where, and keeps
everything running until Ctrl-C (``--once``: exits after the summary). Everything it
started is stopped on the way out, and the leftovers of a run that was killed are stopped
on the next start.

    python examples/kanban/demo.py [--once] [--port 3000]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STATE = Path(os.environ.get("CFK_STATE", "/var/tmp/cfk-otel")) / "demo"  # noqa: S108  (as scripts/services)
# Variables of the developer's shell that would change what the demo shows.
LEAKY = ("OTEL_", "SENTRY_", "CFK_", "DD_", "LOKI_", "CLOUDWATCH_", "LOG_", "METRICS_", "HEALTH_")


def say(message: str) -> None:
    print(f"demo: {message}", flush=True)


def fallback(message: str) -> None:
    """A degraded mode, announced so that nobody mistakes it for the real thing."""
    print(f"\n*** demo FALLBACK: {message}\n", flush=True)


class DemoError(Exception):
    """Something the demo needs is missing; the message says what to do."""


# The app's service.instance.id. The collector relays it as exported_instance, which tells
# this run's series apart from those of any other cf-kanban exporting to the same port
# (another run's app still retrying its last batches, say).
APP_INSTANCE = f"cf-kanban-demo-{uuid.uuid4()}"


def clean_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(LEAKY)}
    env.update(values)
    return env


def port_holder(port: int) -> str:
    """What listens on ``port``: "name (pid N, /path/to/executable)", as scripts/services says
    it; never the arguments (they may hold a password)."""
    pid = ""
    name = ""
    ss = shutil.which("ss")
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        line = subprocess.run(
            [ss or "ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
        if match := re.search(r'users:\(\("([^"]+)",pid=(\d+)', line):
            name, pid = match.groups()
    if not pid:
        pid = _pid_from_proc(port)
    if not pid:
        return f"a process this user cannot see (sudo ss -ltnp 'sport = :{port}' names it)"
    proc = Path("/proc") / pid
    with contextlib.suppress(OSError):
        name = name or (proc / "comm").read_text().strip()
    try:
        exe = f", {os.readlink(proc / 'exe')}"
    except OSError:
        exe = ""
    return f"{name or '?'} (pid {pid}{exe})"


def _pid_from_proc(port: int) -> str:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for row in Path(table).read_text().splitlines()[1:]:
                fields = row.split()
                if fields[3] == "0A" and fields[1].endswith(f":{port:04X}"):
                    inodes.add(f"socket:[{fields[9]}]")
    for fd in Path("/proc").glob("[0-9]*/fd/*") if inodes else ():
        with contextlib.suppress(OSError):
            if os.readlink(fd) in inodes:
                return fd.parts[2]
    return ""


def port_or_free(preferred: int, what: str = "") -> int:
    """``preferred`` when it can be bound on 127.0.0.1, else a free port; when ``what`` (the
    listener, for the message) is given, says which port was taken, by what, and the new one."""
    for port in (preferred, 0):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            chosen = int(s.getsockname()[1])
        if chosen != preferred and what:
            say(f"port {preferred} is held by {port_holder(preferred)}; {what} uses {chosen} instead")
        return chosen
    raise DemoError("no free port on 127.0.0.1")


def http(url: str, method: str = "GET", body: object = None, user: str | None = None) -> tuple[int, Any]:
    """One request; returns the status and the decoded JSON body (or None)."""
    headers = {"content-type": "application/json"}
    if user:
        headers["X-User-Id"] = user
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, None


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if predicate():
                return True
        time.sleep(interval)
    return False


# --- the processes -------------------------------------------------------------------------


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Stack:
    """The processes this run started, recorded in ``STATE`` until they are stopped."""

    tmp: Path
    processes: list[Process] = field(default_factory=list)

    @property
    def record(self) -> Path:
        return STATE / f"{os.getpid()}.json"

    def start(self, name: str, command: list[str], env: dict[str, str], cwd: Path = ROOT) -> Process:
        log = self.tmp / f"{name}.log"
        with log.open("wb") as out:
            # A session of its own: Ctrl-C reaches the demo only, which stops the app first
            # (so that it flushes its telemetry into a collector that is still running).
            popen = subprocess.Popen(
                command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        process = Process(name, popen, log)
        self.processes.append(process)
        STATE.mkdir(parents=True, exist_ok=True)
        started = {
            "demo": started_at(os.getpid()),
            "tmp": str(self.tmp),
            "processes": {p.name: (p.popen.pid, started_at(p.popen.pid)) for p in self.processes},
        }
        self.record.write_text(json.dumps(started))
        return process

    def stop(self) -> None:
        """Stop in reverse start order: the app (it flushes), Prometheus, then the collector."""
        for process in reversed(self.processes):
            stop_group(process.popen.pid, lambda p=process: not p.alive())
        self.record.unlink(missing_ok=True)


def stop_group(pid: int, gone: Callable[[], bool], timeout: float = 15) -> None:
    """SIGTERM the process group ``pid`` leads, SIGKILL it after ``timeout`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        if wait_until(gone, timeout, interval=0.05):
            return


def started_at(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot), or None when it is gone or a zombie.

    Recorded with each pid, so that a pid reused by another process is never signalled.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[19] if fields[0] != "Z" else None


def stop_leftovers() -> None:
    """Stop what an earlier demo started if that demo died without stopping it (kill -9)."""
    for record in STATE.glob("*.json") if STATE.is_dir() else ():
        with contextlib.suppress(ValueError, KeyError, OSError):
            started = json.loads(record.read_text())
            if started_at(int(record.stem)) == started["demo"]:
                continue  # another demo, still running: not ours to stop
            for name, (pid, since) in reversed(started["processes"].items()):
                if started_at(pid) == since:
                    say(f"stopping {name} (pid {pid}), left running by an earlier demo")
                    stop_group(pid, lambda pid=pid: started_at(pid) is None)
            tmp = Path(started["tmp"])
            if tmp.parent == Path(tempfile.gettempdir()) and tmp.name.startswith("cfk-demo-"):
                shutil.rmtree(tmp, ignore_errors=True)
        record.unlink(missing_ok=True)


def start_services() -> dict[str, str]:
    """DATABASE_URL and REDIS_URL: scripts/services, else the ones already in the environment."""
    try:
        done = subprocess.run(
            [str(ROOT / "scripts" / "services"), "start"],
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        stderr = getattr(exc, "stderr", "") or ""
        reason = stderr.strip().splitlines()[-1] if stderr.strip() else str(exc)
        if os.environ.get("DATABASE_URL") and os.environ.get("REDIS_URL"):
            fallback(
                f"scripts/services could not start PostgreSQL and Redis ({reason}); "
                "using DATABASE_URL and REDIS_URL from your environment instead"
            )
            return {"DATABASE_URL": os.environ["DATABASE_URL"], "REDIS_URL": os.environ["REDIS_URL"]}
        raise DemoError(
            f"PostgreSQL and Redis could not be installed or started ({reason}).\n"
            "  scripts/services installs them with apt-get, which needs root and a network.\n"
            "  Either run `sudo scripts/services install` once, or start PostgreSQL and Redis\n"
            "  yourself and run: DATABASE_URL=postgresql://... REDIS_URL=redis://... make demo"
        ) from None
    for line in done.stderr.splitlines():  # a port taken by something else, the ports chosen
        if line.startswith("scripts/services: "):
            say(line)
    return dict(
        line.removeprefix("export ").split("=", 1) for line in done.stdout.splitlines() if "=" in line
    )


@dataclass(frozen=True)
class Ports:
    app: int
    grpc: int = field(default_factory=lambda: port_or_free(4317, "the collector's OTLP/gRPC receiver"))
    otlp_http: int = field(default_factory=lambda: port_or_free(4318, "the collector's OTLP/HTTP receiver"))
    health: int = field(default_factory=lambda: port_or_free(13133, "the collector's health check"))
    exporter: int = field(default_factory=lambda: port_or_free(8889, "the collector's Prometheus exporter"))
    prometheus: int = field(default_factory=lambda: port_or_free(9090, "Prometheus"))


def start_collector(stack: Stack, ports: Ports) -> Process:
    """collector/run with the prometheus and debug backends, on loopback ports."""
    env = clean_env(
        CFK_BACKENDS="prometheus,debug",
        CFK_OTLP_GRPC_ENDPOINT=f"127.0.0.1:{ports.grpc}",
        CFK_OTLP_HTTP_ENDPOINT=f"127.0.0.1:{ports.otlp_http}",
        CFK_HEALTH_CHECK_ENDPOINT=f"127.0.0.1:{ports.health}",
        CFK_PROMETHEUS_ENDPOINT=f"127.0.0.1:{ports.exporter}",
        CFK_STORAGE_DIR=str(stack.tmp / "collector-storage"),
        CFK_BATCH_TIMEOUT="200ms",
        # Every span in its log, so the summary can show the trace an exemplar leads to.
        CFK_DEBUG_VERBOSITY="detailed",
    )
    built = ROOT / "collector" / "bin" / "otelcol-cfk"
    if os.access(built, os.X_OK):  # `make collector` linked it; otherwise run asks build.sh
        env["CFK_COLLECTOR_BIN"] = str(built)
    collector = stack.start("collector", [str(ROOT / "collector" / "run")], env)
    health = f"http://127.0.0.1:{ports.health}/"
    if not wait_until(lambda: collector.alive() and http(health)[0] == 200, timeout=60):
        raise DemoError(f"the collector did not become healthy:\n{collector.tail()}")
    return collector


PROMETHEUS_CONFIG = """\
# Written by the demo. The document's scrape job, with a 1 s interval (15 s in the
# document) so that the summary is ready at once.
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: cf-kanban              # the app's own endpoint
    metrics_path: /api/metrics
    static_configs: [{{targets: ['127.0.0.1:{app}']}}]
  - job_name: otel-collector         # what the app pushed over OTLP, re-served by the collector
    honor_labels: false              # as deploy/: the app's job/instance become exported_*
    static_configs: [{{targets: ['127.0.0.1:{exporter}']}}]
"""


def start_prometheus(stack: Stack, ports: Ports) -> Process | None:
    binary = shutil.which("prometheus")
    if binary is None:
        fallback(
            "Prometheus is not installed (apt-get install prometheus, as root); "
            "the demo runs without it: nothing scrapes /api/metrics or the collector"
        )
        return None
    config = stack.tmp / "prometheus.yml"
    config.write_text(PROMETHEUS_CONFIG.format(app=ports.app, exporter=ports.exporter))
    prometheus = stack.start(
        "prometheus",
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={stack.tmp / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{ports.prometheus}",
            "--enable-feature=exemplar-storage",  # the app's OpenMetrics exemplars
        ],
        clean_env(),
    )
    ready = f"http://127.0.0.1:{ports.prometheus}/-/ready"
    if not wait_until(lambda: prometheus.alive() and http(ready)[0] == 200, timeout=60):
        raise DemoError(f"Prometheus did not become ready:\n{prometheus.tail()}")
    return prometheus


def start_app(stack: Stack, ports: Ports, services: dict[str, str]) -> Process:
    """The example app as production runs it: opentelemetry-instrument uvicorn, no code."""
    env = clean_env(
        **services,
        SERVICE_NAME="cf-kanban",
        SERVICE_VERSION="1.0.0",
        SERVICE_ENVIRONMENT="demo",
        OTEL_RESOURCE_ATTRIBUTES=f"service.instance.id={APP_INSTANCE}",
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{ports.otlp_http}",  # http/protobuf, the default
        # Export every second instead of every 5 s (spans, logs) and 60 s (metrics).
        OTEL_BSP_SCHEDULE_DELAY="500",
        OTEL_BLRP_SCHEDULE_DELAY="500",
        OTEL_METRIC_EXPORT_INTERVAL="1000",
    )
    command = [
        str(BIN / "opentelemetry-instrument"),
        str(BIN / "uvicorn"),
        "kanban.app:app",
        "--app-dir",
        str(ROOT / "examples"),
        "--host",
        "127.0.0.1",
        "--port",
        str(ports.app),
    ]
    app = stack.start("app", command, env)
    ready = f"http://127.0.0.1:{ports.app}/api/health/ready"
    if not wait_until(lambda: app.alive() and http(ready)[0] == 200, timeout=60):
        raise DemoError(f"the app did not become ready:\n{app.tail()}")
    return app


# --- the traffic ------------------------------------------------------------------------------


class BoardListener(threading.Thread):
    """A websocket client of /ws/boards/{board}, collecting the events pushed to it."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.events: collections.Counter[str] = collections.Counter()
        self.connected = threading.Event()
        self.done = threading.Event()

    def run(self) -> None:
        with contextlib.suppress(OSError, ConnectionClosed), ws_connect(self.url) as ws:
            self.connected.set()
            while not self.done.is_set():
                with contextlib.suppress(TimeoutError):
                    self.events[json.loads(ws.recv(timeout=0.2))["event"]] += 1


@dataclass
class Traffic:
    """The burst of requests, tallied by status.

    Users are named per run (``ann-<run>``): each run starts with fresh rate-limit
    buckets, so that runs in quick succession print the same summary.
    """

    base: str
    run: str
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    board_changes: int = 0  # successful writes, each of which the websocket client should see

    def request(self, path: str, method: str, body: object, user: str) -> tuple[int, Any]:
        status, data = http(self.base + path, method, body, f"{user}-{self.run}")
        self.statuses[status] += 1
        return status, data

    def call(self, path: str, method: str = "GET", body: object = None, user: str = "ann") -> Any:
        return self.request(path, method, body, user)[1]

    def status(self, path: str, method: str = "GET", body: object = None, user: str = "ann") -> int:
        return self.request(path, method, body, user)[0]

    def change(self, path: str, method: str, body: object = None, user: str = "ann") -> Any:
        """A write that changes the board: counted when it succeeds."""
        status, data = self.request(path, method, body, user)
        self.board_changes += 200 <= status < 300
        return data


def drive(base: str, run: str) -> tuple[Traffic, BoardListener]:
    """A morning on the board ``demo-<run>``: tickets created and moved, agents, a bug, a greedy bot."""
    board = f"demo-{run}"
    t = Traffic(base, run)
    listener = BoardListener(base.replace("http://", "ws://") + f"/ws/boards/{board}")
    listener.start()
    listener.connected.wait(10)
    # The socket counts once the server has joined it to the board.
    wait_until(lambda: (t.call(f"/api/boards/{board}", user="viewer") or {}).get("watchers") == 1, timeout=10)

    for agent in t.call("/api/agents", user="ops") or []:  # agents an earlier run left running
        t.call(f"/api/agents/{agent['id']}/finish", "POST", user="ops")

    titles = ["Login page", "Password reset", "Board filters", "Dark mode", "CSV export", "Audit log"]
    tickets = [t.change("/api/tickets", "POST", {"boardId": board, "title": title}) for title in titles]
    tickets += [
        t.change("/api/tickets", "POST", {"boardId": board, "title": title, "assignee": "bob"}, user="bob")
        for title in ("Flaky test", "Upgrade asyncpg")
    ]
    if not all(isinstance(ticket, dict) and "id" in ticket for ticket in tickets):
        raise DemoError(f"the app did not create the tickets: {tickets}")
    ids = [ticket["id"] for ticket in tickets]
    t.call(f"/api/boards/{board}")  # cache miss, then a hit
    t.call(f"/api/boards/{board}")
    for ticket_id in ids:
        t.call(f"/api/tickets/{ticket_id}", user="bob")

    for ticket_id in ids:
        t.change(f"/api/tickets/{ticket_id}/transitions", "POST", {"to": "doing"})
    for ticket_id in ids[:5]:
        t.change(f"/api/tickets/{ticket_id}/transitions", "POST", {"to": "review"})
    for ticket_id in ids[:3]:
        t.change(f"/api/tickets/{ticket_id}/transitions", "POST", {"to": "done"}, user="bob")
    t.change(f"/api/tickets/{ids[3]}/transitions", "POST", {"to": "doing"}, user="bob")  # changes requested
    t.change(f"/api/tickets/{ids[0]}/transitions", "POST", {"to": "todo"})  # 409: done is done
    t.change(f"/api/tickets/{ids[6]}/transitions", "POST", {"to": "done"}, user="bob")  # 409: not reviewed
    t.change(f"/api/tickets/{ids[5]}", "PATCH", {"assignee": "ann", "description": "Keep 90 days"})
    t.change(f"/api/tickets/{ids[7]}", "DELETE", user="bob")
    t.call("/api/tickets/999999999", user="bob")  # 404

    agents = [
        t.call("/api/agents", "POST", {"type": kind, "ticketId": ticket_id}, user="ops")
        for kind, ticket_id in (
            ("planner", ids[4]),
            ("coder", ids[5]),
            ("coder", ids[6]),
            ("reviewer", ids[3]),
        )
    ]
    for agent in agents[:2]:
        t.call(f"/api/agents/{agent['id']}/finish", "POST", user="ops")

    t.call("/api/debug/fail")  # 500, on purpose
    for _ in range(1000):  # a bot polling far too often, until the rate limit stops it
        if t.status(f"/api/boards/{board}", user="board-bot") == 429:
            break

    wait_until(lambda: sum(listener.events.values()) >= t.board_changes, timeout=5)
    listener.done.set()
    listener.join(5)
    return t, listener


# --- what arrived -----------------------------------------------------------------------------

DEBUG_COUNTS = {
    "spans": re.compile(r'"spans": (\d+)'),
    "metric data points": re.compile(r'"data points": (\d+)'),
    "log records": re.compile(r'"log records": (\d+)'),
}


def collector_counts(collector: Process) -> dict[str, int]:
    """What the collector's debug exporter reported receiving, summed over its log lines."""
    text = collector.log.read_text(errors="replace")
    return {name: sum(int(n) for n in pattern.findall(text)) for name, pattern in DEBUG_COUNTS.items()}


def promql(port: int, query: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    status, data = http(url)
    return list(data["data"]["result"]) if status == 200 else []


def promql_total(port: int, query: str) -> float:
    return sum(float(r["value"][1]) for r in promql(port, query))


def app_log_lines(app: Process, wanted: tuple[str, ...]) -> list[str]:
    """The first JSON line of the app for each wanted message (prefix), in that order."""
    found: dict[str, str] = {}
    for line in app.log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            message = json.loads(line).get("message", "")
            for prefix in wanted:
                if prefix not in found and message.startswith(prefix):
                    found[prefix] = line
    return [found[p] for p in wanted if p in found]


def app_series(ports: Ports) -> str:
    """The label matcher of the series Prometheus scrapes from the app itself."""
    return f'job="cf-kanban", instance="127.0.0.1:{ports.app}"'


def print_prometheus(ports: Ports, served: int) -> bool:
    """The document's metrics in Prometheus; True when both paths counted every request."""
    direct = f"sum(http_requests_total{{{app_series(ports)}}})"
    pushed = f'sum(http_requests_total{{job="otel-collector", exported_instance="{APP_INSTANCE}"}})'

    def totals() -> tuple[float, float]:
        return promql_total(ports.prometheus, direct), promql_total(ports.prometheus, pushed)

    wait_until(lambda: totals() == (served, served), timeout=20, interval=0.5)
    scraped, via_collector = totals()
    print(
        f"Prometheus: http_requests_total {scraped:g} scraped from the app's /api/metrics, "
        f"{via_collector:g} through the collector"
    )
    agents = promql(ports.prometheus, f"active_agents_count{{{app_series(ports)}}} > 0")
    gauges = ", ".join(f"{r['metric']['type']}={float(r['value'][1]):g}" for r in agents)
    transitions = promql_total(ports.prometheus, f"sum(ticket_transitions_total{{{app_series(ports)}}})")
    errors = promql_total(ports.prometheus, f"sum(errors_total{{{app_series(ports)}}})")
    print(
        f"            ticket_transitions_total {transitions:g}, errors_total {errors:g}, "
        f"active_agents_count {gauges or 'none'}"
    )
    return scraped == via_collector == served


# One span as the collector's debug exporter prints it (verbosity detailed).
COLLECTOR_SPAN = re.compile(
    r"Trace ID\s*: ([0-9a-f]{32})\s+Parent ID\s*: ([0-9a-f]*)\s+ID\s*: ([0-9a-f]{16})\s+"
    r"Name\s*: ([^\n]*)\s+Kind\s*: (\w+)"
)
EXEMPLAR = re.compile(
    r"^http_request_duration_seconds_bucket\{(.*)\} \S+"
    r' # \{trace_id="([0-9a-f]{32})",span_id="([0-9a-f]{16})"\} (\S+)',
    re.M,
)


def slowest_exemplar(ports: Ports, prom: bool, since: float) -> tuple[str, str, str, float] | None:
    """The exemplar of the slowest request's bucket: (where from and its series, trace id,
    span id, seconds), from Prometheus' exemplar storage, or the app's OpenMetrics scrape."""
    found: list[tuple[str, str, str, float]] = []

    def from_prometheus() -> bool:
        query = urllib.parse.urlencode(
            {
                "query": f"http_request_duration_seconds_bucket{{{app_series(ports)}}}",
                "start": f"{since:.3f}",
                "end": f"{time.time() + 1:.3f}",
            }
        )
        _, data = http(f"http://127.0.0.1:{ports.prometheus}/api/v1/query_exemplars?{query}")
        for series in (data or {}).get("data") or []:
            labels = series["seriesLabels"]
            where = f'{{method="{labels.get("method")}",path="{labels.get("path")}",le="{labels.get("le")}"}}'
            for exemplar in series["exemplars"]:
                ids = exemplar["labels"]
                found.append((where, ids["trace_id"], ids["span_id"], float(exemplar["value"])))
        return bool(found)

    if prom:
        wait_until(from_prometheus, timeout=10, interval=0.5)
        source = "Prometheus /api/v1/query_exemplars"
    else:
        request = urllib.request.Request(
            f"http://127.0.0.1:{ports.app}/api/metrics", headers={"Accept": "application/openmetrics-text"}
        )
        with contextlib.suppress(OSError), urllib.request.urlopen(request, timeout=10) as response:
            text = response.read().decode()
            found = [(f"{{{m[1]}}}", m[2], m[3], float(m[4])) for m in EXEMPLAR.finditer(text)]
        source = "the app's OpenMetrics scrape"
    if not found:
        return None
    where, trace_id, span_id, seconds = max(found, key=lambda e: e[3])
    return f"{source}: http_request_duration_seconds_bucket{where}", trace_id, span_id, seconds


def print_exemplar(ports: Ports, prom: bool, collector: Process, since: float) -> bool:
    """One exemplar and the trace it leads to, its spans as the collector delivered them."""
    exemplar = slowest_exemplar(ports, prom, since)
    if exemplar is None:
        print("exemplar: none found")
        return False
    where, trace_id, span_id, seconds = exemplar
    print(f"exemplar ({where}): {seconds:.4f} s, trace {trace_id} span {span_id}")
    spans: dict[str, tuple[str, str, str]] = {}  # span id -> (parent id, name, kind)

    def delivered() -> bool:
        text = collector.log.read_text(errors="replace")
        for found in COLLECTOR_SPAN.finditer(text):
            if found[1] == trace_id:
                spans[found[3]] = (found[2], found[4].strip(), found[5])
        return span_id in spans

    wait_until(delivered, timeout=10, interval=0.5)
    if span_id not in spans:
        print(f"  trace {trace_id}: not in the collector's output")
        return False
    print(f"  the trace it leads to, as the collector delivered it ({len(spans)} spans):")

    def show(parent: str, depth: int) -> None:
        for child, (above, name, kind) in sorted(spans.items(), key=lambda item: item[1][1]):
            if above == parent:
                print(f"    {'  ' * depth}{name} ({kind})")
                show(child, depth + 1)

    show(spans[span_id][0], 0)  # from the exemplar's span: the request's server span
    return True


def summary(
    ports: Ports,
    board: str,
    traffic: Traffic,
    listener: BoardListener,
    collector: Process,
    app: Process,
    prom: bool,
    since: float = 0.0,
) -> bool:
    """Print what the run did and where it can be seen; False when telemetry is missing."""
    base = f"http://127.0.0.1:{ports.app}"
    served = sum(traffic.statuses.values())
    ok = True
    print("\n=== CF-Kanban demo: summary ===")
    by_status = "  ".join(f"{code}: {n}" for code, n in sorted(traffic.statuses.items()))
    print(f"requests served: {served}  by status  {by_status}")
    events = ", ".join(f"{name} {n}" for name, n in sorted(listener.events.items()))
    print(
        f"websocket /ws/boards/{board}: {sum(listener.events.values())} of {traffic.board_changes} "
        f"board changes pushed to a listening client ({events})"
    )

    # The app exports spans and logs every 500 ms and the collector batches for 200 ms:
    # their counts are final once they have not moved for a second. (Metrics are exported
    # every second for as long as the app runs: their count only grows.)
    seen: list[Any] = [None, time.monotonic()]

    def settled() -> bool:
        counts = collector_counts(collector)
        final = (counts["spans"], counts["log records"])
        if final != seen[0]:
            seen[:] = [final, time.monotonic()]
            return False
        return counts["spans"] >= served and all(counts.values()) and time.monotonic() - seen[1] >= 1.0

    wait_until(settled, timeout=20)
    counts = collector_counts(collector)
    print("collector received (its debug exporter): " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    ok &= all(counts.values())

    if prom:
        ok &= print_prometheus(ports, served)
    ok &= print_exemplar(ports, prom, collector, since)
    print("a few of the app's JSON log lines (stdout):")
    wanted = (
        "User created ticket",
        "Ticket moved",
        "Invalid ticket transition",
        "Rate limit exceeded",
        "GET /api/debug/fail",
    )
    for line in app_log_lines(app, wanted):
        print(f"  {line}")
    status, health = http(f"{base}/api/health")
    checks = ", ".join(
        f"{c['name']} {c['status']} ({c['latencyMs']} ms)" for c in (health or {}).get("checks", [])
    )
    print(f"health (/api/health): {status} {(health or {}).get('status')}: {checks}")
    print("look at:")
    urls = [
        ("board (JSON)", f"{base}/api/boards/{board}"),
        ("API docs", f"{base}/docs"),
        ("app metrics", f"{base}/api/metrics"),
        ("health", f"{base}/api/health"),
        ("collector health", f"http://127.0.0.1:{ports.health}/"),
        ("collector metrics", f"http://127.0.0.1:{ports.exporter}/metrics"),
    ]
    if prom:
        query = urllib.parse.quote(f"sum by (path, status) (http_requests_total{{{app_series(ports)}}})")
        urls.append(("Prometheus UI", f"http://127.0.0.1:{ports.prometheus}/graph?g0.expr={query}&g0.tab=1"))
    for name, url in urls:
        print(f"  {name:<18} {url}")
    return ok


# --- main -----------------------------------------------------------------------------------


@contextlib.contextmanager
def stopping_on_signals() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP (a closed terminal) end the demo with the clean-up.

    SIGINT is set explicitly: a shell starts background jobs with it ignored.
    """

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--once", action="store_true", help="exit after the summary")
    parser.add_argument("--port", type=int, default=3000, help="the app's port (default 3000)")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="cfk-demo-"))
    stack = Stack(tmp)
    try:
        with stopping_on_signals():
            stop_leftovers()
            say("starting PostgreSQL and Redis (scripts/services)")
            services = start_services()
            ports = Ports(port_or_free(args.port, "the app"))
            say(
                f"starting the collector (CFK_BACKENDS=prometheus,debug, OTLP on 127.0.0.1:{ports.otlp_http})"
            )
            collector = start_collector(stack, ports)
            say("starting Prometheus")
            prometheus = start_prometheus(stack, ports)
            say(f"starting the app: opentelemetry-instrument uvicorn kanban.app:app --port {ports.app}")
            app = start_app(stack, ports, services)
            run = uuid.uuid4().hex[:6]
            board = f"demo-{run}"
            say(f"driving traffic on board {board}")
            since = time.time() - 1
            traffic, listener = drive(f"http://127.0.0.1:{ports.app}", run)
            ok = summary(ports, board, traffic, listener, collector, app, prometheus is not None, since)
            print(f"logs of this run: {tmp}/{{app,collector,prometheus}}.log (removed on exit)")
            if not ok:
                say("some telemetry did not arrive; see the logs above")
            if args.once:
                return 0 if ok else 1
            print("\neverything keeps running; Ctrl-C stops it all", flush=True)
            while all(p.alive() for p in stack.processes):
                time.sleep(0.5)
            dead = [p for p in stack.processes if not p.alive()]
            say(f"{dead[0].name} exited on its own:\n{dead[0].tail()}")
            return 1
    except KeyboardInterrupt:
        print()
        return 0
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        say("stopping the app, Prometheus and the collector")
        stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
