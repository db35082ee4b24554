"""Shared fixtures: real services, an OTLP receiver, and apps launched as a user would."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cfk_otel._settings import DECLARED
from cfk_otel.testing import OtlpReceiver

ROOT = Path(__file__).resolve().parent.parent
APPS = Path(__file__).resolve().parent / "apps"
BIN = Path(sys.executable).parent
IN_CI = os.environ.get("CI", "").lower() == "true"
# The start of the tests' subprocess scripts: global in-memory tracer and meter providers
# (``spans``, ``reader``), set before anything is instrumented, as the SDK sets them.
IN_MEMORY_PROVIDERS = """
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cfk_otel.testing import MetricsReader

spans = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(spans))
trace.set_tracer_provider(provider)
reader = MetricsReader()  # the SDK's in-memory reader, reading cfk_otel's metrics too
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
"""


@pytest.fixture(autouse=True)
def _each_failure_kind_logged_anew() -> None:
    """cfk_otel's guard logs each kind of internal failure once per process: per test, here."""
    from cfk_otel import _guard

    _guard._reset_for_tests()


def unavailable(reason: str) -> None:
    """A missing service fails the run in CI and skips the test on a developer's machine."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: missing services are failures)")
    pytest.skip(reason)


@dataclass(frozen=True)
class Services:
    database_url: str
    redis_url: str


@pytest.fixture(scope="session")
def services() -> Services:
    """PostgreSQL and Redis from Debian's packages, started on loopback by scripts/services."""
    try:
        out = subprocess.run(
            [str(ROOT / "scripts" / "services"), "start"],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        ).stdout
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        unavailable(f"PostgreSQL/Redis could not be started: {exc}")
    values = dict(line.removeprefix("export ").split("=", 1) for line in out.splitlines() if "=" in line)
    return Services(values["DATABASE_URL"], values["REDIS_URL"])


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


class CoreCalls:
    """Every call into the compiled core made while :meth:`watch` is open, by name: a
    function of ``cfk_otel._native`` or a method of its exporter, metric family or server
    span (and what starts those)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    @contextlib.contextmanager
    def watch(self) -> Iterator[list[str]]:
        from cfk_otel import _native

        owners = (_native.OtlpExporter, _native.Family, _native.ServerSpans, _native.ServerSpan)

        def profile(frame: object, event: str, arg: object) -> None:
            if event == "c_call":
                owner = getattr(arg, "__self__", None)
                if owner is _native or isinstance(owner, owners):
                    self.names.append(getattr(arg, "__name__", "?"))

        self.names.clear()
        sys.setprofile(profile)
        try:
            yield self.names
        finally:
            sys.setprofile(None)


@pytest.fixture
def core_calls() -> CoreCalls:
    return CoreCalls()


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now and not handed out before in this run.

    The kernel may give the port it just freed to the next bind on port 0, so two
    calls in a row (a collector's health and Prometheus ports) could get the same one.
    """
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


@dataclass
class RunningApp:
    process: subprocess.Popen[str]
    port: int
    log_path: Path
    exited_in: float | None = field(default=None)
    stderr_path: Path | None = field(default=None)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def errors(self) -> str:
        """stderr alone, when launched with ``separate_stderr=True`` (else it is in ``output()``)."""
        return self.stderr_path.read_text(errors="replace") if self.stderr_path else ""

    def terminate(self, timeout: float = 15.0) -> float:
        """SIGTERM, then wait; returns the seconds it took to exit."""
        if self.process.poll() is None:
            start = time.monotonic()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(
                    f"app did not exit within {timeout}s of SIGTERM\n{self.output()}"
                ) from None
            self.exited_in = time.monotonic() - start
        return self.exited_in or 0.0


# `make test` runs the suite on the native path, then its app-launching parts again with
# CFK_TEST_NATIVE=false: every app then records our spans with the SDK's tracer, the
# reference (a test that sets CFK_OTEL_NATIVE itself keeps its own value).
# An app under test reads only the settings its test gives it: a shell that exported
# DATABASE_URL or LOG_LEVEL (scripts/services env, say) changes nothing a test sees.
_SETTINGS: frozenset[str] = frozenset(variable.name for variable in DECLARED)
PATH_UNDER_TEST: dict[str, str] = (
    {"CFK_OTEL_NATIVE": os.environ["CFK_TEST_NATIVE"]} if "CFK_TEST_NATIVE" in os.environ else {}
)


def launch(
    tmp_path: Path,
    command: list[str],
    env: dict[str, str],
    port: int,
    wait_path: str = "/hello",
    ready_timeout: float = 30.0,
    separate_stderr: bool = False,
) -> RunningApp:
    """Start ``command`` (already including the port) and wait until it serves ``wait_path``.

    stdout and stderr share one log unless ``separate_stderr`` (then see ``RunningApp.errors``).
    """
    full_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OTEL_", "SENTRY_", "CFK_OTEL")) and k not in _SETTINGS
    }
    full_env.update(
        {
            "PYTHONPATH": str(APPS),
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            "OTEL_BLRP_SCHEDULE_DELAY": "200",
            "OTEL_METRIC_EXPORT_INTERVAL": "500",
            "PYTHONWARNINGS": "ignore::DeprecationWarning",
        }
    )
    full_env.update(PATH_UNDER_TEST)
    full_env.update(env)
    log_path = tmp_path / f"app-{port}.log"
    stderr_path = tmp_path / f"app-{port}.stderr" if separate_stderr else None
    with log_path.open("w") as log, contextlib.ExitStack() as files:  # the child keeps its own
        stderr = files.enter_context(stderr_path.open("w")) if stderr_path else subprocess.STDOUT
        process = subprocess.Popen(command, env=full_env, stdout=log, stderr=stderr, text=True, cwd=APPS)
    app = RunningApp(process, port, log_path, stderr_path=stderr_path)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"app exited with {process.returncode} before serving:\n{app.output()}")
        try:
            with urllib.request.urlopen(app.url + wait_path, timeout=1):
                return app
        except urllib.error.HTTPError:
            return app
        except OSError:
            time.sleep(0.1)
    app.terminate()
    raise AssertionError(f"app did not serve {wait_path} within {ready_timeout}s:\n{app.output()}")


def uvicorn_command(target: str, port: int, *extra: str, instrument: bool = True) -> list[str]:
    base = [str(BIN / "opentelemetry-instrument")] if instrument else []
    return [*base, str(BIN / "uvicorn"), target, "--host", "127.0.0.1", "--port", str(port), *extra]


def gunicorn_command(target: str, port: int, workers: int = 2) -> list[str]:
    """gunicorn with uvicorn's worker class, under opentelemetry-instrument."""
    return [
        str(BIN / "opentelemetry-instrument"),
        str(BIN / "gunicorn"),
        "-k",
        "uvicorn.workers.UvicornWorker",
        "-w",
        str(workers),
        "-b",
        f"127.0.0.1:{port}",
        target,
    ]


@pytest.fixture
def run_app(tmp_path: Path) -> Iterator[object]:
    """Launch apps; every app still running at the end of the test is terminated."""
    started: list[RunningApp] = []

    def start(command: list[str], env: dict[str, str], port: int, **kwargs: object) -> RunningApp:
        app = launch(tmp_path, command, env, port, **kwargs)  # type: ignore[arg-type]
        started.append(app)
        return app

    yield start
    for app in started:
        stop_group(app.process)


def stop_group(process: subprocess.Popen[str]) -> None:
    """SIGTERM, a bounded wait, then SIGKILL for the whole process group (no orphaned workers)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    if process.poll() is None:
        process.wait()
