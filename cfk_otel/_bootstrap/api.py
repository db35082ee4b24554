"""``configure()``, ``flush()`` and ``shutdown()`` for apps launched without ``opentelemetry-instrument``."""

from __future__ import annotations

import importlib
import importlib.util
import logging

from cfk_otel._guard import guard

from . import setup as _sdk

_log = logging.getLogger("cfk_otel")


def configure() -> None:
    """Set up traces, metrics and logs from the environment, once per process.

    A second call is a no-op (logged at debug level). Raises
    :class:`~cfk_otel.ConfigurationError` only when ``CFK_OTEL_STRICT=true`` and a
    variable is invalid.

    >>> import cfk_otel
    >>> cfk_otel.configure()  # doctest: +SKIP
    """
    from .distro import CfkConfigurator, check_packages  # noqa: PLC0415  (keeps `import cfk_otel` light

    if _sdk.active():
        _log.debug("cfk_otel.configure() was already called; ignoring")
        return
    _sdk.prepare()  # raises ConfigurationError here, in strict mode, rather than exiting
    _sdk.selected("configurator")
    CfkConfigurator().configure()  # type: ignore[no-untyped-call]
    _instrument_libraries()
    check_packages()


def _instrument_libraries() -> None:
    # The instrumentations opentelemetry-instrument would load for this service. The
    # upstream asyncpg and redis ones load only when ours are disabled (``superseded``)
    # and are optional: without them installed, disabling ours leaves no client spans.
    from .distro import disabled_instrumentations, superseded  # noqa: PLC0415

    disabled = disabled_instrumentations()
    candidates = (
        ("asyncpg", "asyncpg", "opentelemetry.instrumentation.asyncpg", "AsyncPGInstrumentor"),
        ("redis", "redis", "opentelemetry.instrumentation.redis", "RedisInstrumentor"),
        ("cfk_uvicorn", "uvicorn", "cfk_otel._instrumentation.uvicorn", "UvicornInstrumentor"),
        ("cfk_gunicorn", "gunicorn", "cfk_otel._instrumentation.uvicorn", "GunicornLoggingInstrumentor"),
        ("cfk_asyncpg", "asyncpg", "cfk_otel._instrumentation.db", "AsyncpgInstrumentor"),
        ("cfk_redis", "redis", "cfk_otel._instrumentation.db", "RedisInstrumentor"),
    )
    for name, library, module, cls in candidates:
        if (
            name in disabled
            or "*" in disabled
            or superseded(name, disabled)
            or importlib.util.find_spec(library) is None
            or not _installed(module)
        ):
            continue
        with guard(f"instrumenting {library}"):
            instrumentor = getattr(importlib.import_module(module), cls)()
            if not instrumentor.is_instrumented_by_opentelemetry:
                instrumentor.instrument()


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # its parent package is missing
        return False


def shutdown(timeout: float | None = None) -> bool:
    """Flush and stop telemetry within ``timeout`` seconds (default ``CFK_OTEL_SHUTDOWN_TIMEOUT``).

    Returns True when everything was flushed in time. Also runs at interpreter exit.
    """
    return _sdk.shutdown(timeout)


def flush(timeout: float | None = None) -> bool:
    """Write the request lines held for stdout and export what is queued, within ``timeout``
    seconds (default ``CFK_OTEL_SHUTDOWN_TIMEOUT``); telemetry goes on afterwards.

    Request lines reach stdout in batches, at most 50 ms after their request ends: call this
    where a line must be out now (before reading captured output, before a fork of your own).
    Returns True when everything was flushed in time.

    >>> import cfk_otel
    >>> cfk_otel.flush()
    True
    """
    return _sdk.flush(timeout)
