"""Structured logs: the document's JSON lines on stdout and the same records over OTLP.

Everything that logs in the process goes through the root logger, which cfk_otel owns:
one stdout handler (JSON, or ``LOG_FORMAT=pretty`` for a terminal) and one OTLP
handler, both filtered by ``LOG_LEVEL``. uvicorn's and gunicorn's own handlers are
removed so their records come out once, in the same shape; uvicorn's access log is
replaced by one request line per HTTP request (see :func:`request_observer`).

The app-facing API is :data:`logger` (and :func:`get_logger`), with the document's
methods and child loggers that carry context.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Mapping
from typing import IO, Any, Final, NamedTuple

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry._logs import Logger as OtelLogger
from opentelemetry._logs import LoggerProvider, SeverityNumber

from ._core import Ended, LogSink
from ._guard import guard
from ._http import utc_timestamp
from ._redact import Known, scrub, scrub_text, scrub_url
from ._settings import Settings
from ._types import RequestInfo

LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "fatal": logging.CRITICAL,
}
_BY_SEVERITY: Final = sorted(((v, k) for k, v in LEVELS.items()), reverse=True)
_SEVERITY: Final = {
    logging.DEBUG: (SeverityNumber.DEBUG, "DEBUG"),
    logging.INFO: (SeverityNumber.INFO, "INFO"),
    logging.WARNING: (SeverityNumber.WARN, "WARN"),
    logging.ERROR: (SeverityNumber.ERROR, "ERROR"),
    logging.CRITICAL: (SeverityNumber.FATAL, "FATAL"),
}
MAX_MESSAGE: Final = 16_384
_LOG_CALL: Final = guard("a log call")
_QUEUE_LINE: Final = guard("queueing a request line in the core", then="the line is lost")
# What ends a value cut at its length limit (the compiled core writes the same marker).
_TRUNCATED: Final = "…[truncated {} chars]"
# A stdout line's ceiling in bytes: a line over it is written again with its longest
# fields cut (see _fitted_line).
LINE_MAX_BYTES: Final = 64 << 10
_FITTED_FIELD: Final = 1024  # characters a field over the ceiling keeps
# Exporters logging their own failures must never feed themselves.
_OWN_LOGGERS: Final = ("opentelemetry", "grpc", "urllib3")
# Standard LogRecord attributes; anything else on a record came from ``extra=`` and is context.
_RESERVED: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "cfk_context",
    "cfk_span",
    "color_message",  # uvicorn's copy of the message with ANSI colours
}
_FILENAME: Final = os.path.basename(__file__)
_START: Final[float] = getattr(logging, "_startTime", time.time())  # what relativeCreated counts from
_REQUESTS_LOGGER: Final = "cfk_otel.requests"
_SERVER_LOGGERS: Final = ("uvicorn", "uvicorn.error", "uvicorn.access", "gunicorn", "gunicorn.error")
_ACCESS_LOGGERS: Final = ("uvicorn.access", "gunicorn.access")


def level_name(levelno: int) -> str:
    """The document's level for a ``logging`` level (custom levels round down)."""
    for threshold, name in _BY_SEVERITY:
        if levelno >= threshold:
            return name
    return "debug"


_LEVEL_NAMES: Final = {level: level_name(level) for level in (logging.INFO, logging.WARNING, logging.ERROR)}


def _truncate(message: str) -> str:
    if len(message) <= MAX_MESSAGE:
        return message
    return message[:MAX_MESSAGE] + _TRUNCATED.format(len(message) - MAX_MESSAGE)


def _context_of(record: logging.LogRecord) -> dict[str, Any]:
    bound: Mapping[str, Any] | None = getattr(record, "cfk_context", None)
    context = dict(bound) if bound else {}
    for key, value in record.__dict__.items():
        if key not in _RESERVED and key not in context:
            context[key] = value
    return context


# The last record's redacted context, for the next handler of the same record: (a weak
# reference to the record, its attribute count then, context). One entry, replaced per
# record; nothing is added to the record itself, where the app's own formatters would find
# it, and nothing it holds (an exception's frames) is kept alive.
_last_context: tuple[Callable[[], object], int, dict[str, Any]] = (lambda: None, 0, {})


def _redacted_context(record: logging.LogRecord, known: Known, limit: int) -> dict[str, Any]:
    """The record's context with secrets hidden (secret keys, credentials in text, the
    ``known`` values; see :mod:`cfk_otel._redact`) and strings cut at ``limit``: worked out
    once per record and shared by our handlers (stdout and OTLP), again if a filter added
    to the record since."""
    global _last_context  # noqa: PLW0603  (a one-entry cache)
    last = _last_context
    if last[0]() is record and last[1] == len(record.__dict__):
        return last[2]
    context: dict[str, Any] = scrub(_context_of(record), known=known)
    for key, value in context.items():
        if type(value) is str and len(value) > limit:
            context[key] = cut(value, limit)
    if not _OWN_FIELDS.isdisjoint(context):
        context = _prefixed(context, _OWN_FIELDS)
    _last_context = (weakref.ref(record), len(record.__dict__), context)
    return context


# The fields a line or record has of its own (the JSON line's and the OTLP record's
# attributes): a context key among them is kept as ``context.<key>``, never dropped.
CONTEXT_PREFIX: Final = "context."
_OWN_FIELDS: Final = frozenset(
    {
        "timestamp",
        "level",
        "message",
        "service",
        "environment",
        "version",
        "trace_id",
        "span_id",
        "error",
        "dd.service",
        "dd.env",
        "dd.version",
        "dd.trace_id",
        "dd.span_id",
        "code.file.path",
        "code.function.name",
        "code.line.number",
        "exception.type",
        "exception.message",
        "exception.stacktrace",
    }
)


def _prefixed(context: Mapping[Any, Any], own: frozenset[str] | Mapping[str, Any]) -> dict[Any, Any]:
    """``context`` with each key that is one of ``own`` renamed ``context.<key>`` (order kept)."""
    out: dict[Any, Any] = {}
    for key, value in context.items():
        name = key
        if key in own:
            name = CONTEXT_PREFIX + str(key)
            while name in context or name in out or name in own:
                name = CONTEXT_PREFIX + name
        out[name] = value
    return out


def _span_context(record: logging.LogRecord) -> trace.SpanContext | None:
    explicit = getattr(record, "cfk_span", None)
    span_context = explicit if explicit is not None else trace.get_current_span().get_span_context()
    return span_context if span_context.is_valid else None


def _json_default(value: object) -> object:
    # Called by json for what it cannot encode; app objects may raise anything here.
    if isinstance(value, set | frozenset):
        return sorted(value, key=_safe_repr)
    try:
        isoformat = getattr(value, "isoformat", None)
        if callable(isoformat):
            return isoformat()
    except Exception:  # noqa: S110  (falls through to the repr)
        pass
    return _safe_repr(value)


# A str as a JSON string: json's own (C) escaping, as json.dumps(ensure_ascii=False) does.
_string: Final[Callable[[str], str]] = json.encoder.encode_basestring


# json.dumps with these options builds an encoder per call; one, shared (it keeps no state).
_ENCODER: Final = json.JSONEncoder(
    default=_json_default, ensure_ascii=False, separators=(",", ":"), allow_nan=False
)


def _json(value: object) -> str:
    return _ENCODER.encode(value)


def _dumps(document: dict[str, Any]) -> str:
    try:
        return _json(document)
    except Exception:
        # A circular structure, NaN, or a __repr__ that raises: keep the line, value by value.
        safe: dict[str, Any] = {}
        for key, value in document.items():
            try:
                _json(value)
                safe[str(key)] = value
            except Exception:
                safe[str(key)] = _safe_repr(value)
        return _json(safe)


def _safe_repr(value: object) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    try:
        return repr(value)
    except Exception:
        return f"<unrepresentable {type(value).__qualname__}>"


def _error_fields(exc_info: Any, known: Known) -> dict[str, str] | None:
    if not exc_info or exc_info[0] is None:
        return None
    exc_type, exc, tb = exc_info
    return {
        "type": exc_type.__qualname__,
        "message": scrub_text(_truncate(_safe_str(exc)), known),
        "stack": scrub_text("".join(traceback.format_exception(exc_type, exc, tb)), known),
    }


def _message(record: logging.LogRecord, known: Known) -> str:
    try:
        message = record.getMessage()
    except Exception:  # bad %-arguments: keep both parts rather than lose the line
        message = f"{_safe_repr(record.msg)} % {_safe_repr(record.args)}"
    return scrub_text(_truncate(message.rstrip("\n")), known)


def _safe_str(value: object) -> str:
    try:
        return str(value)
    except Exception:
        return _safe_repr(value)


def cut(value: str, limit: int) -> str:
    """``value`` cut to ``limit`` characters, with a marker saying how many went.

    >>> cut("abcdef", 3)
    'abc…[truncated 3 chars]'
    """
    if len(value) <= limit:
        return value
    return value[:limit] + _TRUNCATED.format(len(value) - limit)


def _utf8_size(text: str) -> int:
    return len(text.encode("utf-8", "replace"))


def _fitted_line(document: dict[str, Any]) -> str:
    """The line of a ``document`` that was over :data:`LINE_MAX_BYTES`, within it: its
    longest fields first cut to :data:`_FITTED_FIELD` characters (a nested one as its JSON
    text, the error's message and stack each), then, if that is not enough, the context
    fields from the last, counted in ``cfk_otel.dropped_fields``."""
    fitted = dict(document)
    sizes = sorted(((_utf8_size(_dumps({"v": v})), k) for k, v in document.items()), reverse=True)
    for size, key in sizes:
        if size <= _FITTED_FIELD:
            break
        value = fitted[key]
        if key == "error" and isinstance(value, dict):
            fitted[key] = {k: cut(v, _FITTED_FIELD) if isinstance(v, str) else v for k, v in value.items()}
        else:
            fitted[key] = cut(value if isinstance(value, str) else _dumps({"v": value})[5:-1], _FITTED_FIELD)
        line = _dumps(fitted)
        if _utf8_size(line) <= LINE_MAX_BYTES:
            return line
    dropped = 0
    for key in reversed(list(fitted)):
        if _utf8_size(line := _dumps({**fitted, "cfk_otel.dropped_fields": dropped})) <= LINE_MAX_BYTES:
            return line
        if key not in _FIXED:
            del fitted[key]
            dropped += 1
    return _dumps({**fitted, "cfk_otel.dropped_fields": dropped})


class JsonFormatter(logging.Formatter):
    """One JSON object per record: the document's fields, then the context.

    ``timestamp`` (UTC, milliseconds, ``Z``), ``level``, ``message``, ``service``,
    ``environment``, ``version``, the context, ``trace_id``/``span_id`` when a span is
    active, ``error`` when an exception is attached, and Datadog's ``dd.*`` fields when
    ``DD_LOGS_INJECTION=true``. Secret-looking keys are ``[REDACTED]`` at any depth.
    """

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self._known = Known(settings.secret_values())
        self._limit = settings.log_value_limit
        self._service = settings.service_name
        self._environment = settings.environment
        self._version = settings.service_version
        self._dd = (
            {"dd.service": settings.dd_service, "dd.env": settings.dd_env, "dd.version": settings.dd_version}
            if settings.dd_logs_injection
            else None
        )
        # The request line's fixed part, encoded once (see _line).
        self._service_fields = _json(
            {"service": self._service, "environment": self._environment, "version": self._version}
        )[1:-1]

    def document(self, record: logging.LogRecord) -> dict[str, Any]:
        document: dict[str, Any] = {
            "timestamp": utc_timestamp(record.created),
            "level": level_name(record.levelno),
            "message": _message(record, self._known),
            "service": self._service,
            "environment": self._environment,
            "version": self._version,
        }
        # A request line's fields are ours, scalars under fixed keys: nothing to find or hide.
        context = (
            record.cfk_context
            if type(record) is _RequestRecord
            else _redacted_context(record, self._known, self._limit)
        )
        for key, value in context.items():
            document.setdefault(str(key), value)
        if not hasattr(record, "cfk_context") and "logger" not in document:
            document["logger"] = record.name
        span_context = _span_context(record)
        if span_context is not None:
            document["trace_id"] = format(span_context.trace_id, "032x")
            document["span_id"] = format(span_context.span_id, "016x")
        error = _error_fields(record.exc_info, self._known)
        if error is not None:
            document["error"] = error
        if self._dd is not None:
            document.update(self._dd)
            if span_context is not None:
                # Datadog correlates on the low 64 bits, in decimal.
                document["dd.trace_id"] = str(span_context.trace_id & 0xFFFFFFFFFFFFFFFF)
                document["dd.span_id"] = str(span_context.span_id)
        return document

    @property
    def direct(self) -> bool:
        """Whether request lines may be written by :meth:`_line` without a record."""
        return self._dd is None

    def format(self, record: logging.LogRecord) -> str:
        if type(record) is _RequestRecord and self._dd is None:
            return self._line(_RequestLine.of(record))
        document = self.document(record)
        line = _dumps(document)
        # A character is at most 4 bytes in UTF-8: most lines need no encoding to know.
        if len(line) * 4 > LINE_MAX_BYTES and _utf8_size(line) > LINE_MAX_BYTES:
            return _fitted_line(document)
        return line

    def _line(self, request: _RequestLine) -> str:
        """The request line :meth:`document` would give, written directly: it runs per request.

        Every field is ours: the method is one of nine names, status and duration are
        numbers, the rest strings escaped as json escapes them (tests/test_logs.py
        compares the two).
        """
        span, level = request.span, request.level
        name = _LEVEL_NAMES.get(level) or level_name(level)
        line = (
            f'{{"timestamp":"{utc_timestamp(request.created)}","level":"{name}",'
            f'"message":{_string(request.message)},{self._service_fields},"method":"{request.method}",'
            f'"path":{_string(request.path)},"route":{_string(request.route)},"status":{request.status},'
            f'"duration_ms":{request.duration_ms!r}'
        )
        if span is None:
            return line + "}"
        return f'{line},"trace_id":"{span.trace_id:032x}","span_id":"{span.span_id:016x}"}}'


_COLOURS: Final = {
    "debug": "\x1b[2m",
    "info": "\x1b[32m",
    "warn": "\x1b[33m",
    "error": "\x1b[31m",
    "fatal": "\x1b[1;41m",
}
_FIXED: Final = (
    "timestamp",
    "level",
    "message",
    "service",
    "environment",
    "version",
    "trace_id",
    "span_id",
    "error",
)


class PrettyFormatter(JsonFormatter):
    """``LOG_FORMAT=pretty``: one readable line per record, coloured on a terminal.

    ``colour=None`` (the set-up's choice) colours only when stdout is a terminal, never
    with ``NO_COLOR`` set, always with ``FORCE_COLOR`` set (NO_COLOR wins). Control
    characters (CR, LF, ESC, the rest of C0 and C1) in the message and in every field are
    written as escapes, so no value can start a line of its own or drive the terminal; an
    exception's stack follows on lines that all start with ``  | ``.
    """

    def __init__(self, settings: Settings, colour: bool | None = None) -> None:
        super().__init__(settings)
        self._colour = colour
        self._no_color, self._force_color = settings.no_color, settings.force_color
        self._stream: object = None  # the stdout last checked, and whether it was coloured
        self._stream_colour = False

    def _coloured(self) -> bool:
        if self._colour is not None:
            return self._colour
        stream = sys.stdout  # what our stdout handler writes to, looked up per record too
        if stream is not self._stream:
            self._stream_colour = colour_wanted(stream, self._no_color, self._force_color)
            self._stream = stream
        return self._stream_colour

    def format(self, record: logging.LogRecord) -> str:
        doc = self.document(record)
        level = doc["level"]
        context = " ".join(f"{k}={_compact(v)}" for k, v in doc.items() if k not in _FIXED)
        head = f"{doc['timestamp'][11:23]} {level.upper():<5}"
        if self._coloured():
            head = f"{_COLOURS[level]}{head}\x1b[0m"
        body = doc["message"] + (f"  {context}" if context else "")
        if "trace_id" in doc:
            body += f"  trace={doc['trace_id'][:16]}"
        line = f"{head} {escape_control(body)}"
        error = doc.get("error")
        if error:
            line += "".join(
                f"\n{_STACK_INDENT}{escape_control(x)}" for x in error["stack"].rstrip().split("\n")
            )
        return line


_STACK_INDENT: Final = "  | "
# C0 and C1 control characters, DEL, and Unicode's line and paragraph separators.
_CONTROL: Final = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_ESCAPES: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    return _ESCAPES.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def escape_control(text: str) -> str:
    """``text`` with every control character written as an escape (``\\n``, ``\\x1b``, ...).

    >>> escape_control("GET /a\\r\\nERROR forged")
    'GET /a\\\\r\\\\nERROR forged'
    """
    if _CONTROL.search(text) is None:
        return text
    return _CONTROL.sub(_escape_one, text)


def colour_wanted(stream: object, no_color: bool, force_color: bool) -> bool:
    """Whether pretty lines written to ``stream`` get ANSI colours: ``NO_COLOR`` set, never;
    ``FORCE_COLOR`` set, always; otherwise only on a terminal."""
    if no_color:
        return False
    if force_color:
        return True
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except Exception:  # a replaced stdout without isatty(), or a closed one
        return False


def _compact(value: object) -> str:
    return value if isinstance(value, str) and " " not in value else _dumps({"v": value})[5:-1]


def _attribute(value: object) -> Any:
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return list(value)
    return _dumps({"v": value})[5:-1]


# An OTLP log record's attributes, in UTF-8 bytes, at most (as a stdout line's): far below
# what log backends take (Loki and CloudWatch Logs 256 KB, Datadog 1 MB), far above an
# ordinary record (a few hundred bytes).
RECORD_MAX_BYTES: Final = 64 << 10


def _weight(value: Any) -> int:
    """Characters a record attribute's value holds (each at most 4 bytes in UTF-8)."""
    if type(value) is str:
        return len(value)
    if type(value) is list:
        return sum(len(v) for v in value)
    return 16


def _as_text(value: Any) -> str:
    return value if type(value) is str else _dumps({"v": value})[5:-1]


def _within_ceiling(attributes: dict[str, Any]) -> dict[str, Any]:
    """A record's attributes within :data:`RECORD_MAX_BYTES`: as they are, nearly always;
    otherwise the longest text values cut to 1024 characters (with the marker), then, if
    that is not enough, the context's last fields dropped and counted in
    ``cfk_otel.dropped_fields``, as a stdout line is fitted. The code location and the
    exception stay."""
    if sum(len(k) + _weight(v) for k, v in attributes.items()) * 4 <= RECORD_MAX_BYTES:
        return attributes  # the usual case: no encoding needed to know

    def size(fields: dict[str, Any]) -> int:
        return sum(_utf8_size(k) + _utf8_size(_as_text(v)) for k, v in fields.items())

    fitted = dict(attributes)
    for key in sorted(fitted, key=lambda k: _weight(fitted[k]), reverse=True):
        if size(fitted) <= RECORD_MAX_BYTES or _weight(fitted[key]) <= _FITTED_FIELD:
            break
        fitted[key] = cut(_as_text(fitted[key]), _FITTED_FIELD)
    dropped = 0
    for key in [k for k in reversed(list(fitted)) if not k.startswith(("code.", "exception."))]:
        if size(fitted) + 64 <= RECORD_MAX_BYTES:
            break
        del fitted[key]
        dropped += 1
    if dropped:
        fitted["cfk_otel.dropped_fields"] = dropped
    return fitted


class OtlpHandler(logging.Handler):
    """Emits every ``logging`` record as an OpenTelemetry log record, once.

    On the native path (a ``sink``, see ``_core.LogSink``) each record goes straight into
    the compiled core; otherwise, or once the app added a log processor of its own, through
    the SDK's logger, as the reference path does.
    """

    def __init__(
        self,
        provider: LoggerProvider,
        level: int = logging.NOTSET,
        sink: LogSink | None = None,
        known: Known | None = None,
        value_limit: int = 8192,
    ) -> None:
        super().__init__(level)
        self._known = known or Known()  # the configured secrets, withheld from every record
        self._limit = value_limit
        self._provider = provider
        self._loggers: dict[str, OtelLogger] = {}
        self._sink = sink

    @property
    def direct(self) -> bool:
        """Whether records go straight to the core (:meth:`emit_request` among them)."""
        return self._sink is not None and self._sink.active

    def emit_request(self, request: _RequestLine) -> None:
        """A request line as an OTLP log record, straight into the core."""
        ended = self.prepare_request(request)
        if ended is None:
            return
        try:
            ended[0].record_log(*ended[1])
        except Exception:  # a log line must never raise into the app
            self.handleError(_RequestRecord(request.level, request.message, request.fields, request.span))

    def prepare_request(self, request: _RequestLine) -> Ended | None:
        """A request line as an OTLP log record for the core: what queues it (see
        ``LogSink.prepared``), for :meth:`emit_request` or for the middleware's one call at
        the request's end. None when it went through the SDK's logger instead, or failed."""
        number, text = _SEVERITY[request.level]
        try:
            stamp = int(request.created * 1e9)
            fields = request.fields
            ended = self._sink.prepared(  # type: ignore[union-attr]  # direct: the sink is there
                _REQUESTS_LOGGER, stamp, stamp, number.value, text, request.message, fields, request.span
            )
            if ended is None:
                self._emit(
                    self._logger(_REQUESTS_LOGGER),
                    _RequestRecord(request.level, request.message, fields, request.span),
                    number,
                    text,
                    dict(fields),
                )
            return ended
        except Exception:  # a log line must never raise into the app
            self.handleError(_RequestRecord(request.level, request.message, request.fields, request.span))
            return None

    def _logger(self, name: str) -> OtelLogger:
        logger = self._loggers.get(name)
        if logger is None:
            logger = self._loggers.setdefault(name, self._provider.get_logger(name))
        return logger

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(_OWN_LOGGERS):
            return
        try:
            if type(record) is _RequestRecord and self.direct:
                self.emit_request(_RequestLine.of(record))
                return
            number, text = _SEVERITY.get(record.levelno, (SeverityNumber.UNSPECIFIED, record.levelname))
            if type(record) is _RequestRecord:  # scalars under fixed keys, no code location
                self._emit(self._logger(record.name), record, number, text, dict(record.cfk_context))
                return
            context = _redacted_context(record, self._known, self._limit)
            attributes = {str(k): _attribute(v) for k, v in context.items()}
            if record.name != _REQUESTS_LOGGER:  # a request line's code location says nothing
                attributes["code.file.path"] = record.pathname
                attributes["code.function.name"] = record.funcName
                attributes["code.line.number"] = record.lineno
            error = _error_fields(record.exc_info, self._known)
            if error is not None:
                attributes["exception.type"] = error["type"]
                attributes["exception.message"] = error["message"]
                attributes["exception.stacktrace"] = error["stack"]
            attributes = _within_ceiling(attributes)
            if self.direct:
                explicit = getattr(record, "cfk_span", None)
                span = explicit if explicit is not None else trace.get_current_span().get_span_context()
                if self._sink.record(  # type: ignore[union-attr]  # direct: the sink is there
                    record.name,
                    int(record.created * 1e9),
                    time.time_ns(),
                    number.value,
                    text,
                    _message(record, self._known),
                    attributes,
                    span,
                ):
                    return
            self._emit(self._logger(record.name), record, number, text, attributes)
        except Exception:  # a log line must never raise into the app
            self.handleError(record)

    def _emit(
        self,
        logger: OtelLogger,
        record: logging.LogRecord,
        number: SeverityNumber,
        text: str,
        attributes: dict[str, Any],
    ) -> None:
        """One record, built by the SDK's ``logger``."""
        explicit = getattr(record, "cfk_span", None)
        ctx = trace.set_span_in_context(trace.NonRecordingSpan(explicit)) if explicit is not None else None
        logger.emit(
            timestamp=int(record.created * 1e9),
            context=ctx or otel_context.get_current(),
            severity_number=number,
            severity_text=text,
            body=_message(record, self._known),
            attributes=attributes,
        )


class _StdoutHandler(logging.StreamHandler[IO[str]]):
    """stdout, looked up per record so that test runners' capture and redirections work."""

    def __init__(self, level: int) -> None:
        super().__init__(sys.stdout)
        self.setLevel(level)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)

    def write_line(self, line: str) -> None:
        """Write one formatted line as :meth:`emit` would (the request line's direct route)."""
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            try:
                stream = self.stream = sys.stdout
                stream.write(line + "\n")
                stream.flush()
            except Exception:  # as logging does: reported on stderr, never raised
                self.handleError(_RequestRecord(logging.INFO, line, {}, None))


_OURS: Final = "_cfk_otel_handler"


def notice(settings: Settings, message: str) -> None:
    """One start-up line on stderr, in the console's format (a JSON object with
    ``LOG_FORMAT=json``), and nowhere else: not on stdout, not exported. An info line:
    quiet when ``LOG_LEVEL`` is above info. With ``LOG_OUTPUT=otlp`` the console stays
    silent, and the line is logged (so exported) instead."""
    if LEVELS[settings.log_level] > logging.INFO:
        return
    if settings.log_output == "otlp":
        logging.getLogger("cfk_otel").info(message)
        return
    formatter = PrettyFormatter(settings) if settings.log_format == "pretty" else JsonFormatter(settings)
    record = logging.LogRecord("cfk_otel", logging.INFO, __file__, 0, message, None, None)
    try:
        print(formatter.format(record), file=sys.stderr, flush=True)
    except Exception:  # a closed stderr: the notice alone is lost
        return


def configure_logging(
    settings: Settings, provider: LoggerProvider | None, sink: LogSink | None = None
) -> None:
    """Own the root logger: our handlers only, at ``LOG_LEVEL``. Safe to call again.

    Called at start-up and again after uvicorn applies its own logging configuration.
    """
    level = LEVELS[settings.log_level]
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handlers: list[logging.Handler] = []
    if settings.log_output in ("stdout", "both"):
        stream = _StdoutHandler(level)
        stream.setFormatter(
            PrettyFormatter(settings) if settings.log_format == "pretty" else JsonFormatter(settings)
        )
        handlers.append(stream)
    if provider is not None and settings.log_output in ("otlp", "both") and settings.logs_exporters:
        known = Known(settings.secret_values())
        handlers.append(OtlpHandler(provider, level, sink, known, settings.log_value_limit))
    for handler in handlers:
        setattr(handler, _OURS, True)
        root.addHandler(handler)
    root.setLevel(level)
    for name in _SERVER_LOGGERS:
        server_logger = logging.getLogger(name)
        for handler in list(server_logger.handlers):
            server_logger.removeHandler(handler)
        server_logger.propagate = True
    for name in _ACCESS_LOGGERS:
        # Replaced by our request line: one line per request, not two. With no handler
        # to reach, uvicorn also skips formatting its access line's arguments per request
        # (it checks hasHandlers(), as with --no-access-log).
        access = logging.getLogger(name)
        access.disabled = True
        access.propagate = False
        for handler in list(access.handlers):
            access.removeHandler(handler)
    logging.captureWarnings(True)


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
_requests: Final = logging.getLogger(_REQUESTS_LOGGER)


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
    "pathname": __file__,
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


class _Route(NamedTuple):
    """Where request lines go when only our handlers would see them (see ``_route``)."""

    stream: _StdoutHandler | None
    formatter: JsonFormatter | None
    otlp: OtlpHandler | None


def _listeners() -> tuple[object, ...]:
    """Everything ``logging`` would involve in a request line: handlers up the logger
    chain, the requests logger's filters and the handlers' filters."""
    handlers: list[logging.Handler] = []
    logger: logging.Logger | None = _requests
    while logger is not None:
        handlers += logger.handlers
        if not logger.propagate:
            break
        logger = logger.parent
    return (*handlers, None, *_requests.filters, None, *(f for h in handlers for f in h.filters))


def _route(listeners: tuple[object, ...]) -> _Route | None:
    """The direct route for request lines, or None when ``logging`` must dispatch them.

    Direct means: no filters, and no handlers but ours up the logger chain; our stdout
    handler writes JSON without Datadog fields, and our OTLP handler has the sink. Then
    a request line is written exactly as ``logging`` would write it, without the record,
    the dispatch and the per-handler locking; anything else takes the usual way.
    """
    handlers = listeners[: listeners.index(None)]
    if len(listeners) != len(handlers) + 2:  # a filter somewhere
        return None
    stream: _StdoutHandler | None = None
    otlp: OtlpHandler | None = None
    for handler in handlers:
        if type(handler) is _StdoutHandler and stream is None and getattr(handler, _OURS, False):
            stream = handler
        elif (
            type(handler) is OtlpHandler
            and otlp is None
            and handler.direct
            and getattr(handler, _OURS, False)
        ):
            otlp = handler
        else:
            return None
    formatter = stream.formatter if stream is not None else None
    if stream is not None and not (type(formatter) is JsonFormatter and formatter.direct):
        return None
    return _Route(stream, formatter if stream is not None else None, otlp)  # type: ignore[arg-type]


class RequestLog:
    """The request line written for each HTTP request: a request observer.

    Called with a :class:`RequestInfo` it writes the line everywhere it goes. The
    middleware calls :meth:`write` instead, which leaves the OTLP record that goes straight
    into the core to the middleware, to hand over with the request's span and metrics in
    one call (``_core.end_request``).
    """

    __slots__ = ("_limit", "_rate", "_route", "_seen")

    def __init__(self, settings: Settings) -> None:
        self._rate = settings.log_requests_sample_rate
        self._limit = settings.log_value_limit
        self._seen: tuple[object, ...] = ()
        self._route: _Route | None = None

    def __call__(self, info: RequestInfo) -> None:
        ended = self.write(info)
        if ended is not None:
            with _QUEUE_LINE:  # a log line must never raise into the app
                ended[0].record_log(*ended[1])

    def write(self, info: RequestInfo) -> Ended | None:
        """Write the request line of ``info``; what queues its OTLP record in the core when
        that is left to the caller (None: nothing left to do)."""
        if info.kind != "http":
            return None
        status = info.status
        if status < 400:
            if self._rate < 1.0 and random.random() >= self._rate:  # noqa: S311  (sampling, not crypto)
                return None
            level = logging.INFO
        else:
            level = logging.ERROR if status >= 500 else logging.WARNING
        if not _requests.isEnabledFor(level):
            return None
        span: trace.SpanContext | None = info.span_context
        if not span.is_valid:  # type: ignore[union-attr]  # a RequestInfo always has one
            span = None
        # An absolute-form target (GET http://user:pw@host/...) loses its userinfo.
        method, path = info.method, scrub_url(info.scope.get("path", ""))
        if len(path) > self._limit:
            path = cut(path, self._limit)
        duration_ms = round(info.duration * 1_000_000) / 1000  # µs precision; round(x, 3) costs 3x
        request = _RequestLine(
            time.time(),
            level,
            f"{method} {path} {status} {duration_ms:g}ms",
            method,
            path,
            info.route,
            status,
            duration_ms,
            span,
        )
        listeners = _listeners()
        if listeners != self._seen:
            self._seen, self._route = listeners, _route(listeners)
        route = self._route
        if route is None:
            _requests.handle(_RequestRecord(level, request.message, request.fields, span))
            return None
        stream, otlp = route.stream, route.otlp
        if stream is not None and level >= stream.level:
            stream.write_line(route.formatter._line(request))  # type: ignore[union-attr]
        if otlp is not None and level >= otlp.level:
            return otlp.prepare_request(request)
        return None


def request_observer(settings: Settings) -> RequestLog | None:
    """The request line written for each HTTP request, or None when switched off."""
    if not settings.log_requests:
        return None
    return RequestLog(settings)
