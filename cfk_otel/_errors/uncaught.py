"""Exceptions nobody caught become log records, not raw tracebacks.

Python prints an exception that escapes a thread (``threading.excepthook``), the main
program (``sys.excepthook``) or an asyncio task (the loop's exception handler) as a
multi-line traceback on stderr, outside the JSON lines. Here each becomes one record of
the ``cfk_otel.uncaught`` logger (``fatal`` at top level, where the process ends; ``error``
otherwise) with the stack in its ``error`` field, on stdout and over OTLP like every other
record, and goes to Sentry, as unhandled, when Sentry is on.

The hooks are installed once by the set-up (:func:`install`) and put back by
:func:`uninstall` (telemetry shutdown, tests). A hook an app installed before us is
still called after ours; Python's own defaults are not, since they would print the
traceback a second time, raw.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

from . import total as _errors_total

_log: Final = logging.getLogger("cfk_otel.uncaught")
_MARK: Final = "_cfk_otel_uncaught"

ExceptHook = Callable[[type[BaseException], BaseException, TracebackType | None], Any]
ThreadHook = Callable[[threading.ExceptHookArgs], Any]
LoopHandler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]


@dataclass
class _Installed:
    sys_hook: ExceptHook
    thread_hook: ThreadHook


_installed: _Installed | None = None
_lock = threading.Lock()


def install() -> None:
    """Take over ``sys.excepthook`` and ``threading.excepthook``. Safe to call again."""
    global _installed  # noqa: PLW0603  (the process's one pair of hooks)
    with _lock:
        if _installed is not None:
            return
        _installed = _Installed(sys.excepthook, threading.excepthook)
        sys.excepthook = _sys_hook(_installed.sys_hook)
        threading.excepthook = _thread_hook(_installed.thread_hook)


def uninstall() -> None:
    """Put back the hooks :func:`install` found, unless something replaced ours since."""
    global _installed
    with _lock:
        installed, _installed = _installed, None
        if installed is None:
            return
        if getattr(sys.excepthook, _MARK, False):
            sys.excepthook = installed.sys_hook
        if getattr(threading.excepthook, _MARK, False):
            threading.excepthook = installed.thread_hook


def _record(
    level: int,
    message: str,
    error: BaseException,
    traceback: TracebackType | None,
    mechanism: str,
    **fields: object,
) -> None:
    # Sentry first: it marks the exception reported, so the logging integration's event
    # for the record below is dropped as a duplicate.
    _errors_total.unhandled(error, mechanism, "fatal" if level >= logging.CRITICAL else "error")
    _log.log(
        level,
        message,
        exc_info=(type(error), error, traceback),
        extra={"mechanism": mechanism, **fields},
    )


def _sys_hook(previous: ExceptHook) -> ExceptHook:
    def excepthook(
        exc_type: type[BaseException], error: BaseException, traceback: TracebackType | None
    ) -> None:
        try:
            if issubclass(exc_type, KeyboardInterrupt):
                _log.warning("Interrupted (KeyboardInterrupt)", extra={"mechanism": "excepthook"})
            else:
                _record(logging.CRITICAL, "Uncaught exception", error, traceback, "excepthook")
        except Exception:  # never lose the traceback: Python's own output then
            sys.__excepthook__(exc_type, error, traceback)
        if previous is not sys.__excepthook__:
            previous(exc_type, error, traceback)

    setattr(excepthook, _MARK, True)
    return excepthook


def _thread_hook(previous: ThreadHook) -> ThreadHook:
    def excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:  # ignored silently, as Python does
            return
        name = args.thread.name if args.thread is not None else "?"
        try:
            error = args.exc_value if args.exc_value is not None else args.exc_type()
            _record(
                logging.ERROR,
                f"Uncaught exception in thread {name}",
                error,
                args.exc_traceback,
                "threading",
                **{"thread.name": name},  # OpenTelemetry's attribute ("thread" is the LogRecord's)
            )
        except Exception:
            threading.__excepthook__(args)
        if previous is not threading.__excepthook__:
            previous(args)

    setattr(excepthook, _MARK, True)
    return excepthook


def watch_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Exceptions the loop reports (a task's exception never retrieved, a failed callback)
    become ``error`` records. Other reports still go to the handler found (or the
    loop's default, which logs them). Once per loop."""
    previous = loop.get_exception_handler()
    if getattr(previous, _MARK, False):
        return

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        if isinstance(error, BaseException):
            try:
                task = context.get("task") or context.get("future")
                fields = {"task": task.get_name()} if isinstance(task, asyncio.Task) else {}
                message = str(context.get("message") or "Unhandled exception in the event loop")
                _record(logging.ERROR, message, error, error.__traceback__, "asyncio", **fields)
            except Exception:
                loop.default_exception_handler(context)
            if previous is not None:
                previous(loop, context)
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    setattr(handler, _MARK, True)
    loop.set_exception_handler(handler)
