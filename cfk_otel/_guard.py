"""The one guard between cfk_otel's own failures and the app.

Telemetry must never break the app it observes: what fails inside cfk_otel is caught here,
logged once per kind (with its traceback, at warning level) and swallowed, as
sentry-python's ``capture_internal_exceptions()`` does. A kind is a short description of
what failed ("recording a query"); at most :data:`MAX_KINDS` kinds are remembered, so a
storm of distinct failures cannot grow memory.

Only :class:`Exception` is swallowed: ``KeyboardInterrupt``, ``SystemExit`` and an
asyncio cancellation go on to the app, as they must. A block that needs a fallback value
sets it before the ``with``::

    attributes = {}
    with guard("reading a connection's attributes"):
        attributes = describe(connection)

:func:`guard` returns one shared guard per kind, so the hot path pays for a ``with``
statement and nothing else.
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType
from typing import Final

MAX_KINDS: Final = 64
_log = logging.getLogger("cfk_otel")
_lock = threading.Lock()
_warned: set[str] = set()
_guards: dict[str, Guard] = {}


ExcInfo = bool | tuple[type[BaseException], BaseException, TracebackType | None]


def warn_once(kind: str, message: str, *args: object, exc_info: ExcInfo = False) -> None:
    """Log ``message`` (``%``-style with ``args``) the first time ``kind`` happens."""
    with _lock:
        if kind in _warned or len(_warned) >= MAX_KINDS:
            return
        _warned.add(kind)
    _log.warning(message, *args, exc_info=exc_info)


class Guard:
    """A context manager that swallows an :class:`Exception` and logs its kind once."""

    __slots__ = ("kind", "passes", "then")

    def __init__(self, kind: str, then: str = "", passes: tuple[type[Exception], ...] = ()) -> None:
        self.kind = kind
        self.then = f"; {then}" if then else ""  # what happens instead, said in the line
        self.passes = passes  # exceptions that go on to the caller, as they are

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if exc_type is None or not issubclass(exc_type, Exception) or issubclass(exc_type, self.passes):
            return False
        warn_once(self.kind, "cfk_otel: %s failed%s", self.kind, self.then, exc_info=(exc_type, exc, tb))  # type: ignore[arg-type]
        return True

    def failed(self, error: Exception) -> None:
        """Log ``error`` as this guard's block would have (once per kind), for a hot path that
        catches with ``try``/``except`` (free until it raises) rather than entering a ``with``."""
        warn_once(
            self.kind,
            "cfk_otel: %s failed%s",
            self.kind,
            self.then,
            exc_info=(type(error), error, error.__traceback__),
        )


def guard(kind: str, then: str = "") -> Guard:
    """The guard for ``kind``: run the block; an exception it raises is logged once and
    swallowed. ``then`` says what happens instead.

    >>> with guard("starting Sentry", then="continuing without it"):
    ...     raise RuntimeError("down")  # "cfk_otel: starting Sentry failed; continuing without it"
    """
    found = _guards.get(kind)
    if found is None:
        found = Guard(kind, then)
        if len(_guards) < MAX_KINDS:
            _guards[kind] = found
    return found


def _reset_for_tests() -> None:
    """TESTS ONLY: forget which kinds were logged."""
    with _lock:
        _warned.clear()
