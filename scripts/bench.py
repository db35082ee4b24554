#!/usr/bin/env python3
"""``make bench``: what telemetry costs the app, as ratios against the bare app in one run.

Scenarios, interleaved round by round so drift hits them all alike:
  bare                  uvicorn app:app, no telemetry
  upstream              opentelemetry-instrument with the stock distro and the stock
                        OpenTelemetryMiddleware, OTLP traces + metrics + logs
  cfk_otel              opentelemetry-instrument with cfk_otel, all three signals, 100% sampling
  cfk_otel_sdk          the same on the SDK reference path (CFK_OTEL_NATIVE=false): our
                        spans recorded by the SDK's tracer rather than the compiled core
  cfk_otel_down         cfk_otel with the collector down (connection refused)
  NAME@base             NAME run from another checkout's venv (--base DIR): an A/B of a change,
                        e.g. --base ../base/.venv/bin --scenarios bare,cfk_otel,cfk_otel@base

Then, on the hello route, a ladder that shows where cfk_otel's cost goes, side by side:
  empty_middleware      an empty pure-ASGI middleware (examples/bench/app_floor.py)
  cfk_unsampled         cfk_otel with every trace sampled out, the logs exporter off and no
                        request line: the middleware, its route and metrics, no span recorded
  cfk_spans             ... and the spans exported over OTLP
  cfk_spans_stdout_line ... and the request line on stdout
  cfk_otel              ... and the request line over OTLP too (the default set-up)

Two routes: /hello and /boards/{id} (a PostgreSQL query plus a Redis call, about 1 ms).
The server is pinned to CPU 0; wrk, the OTLP receiver, PostgreSQL and Redis to CPU 1. Reported: throughput
and its ratio to bare, server CPU per request, p50/p99 latency at a fixed offered load,
peak RSS; for cfk_otel_down also RSS over a minute of load and the SIGTERM exit time.
Writes docs/benchmarks.json and docs/benchmarks.md; the micro-benchmarks
(scripts/microbench.py, which ``make bench`` runs next) write their own docs/microbenchmarks.*.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
APP_DIR = ROOT / "examples" / "bench"
BIN = Path(sys.executable).parent
# --base: another checkout's venv bin directory; a scenario named "<name>@base" runs from it
# (its cfk_otel, its core), beside the same scenario from this one, for an A/B of a change.
BASE_BIN: list[Path] = []
TICKS = os.sysconf("SC_CLK_TCK")
ROUTES = {"hello": "/hello", "work": "/boards/7"}
RATES = {"hello": 400, "work": 200}  # fixed offered load for the latency runs, requests/s
# The ladder's steps (see the module docstring), each adding one thing to the one before.
LADDER = {
    "bare": "the app alone",
    "empty_middleware": "an empty pure-ASGI middleware (times the request, reads the status)",
    "cfk_unsampled": "cfk_otel's middleware: route and request metrics, the trace sampled out",
    "cfk_spans": "the server span recorded and exported over OTLP (the compiled core)",
    "cfk_spans_stdout_line": "the request line, as JSON on stdout",
    "cfk_otel": "the request line over OTLP too (the default set-up)",
}
# cfk_otel's settings per ladder step.
_STEPS = {
    # Sampled out rather than the exporter off: without an OTLP exporter the spans would move
    # onto the SDK's tracer (the compiled core exports its own), and the step would measure it.
    "cfk_unsampled": {
        "OTEL_TRACES_SAMPLER": "always_off",
        "OTEL_LOGS_EXPORTER": "none",
        "LOG_REQUESTS": "false",
    },
    "cfk_spans": {"OTEL_LOGS_EXPORTER": "none", "LOG_REQUESTS": "false"},
    "cfk_spans_stdout_line": {"OTEL_LOGS_EXPORTER": "none"},
    "cfk_otel_sdk": {"CFK_OTEL_NATIVE": "false"},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def services_env() -> dict[str, str]:
    out = subprocess.run(
        [str(ROOT / "scripts" / "services"), "start"], capture_output=True, text=True, check=True
    )
    return dict(line.removeprefix("export ").split("=", 1) for line in out.stdout.splitlines() if "=" in line)


def pin_services() -> int:
    """PostgreSQL (the postmaster: backends it forks inherit it) and Redis to CPU 1, off
    the server's core, so that the work route's throughput is the server's own."""
    found = subprocess.run(
        ["pgrep", "-x", "postgres|redis-server"], capture_output=True, text=True, check=False
    ).stdout
    pids = found.split()
    for pid in pids:
        subprocess.run(["taskset", "-a", "-p", "-c", "1", pid], capture_output=True, check=True)
    return len(pids)


class Receiver:
    """The OTLP receiver (cfk_otel.testing) in its own process on CPU 1.

    Each scenario's run ends by asking what arrived since the last question, so the
    table shows that telemetry really flowed, and the receiver's memory stays bounded.
    """

    _SCRIPT = (
        "import sys\nfrom cfk_otel.testing import OtlpReceiver\n"
        "r = OtlpReceiver().start()\nprint(r.grpc_port, r.http_port, flush=True)\n"
        "for _ in sys.stdin:\n"
        "    with r._lock:\n"
        "        print(len(r.spans), len(r.logs), len(r.metrics), flush=True)\n"
        "        r.spans.clear(); r.logs.clear(); r.metrics.clear(); r.headers.clear(); r.paths.clear()\n"
    )

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            ["taskset", "-c", "1", sys.executable, "-c", self._SCRIPT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert self.process.stdout is not None
        grpc_port, http_port = self.process.stdout.readline().split()
        # The stock distro exports over gRPC by default, cfk_otel over HTTP (the spec's default).
        self.grpc = f"http://127.0.0.1:{grpc_port}"
        self.http = f"http://127.0.0.1:{http_port}"

    def arrived(self) -> dict[str, int]:
        """Spans, log records and metric streams received since the last call."""
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        spans, logs, metrics = (int(n) for n in self.process.stdout.readline().split())
        return {"spans_received": spans, "logs_received": logs, "metrics_received": metrics}

    def stop(self) -> None:
        self.process.kill()


def scenario(name: str, port: int, receiver: Receiver, closed: str) -> tuple[list[str], dict[str, str]]:
    bin_dir = BIN
    if name.endswith("@base"):
        if not BASE_BIN:
            raise SystemExit(f"bench: {name} needs --base (another checkout's venv bin directory)")
        bin_dir, name = BASE_BIN[0], name.removesuffix("@base")
    uvicorn = [str(bin_dir / "uvicorn"), "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    instrument = [str(bin_dir / "opentelemetry-instrument")]
    common = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http, "OTEL_SERVICE_NAME": "bench"}
    if name == "bare":
        return [*uvicorn, "app:app", "--no-access-log"], {}
    if name == "empty_middleware":
        return [*uvicorn, "app_floor:app", "--no-access-log"], {}
    if name == "upstream":
        env = {
            **common,
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.grpc,
            "OTEL_PYTHON_DISTRO": "distro",
            "OTEL_PYTHON_CONFIGURATOR": "configurator",
            "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "cfk_uvicorn,cfk_asyncpg,cfk_redis,cfk_gunicorn",
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_METRICS_EXPORTER": "otlp",
            "OTEL_LOGS_EXPORTER": "otlp",
            "OTEL_PYTHON_LOGGING_AUTO_INSTRUMENTATION_ENABLED": "true",
        }
        return [*instrument, *uvicorn, "app_stock:app", "--no-access-log"], env
    env = {**common, "OTEL_PYTHON_DISTRO": "cfk_otel", "OTEL_PYTHON_CONFIGURATOR": "cfk_otel"}
    if name == "cfk_otel_down":
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = closed
    env.update(_STEPS.get(name, {}))
    return [*instrument, *uvicorn, "app:app"], env


class Server:
    def __init__(self, command: list[str], env: dict[str, str], port: int) -> None:
        self.port = port
        self.process = subprocess.Popen(
            ["taskset", "-c", "0", *command],
            cwd=APP_DIR,
            env={**os.environ, **env, "PYTHONPATH": str(APP_DIR)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        self.process.kill()
        raise RuntimeError(f"server did not start: {command}")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS

    def memory_kib(self, field: str) -> int:
        match = re.search(
            rf"^{field}:\s+(\d+) kB", Path(f"/proc/{self.process.pid}/status").read_text(), re.M
        )
        return int(match.group(1)) if match else 0

    def stop(self) -> float:
        start = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return time.monotonic() - start


def wrk(url: str, seconds: int) -> float:
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", "-c32", f"-d{seconds}s", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return float(match.group(1)) if match else 0.0


async def _fixed_rate(port: int, path: str, rate: int, seconds: float, connections: int = 8) -> list[float]:
    """Latencies (s) measured from each request's scheduled time: no coordinated omission."""
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    latencies: list[float] = []
    start = time.perf_counter()
    total = int(rate * seconds)

    async def worker(index: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for n in range(index, total, connections):
            due = start + n / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))  # type: ignore[union-attr]
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - due)
        writer.close()

    await asyncio.gather(*(worker(i) for i in range(connections)))
    return latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_once(name: str, route: str, receiver: Receiver, closed: str, seconds: int) -> dict[str, Any]:
    port = free_port()
    command, env = scenario(name, port, receiver, closed)
    server = Server(command, env, port)
    url = f"http://127.0.0.1:{port}{ROUTES[route]}"
    try:
        wrk(url, 2)  # warm-up
        cpu_before = server.cpu_seconds()
        rps = wrk(url, seconds)
        cpu = server.cpu_seconds() - cpu_before
        latencies = asyncio.run(_fixed_rate(port, ROUTES[route], RATES[route], 5))
        rss = server.memory_kib("VmHWM")
    finally:
        exit_seconds = server.stop()
    arrived = receiver.arrived()  # the server flushed on SIGTERM
    # The stock set-up writes no log line per request (uvicorn's access log is off in every
    # scenario), so only its spans are expected; cfk_otel also ships its request lines.
    expected = {
        "upstream": ("spans_received",),
        "cfk_otel": ("spans_received", "logs_received"),
        "cfk_otel_sdk": ("spans_received", "logs_received"),
    }
    if not all(arrived[k] for k in expected.get(name, ())):
        raise RuntimeError(f"{name}: the receiver got {arrived}; the run is void")
    return {
        **arrived,
        "rps": rps,
        "cpu_us_per_request": cpu / max(rps * seconds, 1) * 1e6,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "peak_rss_mib": rss / 1024,
        "sigterm_exit_s": exit_seconds,
    }


def side_by_side(
    route: str, names: list[str], receiver: Receiver, closed: str, rounds: int, seconds: int
) -> dict[str, dict[str, Any]]:
    """Every scenario's server at once on CPU 0, each under its own wrk; CPU per request
    compared round by round. The machine's speed drifts by 15-20% between the rounds of
    the main table; here it moves all servers alike, so each ratio is read in the same
    seconds: "keeps" is bare's CPU per request over the scenario's (the share of bare's
    throughput it keeps with the same CPU), "added" its extra CPU per request."""
    servers: dict[str, Server] = {}
    try:
        for name in names:
            port = free_port()
            command, env = scenario(name, port, receiver, closed)
            servers[name] = Server(command, env, port)
        urls = {name: f"http://127.0.0.1:{server.port}{ROUTES[route]}" for name, server in servers.items()}
        per_round: dict[str, list[float]] = {name: [] for name in names}
        for round_ in range(rounds + 1):  # the first round warms up
            before = {name: server.cpu_seconds() for name, server in servers.items()}
            loads = {
                name: subprocess.Popen(
                    ["taskset", "-c", "1", "wrk", "-t1", "-c16", f"-d{seconds}s", url],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for name, url in urls.items()
            }
            outputs = {name: load.communicate()[0] for name, load in loads.items()}
            for name, server in servers.items():
                match = re.search(r"Requests/sec:\s+([\d.]+)", outputs[name])
                requests = (float(match.group(1)) if match else 0.0) * seconds
                cpu_us = (server.cpu_seconds() - before[name]) / max(requests, 1) * 1e6
                if round_:
                    per_round[name].append(cpu_us)
    finally:
        for server in servers.values():
            server.stop()
        receiver.arrived()  # what they flushed at exit is not counted in the main table
    bare = per_round["bare"]
    result = {}
    for name, cpus in per_round.items():
        keeps = sorted(b / c for b, c in zip(bare, cpus, strict=True))
        result[name] = {
            "keeps_median": statistics.median(keeps),
            "keeps_min": keeps[0],
            "keeps_max": keeps[-1],
            "added_us_median": statistics.median(c - b for b, c in zip(bare, cpus, strict=True)),
            "cpu_us_per_round": cpus,
        }
    return result


def ladder_steps(paired: dict[str, dict[str, Any]]) -> dict[str, float]:
    """What each ladder step adds to the one before: the median over rounds of the
    difference in CPU per request, read in the same round."""
    names = list(paired)
    return {
        name: statistics.median(
            c - p
            for p, c in zip(
                paired[previous]["cpu_us_per_round"], paired[name]["cpu_us_per_round"], strict=True
            )
        )
        for previous, name in itertools.pairwise(names)
    }


def _scrape(port: int) -> float:
    """One GET of /api/metrics, whole body read: seconds taken."""
    started = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/metrics", timeout=10) as response:
        response.read()
    return time.perf_counter() - started


def scrape_interference(receiver: Receiver, closed: str, seconds: int, every: float) -> dict[str, Any]:
    """The app with 10,000 series (examples/bench/app_series.py): how long a scrape takes, and
    the p99 of /hello at a fixed rate without scrapes, then with one every ``every`` seconds."""
    port = free_port()
    command, env = scenario("cfk_otel", port, receiver, closed)
    server = Server([*command[:-1], "app_series:app"], env, port)
    try:
        wrk(f"http://127.0.0.1:{port}/hello", 2)  # warm-up
        durations = [_scrape(port) for _ in range(10)]
        quiet = asyncio.run(_fixed_rate(port, "/hello", RATES["hello"], seconds))
        stop = threading.Event()
        during: list[float] = []

        def scrape_repeatedly() -> None:
            while not stop.wait(every):
                during.append(_scrape(port))

        scraper = threading.Thread(target=scrape_repeatedly, daemon=True)
        scraper.start()
        try:
            busy = asyncio.run(_fixed_rate(port, "/hello", RATES["hello"], seconds))
        finally:
            stop.set()
            scraper.join(15)
    finally:
        server.stop()
    return {
        "series": 10_000,
        "scrape_ms_median": statistics.median(durations) * 1000,
        "scrapes_during": len(during),
        "every_s": every,
        "rate": RATES["hello"],
        "p99_ms_without": percentile(quiet, 0.99) * 1000,
        "p99_ms_with": percentile(busy, 0.99) * 1000,
    }


def soak_collector_down(receiver: Receiver, closed: str, seconds: int) -> dict[str, Any]:
    """A minute of load with the collector down: RSS samples and the SIGTERM exit time."""
    port = free_port()
    command, env = scenario("cfk_otel_down", port, receiver, closed)
    server = Server(command, env, port)
    load = subprocess.Popen(
        ["taskset", "-c", "1", "wrk", "-t1", "-c16", f"-d{seconds}s", f"http://127.0.0.1:{port}/hello"],
        stdout=subprocess.DEVNULL,
    )
    samples = []
    try:
        for _ in range(seconds // 5):
            time.sleep(5)
            samples.append(server.memory_kib("VmRSS") / 1024)
        load.wait(30)
    finally:
        exit_seconds = server.stop()
    return {"rss_mib_every_5s": [round(s, 1) for s in samples], "sigterm_exit_s": exit_seconds}


def machine() -> dict[str, str]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `make bench` on {result['date']}: {result['machine']['cpu']}, "
        f"{result['machine']['cores']} cores, Python {result['machine']['python']}. "
        f"Median of {result['rounds']} interleaved rounds; server pinned to CPU 0; wrk, the receiver, "
        "PostgreSQL and Redis on CPU 1. "
        "Received: what the OTLP receiver got from one run (load, latency run and the flush at exit); "
        "the upstream set-up exports over gRPC (the stock default), cfk_otel over HTTP. "
        "Upstream writes no log line per request (uvicorn's access log is off in every scenario); "
        "cfk_otel writes its request line to stdout and OTLP.",
        "",
    ]
    rows = []
    for route, scenarios in result["results"].items():
        bare = scenarios["bare"]
        for name, r in scenarios.items():
            cpu, added = r["cpu_us_per_request"], r["cpu_us_per_request"] - bare["cpu_us_per_request"]
            rows.append(
                [
                    route,
                    name,
                    f"{r['rps']:.0f}",
                    f"{r['rps'] / bare['rps']:.2f}",
                    f"{cpu:.0f}",
                    f"{added:.0f}",
                    f"{r['p50_ms']:.2f}",
                    f"{r['p99_ms']:.2f}",
                    f"{r['peak_rss_mib']:.0f}",
                    f"{r['spans_received']:.0f}, {r['logs_received']:.0f}",
                ]
            )
    header = ["route", "scenario", "req/s", "vs bare", "CPU µs/req", "added µs/req", "p50 ms", "p99 ms"]
    lines += _table([*header, "peak RSS MiB", "spans, log records received"], rows)
    paired = result.get("side_by_side")
    if paired:
        lines += [
            "",
            f"Side by side: every scenario's server at once on CPU 0, each under its own wrk, "
            f"{result['paired_rounds']} rounds. The machine's speed drifts between the rounds above "
            "(bare alone varies by 15-20%); here it moves all servers alike, so the ratios are read "
            "in the same seconds. Keeps: bare's CPU per request over the scenario's, the share of "
            "bare's throughput it keeps with the same CPU (median, and the range over rounds). "
            "Sharing the core makes every server slower in absolute terms.",
            "",
        ]
        lines += _table(
            ["route", "scenario", "keeps (median)", "range", "added CPU µs/req (median)"],
            [
                [
                    route,
                    name,
                    f"{r['keeps_median']:.2f}",
                    f"{r['keeps_min']:.2f} to {r['keeps_max']:.2f}",
                    f"{r['added_us_median']:.0f}",
                ]
                for route, scenarios in paired.items()
                for name, r in scenarios.items()
                if name != "bare"
            ],
        )
    ladder = result.get("ladder")
    if ladder:
        steps = ladder_steps(ladder)
        lines += [
            "",
            "Where the time goes (hello route): a ladder, each step adding one thing to the one "
            f"before, all side by side as above ({result['paired_rounds']} rounds). Adds: the step's "
            "CPU per request over the previous step's, read in the same round (median).",
            "",
        ]
        lines += _table(
            ["step", "adds", "keeps (median)", "added CPU µs/req over bare", "this step adds µs/req"],
            [
                [
                    name,
                    LADDER[name],
                    f"{r['keeps_median']:.2f}",
                    f"{r['added_us_median']:.0f}",
                    f"{steps[name]:.0f}",
                ]
                for name, r in ladder.items()
                if name != "bare"
            ],
        )
    soak = result.get("collector_down_soak")
    if soak:
        lines += [
            "",
            f"Collector down, {result['soak_seconds']} s of load: RSS every 5 s (MiB) "
            f"{soak['rss_mib_every_5s']}; SIGTERM exit {soak['sigterm_exit_s']:.2f} s.",
        ]
    scrapes = result.get("scrape_interference")
    if scrapes:
        ratio = scrapes["p99_ms_with"] / max(scrapes["p99_ms_without"], 1e-9)
        lines += [
            "",
            f"Scrapes of {scrapes['series']:,} series (examples/bench/app_series.py): "
            f"{scrapes['scrape_ms_median']:.1f} ms each (median of 10, whole body read). "
            f"p99 of /hello at {scrapes['rate']} req/s: {scrapes['p99_ms_without']:.2f} ms without "
            f"scrapes, {scrapes['p99_ms_with']:.2f} ms with one every {scrapes['every_s']:g} s "
            f"({scrapes['scrapes_during']} scrapes; {ratio:.2f}x).",
        ]
    lines += [
        "",
        "The hot paths one call at a time (a span, a histogram record, a log line, a 10,000-series "
        "scrape), each beside its upstream equivalent: [microbenchmarks.md](microbenchmarks.md), "
        "from `make microbench`.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--soak-seconds", type=int, default=60)
    parser.add_argument("--paired-rounds", type=int, default=5, help="side-by-side rounds (0: none)")
    parser.add_argument("--paired-seconds", type=int, default=5)
    parser.add_argument("--scenarios", default="bare,upstream,cfk_otel,cfk_otel_sdk,cfk_otel_down")
    parser.add_argument("--routes", default="hello,work")
    parser.add_argument(
        "--no-ladder", dest="ladder", action="store_false", help="skip the hello route's cost ladder"
    )
    parser.add_argument(
        "--no-scrapes", dest="scrapes", action="store_false", help="skip the 10,000-series scrape step"
    )
    parser.add_argument(
        "--base",
        type=Path,
        help="another checkout's venv bin directory: scenarios named NAME@base run from it (an A/B)",
    )
    args = parser.parse_args()
    if args.base is not None:
        BASE_BIN.append(args.base)
    os.environ.update(services_env())
    if not pin_services():
        raise SystemExit("bench: no PostgreSQL or Redis process found to pin to CPU 1")

    receiver = Receiver()
    closed = f"http://127.0.0.1:{free_port()}"
    names = args.scenarios.split(",")
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    try:
        for round_ in range(args.rounds):
            for route in args.routes.split(","):
                for name in names:
                    r = run_once(name, route, receiver, closed, args.seconds)
                    runs.setdefault(route, {}).setdefault(name, []).append(r)
                    print(
                        f"round {round_ + 1} {route:5} {name:15} {r['rps']:8.0f} req/s "
                        f"{r['cpu_us_per_request']:6.0f} µs CPU/req p99 {r['p99_ms']:.2f} ms",
                        flush=True,
                    )
        paired = (
            {
                route: side_by_side(route, names, receiver, closed, args.paired_rounds, args.paired_seconds)
                for route in args.routes.split(",")
            }
            if "bare" in names and args.paired_rounds
            else {}
        )
        ladder = (
            side_by_side("hello", list(LADDER), receiver, closed, args.paired_rounds, args.paired_seconds)
            if args.ladder and args.paired_rounds and "hello" in args.routes.split(",")
            else {}
        )
        soak = soak_collector_down(receiver, closed, args.soak_seconds) if "cfk_otel_down" in names else None
        scrapes = scrape_interference(receiver, closed, args.seconds, 0.5) if args.scrapes else None
    finally:
        receiver.stop()
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "rounds": args.rounds,
        "soak_seconds": args.soak_seconds,
        "results": {
            route: {
                name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in by_name.items()
            }
            for route, by_name in runs.items()
        },
        "side_by_side": paired,
        "paired_rounds": args.paired_rounds,
        "ladder": ladder,
        "collector_down_soak": soak,
        "scrape_interference": scrapes,
    }
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    (docs / "benchmarks.json").write_text(json.dumps(result, indent=2) + "\n")
    (docs / "benchmarks.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
