"""Every environment variable cfk_otel reads, declared once and parsed once.

Each variable is declared on the :class:`Settings` field it fills (:func:`setting`): its
name, parser, default, accepted values and one line of documentation, once. The README's
table (checked against :data:`VARIABLES` by the test suite), ``cfk-otel env``, the
validation messages and :func:`load` all come from that declaration.

A bad value never stops the app unless ``CFK_OTEL_STRICT=true``: :func:`load` returns
the problems next to settings that use the documented default instead.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final, Generic, TypeVar
from urllib.parse import SplitResult, unquote, urlsplit

T = TypeVar("T")

LOG_LEVELS: Final = ("debug", "info", "warn", "error", "fatal")
LOG_FORMATS: Final = ("json", "pretty")
OTLP_PROTOCOLS: Final = ("grpc", "http/protobuf")
EXPORTERS: Final = ("otlp", "console", "none")
SAMPLERS: Final = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
# A longer value is refused: it would be repeated in every span, log line or export
# request. Room for the longest legitimate one (a JWT in OTEL_EXPORTER_OTLP_HEADERS).
MAX_VALUE_LENGTH: Final = 8192
_SHOWN_LENGTH: Final = 100  # of a rejected value, in messages
_PRINTABLE: Final = f"printable UTF-8 text of at most {MAX_VALUE_LENGTH} characters"
_TRUE: Final = frozenset({"true", "1", "yes", "on"})
_FALSE: Final = frozenset({"false", "0", "no", "off", ""})


class InvalidValue(ValueError):
    """Raised by a parser; the message says what is accepted."""


@dataclass(frozen=True, slots=True)
class Variable(Generic[T]):
    """One environment variable: its name, default, accepted values and meaning."""

    name: str
    default: T
    parse: Callable[[str], T]
    accepted: str
    doc: str
    secret: bool = False

    def default_text(self) -> str:
        if self.default is None or self.default == "":
            return "(unset)"
        if isinstance(self.default, bool):
            return str(self.default).lower()
        if isinstance(self.default, tuple):
            return ",".join(self.default)
        return str(self.default)


@dataclass(frozen=True, slots=True)
class Problem:
    """A variable whose value was rejected."""

    variable: str
    value: str
    accepted: str
    default: str

    @property
    def reason(self) -> str:
        return f"{self.variable}={self.value!r} is not valid (accepted: {self.accepted})"

    def __str__(self) -> str:
        return f"cfk_otel: {self.reason}; using the default {self.default}"


class ConfigurationError(RuntimeError):
    """Raised by :func:`load` in strict mode when any variable is invalid."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p.reason}" for p in problems)
        super().__init__(f"cfk_otel refuses to start (CFK_OTEL_STRICT=true):\n{lines}")


# --- parsers ---------------------------------------------------------------------------


def _text(value: str) -> str:
    return value.strip()


def _optional_text(value: str) -> str | None:
    return value.strip() or None


def _set(value: str) -> bool:
    # The no-color.org and force-color.org convention: set and not empty, whatever the value.
    return value != ""


def _bool(value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise InvalidValue


def _choice(*choices: str, aliases: Mapping[str, str] | None = None) -> Callable[[str], str]:
    table = {c: c for c in choices} | dict(aliases or {})

    def parse(value: str) -> str:
        try:
            return table[value.strip().lower()]
        except KeyError:
            raise InvalidValue from None

    return parse


def _exporters(value: str) -> tuple[str, ...]:
    names = tuple(n.strip().lower() for n in value.split(",") if n.strip())
    if not names or any(n not in EXPORTERS for n in names):
        raise InvalidValue
    if "none" in names and len(names) > 1:
        raise InvalidValue
    return () if names == ("none",) else names


def _names(value: str) -> tuple[str, ...]:
    names = tuple(n.strip().lower() for n in value.split(",") if n.strip())
    if not names:
        raise InvalidValue
    return names


# OTLP headers as the SDK's exporters read them (W3C baggage style, and liberally a value with
# spaces): a pair it cannot read, it prints whole on stderr, secret and all, once per
# exporter. So one bad pair refuses the variable here, where the message hides its value.
_HEADER_KEY: Final = r"[\x21\x23-\x27\x2a\x2b\x2d\x2e\x30-\x39\x41-\x5a\x5e-\x7a\x7c\x7e]+"
_HEADER_PAIR: Final = re.compile(
    rf"[ \t]*{_HEADER_KEY}[ \t]*=[ \t]*[\x20\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*"
)


def _header_pairs(value: str) -> str:
    if any(item.strip() and not _HEADER_PAIR.fullmatch(item.strip()) for item in value.split(",")):
        raise InvalidValue
    return value.strip()


def _rate(value: str) -> float | None:
    if not value.strip():
        return None
    try:
        rate = float(value)
    except ValueError:
        raise InvalidValue from None
    if not 0.0 <= rate <= 1.0:
        raise InvalidValue
    return rate


def _status_codes(low: int, high: int) -> Callable[[str], str]:
    """``none``, ``all`` or a list of codes in [low, high], normalised (sorted, no spaces)."""

    def parse(value: str) -> str:
        v = value.strip().lower()
        if v in ("none", "all"):
            return v
        try:
            codes = {int(c) for c in v.split(",") if c.strip()}
        except ValueError:
            raise InvalidValue from None
        if not codes or any(not low <= c <= high for c in codes):
            raise InvalidValue
        return ",".join(str(c) for c in sorted(codes))

    return parse


def status_set(value: str, low: int = 400, high: int = 499) -> frozenset[int]:
    """The codes a normalised ``none``/``all``/list value stands for.

    >>> sorted(status_set("401,429")), len(status_set("all")), status_set("none")
    ([401, 429], 100, frozenset())
    """
    if value == "none":
        return frozenset()
    if value == "all":
        return frozenset(range(low, high + 1))
    return frozenset(int(c) for c in value.split(","))


def _seconds(low: float, high: float) -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            seconds = float(value)
        except ValueError:
            raise InvalidValue from None
        if not (math.isfinite(seconds) and low < seconds <= high):
            raise InvalidValue
        return seconds

    return parse


def _seconds_or_off(value: str) -> float | None:
    """A number of seconds, more than 0 and at most an hour, or ``off`` (None)."""
    if value.strip().lower() == "off":
        return None
    return _seconds(0.0, 3600.0)(value.strip())


def _positive_int(value: str) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        raise InvalidValue from None
    if number <= 0:
        raise InvalidValue
    return number


def _whole(low: int, high: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value.strip())
        except ValueError:
            raise InvalidValue from None
        if not low <= number <= high:
            raise InvalidValue
        return number

    return parse


def _positive_number(value: str) -> float:
    try:
        number = float(value.strip())
    except ValueError:
        raise InvalidValue from None
    if not (math.isfinite(number) and number > 0):
        raise InvalidValue
    return number


def _split(value: str) -> SplitResult:
    """``urlsplit`` with its port checked; both raise ``ValueError`` on malformed URLs
    (an unclosed ``[``, a port out of range or not a number)."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError:
        raise InvalidValue from None
    return parts


def _url(value: str) -> str | None:
    v = value.strip()
    if not v:
        return None
    parts = _split(v)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidValue
    return v


def _dsn(value: str) -> str | None:
    v = value.strip()
    if not v:
        return None
    parts = _split(v)
    if parts.scheme not in ("http", "https") or not parts.hostname or not parts.username:
        raise InvalidValue
    if not parts.path.strip("/"):
        raise InvalidValue
    return v


def _path(value: str) -> str:
    v = value.strip()
    if not v.startswith("/") or any(c in v for c in " ?#") or "//" in v:
        raise InvalidValue
    return v.rstrip("/") or "/"


def _database_url(value: str) -> str | None:
    v = value.strip()
    if not v:
        return None
    parts = _split(v)
    if parts.scheme not in ("postgres", "postgresql") or not (parts.hostname or "host=" in parts.query):
        raise InvalidValue
    return v


def _redis_url(value: str) -> str | None:
    v = value.strip()
    if not v:
        return None
    parts = _split(v)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise InvalidValue
    return v


# --- the declaration --------------------------------------------------------------------

_VARIABLE: Final = "cfk_otel.variable"


def setting(
    name: str, default: Any, parse: Callable[[str], Any], accepted: str, doc: str, secret: bool = False
) -> Any:
    """A :class:`Settings` field read from the environment variable ``name``: the variable
    is declared here, once (its field, parser, default, accepted values and doc), and the
    README's table, ``cfk-otel env``, the validation messages and :func:`load` come from it.
    A secret's value is left out of the settings' ``repr``."""
    variable = Variable(name, default, parse, accepted, doc, secret)
    return field(default=default, repr=not secret, metadata={_VARIABLE: variable})


# Text attribute values longer than this are cut, with a marker, in spans and log records
# (OTLP and the stdout line). 8192 characters keeps any real URL (servers and proxies cap
# the request line near 8 KB), a SQL statement or a stack trace whole, and keeps a hostile
# 1 MB header or ``extra`` field from reaching the queues. The specification's default is
# no limit; cfk_otel sets one so that memory stays bounded whatever the input.
_VALUE_LENGTH: Final = "a whole number of characters from 1 to 1048576"


@dataclass(frozen=True, slots=True)
class Settings:
    """The parsed environment, one field per variable. Build it with :func:`load`.

    Some fields hold what their variable gives after the fallbacks :func:`load` applies
    (``service_name``, ``service_version``, ``environment``, the ``dd_*`` and ``sentry_*``
    names, the sampler, the value-length limits); the rest hold the parsed value as it is.
    """

    service_name: str = setting(
        "SERVICE_NAME",
        "cf-kanban",
        _text,
        "any text",
        "Service name for traces, metrics and logs.",
    )
    otel_service_name: str = setting(
        "OTEL_SERVICE_NAME",
        "",
        _text,
        "any text",
        "Standard name of the service; wins over SERVICE_NAME when both are set.",
    )
    service_version: str = setting(
        "SERVICE_VERSION",
        "",
        _text,
        "any text",
        "Service version; defaults to the part after '@' in SENTRY_RELEASE, else 'unknown'.",
    )
    environment: str = setting(
        "SERVICE_ENVIRONMENT",
        "",
        _text,
        "any text",
        "Deployment environment; defaults to SENTRY_ENVIRONMENT, then DD_ENV, then 'production'.",
    )
    log_level: str = setting(
        "LOG_LEVEL",
        "info",
        _choice(*LOG_LEVELS, aliases={"warning": "warn", "critical": "fatal"}),
        "debug, info, warn, error, fatal",
        "Lowest level written.",
    )
    log_format: str = setting(
        "LOG_FORMAT",
        "json",
        _choice(*LOG_FORMATS),
        "json, pretty",
        "json for log aggregation, pretty for a terminal.",
    )
    no_color: bool = setting(
        "NO_COLOR",
        None,
        _set,
        "any text (set and not empty: no colour)",
        "LOG_FORMAT=pretty without ANSI colours, even on a terminal (https://no-color.org).",
    )
    force_color: bool = setting(
        "FORCE_COLOR",
        None,
        _set,
        "any text (set and not empty: colour)",
        "LOG_FORMAT=pretty in colour even when stdout is not a terminal; NO_COLOR wins.",
    )
    log_output: str = setting(
        "LOG_OUTPUT",
        "both",
        _choice("stdout", "otlp", "both"),
        "stdout, otlp, both",
        "Where log records go: JSON lines on stdout (kubectl logs), OTLP to the collector, or both.",
    )
    log_requests: bool = setting(
        "LOG_REQUESTS",
        True,
        _bool,
        "true, false",
        "One log line per HTTP request (replaces uvicorn's access log).",
    )
    log_requests_sample_rate: float = setting(
        "LOG_REQUESTS_SAMPLE_RATE",
        1.0,
        _rate,
        "a number from 0 to 1",
        "Share of request lines kept for responses below 400; 4xx and 5xx are always logged.",
    )
    span_value_limit: int = setting(
        "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT",
        8192,
        _whole(1, 1 << 20),
        _VALUE_LENGTH,
        "Longest text attribute value of a span (and of a log record, unless set below); "
        "longer ones are cut and end with `…[truncated N chars]`.",
    )
    log_value_limit: int = setting(
        "OTEL_LOGRECORD_ATTRIBUTE_VALUE_LENGTH_LIMIT",
        None,
        _whole(1, 1 << 20),
        _VALUE_LENGTH,
        "Longest text value in a log record (OTLP attribute, stdout field); "
        "unset: `OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT`.",
    )
    dd_logs_injection: bool = setting(
        "DD_LOGS_INJECTION",
        False,
        _bool,
        "true, false",
        "Add Datadog's dd.trace_id, dd.span_id, dd.service, dd.env and dd.version to each line.",
    )
    dd_service: str = setting(
        "DD_SERVICE",
        "",
        _text,
        "any text",
        "dd.service in log lines; defaults to the service name.",
    )
    dd_version: str = setting(
        "DD_VERSION",
        "",
        _text,
        "any text",
        "dd.version in log lines; defaults to the version.",
    )
    sentry_dsn: str | None = setting(
        "SENTRY_DSN",
        None,
        _dsn,
        "a Sentry DSN (https://KEY@HOST/PROJECT)",
        "Sentry project DSN; unset means nothing is sent to Sentry.",
        secret=True,
    )
    sentry_environment: str = setting(
        "SENTRY_ENVIRONMENT",
        "",
        _text,
        "any text",
        "Sentry environment; defaults to the service environment.",
    )
    sentry_release: str | None = setting(
        "SENTRY_RELEASE",
        "",
        _text,
        "any text",
        "Sentry release, e.g. cf-kanban@1.0.0.",
    )
    sentry_traces_sample_rate: float | None = setting(
        "SENTRY_TRACES_SAMPLE_RATE",
        None,
        _rate,
        "a number from 0 to 1",
        "Share of traces kept: sets the OpenTelemetry sampler (parentbased_traceidratio) "
        "when OTEL_TRACES_SAMPLER is unset; traces reach Sentry through the collector.",
    )
    sentry_profiles_sample_rate: float | None = setting(
        "SENTRY_PROFILES_SAMPLE_RATE",
        None,
        _rate,
        "a number from 0 to 1",
        "Share of worker processes running Sentry's continuous profiler (needs SENTRY_DSN).",
    )
    sentry_capture_4xx: frozenset[int] = setting(
        "SENTRY_CAPTURE_4XX",
        "all",
        _status_codes(400, 499),
        "all, none, or status codes separated by commas (e.g. 401,403,429)",
        "4xx responses reported to Sentry as warnings, one issue per method, route and status, and "
        "counted in errors_total (severity warn); 404s on paths no route matches never are. "
        "5xx are always reported as errors.",
    )
    sdk_disabled: bool = setting("OTEL_SDK_DISABLED", False, _bool, "true, false", "Turns all telemetry off.")
    otlp_endpoint: str | None = setting(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        None,
        _url,
        "an http:// or https:// URL",
        "Collector address (default http://localhost:4318 for http/protobuf, :4317 for grpc).",
    )
    otlp_protocol: str = setting(
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "http/protobuf",
        _choice(*OTLP_PROTOCOLS),
        "grpc, http/protobuf",
        "OTLP transport for all three signals; http/protobuf is the specification's default and "
        "our fast path (spans and logs encoded by cfk_otel).",
    )
    otlp_headers: str = setting(
        "OTEL_EXPORTER_OTLP_HEADERS",
        "",
        _header_pairs,
        "key=value pairs separated by commas, values URL-encoded (no ';', ',', '\\' or '\"')",
        "Extra headers sent with every OTLP request (e.g. authorization).",
        secret=True,
    )
    traces_exporters: tuple[str, ...] = setting(
        "OTEL_TRACES_EXPORTER",
        ("otlp",),
        _exporters,
        "otlp, console, none (comma-separated)",
        "Where spans go.",
    )
    metrics_exporters: tuple[str, ...] = setting(
        "OTEL_METRICS_EXPORTER",
        ("otlp",),
        _exporters,
        "otlp, console, none (comma-separated)",
        "Where metrics are pushed (the /api/metrics scrape endpoint is separate).",
    )
    metrics_temporality: str = setting(
        "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE",
        "cumulative",
        _choice("cumulative", "delta", "lowmemory"),
        "cumulative, delta, lowmemory",
        "Temporality of the counters and histograms pushed over OTLP, as the specification defines "
        "the three choices (the /api/metrics scrape is always cumulative).",
    )
    logs_exporters: tuple[str, ...] = setting(
        "OTEL_LOGS_EXPORTER",
        ("otlp",),
        _exporters,
        "otlp, console, none (comma-separated)",
        "Where log records are pushed.",
    )
    sampler: str = setting(
        "OTEL_TRACES_SAMPLER",
        "parentbased_always_on",
        _choice(*SAMPLERS),
        ", ".join(SAMPLERS),
        "Head sampler for traces.",
    )
    sampler_arg: float | None = setting(
        "OTEL_TRACES_SAMPLER_ARG",
        None,
        _rate,
        "a number from 0 to 1",
        "Ratio for the traceidratio samplers.",
    )
    keep_slower_than: float | None = setting(
        "CFK_TRACES_KEEP_SLOWER_THAN",
        2.0,
        _seconds_or_off,
        "seconds, more than 0; or off",
        "With a ratio sampler, a trace the ratio would drop is still kept whole when it failed "
        "or took longer than this; off: the ratio alone decides.",
    )
    propagators: tuple[str, ...] = setting(
        "OTEL_PROPAGATORS",
        ("tracecontext", "baggage"),
        _names,
        "comma-separated propagator names (tracecontext, baggage, none, or an installed one)",
        "Context propagation formats; cfk_otel's W3C propagator stands for tracecontext.",
    )
    resource_attributes: str = setting(
        "OTEL_RESOURCE_ATTRIBUTES",
        "",
        _text,
        "key=value pairs separated by commas",
        "Extra resource attributes; the explicit variables above win over the same key here.",
    )
    disabled_instrumentations: str = setting(
        "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS",
        "",
        _text,
        "instrumentation names separated by commas (cfk_uvicorn, cfk_asyncpg, cfk_redis, ...)",
        "Instrumentations opentelemetry-instrument must not load.",
    )
    strict: bool = setting(
        "CFK_OTEL_STRICT",
        False,
        _bool,
        "true, false",
        "Refuse to start when any variable here is invalid, instead of using its default; "
        "a metric recorded with wrong labels raises instead of being dropped and logged once.",
    )
    native: bool = setting(
        "CFK_OTEL_NATIVE",
        True,
        _bool,
        "true, false",
        "Record cfk_otel's request and client spans in the compiled core; false runs the stock "
        "OpenTelemetry SDK path instead (the reference; slower).",
    )
    shutdown_timeout: float = setting(
        "CFK_OTEL_SHUTDOWN_TIMEOUT",
        3.0,
        _seconds(0.0, 30.0),
        "seconds, more than 0 and at most 30",
        "Upper bound on flushing telemetry at exit, for all signals together.",
    )
    defer_init: str = setting(
        "CFK_OTEL_DEFER_INIT",
        "auto",
        _choice("auto", "true", "false"),
        "auto, true, false",
        "Start the SDK in each forked worker instead of the parent (auto: under gunicorn).",
    )
    k8s_pod_name: str = setting(
        "K8S_POD_NAME",
        "",
        _text,
        "any text",
        "Pod name from the downward API (resource k8s.pod.name).",
    )
    k8s_pod_uid: str = setting(
        "K8S_POD_UID",
        "",
        _text,
        "any text",
        "Pod UID from the downward API (resource k8s.pod.uid).",
    )
    k8s_namespace: str = setting(
        "K8S_NAMESPACE_NAME",
        "",
        _text,
        "any text",
        "Namespace from the downward API (k8s.namespace.name).",
    )
    k8s_node_name: str = setting(
        "K8S_NODE_NAME",
        "",
        _text,
        "any text",
        "Node name from the downward API (resource k8s.node.name).",
    )
    dd_env: str = setting(
        "DD_ENV",
        "",
        _text,
        "any text",
        "Datadog's environment tag; a fallback for the environment.",
    )
    metrics_enabled: bool = setting(
        "METRICS_ENABLED",
        True,
        _bool,
        "true, false",
        "Serve the Prometheus scrape endpoint from the app.",
    )
    metrics_path: str = setting(
        "METRICS_PATH",
        "/api/metrics",
        _path,
        "an absolute URL path",
        "Path of the Prometheus scrape endpoint.",
    )
    metrics_bearer_token: str | None = setting(
        "METRICS_BEARER_TOKEN",
        None,
        _optional_text,
        "any text",
        "When set, scrapes must send 'Authorization: Bearer <token>'.",
        secret=True,
    )
    health_enabled: bool = setting(
        "HEALTH_ENABLED",
        True,
        _bool,
        "true, false",
        "Serve the health endpoints from the app.",
    )
    health_path: str = setting(
        "HEALTH_PATH",
        "/api/health",
        _path,
        "an absolute URL path",
        "Full health report (200/503).",
    )
    health_live_path: str = setting(
        "HEALTH_LIVE_PATH",
        "/api/health/live",
        _path,
        "an absolute URL path",
        "Liveness probe path.",
    )
    health_ready_path: str = setting(
        "HEALTH_READY_PATH",
        "/api/health/ready",
        _path,
        "an absolute URL path",
        "Readiness probe path.",
    )
    health_check_timeout: float = setting(
        "HEALTH_CHECK_TIMEOUT",
        1.0,
        _seconds(0.0, 30.0),
        "seconds, more than 0 and at most 30",
        "Time limit of each health check.",
    )
    health_cache_ttl: float = setting(
        "HEALTH_CACHE_TTL",
        2.0,
        _seconds(-1e-9, 300.0),
        "seconds, 0 to 300",
        "How long health results are reused, so probe storms cannot hammer dependencies.",
    )
    health_telemetry: bool = setting(
        "HEALTH_TELEMETRY",
        False,
        _bool,
        "true, false",
        "Count and trace requests to the health and metrics endpoints too.",
    )
    slow_query_threshold: float = setting(
        "SLOW_QUERY_THRESHOLD",
        1.0,
        _seconds(0.0, 3600.0),
        "seconds, more than 0",
        "A database query slower than this logs a warning and adds a span event.",
    )
    database_url: str | None = setting(
        "DATABASE_URL",
        None,
        _database_url,
        "a postgresql:// URL",
        "PostgreSQL for the built-in database health check.",
        secret=True,
    )
    redis_url: str | None = setting(
        "REDIS_URL",
        None,
        _redis_url,
        "a redis://, rediss:// or unix:// URL",
        "Redis for the built-in Redis health check.",
        secret=True,
    )
    problems: tuple[Problem, ...] = field(default=())

    def secret_values(self) -> tuple[str, ...]:
        """The values of the secret variables that are set: the secrets policy withholds
        them wherever they appear (as :class:`cfk_otel._redact.Known` values, made once by
        each part that scrubs, from the settings it was given)."""
        values = (getattr(self, name) for name, var in _FIELDS if var.secret)
        return tuple(v for v in values if isinstance(v, str) and v)


# (field name, variable) in the order of the README's table.
_FIELDS: Final[tuple[tuple[str, Variable[Any]], ...]] = tuple(
    (f.name, f.metadata[_VARIABLE]) for f in fields(Settings) if _VARIABLE in f.metadata
)
VARIABLES: Final[tuple[Variable[Any], ...]] = tuple(variable for _, variable in _FIELDS)
_BY_NAME: Final[dict[str, Variable[Any]]] = {variable.name: variable for variable in VARIABLES}


def variable(name: str) -> Variable[Any]:
    """The declared variable called ``name`` (``KeyError`` for one cfk_otel does not read)."""
    return _BY_NAME[name]


# Per-signal protocol overrides the SDK honours; validated like the shared one.
_SIGNAL_PROTOCOLS: Final = tuple(
    Variable(
        f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL",
        "",
        _choice(*OTLP_PROTOCOLS),
        "grpc, http/protobuf",
        f"OTLP transport for {signal.lower()} only.",
    )
    for signal in ("TRACES", "METRICS", "LOGS")
)


# Per-signal headers the SDK honours; checked like the shared ones (they hold secrets too).
_SIGNAL_HEADERS: Final = tuple(
    Variable(
        f"OTEL_EXPORTER_OTLP_{signal}_HEADERS",
        "",
        _header_pairs,
        variable("OTEL_EXPORTER_OTLP_HEADERS").accepted,
        f"OTLP headers for {signal.lower()} only.",
        secret=True,
    )
    for signal in ("TRACES", "METRICS", "LOGS")
)


# The SDK's own batching and export variables: it raises on out-of-range values in the
# middle of its set-up (taking every instrumentation down with it) and names neither the
# variable nor the value, so they are checked here first, like ours.
_MILLIS: Final = "a whole number of milliseconds above 0"
_SECONDS: Final = "a number of seconds above 0"
_SDK_NUMBERS: Final[tuple[Variable[Any], ...]] = (
    *(
        Variable(f"{prefix}_{name}", default, _positive_int, accepted, "")
        for prefix, delay in (("OTEL_BSP", 5000), ("OTEL_BLRP", 1000))
        for name, default, accepted in (
            ("SCHEDULE_DELAY", delay, _MILLIS),
            ("EXPORT_TIMEOUT", 30000, _MILLIS),
            ("MAX_QUEUE_SIZE", 2048, "a whole number above 0"),
            ("MAX_EXPORT_BATCH_SIZE", 512, "a whole number above 0, at most the queue size"),
        )
    ),
    Variable("OTEL_METRIC_EXPORT_INTERVAL", 60000, _positive_int, _MILLIS, ""),
    Variable("OTEL_METRIC_EXPORT_TIMEOUT", 30000, _positive_int, _MILLIS, ""),
    *(
        Variable(f"OTEL_EXPORTER_OTLP{signal}_TIMEOUT", 10.0, _positive_number, _SECONDS, "")
        for signal in ("", "_TRACES", "_METRICS", "_LOGS")
    ),
)


# Every variable read and checked here, for tests and tools that must cover them all.
DECLARED: Final[tuple[Variable[Any], ...]] = (*VARIABLES, *_SIGNAL_PROTOCOLS, *_SIGNAL_HEADERS, *_SDK_NUMBERS)


def _check_sdk_numbers(env: Mapping[str, str], problems: list[Problem]) -> None:
    values = {var.name: _read(var, env, problems) for var in _SDK_NUMBERS}
    rejected = {p.variable for p in problems}
    for prefix in ("OTEL_BSP", "OTEL_BLRP"):
        batch_name, queue_name = f"{prefix}_MAX_EXPORT_BATCH_SIZE", f"{prefix}_MAX_QUEUE_SIZE"
        batch, queue = values[batch_name], values[queue_name]
        if batch > queue and batch_name in env and batch_name not in rejected:
            accepted = f"a whole number from 1 to the queue size, {queue:g}"
            problems.append(Problem(batch_name, shown(env[batch_name], secret=False), accepted, "512"))
            batch = 512
        if batch > queue:
            # The SDK would refuse the default batch size (512) over this smaller queue.
            accepted = f"a whole number of at least the export batch size, {batch:g}"
            problems.append(Problem(queue_name, shown(env[queue_name], secret=False), accepted, "2048"))


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _resource_attributes(value: str) -> dict[str, str]:
    """``OTEL_RESOURCE_ATTRIBUTES`` as the SDK reads it (percent-decoded key=value pairs)."""
    pairs = (item.split("=", 1) for item in value.split(",") if "=" in item)
    return {unquote(k).strip(): unquote(v).strip() for k, v in pairs}


_SCHEME: Final = re.compile(r"\s*([A-Za-z][A-Za-z0-9+.-]*)://(.*)", re.DOTALL)


def shown(value: str, secret: bool) -> str:
    """``value`` as a message may show it: never what comes before an ``@`` (a URL's
    password, a DSN key), a URL's query or fragment, or any of a secret that is no URL;
    at most ~100 characters.

    >>> shown("postgresql://u:p@[::1/db?sslpassword=x", secret=True)
    'postgresql://<redacted>@[::1/db?<redacted>'
    """
    match = _SCHEME.match(value)
    if match is None:
        # No scheme, but perhaps still user:password@host.
        _, at, after = value.rpartition("@")
        text = "<redacted>" if secret else f"<redacted>@{after}" if at else value
    else:
        scheme, rest = match.groups()
        userinfo, at, after = rest.rpartition("@")
        host_and_path = after.split("?", 1)[0].split("#", 1)[0]
        text = f"{scheme}://{'<redacted>@' if at else ''}{host_and_path}"
        if len(host_and_path) < len(after):
            text += "?<redacted>"
        if any(c in userinfo for c in "/?#"):
            # The '@' may sit in a path or query: no telling where a password ends.
            text = f"{scheme}://<redacted>"
    if len(text) > _SHOWN_LENGTH:
        text = f"{text[:_SHOWN_LENGTH]}... ({len(value)} characters)"
    return text


def _read(var: Variable[T], env: Mapping[str, str], problems: list[Problem]) -> T:
    raw = env.get(var.name)
    if raw is None:
        return var.default
    # Whitespace around a value is ignored (a secret mounted with its newline), but
    # control characters, bytes that are not UTF-8 (os.environ keeps them as lone
    # surrogates) and huge values would reach every log line, span and export request.
    if len(raw) > MAX_VALUE_LENGTH or not raw.strip().isprintable():
        accepted = f"{var.accepted}; {_PRINTABLE}"
    else:
        accepted = var.accepted
        try:
            return var.parse(raw)
        except ValueError:  # InvalidValue, or a library's (urlsplit's) we did not foresee
            pass
    if all(p.variable != var.name for p in problems):  # some are read twice
        problems.append(Problem(var.name, shown(raw, var.secret), accepted, var.default_text()))
    return var.default


def load(env: Mapping[str, str] | None = None) -> Settings:
    """Parse ``env`` (default: ``os.environ``) into :class:`Settings`.

    Invalid values become their defaults and are listed in ``Settings.problems``;
    with ``CFK_OTEL_STRICT=true`` they raise :class:`ConfigurationError` instead.

    >>> load({"LOG_LEVEL": "warning"}).log_level
    'warn'
    """
    env = os.environ if env is None else env
    problems: list[Problem] = []
    values: dict[str, Any] = {name: _read(var, env, problems) for name, var in _FIELDS}
    for var in (*_SIGNAL_PROTOCOLS, *_SIGNAL_HEADERS):  # the SDK reads them: named here, removed first
        _read(var, env, problems)
    _check_sdk_numbers(env, problems)

    # The fallbacks between variables.
    resource = _resource_attributes(values["resource_attributes"])
    service_name = (
        values["otel_service_name"]
        or (values["service_name"] if "SERVICE_NAME" in env else "")
        or resource.get("service.name")
        or variable("SERVICE_NAME").default
    )
    sentry_release = values["sentry_release"] or None
    version = values["service_version"] or resource.get("service.version", "")
    if not version and sentry_release and "@" in sentry_release:
        version = sentry_release.rsplit("@", 1)[1]
    environment = (
        values["environment"]
        or resource.get("deployment.environment.name")
        or values["sentry_environment"]
        or values["dd_env"]
        or "production"
    )
    if values["sentry_traces_sample_rate"] is not None and "OTEL_TRACES_SAMPLER" not in env:
        # OpenTelemetry is the one tracer: Sentry's share of traces is the sampler's (docs/sentry.md).
        values.update(sampler="parentbased_traceidratio", sampler_arg=values["sentry_traces_sample_rate"])
    span_value_limit = values["span_value_limit"] or 8192
    values.update(
        service_name=service_name,
        service_version=version or "unknown",
        environment=environment,
        no_color=bool(values["no_color"]),
        force_color=bool(values["force_color"]),
        log_requests_sample_rate=_or(values["log_requests_sample_rate"], 1.0),
        span_value_limit=span_value_limit,
        log_value_limit=values["log_value_limit"] or span_value_limit,
        dd_service=values["dd_service"] or service_name,
        dd_env=values["dd_env"] or environment,
        dd_version=values["dd_version"] or version or "unknown",
        sentry_environment=values["sentry_environment"] or environment,
        sentry_release=sentry_release,
        sentry_capture_4xx=status_set(values["sentry_capture_4xx"]),
    )
    settings = Settings(**values, problems=tuple(problems))
    if problems and settings.strict:
        raise ConfigurationError(problems)
    return settings


def markdown_table() -> str:
    """The README's table of variables, generated from :data:`VARIABLES`."""
    rows = ["| Variable | Default | Accepted | Meaning |", "|---|---|---|---|"]
    for var in VARIABLES:
        rows.append(f"| `{var.name}` | `{var.default_text()}` | {var.accepted} | {var.doc} |")
    return "\n".join(rows)
