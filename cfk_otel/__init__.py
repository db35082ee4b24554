"""cfk_otel: the OpenTelemetry distribution of CF-Kanban.

Launched with ``opentelemetry-instrument uvicorn app:app``, it needs no code in the
app. Without the wrapper, call :func:`configure` once at start-up and wrap the app
with :class:`TelemetryMiddleware`.
"""

from __future__ import annotations

from ._api import configure, shutdown
from ._app import instrument_app
from ._asgi import TelemetryMiddleware
from ._metrics import (
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
    "Histogram",
    "TelemetryMiddleware",
    "Timer",
    "__version__",
    "agent_finished",
    "agent_started",
    "configure",
    "http_request_duration",
    "instrument_app",
    "record_ticket_transition",
    "register_counter",
    "register_gauge",
    "register_histogram",
    "set_active_agents",
    "shutdown",
]
