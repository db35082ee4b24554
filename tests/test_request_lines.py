"""Request lines on stdout, held by the core and written in batches (``native/src/stdout.rs``,
``_StdoutHandler.write_held``): order with our other lines, the time bound without any call,
shutdown, exit, fork, a blocked stdout and a failing one."""

from __future__ import annotations

import json
import logging
import os
import re
import select
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.trace import SpanContext, TraceFlags

import cfk_otel
from cfk_otel._asgi.types import RequestInfo
from cfk_otel._core import seam as _core
from cfk_otel._logs.handlers import configure_logging
from cfk_otel._logs.requests import RequestLog, request_observer
from cfk_otel._settings import Settings, load
from tests.conftest import IN_CI

# Off CI only: with CI=true a missing compiled core fails these tests rather than skipping them.
pytestmark = pytest.mark.skipif(
    _core._native is None and not IN_CI, reason="the compiled core holds the lines"
)

HOLD = 0.05  # the longest a line waits in the core's buffer (LineBuffer's default)
SPAN = SpanContext(0xABC, 0xDEF, is_remote=False, trace_flags=TraceFlags(1))


@pytest.fixture
def settings() -> Settings:
    return load(
        {"SERVICE_NAME": "cf-kanban", "SERVICE_ENVIRONMENT": "production", "SERVICE_VERSION": "1.0.0"}
    )


@pytest.fixture
def setup(settings: Settings) -> Iterator[Callable[[], RequestLog]]:
    """Sets up our handlers on the root logger (stdout only) and gives the request line's
    observer; called in the test's body, after pytest added its own handlers to the root."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level

    def observer() -> RequestLog:
        configure_logging(settings, None)
        made = request_observer(settings)
        assert made is not None
        return made

    yield observer
    cfk_otel.flush()
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("uvicorn.access").disabled = False
    logging.captureWarnings(False)


def _info(path: str, status: int = 200) -> RequestInfo:
    return RequestInfo({"path": path}, "http", "GET", "/p/{n}", status, 0.0125, None, SPAN)


class Recording:
    """A stream that records each write."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None: ...


def test_lines_keep_their_order_with_our_other_lines(
    setup: Callable[[], RequestLog], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever else of ours reaches the stream writes the held request lines first: a record
    logged after them, a request line Python writes (a path the core cannot take), one that
    takes ``logging``'s way (a filter on the requests logger). Every line where it happened."""
    observe = setup()
    stream = Recording()
    monkeypatch.setattr(sys, "stdout", stream)
    observe(_info("/p/1"))
    observe(_info("/p/2"))
    logging.getLogger("app").warning("between")
    observe(_info("/p/3"))
    observe(_info("/p/\udc80"))  # a lone surrogate: Python's route (this stream takes it)
    observe(_info("/p/4"))
    requests = logging.getLogger("cfk_otel.requests")
    requests.addFilter(lambda record: True)  # now logging dispatches request lines
    try:
        observe(_info("/p/5"))
    finally:
        requests.filters.clear()
    observe(_info("/p/6"))
    assert cfk_otel.flush()
    lines = [json.loads(line) for line in "".join(stream.writes).splitlines()]
    assert [line.get("path", line["message"]) for line in lines] == [
        "/p/1",
        "/p/2",
        "between",
        "/p/3",
        "/p/\udc80",
        "/p/4",
        "/p/5",
        "/p/6",
    ]


def test_lines_are_written_in_one_write_byte_identical(
    setup: Callable[[], RequestLog], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lines written together go out in one write (on the stream of the moment), each the
    line the core renders, in the order they came."""
    observe = setup()
    stream = Recording()
    monkeypatch.setattr(sys, "stdout", stream)
    for n in range(5):
        observe(_info(f"/p/{n}"))
    assert cfk_otel.flush()
    assert 1 <= len(stream.writes) < 5  # batched (a stall past the hold may split the batch once)
    text = "".join(stream.writes)
    lines = text.splitlines()
    assert [json.loads(line)["path"] for line in lines] == [f"/p/{n}" for n in range(5)]
    assert text.endswith("\n")
    line = json.loads(lines[0])
    service = '"service":"cf-kanban","environment":"production","version":"1.0.0"'
    render = _core._native.RequestLine(service).render  # type: ignore[union-attr]
    assert lines[0] == render(0.0, 20, "GET", "/p/0", "/p/{n}", "200", 0.0125, 0xABC, 0xDEF).replace(
        "1970-01-01T00:00:00.000Z", line["timestamp"]
    )


def test_a_failing_stream_is_reported_once_and_never_raises(tmp_path: Path) -> None:
    """A stdout that raises (a closed pipe) loses the lines: counted, reported once on stderr,
    never raised, whether the caller's flush or the core's thread meets it. In a child, so
    that its drops stay out of this process's health."""
    child = _child(
        """
        class Broken:
            def write(self, text):
                raise OSError("stdout is closed")

            def flush(self):
                raise OSError("stdout is closed")

        sys.stdout = Broken()
        for n in range(3):
            observe(info(f"/p/{n}"))
        cfk_otel.flush()  # no exception
        for n in range(3):
            observe(info(f"/p/{n}"))
        time.sleep(0.3)  # the core's thread meets the failure: no exception there either
        cfk_otel.flush()
        sys.stdout = sys.__stdout__
        stats, health = seam.stats()["stdout"], seam.health()["stdout"]
        print(json.dumps([stats, health]))
        """,
        tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err.decode()
    stats, health = json.loads(out)
    report = err.decode()
    assert report.count("--- Logging error ---") == 1, report
    assert "OSError: stdout is closed" in report
    assert re.search(r"\d request line\(s\) lost", report)
    assert stats["dropped_export_failed"] == 6
    assert stats["exported"] == 0
    assert health["dropped"] == {"queue_full": 0, "export_failed": 6}


def _child(script: str, tmp_path: Path, **popen: Any) -> subprocess.Popen[bytes]:
    """A Python process running ``script`` after a stdout-only set-up with ``observe``, a
    request line observer, and ``info(path)``."""
    prelude = """
        import json, logging, os, sys, time
        import cfk_otel
        from opentelemetry.trace import SpanContext, TraceFlags
        from cfk_otel._asgi.types import RequestInfo
        from cfk_otel._core import seam
        from cfk_otel._logs.handlers import configure_logging
        from cfk_otel._logs.requests import request_observer
        from cfk_otel._settings import load

        settings = load({"SERVICE_NAME": "child"})
        configure_logging(settings, None)
        observe = request_observer(settings)
        span = SpanContext(0xABC, 0xDEF, is_remote=False, trace_flags=TraceFlags(1))
        def info(path):
            return RequestInfo({"path": path}, "http", "GET", "/p", 200, 0.001, None, span)
    """
    path = tmp_path / "child.py"
    path.write_text(textwrap.dedent(prelude) + textwrap.dedent(script))
    env = {**os.environ, **{f"OTEL_{s}_EXPORTER": "none" for s in ("TRACES", "METRICS", "LOGS")}}
    return subprocess.Popen([sys.executable, str(path)], env=env, **popen)


def _paths(out: bytes) -> list[str]:
    return [json.loads(line).get("path", json.loads(line)["message"]) for line in out.decode().splitlines()]


def test_a_held_line_is_written_within_the_bound_while_the_app_runs(tmp_path: Path) -> None:
    """No call needed: the core's thread writes the line soon after its request, while the
    process goes on (here asleep, holding nothing)."""
    child = _child(
        """
        observe(info("/first"))
        sys.stderr.write("sent\\n"); sys.stderr.flush()
        time.sleep(30)
        """,
        tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert child.stderr is not None
        assert child.stdout is not None
        assert child.stderr.readline() == b"sent\n"
        sent = time.monotonic()
        ready, _, _ = select.select([child.stdout], [], [], 5.0)
        waited = time.monotonic() - sent
        assert ready, "the line never came"
        assert child.poll() is None  # still running: nothing flushed it at exit
        assert _paths(child.stdout.readline()) == ["/first"]
        assert waited < HOLD + 0.5  # the hold, and slack for a busy machine
    finally:
        child.kill()
        child.communicate()  # and its pipes closed


def test_held_lines_are_written_at_shutdown_and_at_exit(tmp_path: Path) -> None:
    child = _child(
        """
        cfk_otel.configure()  # exporters none: shutdown's jobs end at once
        observe(info("/before-shutdown"))
        assert cfk_otel.shutdown(5.0)
        sys.stdout.write("shut down\\n")
        observe(info("/at-exit"))
        """,
        tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines[1] == "shut down"
    assert _paths(("\n".join([lines[0], lines[2]])).encode()) == ["/before-shutdown", "/at-exit"]
    assert len(lines) == 3


def test_a_fork_does_not_write_the_parents_lines_twice(tmp_path: Path) -> None:
    """Held lines are written before the fork; the child holds and writes only its own."""
    child = _child(
        """
        observe(info("/parent-before"))
        pid = os.fork()
        if pid == 0:
            observe(info("/child"))
            cfk_otel.flush()
            os._exit(0)
        os.waitpid(pid, 0)
        observe(info("/parent-after"))
        """,
        tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err.decode()
    assert _paths(out) == ["/parent-before", "/child", "/parent-after"]


def test_a_blocked_stdout_drops_and_counts_and_requests_go_on(tmp_path: Path) -> None:
    """Nobody reads the child's stdout: the pipe fills, then the core's buffer (1 MiB), then
    lines are dropped and counted, and every request still ends at once. Once stdout is
    read again, the lines held come out: written and dropped add up to the requests."""
    requests = 6000  # about 1.3 MiB of lines: past the pipe (64 KiB) and the buffer
    child = _child(
        f"""
        slowest = 0.0
        for n in range({requests}):
            started = time.perf_counter()
            observe(info(f"/p/{{n}}"))
            slowest = max(slowest, time.perf_counter() - started)
        time.sleep(0.2)  # the thread is stuck in its write by now
        counted = seam.stats()["stdout"]
        shown = seam.health()["stdout"]["dropped"]["queue_full"]
        sys.stderr.write(json.dumps([slowest, counted, shown]) + "\\n"); sys.stderr.flush()
        sys.stdin.readline()  # until the test reads stdout
        """,
        tmp_path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert child.stderr is not None
        report = child.stderr.readline()
        assert report, "the child was stuck"
        slowest, counted, shown = json.loads(report)
        assert slowest < 0.05  # no request waited for stdout
        assert counted["dropped_queue_full"] > 0
        assert shown == counted["dropped_queue_full"]
        out, err = child.communicate(b"\n", timeout=30)
        assert child.returncode == 0, err.decode()
        written = out.decode().splitlines()
        assert len(written) + counted["dropped_queue_full"] == requests
        paths = [json.loads(line)["path"] for line in written]
        assert paths == sorted(paths, key=lambda p: int(p.rsplit("/", 1)[1]))  # in order, gaps only
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
