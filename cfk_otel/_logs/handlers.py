"""The handlers on the root logger: the stdout line and the OTLP record, set up once.

Everything that logs in the process goes through the root logger, which cfk_otel owns:
one stdout handler (JSON, or ``LOG_FORMAT=pretty`` for a terminal) and one OTLP
handler, both filtered by ``LOG_LEVEL``. uvicorn's and gunicorn's own handlers are
removed so their records come out once, in the same shape.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import IO, TYPE_CHECKING, Any, Final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry._logs import Logger as OtelLogger
from opentelemetry._logs import LoggerProvider, SeverityNumber

from cfk_otel._core.seam import Ended, LogSink, flush_lines, line_buffer
from cfk_otel._redact import Known
from cfk_otel._settings import Settings

if TYPE_CHECKING:
    from cfk_otel._native import OtlpExporter

from .record import _REQUESTS_LOGGER, LINE_ATTRIBUTES, _RequestLine, _RequestRecord
from .render import (
    _ACCESS_LOGGERS,
    _OWN_LOGGERS,
    _SERVER_LOGGERS,
    _SEVERITY,
    LEVELS,
    JsonFormatter,
    PrettyFormatter,
    _attribute,
    _error_fields,
    _message,
    _redacted_context,
    _within_ceiling,
)


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

    def line_target(self) -> tuple[OtlpExporter, int] | None:
        """Where the core queues a request line's record itself (the exporter and the line's
        scope): the same tuple while they hold; None when the record must take
        :meth:`prepare_request`'s way."""
        sink = self._sink
        if sink is None or not sink.active or not sink.takes(LINE_ATTRIBUTES):
            return None
        return sink.target(_REQUESTS_LOGGER)

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
            sink = self._sink
            # A processor the app added since the route was chosen sees the record (the SDK's way).
            ended = (
                sink.prepared(
                    _REQUESTS_LOGGER, stamp, stamp, number.value, text, request.message, fields, request.span
                )
                if sink is not None and sink.active
                else None
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
    """stdout, looked up per write so that test runners' capture and redirections work.

    The core holds request lines briefly and calls :meth:`write_held` to write them in one
    batch (see ``_core.line_buffer``); whatever else this handler writes first writes what
    is held, so our lines keep their order on the stream.
    """

    def __init__(self, level: int) -> None:
        super().__init__(sys.stdout)
        self.setLevel(level)
        self._failed = False

    def emit(self, record: logging.LogRecord) -> None:
        flush_lines()  # the request lines before it, as they came
        self.stream = sys.stdout
        super().emit(record)

    def flush(self) -> None:
        """Write the request lines held, then flush the stream (``logging`` calls this at exit)."""
        flush_lines()
        super().flush()

    def write_line(self, line: str) -> None:
        """Write one formatted line as :meth:`emit` would (a request line written by Python)."""
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            flush_lines()
            try:
                stream = self.stream = sys.stdout
                stream.write(line + "\n")
                stream.flush()
            except Exception:  # as logging does: reported on stderr, never raised
                self.handleError(_RequestRecord(logging.INFO, line, {}, None))

    def write_held(self) -> None:
        """Write the request lines the core holds in one ``write`` and ``flush`` (called by the
        core's thread, and by :func:`~cfk_otel._core.seam.flush_lines`). A failing stream loses
        them: counted with the core's drops, reported on stderr once, never raised."""
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            buffer = line_buffer()
            if buffer is None:
                return
            text, count = buffer.take()
            if not text:
                return
            try:
                stream = self.stream = sys.stdout
                stream.write(text)
                stream.flush()
            except Exception:  # as logging does: reported on stderr (here once), never raised
                buffer.lost(count)
                if not self._failed:
                    self._failed = True
                    message = f"{count} request line(s) lost; later failures are counted, not reported"
                    self.handleError(_RequestRecord(logging.ERROR, message, {}, None))


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
