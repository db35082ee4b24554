"""cfk_otel: the OpenTelemetry distribution of CF-Kanban.

Launched with ``opentelemetry-instrument uvicorn app:app``, it needs no code in the
app. Without the wrapper, call :func:`configure` once at start-up and wrap the app
with :class:`TelemetryMiddleware`.
"""

from __future__ import annotations

from ._api import configure, shutdown
from ._app import instrument_app
from ._asgi import TelemetryMiddleware
from ._settings import ConfigurationError
from ._version import __version__

__all__ = [
    "ConfigurationError",
    "TelemetryMiddleware",
    "__version__",
    "configure",
    "instrument_app",
    "shutdown",
]
