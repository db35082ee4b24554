"""Zero-code ASGI: wrap the application uvicorn loads, in every worker it starts.

uvicorn's ``Config.load`` imports the app (also under gunicorn's ``UvicornWorker`` and
in each ``--workers`` process), so wrapping its result covers every launch style
without touching the app. ``Server.shutdown`` is wrapped too: after a SIGTERM uvicorn
re-raises the signal once it has stopped, which ends the process without running
``atexit`` handlers, so telemetry is flushed (within its bound) right there. And
``Server.handle_exit``, uvicorn's SIGTERM/SIGINT handler, first marks the process as
shutting down, so that readiness answers 503 while uvicorn drains its connections.

Disable with ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=cfk_uvicorn``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Collection, Coroutine
from typing import Any

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor

from cfk_otel._asgi.app import instrument_app
from cfk_otel._bootstrap import setup as _sdk
from cfk_otel._errors import uncaught as _uncaught
from cfk_otel._guard import guard
from cfk_otel._health import registry as _health

_log = logging.getLogger("cfk_otel")
_ORIGINAL = "_cfk_original"


def _wrap_load(original: Callable[[Any], None]) -> Callable[[Any], None]:
    @functools.wraps(original)
    def load(config: Any) -> None:
        original(config)
        with guard("wrapping the ASGI app", then="serving it without telemetry"):  # the app must start
            config.loaded_app = instrument_app(config.loaded_app)

    return load


def _wrap_shutdown(
    original: Callable[..., Coroutine[Any, Any, None]],
) -> Callable[..., Coroutine[Any, Any, None]]:
    @functools.wraps(original)
    async def shutdown(server: Any, *args: Any, **kwargs: Any) -> None:
        try:
            await original(server, *args, **kwargs)
        finally:
            await asyncio.to_thread(_sdk.shutdown)

    return shutdown


def _wrap_handle_exit(original: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(original)
    def handle_exit(server: Any, *args: Any, **kwargs: Any) -> None:
        # A signal handler: only set a flag here (no locks, no logging).
        _health.mark_shutting_down()
        original(server, *args, **kwargs)

    return handle_exit


def _wrap_startup(
    original: Callable[..., Coroutine[Any, Any, None]],
) -> Callable[..., Coroutine[Any, Any, None]]:
    @functools.wraps(original)
    async def startup(server: Any, *args: Any, **kwargs: Any) -> None:
        with guard("watching the event loop's exceptions"):
            # The loop uvicorn serves on: a task's exception becomes a record, not a traceback.
            _uncaught.watch_loop(asyncio.get_running_loop())
        await original(server, *args, **kwargs)

    return startup


def _wrap_configure_logging(original: Callable[[Any], None]) -> Callable[[Any], None]:
    @functools.wraps(original)
    def configure_logging(config: Any) -> None:
        original(config)
        # uvicorn just applied its own dictConfig: take the root logger back so its
        # records come out once, in our format.
        with guard("re-applying logging after uvicorn's"):
            _sdk.apply_logging()

    return configure_logging


_PATCHES = (
    ("uvicorn.config", "Config", "configure_logging", _wrap_configure_logging),
    ("uvicorn.config", "Config", "load", _wrap_load),
    ("uvicorn.server", "Server", "startup", _wrap_startup),
    ("uvicorn.server", "Server", "shutdown", _wrap_shutdown),
    ("uvicorn.server", "Server", "handle_exit", _wrap_handle_exit),
)


def _wrap_gunicorn_setup(original: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(original)
    def setup(glogger: Any, *args: Any, **kwargs: Any) -> None:
        original(glogger, *args, **kwargs)
        with guard("re-applying logging after gunicorn's"):
            _sdk.apply_logging()  # gunicorn's master and workers log through our root too

    return setup


class GunicornLoggingInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Patches ``gunicorn.glogging.Logger.setup`` so gunicorn's lines come out as ours."""

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("gunicorn >= 20",)

    def _instrument(self, **kwargs: Any) -> None:
        from gunicorn.glogging import Logger  # noqa: PLC0415

        if _ORIGINAL + "setup" not in Logger.__dict__:
            setattr(Logger, _ORIGINAL + "setup", Logger.setup)
            Logger.setup = _wrap_gunicorn_setup(Logger.setup)

    def _uninstrument(self, **kwargs: Any) -> None:
        from gunicorn.glogging import Logger  # noqa: PLC0415

        original = Logger.__dict__.get(_ORIGINAL + "setup")
        if original is not None:
            Logger.setup = original
            delattr(Logger, _ORIGINAL + "setup")


class UvicornInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Patches uvicorn's ``Config.configure_logging``, ``Config.load``, ``Server.startup``,
    ``Server.shutdown`` and ``Server.handle_exit``."""

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("uvicorn >= 0.30",)

    def _instrument(self, **kwargs: Any) -> None:
        import importlib  # noqa: PLC0415

        for module, cls_name, method, wrap in _PATCHES:
            cls = getattr(importlib.import_module(module), cls_name)
            if _ORIGINAL + method in cls.__dict__:
                continue
            original = cls.__dict__[method]
            setattr(cls, _ORIGINAL + method, original)
            setattr(cls, method, wrap(original))

    def _uninstrument(self, **kwargs: Any) -> None:
        import importlib  # noqa: PLC0415

        for module, cls_name, method, _ in _PATCHES:
            cls = getattr(importlib.import_module(module), cls_name)
            original = cls.__dict__.get(_ORIGINAL + method)
            if original is not None:
                setattr(cls, method, original)
                delattr(cls, _ORIGINAL + method)
