"""What a log record is made of: the level names, and the request line's own record type.

A request line is written for every request, so it has a record type built directly
(no stack walk, no path parsing) that every handler and formatter still takes as a
``LogRecord``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Final, NamedTuple

from opentelemetry import trace

_FILENAME: Final = "requests.py"  # where a request line is made (request_observer)
_START: Final[float] = getattr(logging, "_startTime", time.time())  # what relativeCreated counts from
_REQUESTS_LOGGER: Final = "cfk_otel.requests"
# How many attributes a request line's OTLP record has: the keys of `_RequestLine.fields`.
LINE_ATTRIBUTES: Final = 5


class _RequestLine(NamedTuple):
    """What a request line says; written directly or carried by a :class:`_RequestRecord`."""

    created: float
    level: int
    message: str
    method: str
    path: str
    route: str
    status: int
    duration_ms: float
    span: trace.SpanContext | None

    @property
    def fields(self) -> dict[str, Any]:
        """The line's context, as a :class:`_RequestRecord` carries it."""
        return {
            "method": self.method,
            "path": self.path,
            "route": self.route,
            "status": self.status,
            "duration_ms": self.duration_ms,
        }

    @classmethod
    def of(cls, record: _RequestRecord) -> _RequestLine:
        fields = record.cfk_context
        return cls(
            record.created,
            record.levelno,
            record.msg,
            fields["method"],
            fields["path"],
            fields["route"],
            fields["status"],
            fields["duration_ms"],
            record.cfk_span,
        )


class _RequestRecord(logging.LogRecord):
    """A request line. It is written for every request, so it is built directly: no stack
    walk for the caller, no path parsing, no scan for ``extra`` fields. It still has every
    attribute a ``LogRecord`` has, for any handler or formatter the app adds."""

    def __init__(
        self, level: int, message: str, fields: dict[str, Any], span: trace.SpanContext | None
    ) -> None:  # deliberately not calling LogRecord.__init__
        created = time.time()
        self.__dict__.update(_REQUEST_RECORD_FIXED)
        self.msg = message
        self.levelno = level
        self.levelname = logging.getLevelName(level)
        self.created = created
        self.msecs = (created - int(created)) * 1000
        self.relativeCreated = (created - _START) * 1000
        self.thread = threading.get_ident()
        self.threadName = threading.current_thread().name
        self.process = os.getpid()
        self.cfk_context = fields
        self.cfk_span = span


_REQUEST_RECORD_FIXED: Final = {
    "name": _REQUESTS_LOGGER,
    "args": None,
    "pathname": os.path.join(os.path.dirname(__file__), _FILENAME),
    "filename": _FILENAME,
    "module": _FILENAME.removesuffix(".py"),
    "exc_info": None,
    "exc_text": None,
    "stack_info": None,
    "lineno": 0,
    "funcName": "request_observer",
    "processName": "MainProcess",
    "taskName": None,
}
