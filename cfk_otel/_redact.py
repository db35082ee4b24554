"""One rule for secrets, shared by log lines, OTLP log attributes and Sentry events.

A value is hidden when its key looks secret (password, token, secret, authorization,
api_key, dsn, cookie, ...), at any depth of dicts, lists and tuples. Values are never
inspected, only keys: a rule that guesses from values hides too much or too little.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

REDACTED: Final = "[REDACTED]"
_MAX_DEPTH: Final = 12

# Substrings of a key, lower-cased with '-' and ' ' as '_', that mark its value secret.
_SECRET_PARTS: Final = (
    "password",
    "passwd",
    "pwd",
    "secret",
    "token",
    "authorization",
    "api_key",
    "apikey",
    "dsn",
    "cookie",
    "session",
    "credential",
    "private_key",
    "access_key",
)
_SECRET_KEY: Final = re.compile("|".join(re.escape(p) for p in _SECRET_PARTS))
_cache: dict[str, bool] = {}
_SCALARS: Final = frozenset({str, int, float, bool, type(None), bytes})


def is_secret_key(key: object) -> bool:
    """Whether values under ``key`` must be hidden.

    >>> is_secret_key("X-Api-Key"), is_secret_key("userId")
    (True, False)
    """
    if not isinstance(key, str):
        return False
    hit = _cache.get(key)
    if hit is None:
        normalised = key.lower().replace("-", "_").replace(" ", "_")
        hit = bool(_SECRET_KEY.search(normalised))
        if len(_cache) < 4096:
            _cache[key] = hit
    return hit


def redact(value: Any, depth: int = 0) -> Any:
    """A copy of ``value`` with every secret-keyed entry replaced by ``[REDACTED]``.

    Containers are copied only when something inside them changes.

    >>> redact({"user": "ann", "db": {"password": "x"}})
    {'user': 'ann', 'db': {'password': '[REDACTED]'}}
    """
    if depth > _MAX_DEPTH or type(value) in _SCALARS:
        return value
    if isinstance(value, Mapping):
        out: dict[Any, Any] | None = None
        for key, item in value.items():
            if is_secret_key(key):
                new = REDACTED
            else:
                new = item if type(item) in _SCALARS else redact(item, depth + 1)
            if new is not item and out is None:
                out = dict(value)
            if out is not None:
                out[key] = new
        return value if out is None else out
    if isinstance(value, list | tuple):
        items = [redact(item, depth + 1) for item in value]
        if all(a is b for a, b in zip(items, value, strict=True)):
            return value
        return tuple(items) if isinstance(value, tuple) else items
    return value
