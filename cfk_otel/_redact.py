"""The one secrets policy: what is a secret, and how it is withheld, on every route out.

Log lines (stdout and OTLP), span attributes and events, Sentry events, health bodies, the
CLI and error messages all go through here, so a secret that one route hides, every route
hides. Three rules:

- **Keys.** A value is withheld when its key names a secret (``password``, ``token``,
  ``auth``, ``jwt``, ``signature``, ``key``, ``api_key``, ``dsn``, ``cookie``...), at any
  depth of dicts, lists, tuples, named tuples and dataclasses; a ``(name, value)`` pair, as in
  a header list, counts as a key. Keys are matched by their words, so ``authHeader`` and
  ``X-Api-Key`` are secret and ``author`` is not.
- **Text.** Free text loses URL credentials (``scheme://user:password@``), the credentials of
  ``Bearer``/``Basic``/``Token``/``Digest`` schemes and ``Authorization:`` values, and the
  values of secret ``key=value`` / ``key: value`` / ``"key": "value"`` pairs.
- **Known values.** The secrets cfk_otel is configured with (the Sentry DSN's key, database
  and Redis passwords, the scrape token, OTLP header values) are withheld wherever they
  appear as a whole word, whatever surrounds them. Values shorter than
  :data:`MIN_KNOWN_LENGTH` are left to the rules above: replacing them inside other words
  would garble every message and show where the secret is.
"""

from __future__ import annotations

import dataclasses
import re
import traceback
from collections.abc import Iterable, Mapping
from typing import Any, Final
from urllib.parse import parse_qsl, unquote, urlsplit

from opentelemetry.semconv.attributes.exception_attributes import EXCEPTION_MESSAGE, EXCEPTION_STACKTRACE

REDACTED: Final = "[REDACTED]"
# Deeper than this, a container is withheld whole: nothing below it is looked at.
MAX_DEPTH: Final = 64
MIN_KNOWN_LENGTH: Final = 6

# Words of a key (split at '_', '-', '.', ' ' and camelCase humps) that make its value secret.
_SECRET_WORDS: Final = frozenset(
    {
        "password",
        "passwd",
        "pwd",
        "passphrase",
        "secret",
        "secrets",
        "token",
        "tokens",
        "auth",
        "authorization",
        "authentication",
        "bearer",
        "jwt",
        "signature",
        "apikey",
        "dsn",
        "cookie",
        "cookies",
        "session",
        "sessionid",
        "credential",
        "credentials",
        "otp",
        "privatekey",
        "accesskey",
        "secretkey",
    }
)
# Words that make a key secret only as its last word (``db_pass``, ``refresh``, ``api_key``),
# not in front of another (``pass_through``, ``refresh_interval``). ``key`` also needs to be
# alone or follow a word that says what kind (``cache_key`` and ``sort_key`` are not secret).
_LAST_WORDS: Final = frozenset({"pass", "refresh", "sig"})
# A key ending in one of these names a failure, not the secret (an exception class name
# before its message looks like ``key: value``).
_NOT_A_VALUE: Final = frozenset({"error", "errors", "exception", "warning", "failed", "failure"})
_KEY_KINDS: Final = frozenset(
    {
        "api",
        "private",
        "secret",
        "access",
        "signing",
        "encryption",
        "master",
        "client",
        "license",
        "app",
        "auth",
    }
)
# Substrings that mark a key secret however it is written (``db_password2``, ``xAuthToken``).
_SECRET_PARTS: Final = re.compile(
    "password|passwd|passphrase|secret|token|authoriz|api_?key|private_?key|access_?key|credential|cookie|dsn"
)
_WORD: Final = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
_SCALARS: Final = frozenset({str, int, float, bool, type(None), bytes})
_key_cache: dict[object, bool] = {}

# URL credentials: the scheme may be glued to what precedes it (``x_postgresql://``).
_URL_USERINFO: Final = re.compile(r"(?i)([a-z][a-z0-9+.\-]*://)[^/\s@'\"<>\\]+@")
# An Authorization header's whole value, whatever its scheme, up to the end of the line or quote.
_AUTHORIZATION: Final = re.compile(
    r"""(?i)((?:proxy[-_])?authori[sz]ation["']?\s*[:=,]\s*["']?)([^"'\r\n\]\)},;]+)"""
)
_AUTH_SCHEME: Final = re.compile(r"(?i)\b(bearer|basic|digest|token)\s+[a-z0-9._~+/=\-]{4,}")
# key = value, key: value, "key": "value", key='value with spaces' (a repr); not a key whose
# value is a structure (``"auth": {`` in JSON or YAML): what is inside is judged on its own.
_KEY_VALUE: Final = re.compile(
    r"""([A-Za-z_][\w.\-]{0,63})(["']?\s*[:=]\s*)("[^"\r\n]*"|'[^'\r\n]*'|[^\s"',;&)}\]{\[][^\s"',;&)}\]]*)"""
)


# A fragment of every secret word, key kind and auth scheme above (checked by a test).
_HINT: Final = re.compile(
    "pass|pwd|secret|token|auth|bearer|basic|digest|jwt|sig|key|dsn|cookie|session|credential|refresh|otp"
)


def _words(key: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(key)]


def _secret_words(words: list[str]) -> bool:
    if not words:
        return False
    last = words[-1]
    if last in _LAST_WORDS or (last == "key" and (len(words) == 1 or words[-2] in _KEY_KINDS)):
        return True
    return any(w in _SECRET_WORDS for w in words)


def is_secret_key(key: object) -> bool:
    """Whether values under ``key`` must be withheld (bytes keys are read as text; other
    non-text keys by their ``str``).

    >>> is_secret_key("X-Api-Key"), is_secret_key("authHeader"), is_secret_key("author")
    (True, True, False)
    """
    hit = _key_cache.get(key) if isinstance(key, str | bytes) else None
    if hit is None:
        if isinstance(key, bytes):
            text = key.decode("utf-8", "replace")
        elif isinstance(key, str):
            text = key
        else:
            try:
                text = str(key)
            except Exception:  # a hostile __str__: withhold rather than guess
                return True
        words = _words(text)
        if words and words[-1] in _NOT_A_VALUE:
            hit = False  # "InvalidPasswordError: password authentication failed" names no secret
        else:
            hit = _secret_words(words) or bool(_SECRET_PARTS.search(text.lower()))
        if isinstance(key, str | bytes) and len(_key_cache) < 4096:
            _key_cache[key] = hit
    return hit


def _fields(value: object) -> Mapping[str, Any] | None:
    """A named tuple's or a dataclass instance's fields, as a mapping (keys matter)."""
    if isinstance(value, tuple) and hasattr(value, "_asdict"):
        fields: Mapping[str, Any] = value._asdict()
        return fields
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name, None) for f in dataclasses.fields(value)}
    return None


def redact(value: Any, depth: int = 0) -> Any:
    """A copy of ``value`` with every secret-keyed entry replaced by ``[REDACTED]``; text is
    left as it is (see :func:`scrub` for that too). Containers are copied only when
    something inside them changes; named tuples and dataclasses become dicts when they do.

    >>> redact({"user": "ann", "db": {"password": "x"}})
    {'user': 'ann', 'db': {'password': '[REDACTED]'}}
    """
    return _walk(value, depth, text=False)


def scrub(value: Any, depth: int = 0, known: Known | None = None) -> Any:
    """:func:`redact`, and every text inside ``value`` through :func:`scrub_text` (with
    the ``known`` secret values).

    >>> scrub({"extra": {"headers": [["Authorization", "Bearer x"]], "dsn": "https://k@h/1"}})
    {'extra': {'headers': [['Authorization', '[REDACTED]']], 'dsn': '[REDACTED]'}}
    """
    return _walk(value, depth, True, known)


def _walk(value: Any, depth: int, text: bool, known: Known | None = None) -> Any:
    kind = type(value)
    if kind in _SCALARS:
        return scrub_text(value, known) if text and kind is str else value
    fields = _fields(value)
    if fields is not None:
        copy = dict(fields)
        walked = _walk(copy, depth, text, known)
        return value if walked is copy else walked
    if not isinstance(value, Mapping | list | tuple):
        return value
    if depth >= MAX_DEPTH:
        return REDACTED  # too deep to look at: withheld whole
    if isinstance(value, Mapping):
        return _walk_mapping(value, depth, text, known)
    if len(value) == 2 and isinstance(value[0], str | bytes) and is_secret_key(value[0]):
        items = [value[0], REDACTED]
    else:
        items = [_walk(item, depth + 1, text, known) for item in value]
    changed = any(a is not b for a, b in zip(items, value, strict=True))
    return (tuple(items) if isinstance(value, tuple) else items) if changed else value


def _walk_mapping(value: Mapping[Any, Any], depth: int, text: bool, known: Known | None) -> Mapping[Any, Any]:
    out: dict[Any, Any] | None = None
    for key, item in value.items():
        new = REDACTED if is_secret_key(key) else _walk(item, depth + 1, text, known)
        if new is not item and out is None:
            out = dict(value)
        if out is not None:
            out[key] = new
    return value if out is None else out


class Known:
    """Secret values withheld wherever they appear as a whole word (see the module)."""

    def __init__(self, values: Iterable[str | None] = ()) -> None:
        parts: set[str] = set()
        for value in values:
            if value:
                parts.update(_secret_parts(value))
        # Longest first: a whole URL before its password.
        kept = sorted((p for p in parts if len(p) >= MIN_KNOWN_LENGTH), key=len, reverse=True)
        self._parts = tuple(kept)
        words = "|".join(re.escape(p) for p in kept)
        # As a whole word: not inside a longer run of letters and digits.
        self._pattern = re.compile(rf"(?<![A-Za-z0-9])(?:{words})(?![A-Za-z0-9])") if kept else None

    def __bool__(self) -> bool:
        return self._pattern is not None

    def sub(self, text: str) -> str:
        if self._pattern is None or not any(part in text for part in self._parts):
            return text
        return self._pattern.sub(REDACTED, text)


def _secret_parts(secret: str) -> set[str]:
    parts = {secret.strip()}
    try:
        url = urlsplit(secret.strip())
        if url.password:
            parts.update({url.password, unquote(url.password)})
        if url.username and url.scheme in ("http", "https") and not url.password:
            parts.add(url.username)  # a DSN's key
        for key, value in parse_qsl(url.query):
            if value and is_secret_key(key):
                parts.add(value)
    except ValueError:
        pass
    if "=" in secret and "://" not in secret:  # key=value pairs (OTLP headers)
        parts.discard(secret.strip())
        for item in secret.split(","):
            key, _, value = item.partition("=")
            value = unquote(value).strip()
            if is_secret_key(unquote(key).strip()) and value:
                parts.update({value, value.split()[-1]})  # "Bearer abc": the token alone too
    return {p for p in parts if p}


def scrub_text(text: str, known: Known | None = None) -> str:
    """``text`` without credentials (see the module's rules), and without the ``known``
    secret values: what the process was configured with (``Known(settings.secret_values())``,
    made once by whoever scrubs, from the settings it was given).

    >>> scrub_text("connect postgresql://app:pw@db/cfk?sslmode=require token=abc failed")
    'connect postgresql://[REDACTED]@db/cfk?sslmode=require token=[REDACTED] failed'
    """
    if known is not None:
        text = known.sub(text)
    if "@" in text and "://" in text:
        text = _URL_USERINFO.sub(rf"\1{REDACTED}@", text)
    # Every rule below needs a word of a secret key or scheme: most text has none, and a
    # search for them costs a fraction of the rules themselves.
    lower = text.lower()
    if _HINT.search(lower) is None:
        return text
    if "uthori" in lower:
        text = _AUTHORIZATION.sub(rf"\1{REDACTED}", text)
    if " " in text:
        text = _AUTH_SCHEME.sub(rf"\1 {REDACTED}", text)
    if "=" in text or ":" in text:
        text = _KEY_VALUE.sub(_hide_value, text)
    return text


def _hide_value(match: re.Match[str]) -> str:
    key, separator, value = match.groups()
    if REDACTED[:-1] in value or not is_secret_key(key):
        return match.group(0)
    quote = value[0] if value[:1] in ("'", '"') and len(value) > 1 else ""
    return f"{key}{separator}{quote}{REDACTED}{quote}"


def exception_attributes(error: BaseException, known: Known | None = None) -> dict[str, str]:
    """An exception's message and stack as a span's exception event carries them, scrubbed
    (given to ``record_exception``, they replace the SDK's raw ones)."""
    return {
        EXCEPTION_MESSAGE: scrub_text(str(error), known),
        EXCEPTION_STACKTRACE: scrub_text("".join(traceback.format_exception(error)), known),
    }


def scrub_url(url: str) -> str:
    """A URL (or an absolute-form request target) without its userinfo.

    >>> scrub_url("http://user:pw@host/boards?x=1")
    'http://[REDACTED]@host/boards?x=1'
    """
    return _URL_USERINFO.sub(rf"\1{REDACTED}@", url) if "@" in url else url


def _main() -> None:
    """Copy stdin to stdout through the policy, with the values of cfk_otel's secret settings
    and of every environment variable named like a secret (``DD_API_KEY``,
    ``AWS_SECRET_ACCESS_KEY``...) as known secrets. ``collector/run --print-config`` pipes
    the collector's own redacted configuration through it."""
    import os  # noqa: PLC0415  (the command only)
    import sys  # noqa: PLC0415

    from ._settings import load  # noqa: PLC0415

    values = [v for k, v in os.environ.items() if is_secret_key(k)]
    known = Known([*values, *load().secret_values()])
    sys.stdout.write(scrub_text(sys.stdin.read(), known))
