"""The failure suite: the real app under ``opentelemetry-instrument uvicorn``, real HTTP load,
and everything around it failing (collector absent, killed or slow, Sentry down, hostile
paths and log values, malformed environment, a crowd of concurrent users).

Every case asserts the same three things: no request fails because of telemetry, the app's
resident memory stays bounded, and what the design promises to deliver arrives.
"""

from __future__ import annotations

import contextlib
import http.client
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

import grpc
import pytest

from tests.collector.conftest import collector, collector_bin, otlp_backend
from tests.conftest import RunningApp, launch

__all__ = ["collector", "collector_bin", "otlp_backend"]  # fixtures shared with tests/collector

# The growth of the app's VmRSS a case may cause once warmed up. Queues are bounded
# (2048 spans, 2048 log records, one metric snapshot), so a leak shows up well above this.
RSS_BOUND_MIB = 40.0
# Any single request, whatever telemetry is doing: generous for a loaded 2-core machine,
# far below an exporter's 10 s timeout, so a request that waited on an export fails it.
REQUEST_BOUND_S = 2.0
# SIGTERM to exit: CFK_OTEL_SHUTDOWN_TIMEOUT (3 s by default) plus uvicorn's own exit.
SHUTDOWN_BOUND_S = 5.0

StartApp = Callable[..., RunningApp]


def rss_mib(pid: int) -> float:
    """The resident set size of ``pid`` (VmRSS), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def app_rss(app: RunningApp) -> float:
    # opentelemetry-instrument execs uvicorn, so the pid we started is the server itself.
    cmdline = Path(f"/proc/{app.process.pid}/cmdline").read_bytes().split(b"\0")
    assert any(part.endswith(b"uvicorn") for part in cmdline), cmdline
    return rss_mib(app.process.pid)


def figures(case: str, **values: object) -> None:
    """One line of measured figures, shown by ``pytest -rP`` (the suite's report)."""
    shown = " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    print(f"FIGURES {case}: {shown}")


# --- load --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    path: str
    status: int  # 0: no HTTP response at all (refused, reset, timed out)
    seconds: float
    body: bytes = b""
    error: str = ""


class Client:
    """One keep-alive HTTP/1.1 connection to the app; paths are sent byte for byte (already
    encoded). A failed request is reported, not retried, and the next one reconnects."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.port = port
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def get(self, path: str, headers: Mapping[str, str] | None = None) -> Reply:
        if self._conn is None:
            self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        start = time.perf_counter()
        try:
            self._conn.request("GET", path, headers=headers or {})
            response = self._conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            return Reply(path, 0, time.perf_counter() - start, error=f"{type(exc).__name__}: {exc}")
        # uvicorn closes the connection of an app that raised, after its 500 went out (no
        # "Connection: close" header): a client that reused it would see a reset.
        if response.will_close or response.status >= 500:
            self.close()
        return Reply(path, response.status, time.perf_counter() - start, body)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def hammer(port: int, paths: Iterable[str], concurrency: int = 8) -> list[Reply]:
    """GET every path from ``concurrency`` threads, each with its own keep-alive connection.

    Returns the replies in the order of ``paths``.
    """
    local = threading.local()
    clients: list[Client] = []
    lock = threading.Lock()

    def one(path: str) -> Reply:
        client: Client | None = getattr(local, "client", None)
        if client is None:
            client = local.client = Client(port)
            with lock:
                clients.append(client)
        return client.get(path)

    try:
        with futures.ThreadPoolExecutor(concurrency, thread_name_prefix="hammer") as pool:
            return list(pool.map(one, paths))
    finally:
        for client in clients:
            client.close()


def latency(replies: list[Reply]) -> dict[str, float]:
    seconds = sorted(r.seconds for r in replies)
    return {
        "p50_ms": statistics.median(seconds) * 1000,
        "p99_ms": seconds[int(len(seconds) * 0.99) - 1] * 1000,
        "max_ms": seconds[-1] * 1000,
    }


def assert_served(replies: list[Reply], expected: Callable[[str], int]) -> None:
    """Every reply is the app's own answer, in time."""
    wrong = [r for r in replies if r.status != expected(r.path)]
    assert not wrong, f"{len(wrong)} of {len(replies)} wrong, e.g. {wrong[:3]}"
    slow = [r for r in replies if r.seconds > REQUEST_BOUND_S]
    assert not slow, f"{len(slow)} requests over {REQUEST_BOUND_S}s, e.g. {slow[:3]}"


class Load:
    """Steady traffic in background threads until stopped; each reply tagged with the phase
    that was current when its request started."""

    def __init__(self, port: int, make_path: Callable[[str, int], str], threads: int = 4) -> None:
        self.port = port
        self.make_path = make_path
        self.phase = "start"
        self.replies: list[tuple[str, Reply]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._count = 0
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self) -> None:
        client = Client(self.port)
        try:
            while not self._stop.is_set():
                with self._lock:
                    self._count += 1
                    phase, n = self.phase, self._count
                reply = client.get(self.make_path(phase, n))
                with self._lock:
                    self.replies.append((phase, reply))
                self._stop.wait(0.01)  # at most about 100 requests a second per thread
        finally:
            client.close()

    def in_phase(self, phase: str) -> list[Reply]:
        with self._lock:
            return [r for p, r in self.replies if p == phase]

    def wait_for(self, phase: str, count: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.in_phase(phase)) < count:
            assert time.monotonic() < deadline, f"only {len(self.in_phase(phase))} {phase} requests"
            time.sleep(0.02)


# --- stand-ins ---------------------------------------------------------------------------


class SlowOtlp:
    """An OTLP endpoint (gRPC and HTTP on 127.0.0.1) that holds every export ``delay`` seconds
    before answering OK: a collector that is overloaded, or hung when ``delay`` exceeds the
    exporter's timeout. ``exports`` counts the requests that reached it."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.exports = 0
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._grpc: grpc.Server | None = None
        self._http: ThreadingHTTPServer | None = None
        self.grpc_port = 0
        self.http_port = 0

    def _hold(self) -> None:
        with self._lock:
            self.exports += 1
        self._release.wait(self.delay)

    def __enter__(self) -> Self:
        stand_in = self

        def export(request: bytes, context: Any) -> bytes:
            stand_in._hold()
            return b""  # an empty Export*ServiceResponse

        services = [
            grpc.method_handlers_generic_handler(
                f"opentelemetry.proto.collector.{signal}.v1.{name}Service",
                {"Export": grpc.unary_unary_rpc_method_handler(export)},
            )
            for signal, name in (("trace", "Trace"), ("metrics", "Metrics"), ("logs", "Logs"))
        ]

        class HttpHandler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                stand_in._hold()
                with contextlib.suppress(OSError):  # the exporter gave up waiting
                    self.send_response(200)
                    self.send_header("Content-Type", "application/x-protobuf")
                    self.send_header("Content-Length", "0")
                    self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
        self._grpc.add_generic_rpc_handlers(services)
        self.grpc_port = self._grpc.add_insecure_port("127.0.0.1:0")
        self._grpc.start()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), HttpHandler)
        self._http.daemon_threads = True
        threading.Thread(target=self._http.serve_forever, name="slow-otlp", daemon=True).start()
        self.http_port = int(self._http.server_address[1])
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()  # held exports answer now, so no thread outlives the test
        if self._grpc is not None:
            self._grpc.stop(grace=None)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()

    def endpoint(self, protocol: str) -> str:
        return f"http://127.0.0.1:{self.grpc_port if protocol == 'grpc' else self.http_port}"


def otlp_env(endpoint: str, protocol: str, **extra: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "SERVICE_NAME": "cf-kanban",
        **extra,
    }


@pytest.fixture(scope="module")
def module_apps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartApp]:
    """Like ``run_app``, for an app shared by the tests of one module."""
    started: list[RunningApp] = []
    tmp = tmp_path_factory.mktemp("apps")

    def start(command: list[str], env: dict[str, str], port: int, **kwargs: Any) -> RunningApp:
        app = launch(tmp, command, env, port, **kwargs)
        started.append(app)
        return app

    yield start
    for app in started:
        if app.process.poll() is None:
            app.terminate()
