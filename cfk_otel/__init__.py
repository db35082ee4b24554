"""cfk_otel: the OpenTelemetry distribution of CF-Kanban.

Launched with ``opentelemetry-instrument uvicorn app:app``, it needs no code in the
app. Without the wrapper, call :func:`configure` once at start-up and wrap the app
with :class:`TelemetryMiddleware`.
"""

from __future__ import annotations

from ._asgi.app import instrument_app
from ._asgi.middleware import TelemetryMiddleware
from ._bootstrap.api import configure, flush, shutdown
from ._errors.api import capture_error, capture_message, set_user
from ._health.registry import (
    HealthCheckResult,
    HealthRegistry,
    health_app,
    health_registry,
    mark_shutting_down,
    register_health_check,
)
from ._logs.api import Logger, get_logger, logger
from ._metrics.catalogue import (
    Counter,
    Gauge,
    Histogram,
    Timer,
    agent_finished,
    agent_started,
    http_request_duration,
    record_ticket_transition,
    register_counter,
    register_gauge,
    register_histogram,
    set_active_agents,
)
from ._settings import ConfigurationError
from ._version import __version__

__all__ = [
    "ConfigurationError",
    "Counter",
    "Gauge",
    "HealthCheckResult",
    "HealthRegistry",
    "Histogram",
    "Logger",
    "TelemetryMiddleware",
    "Timer",
    "__version__",
    "agent_finished",
    "agent_started",
    "capture_error",
    "capture_message",
    "configure",
    "flush",
    "get_logger",
    "health_app",
    "health_registry",
    "http_request_duration",
    "instrument_app",
    "logger",
    "mark_shutting_down",
    "record_ticket_transition",
    "register_counter",
    "register_gauge",
    "register_health_check",
    "register_histogram",
    "set_active_agents",
    "set_user",
    "shutdown",
]
