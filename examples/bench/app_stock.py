"""The upstream baseline: the same app wrapped in the stock OpenTelemetry ASGI middleware."""

from __future__ import annotations

from app import app as _app
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

app = OpenTelemetryMiddleware(_app)
