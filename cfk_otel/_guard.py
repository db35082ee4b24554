"""The one guard between cfk_otel's own failures and the app.

Telemetry must never break the app it observes: what fails inside cfk_otel is caught here,
logged once per kind (with its traceback, at warning level) and swallowed, as
sentry-python's ``capture_internal_exceptions()`` does. A kind is a short name of what
failed ("capture_error", "slow-query"); at most :data:`MAX_KINDS` kinds are remembered, so a
storm of distinct failures cannot grow memory.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Final

MAX_KINDS: Final = 64
_log = logging.getLogger("cfk_otel")
_lock = threading.Lock()
_warned: set[str] = set()


def warn_once(kind: str, message: str, *args: object, exc_info: bool = False) -> None:
    """Log ``message`` (``%``-style with ``args``) the first time ``kind`` happens."""
    with _lock:
        if kind in _warned or len(_warned) >= MAX_KINDS:
            return
        _warned.add(kind)
    _log.warning(message, *args, exc_info=exc_info)


@contextlib.contextmanager
def guard(kind: str) -> Iterator[None]:
    """Run the block; an exception it raises is logged once per ``kind`` and swallowed.

    >>> with guard("flushing Sentry"):
    ...     raise RuntimeError("down")  # logged once: "cfk_otel: flushing Sentry failed"
    """
    try:
        yield
    except Exception:
        warn_once(kind, "cfk_otel: %s failed", kind, exc_info=True)


def _reset_for_tests() -> None:
    """TESTS ONLY: forget which kinds were logged."""
    with _lock:
        _warned.clear()
