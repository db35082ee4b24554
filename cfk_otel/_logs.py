"""Bridge from the standard ``logging`` module to OpenTelemetry log records (OTLP).

The SDK's own ``LoggingHandler`` is deprecated; this handler is the small part of it we
need. Records from the OpenTelemetry SDK and exporters themselves are never bridged:
an exporter that logs its own failure must not feed itself.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any, Final

from opentelemetry._logs import Logger, LoggerProvider, SeverityNumber

LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "fatal": logging.CRITICAL,
}
_SEVERITY: Final = {
    logging.DEBUG: (SeverityNumber.DEBUG, "DEBUG"),
    logging.INFO: (SeverityNumber.INFO, "INFO"),
    logging.WARNING: (SeverityNumber.WARN, "WARN"),
    logging.ERROR: (SeverityNumber.ERROR, "ERROR"),
    logging.CRITICAL: (SeverityNumber.FATAL, "FATAL"),
}
_OWN_LOGGERS: Final = ("opentelemetry", "grpc", "urllib3")


class OtlpHandler(logging.Handler):
    """Emits every ``logging`` record as an OpenTelemetry log record."""

    def __init__(self, provider: LoggerProvider, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self._provider = provider
        self._loggers: dict[str, Logger] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(_OWN_LOGGERS):
            return
        try:
            logger = self._loggers.get(record.name)
            if logger is None:
                logger = self._loggers.setdefault(record.name, self._provider.get_logger(record.name))
            number, text = _SEVERITY.get(record.levelno, (SeverityNumber.UNSPECIFIED, record.levelname))
            attributes: dict[str, Any] = {
                "code.file.path": record.pathname,
                "code.function.name": record.funcName,
                "code.line.number": record.lineno,
            }
            if record.exc_info and record.exc_info[0] is not None:
                exc_type, exc, tb = record.exc_info
                attributes["exception.type"] = exc_type.__qualname__
                attributes["exception.message"] = str(exc)
                attributes["exception.stacktrace"] = "".join(traceback.format_exception(exc_type, exc, tb))
            logger.emit(
                timestamp=int(record.created * 1e9),
                severity_number=number,
                severity_text=text,
                body=record.getMessage(),
                attributes=attributes,
            )
        except Exception:  # a log line must never raise into the app
            self.handleError(record)
