"""The entry points ``opentelemetry-instrument`` loads: distro, configurator, selection check."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from importlib.metadata import EntryPoint
from typing import Any, Final

from opentelemetry.instrumentation import auto_instrumentation
from opentelemetry.instrumentation.dependencies import DependencyConflictError
from opentelemetry.instrumentation.distro import BaseDistro
from opentelemetry.instrumentation.environment_variables import (
    OTEL_PYTHON_CONFIGURATOR,
    OTEL_PYTHON_DISABLED_INSTRUMENTATIONS,
    OTEL_PYTHON_DISTRO,
)
from opentelemetry.sdk._configuration import _OTelSDKConfigurator

from cfk_otel._guard import Guard, guard
from cfk_otel._settings import ConfigurationError

from . import packages as _packages
from . import setup as _sdk

NAME = "cfk_otel"
_log = logging.getLogger("cfk_otel")
# Upstream instrumentations whose spans ours make, with the timings, in one wrapper
# per call (cfk_otel/_instrumentation/db.py). Disabling ours brings the upstream one back.
SUPERSEDED: Final = {"asyncpg": "cfk_asyncpg", "redis": "cfk_redis"}


def disabled_instrumentations() -> set[str]:
    """``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS``, as opentelemetry-instrument reads it."""
    return {name.strip() for name in os.environ.get(OTEL_PYTHON_DISABLED_INSTRUMENTATIONS, "").split(",")}


def superseded(name: str, disabled: set[str]) -> bool:
    """Whether the instrumentation ``name`` is upstream's and ours stands in for it."""
    ours = SUPERSEDED.get(name)
    return ours is not None and ours not in disabled


class CfkDistro(BaseDistro):  # type: ignore[misc]
    """Sets the defaults our configurator and the SDK read, before either runs."""

    def _configure(self, **kwargs: Any) -> None:
        _sdk.selected("distro")
        # With another configurator installed, the first one found would win; ours must.
        os.environ.setdefault(OTEL_PYTHON_CONFIGURATOR, NAME)
        with contextlib.suppress(ConfigurationError):  # the configurator reports it and exits
            _sdk.prepare()

    def load_instrumentor(self, entry_point: EntryPoint, **kwargs: Any) -> None:
        if superseded(entry_point.name, disabled_instrumentations()):
            return
        # opentelemetry-instrument would re-raise a failure and start the app with no
        # telemetry at all (not even /api/health); one library goes untraced instead. It
        # skips a missing library or a conflicting version itself: those go on to it.
        with Guard(f"instrumenting {entry_point.name}", "skipped", (ImportError, DependencyConflictError)):
            super().load_instrumentor(entry_point, **kwargs)


class CfkConfigurator(_OTelSDKConfigurator):
    """Builds the SDK through the standard configurator, with our resource."""

    def _configure(self, **kwargs: Any) -> None:
        _sdk.selected("configurator")
        parent = super()._configure

        def initialize(resource_attributes: dict[str, Any], extra: dict[str, Any]) -> None:
            parent(**kwargs, **extra, resource_attributes=resource_attributes)  # type: ignore[no-untyped-call]

        try:
            _sdk.start(initialize)
        except ConfigurationError as exc:
            _refuse_to_start(str(exc))


def check_selected() -> None:
    """``opentelemetry_post_instrument`` hook: say so when another distro took over, or
    when the installed OpenTelemetry packages do not fit together."""
    keep_workers_instrumented()
    check_packages()
    distro, configurator = _sdk.selection()
    if distro and configurator:
        return
    missing = [
        f"{var}={NAME}"
        for var, ok in ((OTEL_PYTHON_DISTRO, distro), (OTEL_PYTHON_CONFIGURATOR, configurator))
        if not ok
    ]
    message = (
        "cfk_otel: another OpenTelemetry distro or configurator was loaded instead of cfk_otel; "
        f"set {' and '.join(missing)} to select it"
    )
    if _sdk.settings().strict:
        _refuse_to_start(message)
    print(message, file=sys.stderr, flush=True)


def keep_workers_instrumented() -> None:
    """Leave ``opentelemetry-instrument``'s directory on ``PYTHONPATH`` once set-up is done.

    The workers ``uvicorn --workers`` spawns are fresh interpreters, instrumented through the
    ``sitecustomize`` that directory holds. opentelemetry-instrumentation takes it off while
    it sets up (a subprocess started then must not set up again) and, before 0.63b0, never
    put it back: the workers ran untraced. This puts it back as 0.63b0 does (which then
    finds it there); it does nothing when the app did not start through that directory.
    """
    site = getattr(sys.modules.get("sitecustomize"), "__file__", None)
    if site is None:
        return
    directory = os.path.dirname(os.path.abspath(auto_instrumentation.__file__))
    if os.path.dirname(os.path.abspath(site)) != directory:
        return
    current = os.environ.get("PYTHONPATH", "")
    if directory not in current.split(os.pathsep):
        os.environ["PYTHONPATH"] = directory + os.pathsep + current if current else directory


def check_packages() -> None:
    """One warning when an instrumentation installed later moved the SDK's pins.

    Reading every installed package's metadata takes about 0.1 s, so it runs on a
    thread of its own rather than delaying the app's start.
    """

    def check() -> None:
        with guard("checking the installed packages"):  # never stops the app
            message = _packages.report()
            if message is not None:
                _log.warning(message)

    threading.Thread(target=check, name="cfk-otel-packages", daemon=True).start()


def _refuse_to_start(message: str) -> None:
    # This runs inside ``sitecustomize``: an exception would be swallowed by
    # opentelemetry-instrument (starting the app without telemetry) or turn into a
    # "Fatal Python error" traceback. Strict mode means a clean, explained exit.
    print(message, file=sys.stderr, flush=True)
    os._exit(78)  # EX_CONFIG
