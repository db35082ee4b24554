"""``instrument_app``: the middleware with the distro's own endpoints, from the settings."""

from __future__ import annotations

from typing import Any

from cfk_otel._bootstrap import setup as _sdk
from cfk_otel._errors import api as _errors
from cfk_otel._errors.total import RequestErrors
from cfk_otel._health import registry as _health
from cfk_otel._logs.requests import request_observer
from cfk_otel._metrics.scrape import MetricsEndpoint
from cfk_otel._redact import Known

from .middleware import ASGIApp, RequestObserver, TelemetryMiddleware


def instrument_app(app: ASGIApp) -> TelemetryMiddleware:
    """Wrap ``app`` with telemetry and serve the health and metrics endpoints.

    This is what ``opentelemetry-instrument`` does to the app uvicorn loads; call it
    yourself only when serving the app some other way.

    >>> app = instrument_app(app)  # doctest: +SKIP
    """
    if isinstance(app, TelemetryMiddleware):
        return app
    settings = _sdk.settings()
    endpoints: dict[str, Any] = {}
    if settings.metrics_enabled:
        scrape = MetricsEndpoint(_sdk.scrape, settings.metrics_bearer_token)
        endpoints[settings.metrics_path] = scrape
    endpoints.update(_health.build_endpoints(settings))
    observers: list[RequestObserver] = []
    request_log = request_observer(settings)
    if request_log is not None:
        observers.append(request_log)
    errors = RequestErrors(settings.sentry_capture_4xx)  # one rule for counting and reporting
    app = _errors.instrument(app, observers, errors)  # Sentry: a scope per request, error reports
    return TelemetryMiddleware(
        app,
        endpoints=endpoints,
        endpoint_telemetry=settings.health_telemetry,
        observers=observers,
        errors=errors,
        secrets=Known(settings.secret_values()),
    )
