"""cfk_otel/_errors/uncaught.py: exceptions nobody caught become records (and Sentry reports), once."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import pytest

from cfk_otel import _settings
from cfk_otel._errors import api as _errors
from cfk_otel._errors import total as _errors_total
from cfk_otel._errors import uncaught as _uncaught
from cfk_otel.testing import SentryReceiver
from tests.conftest import ROOT


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    logger = logging.getLogger("cfk_otel.uncaught")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)


@pytest.fixture
def hooks() -> Iterator[None]:
    """Each test starts with none of ours installed (an earlier in-process set-up may have
    left them), and the hooks are put back as the test found them, whatever it installs."""
    saved = sys.excepthook, threading.excepthook, _uncaught._installed
    _uncaught.uninstall()
    yield
    _uncaught.uninstall()
    sys.excepthook, threading.excepthook, _uncaught._installed = saved


@pytest.fixture
def reported(monkeypatch: pytest.MonkeyPatch) -> list[tuple[BaseException, str]]:
    calls: list[tuple[BaseException, str]] = []

    def report(error: BaseException, mechanism: str, severity: str = "error") -> None:
        calls.append((error, mechanism))

    monkeypatch.setattr(_errors_total, "unhandled", report)
    return calls


def _crash_in_a_thread(error: BaseException) -> None:
    def run() -> None:
        raise error

    thread = threading.Thread(target=run, name="worker-7")
    thread.start()
    thread.join()


@pytest.mark.usefixtures("hooks")
def test_install_is_once_and_uninstall_puts_back_what_it_found() -> None:
    def app_hook(*args: Any) -> None: ...

    sys.excepthook = app_hook
    before_thread = threading.excepthook
    _uncaught.install()
    ours = sys.excepthook, threading.excepthook
    assert ours[0] is not app_hook
    assert ours[1] is not before_thread
    _uncaught.install()
    assert (sys.excepthook, threading.excepthook) == ours  # not wrapped twice
    _uncaught.uninstall()
    assert (sys.excepthook, threading.excepthook) == (app_hook, before_thread)
    _uncaught.uninstall()  # again: nothing to do
    assert sys.excepthook is app_hook


@pytest.mark.usefixtures("hooks")
def test_a_threads_exception_is_one_error_record_and_no_raw_traceback(
    records: Records, reported: list[tuple[BaseException, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    threading.excepthook = threading.__excepthook__  # Python's default (pytest installs its own)
    _uncaught.install()
    error = ValueError("worker failed")
    _crash_in_a_thread(error)
    _crash_in_a_thread(SystemExit(3))  # ignored, as Python does
    [record] = records.records
    assert (record.levelno, record.getMessage()) == (logging.ERROR, "Uncaught exception in thread worker-7")
    assert record.exc_info is not None
    assert record.exc_info[1] is error
    assert (record.__dict__["thread.name"], record.__dict__["mechanism"]) == ("worker-7", "threading")
    assert reported == [(error, "threading")]
    assert capsys.readouterr().err == ""  # Python's own hook did not print it too


@pytest.mark.usefixtures("hooks")
def test_a_hook_the_app_installed_before_still_runs(records: Records) -> None:
    seen: list[object] = []
    threading.excepthook = lambda args: seen.append(args.exc_value)
    sys.excepthook = lambda t, e, tb: seen.append(e)
    _uncaught.install()
    first, second = ValueError("in a thread"), KeyError("at top level")
    _crash_in_a_thread(first)
    sys.excepthook(KeyError, second, None)
    assert seen == [first, second]
    assert [r.levelno for r in records.records] == [logging.ERROR, logging.CRITICAL]


@pytest.mark.usefixtures("hooks")
def test_top_level_is_fatal_and_interrupt_a_warning(
    records: Records, reported: list[tuple[BaseException, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    sys.excepthook = sys.__excepthook__
    _uncaught.install()
    try:
        raise RuntimeError("startup failed")
    except RuntimeError as exc:
        error: BaseException = exc
        traceback: TracebackType | None = exc.__traceback__
    sys.excepthook(RuntimeError, error, traceback)
    sys.excepthook(KeyboardInterrupt, KeyboardInterrupt(), None)
    fatal, interrupted = records.records
    assert (fatal.levelno, fatal.getMessage(), fatal.__dict__["mechanism"]) == (
        logging.CRITICAL,
        "Uncaught exception",
        "excepthook",
    )
    assert fatal.exc_info is not None
    assert fatal.exc_info[2] is traceback
    assert (interrupted.levelno, interrupted.exc_info) == (logging.WARNING, None)
    assert reported == [(error, "excepthook")]
    assert capsys.readouterr().err == ""


@pytest.mark.usefixtures("hooks")
def test_a_failing_hook_falls_back_to_pythons_output(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(error: BaseException, mechanism: str) -> None:
        raise RuntimeError("reporting broke")

    monkeypatch.setattr(_errors_total, "unhandled", broken)
    sys.excepthook = sys.__excepthook__
    _uncaught.install()
    sys.excepthook(ValueError, ValueError("kept"), None)
    assert "ValueError: kept" in capsys.readouterr().err  # never lost


def test_a_tasks_exception_is_an_error_record_and_other_reports_go_on(
    records: Records, reported: list[tuple[BaseException, str]], caplog: pytest.LogCaptureFixture
) -> None:
    async def fail() -> None:
        raise LookupError("nobody awaited me")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        _uncaught.watch_loop(loop)
        handler = loop.get_exception_handler()
        _uncaught.watch_loop(loop)
        assert loop.get_exception_handler() is handler  # once per loop
        task = loop.create_task(fail(), name="export")
        await asyncio.sleep(0.05)
        del task  # nobody retrieves its exception
        gc.collect()
        loop.call_exception_handler({"message": "something without an exception"})

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(main())
    [record] = records.records
    assert (record.levelno, record.getMessage()) == (logging.ERROR, "Task exception was never retrieved")
    assert (record.__dict__["task"], record.__dict__["mechanism"]) == ("export", "asyncio")
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], LookupError)
    assert [type(e) for e, _ in reported] == [LookupError]
    # The report without an exception: the loop's default handler, which logs it.
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == [
        "something without an exception"
    ]


@pytest.mark.usefixtures("hooks")
def test_sentry_gets_each_uncaught_exception_once_as_unhandled(
    records: Records, capsys: pytest.CaptureFixture[str]
) -> None:
    threading.excepthook = threading.__excepthook__
    sys.excepthook = sys.__excepthook__
    with SentryReceiver() as receiver:
        _errors.start(_settings.load({"SENTRY_DSN": receiver.dsn}))  # Sentry's hooks, if any, first
        try:
            _uncaught.install()
            _crash_in_a_thread(ValueError("thread crash"))
            sys.excepthook(KeyError, KeyError("top crash"), None)
            events = receiver.wait_for_events(2)
        finally:
            _errors._reset_for_tests()  # flush while the receiver still listens
        assert len(receiver.events) == 2  # the logging integration's copies were dropped
    mechanisms = sorted(
        (e["exception"]["values"][-1]["type"], e["exception"]["values"][-1]["mechanism"]["type"])
        for e in events
    )
    assert mechanisms == [("KeyError", "excepthook"), ("ValueError", "threading")]
    assert all(e["exception"]["values"][-1]["mechanism"]["handled"] is False for e in events)
    assert len(records.records) == 2
    assert capsys.readouterr().err == ""  # no hook of Sentry's printing Python's traceback after ours


SCRIPT = """
import threading
import cfk_otel

cfk_otel.configure()

def work():
    raise ValueError("thread crash\\nsecond line")

thread = threading.Thread(target=work, name="worker")
thread.start()
thread.join()
raise RuntimeError("top-level crash")
"""


def test_a_process_that_crashes_writes_only_json(tmp_path: Any) -> None:
    """A real interpreter: stdout and stderr together hold only JSON lines."""
    env = {
        "PATH": "/usr/bin:/bin",
        "OTEL_SDK_DISABLED": "true",
        "SERVICE_NAME": "cf-kanban",
        "PYTHONPATH": str(ROOT),
    }
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 1
    output = (result.stdout + result.stderr).splitlines()
    lines = [json.loads(x) for x in output]  # every line one JSON object
    thread, top = (x for x in lines if x.get("logger") == "cfk_otel.uncaught")
    assert (thread["level"], thread["thread.name"], thread["error"]["type"]) == (
        "error",
        "worker",
        "ValueError",
    )
    assert ", in work\nValueError: thread crash\nsecond line" in thread["error"]["stack"]
    assert (top["level"], top["message"], top["error"]["message"]) == (
        "fatal",
        "Uncaught exception",
        "top-level crash",
    )


@pytest.mark.usefixtures("hooks")
def test_telemetry_shutdown_puts_the_hooks_back(monkeypatch: pytest.MonkeyPatch) -> None:
    from cfk_otel._bootstrap import setup as _sdk
    from cfk_otel._state import State

    monkeypatch.setattr(_sdk, "STATE", State(started=True))
    before = sys.excepthook, threading.excepthook
    _uncaught.install()
    assert (sys.excepthook, threading.excepthook) != before
    assert _sdk.shutdown(1.0)
    assert (sys.excepthook, threading.excepthook) == before
