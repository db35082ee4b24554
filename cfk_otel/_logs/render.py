"""The one renderer of a log record: the document's JSON line, or ``LOG_FORMAT=pretty``.

One dict is built per record (message, level, context, trace ids, error fields, redacted
and bounded once); the JSON and pretty formatters write it.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import traceback
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Final

from opentelemetry import trace
from opentelemetry._logs import SeverityNumber

from cfk_otel._asgi.http import utc_timestamp
from cfk_otel._guard import guard
from cfk_otel._redact import Known, scrub, scrub_text
from cfk_otel._settings import Settings

from .record import _RequestLine, _RequestRecord

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
