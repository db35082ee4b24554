"""The app-facing logger: :data:`logger` and :func:`get_logger`, with the document's
methods and child loggers that carry context.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Final

from .render import _LOG_CALL, _prefixed, _safe_repr, _safe_str


class Logger:
    """The document's logger: a message plus context, one JSON line (and OTLP record) each.

    Context is a dict, keywords, or both, as in the document:

    >>> from cfk_otel import logger
    >>> logger.info("User logged in", {"userId": "user-123", "ip": "10.0.0.1"})
    >>> logger.info("User logged in", userId="user-123", ip="10.0.0.1")
    >>> logger.error("Failed to create ticket", err, {"ticketData": data})  # doctest: +SKIP
    >>> logger.log_request("POST", "/api/tickets", 201, 45, {"userId": "user-123"})
    >>> request_logger = logger.create_child_logger({"requestId": "r-1"})
    >>> request_logger.warn("Rate limit approaching", remaining=5)

    Keywords win over the dict. A context key that is one of the line's own fields
    (``level``, ``message``, ``service``, ``timestamp``, ...) is kept as ``context.<key>``.
    A call never raises into the app: other arguments still give the line (under
    ``args``) and one warning per method. Child loggers are immutable: context bound for
    one request cannot leak into another. ``fatal`` logs at the highest severity and does
    **not** exit the process.
    """

    __slots__ = ("_context", "_logger")

    def __init__(self, name: str = "cfk_otel.app", context: Mapping[str, Any] | None = None) -> None:
        self._logger = logging.getLogger(name)
        self._context: Mapping[str, Any] = dict(context or {})

    def _log(self, level: int, message: str, exc: BaseException | None, context: dict[str, Any]) -> None:
        if not self._logger.isEnabledFor(level):
            return
        merged = {**self._context, **context} if self._context else context
        with _LOG_CALL:  # logging must never raise into the app
            self._logger.log(level, message, exc_info=exc, extra={"cfk_context": merged}, stacklevel=3)

    # The common call (a message, keywords) costs one test more than it did; anything
    # else goes through _context (see there).

    def debug(
        self, message: str, context: Mapping[str, Any] | None = None, /, *extra: Any, **fields: Any
    ) -> None:
        if context is not None or extra or type(message) is not str:
            message, _, fields = _context("debug", message, (context, *extra), fields, False)
        self._log(logging.DEBUG, message, None, fields)

    def info(
        self, message: str, context: Mapping[str, Any] | None = None, /, *extra: Any, **fields: Any
    ) -> None:
        if context is not None or extra or type(message) is not str:
            message, _, fields = _context("info", message, (context, *extra), fields, False)
        self._log(logging.INFO, message, None, fields)

    def warn(
        self, message: str, context: Mapping[str, Any] | None = None, /, *extra: Any, **fields: Any
    ) -> None:
        if context is not None or extra or type(message) is not str:
            message, _, fields = _context("warn", message, (context, *extra), fields, False)
        self._log(logging.WARNING, message, None, fields)

    warning = warn

    def error(
        self,
        message: str,
        error: BaseException | Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        /,
        *extra: Any,
        exc: BaseException | None = None,
        **fields: Any,
    ) -> None:
        """Log an error: with an exception (before the context), its type, message and stack too.

        ``logger.error(msg, err, {ctx})``, ``logger.error(msg, {ctx})``, ``logger.error(msg,
        err, key=value)`` and ``logger.error(msg, exc=err)`` all work.
        """
        message, exc, fields = _context("error", message, (error, context, *extra), fields, True, exc)
        self._log(logging.ERROR, message, exc, fields)

    def fatal(
        self,
        message: str,
        error: BaseException | Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        /,
        *extra: Any,
        exc: BaseException | None = None,
        **fields: Any,
    ) -> None:
        """Log at the highest severity, as :meth:`error`. The process keeps running:
        exiting is the caller's call."""
        message, exc, fields = _context("fatal", message, (error, context, *extra), fields, True, exc)
        self._log(logging.CRITICAL, message, exc, fields)

    def log_request(
        self,
        method: str,
        path: str,
        status: int,
        duration_ms: float,
        context: Mapping[str, Any] | None = None,
        /,
        *extra: Any,
        **fields: Any,
    ) -> None:
        """One line for a finished request: ``POST /api/tickets 201 45ms``.

        Level follows the status: 5xx error, 4xx warn, else info. ``method``, ``path``,
        ``status`` and ``duration_ms`` are the line's fields; context keys of the same
        names are kept as ``context.<key>``.
        """
        _, _, context_fields = _context("log_request", "", (context, *extra), fields, False)
        try:
            code = int(status)
            level = logging.ERROR if code >= 500 else logging.WARNING if code >= 400 else logging.INFO
            message = f"{method} {path} {status} {duration_ms:g}ms"
        except Exception:  # a status or duration of another type: still a line
            _misuse("log_request", "status must be an int and duration_ms a number")
            level = logging.INFO
            message = f"{_safe_str(method)} {_safe_str(path)} {_safe_str(status)} {_safe_str(duration_ms)}ms"
        if not self._logger.isEnabledFor(level):
            return
        own = {"method": method, "path": path, "status": status, "duration_ms": duration_ms}
        bound = {**self._context, **context_fields} if self._context else context_fields
        own.update(_prefixed(bound, own))
        with _LOG_CALL:  # logging must never raise into the app
            self._logger.log(level, message, extra={"cfk_context": own}, stacklevel=2)

    def create_child_logger(
        self, context: Mapping[str, Any] | None = None, /, *extra: Any, **fields: Any
    ) -> Logger:
        """A logger whose lines all carry ``context`` (a dict, keywords or both) on top of this one's."""
        if context is not None or extra:
            _, _, fields = _context("create_child_logger", "", (context, *extra), fields, False)
        return Logger(self._logger.name, {**self._context, **fields})

    bind = create_child_logger


_misused: set[str] = set()
_MAX_MISUSE_WARNINGS: Final = 32


def _misuse(call: str, problem: str) -> None:
    """One warning per logger method and kind of mistake: the app's line is written anyway."""
    key = f"{call}:{problem}"
    if key in _misused or len(_misused) >= _MAX_MISUSE_WARNINGS:
        return
    _misused.add(key)
    logging.getLogger("cfk_otel").warning(
        "cfk_otel: logger.%s(): %s; the line was written, with what did not fit under 'args'", call, problem
    )


def _context(
    call: str,
    message: object,
    positional: tuple[Any, ...],
    fields: dict[str, Any],
    takes_error: bool,
    exc: BaseException | None = None,
) -> tuple[str, BaseException | None, dict[str, Any]]:
    """(message, exception, context) from a call's arguments, whatever they are.

    Positional dicts (any ``Mapping``) are the context, under the keywords; with
    ``takes_error``, an exception is the error (the first one; ``exc=`` wins). ``None``
    is skipped. Anything else is kept, in order, under ``args``, with a warning.
    """
    context: dict[str, Any] = {}
    leftovers: list[Any] = []
    if exc is not None and not isinstance(exc, BaseException):
        leftovers.append(exc)
        exc = None
    for value in positional:
        if value is None:
            continue
        if isinstance(value, Mapping):
            try:
                context.update(value)
                continue
            except Exception:  # a mapping whose items() raises: kept as a leftover
                leftovers.append(_safe_repr(value))
                continue
        elif takes_error and exc is None and isinstance(value, BaseException):
            exc = value
            continue
        leftovers.append(value)
    if leftovers:
        _misuse(
            call,
            "arguments after the message must be "
            + ("an exception, then " if takes_error else "")
            + "a dict",
        )
        context["args"] = leftovers
    if not isinstance(message, str):
        _misuse(call, "the message must be a str")
        message = _safe_str(message)
    if context:
        context.update(fields)
        fields = context
    return message, exc, fields


def get_logger(name: str | None = None, **context: Any) -> Logger:
    """A :class:`Logger` for ``name`` (default: the app logger), with optional context."""
    return Logger(name or "cfk_otel.app", context)


logger: Final = Logger()
