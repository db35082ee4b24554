"""The seam between the request path and what records it: the compiled core or the SDK.

cfk_otel's own spans (each request's server span, and the asyncpg and redis client spans)
are started here, by :class:`Spans`. Which implementation records them is chosen once per
process, at set-up (:func:`select`), and said once in the log:

- **native**: the compiled core (``cfk_otel._native``, Rust). A span is a small Python
  object while it is open, so the app can name it, add attributes and events and parent
  its own spans on it through the OpenTelemetry API; when it ends it crosses into the core
  in one call, and the core's own thread batches, encodes and exports it over OTLP/HTTP,
  without the GIL, from a queue bounded in count and in bytes.
- **sdk**: the stock OpenTelemetry SDK through its public API (``Tracer.start_span``,
  its batch processor and exporter). It is the reference the core is tested against, and
  what runs when the compiled module is missing, when ``CFK_OTEL_NATIVE=false``, or when
  the core cannot honour the configuration (see :func:`otlp_target`).

Only the public API of the SDK is used: the provider's ``sampler``, ``id_generator`` and
``resource``, the span limits from the environment, ``BoundedAttributes`` for what the app
adds. The app's own spans stay SDK spans, exported by the SDK's own processor.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from random import getrandbits
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote

from opentelemetry import context as context_api
from opentelemetry import metrics, trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk._logs import LoggerProvider, LogRecordLimits
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.semconv.attributes.exception_attributes import (
    EXCEPTION_MESSAGE,
    EXCEPTION_STACKTRACE,
    EXCEPTION_TYPE,
)
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState
from opentelemetry.util import types

from cfk_otel import _settings
from cfk_otel._guard import guard, warn_once
from cfk_otel._redact import scrub_url  # noqa: F401  (the core's server span calls it)
from cfk_otel._version import __version__

from . import sampling as _sampling

if TYPE_CHECKING:
    from cfk_otel._native import (
        CallTimer,
        Family,
        LineBuffer,
        OtlpExporter,
        PreparedSpan,
        RequestLine,
        ServerSpans,
    )

_native: ModuleType | None
try:
    from cfk_otel import _native
except ImportError:  # a source checkout without the build, or a platform without a wheel
    _native = None

_log = logging.getLogger("cfk_otel")
_START_SPAN: Final = guard("starting a span", then="the call goes on, untraced")
_RECORD_SPAN: Final = guard("recording a span", then="dropped")
SCOPE: Final = "cfk_otel"
_UNSET: Final = Status(StatusCode.UNSET)
_OTLP_KINDS: Final = {kind: kind.value + 1 for kind in SpanKind}  # OTLP counts from UNSPECIFIED
# OTLP's span flags as the SDK's encoder writes them: "is the parent remote" is known.
_HAS_IS_REMOTE: Final = 0x100
_IS_REMOTE: Final = 0x200
# W3C Trace Context level 2's random-trace-id flag, where the installed API has it (1.42 and
# later); an older SDK never sets it, and then neither do we: the two paths stay alike.
_RANDOM: Final = int(getattr(TraceFlags, "RANDOM_TRACE_ID", 0))
_FLAGS: Final = {
    (sampled, random): TraceFlags(
        (TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT) | (_RANDOM if random else 0)
    )
    for sampled in (False, True)
    for random in (False, True)
}


@dataclass(frozen=True, slots=True)
class Target:
    """Where and how one signal is exported over OTLP/HTTP, from the ``OTEL_EXPORTER_OTLP_*``
    variables, as the SDK's exporter reads them. The TLS material is the PEM text of the
    files the variables name, read once."""

    url: str
    headers: tuple[tuple[str, str], ...]
    gzip: bool
    timeout: float
    certificate: bytes | None = None
    client_certificate: bytes | None = None
    client_key: bytes | None = None


def _signal_env(env: Mapping[str, str], signal: str, name: str) -> str:
    own = env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_{name}", "").strip()
    return own or env.get(f"OTEL_EXPORTER_OTLP_{name}", "").strip()


def _signal_variable(env: Mapping[str, str], signal: str, name: str) -> str:
    """Which variable :func:`_signal_env` took the value from."""
    own = f"OTEL_EXPORTER_OTLP_{signal.upper()}_{name}"
    return own if env.get(own, "").strip() else f"OTEL_EXPORTER_OTLP_{name}"


def _headers(value: str) -> tuple[tuple[str, str], ...]:
    # The W3C baggage-like format the SDK reads: percent-encoded key=value pairs.
    pairs = (item.split("=", 1) for item in value.split(",") if "=" in item)
    return tuple((unquote(k).strip().lower(), unquote(v).strip()) for k, v in pairs if k.strip())


# Where requests (the SDK's HTTP client) finds its roots when no OTLP certificate is named:
# an app that trusts its collector's private CA this way keeps doing so on the core.
_REQUESTS_ROOTS: Final = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


def _tls(env: Mapping[str, str], signal: str) -> tuple[bytes | None, bytes | None, bytes | None] | str:
    """The PEM text of the CA, client certificate and client key files for ``signal``, as the
    SDK pairs them (a key without a certificate is not used), or why they cannot be used."""
    read: list[bytes | None] = []
    for name in ("CERTIFICATE", "CLIENT_CERTIFICATE", "CLIENT_KEY"):
        path, variable = _signal_env(env, signal, name), _signal_variable(env, signal, name)
        if not path and name == "CERTIFICATE":
            variable = next((v for v in _REQUESTS_ROOTS if env.get(v, "").strip()), "")
            path = env.get(variable, "").strip() if variable else ""
        if not path or (name == "CLIENT_KEY" and read[1] is None):
            read.append(None)
            continue
        try:
            with open(path, "rb") as file:
                read.append(file.read(1 << 20))  # a PEM bundle; never a whole disk
        except OSError as error:
            return f"{variable}: cannot read the file ({error.strerror or type(error).__name__})"
    certificate, client_certificate, client_key = read
    if _native is not None and (certificate or client_certificate):
        try:
            _native.check_tls(certificate, client_certificate, client_key)
        except ValueError as error:
            return f"OTEL_EXPORTER_OTLP_* TLS files for {signal}: {error}"
    return certificate, client_certificate, client_key


def otlp_target(signal: str, env: Mapping[str, str]) -> Target | str:
    """The core's export target for ``signal`` ("traces", "logs", "metrics"), or the reason
    the core cannot honour the configuration (then the SDK's exporter is used)."""
    protocol = _signal_env(env, signal, "PROTOCOL") or "http/protobuf"
    if protocol != "http/protobuf":
        return f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol}"
    for variable in (
        "OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER",
        f"OTEL_PYTHON_EXPORTER_OTLP_HTTP_{signal.upper()}_CREDENTIAL_PROVIDER",
    ):
        if env.get(variable, "").strip():
            return f"{variable} (a requests session of the app's)"
    own = env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT", "").strip()
    if own:
        url = own
    else:
        base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or "http://localhost:4318"
        url = f"{base.rstrip('/')}/v1/{signal}"
    compression = _signal_env(env, signal, "COMPRESSION").lower()
    if compression not in ("", "none", "gzip"):
        return f"OTEL_EXPORTER_OTLP_COMPRESSION={compression}"
    try:
        timeout = float(_signal_env(env, signal, "TIMEOUT") or 10.0)
    except ValueError:  # rejected and removed by the settings already; never here
        timeout = 10.0
    tls = _tls(env, signal)
    if isinstance(tls, str):
        return tls
    headers = _headers(_signal_env(env, signal, "HEADERS"))
    return Target(url, headers, compression == "gzip", timeout, *tls)


def _number(env: Mapping[str, str], name: str, default: int) -> int:
    try:
        value = int(env.get(name, default))
    except ValueError:
        return default
    return value if value > 0 else default


@dataclass(frozen=True, slots=True)
class Choice:
    """Which implementation records cfk_otel's spans in this process, and why."""

    native: bool
    reason: str

    def describe(self) -> str:
        return "native core" if self.native else f"OpenTelemetry SDK ({self.reason})"


def select(settings: _settings.Settings, env: Mapping[str, str] | None = None) -> Choice:
    """Who records our spans in this process (see the module docstring)."""
    return _select(settings, "traces", settings.traces_exporters, env)


def select_logs(settings: _settings.Settings, env: Mapping[str, str] | None = None) -> Choice:
    """Whether ``logging``'s records (request lines included) go straight to the core."""
    return _select(settings, "logs", settings.logs_exporters, env)


def _select(
    settings: _settings.Settings, signal: str, exporters: tuple[str, ...], env: Mapping[str, str] | None
) -> Choice:
    if not settings.native:
        return Choice(False, "CFK_OTEL_NATIVE=false")
    if _native is None:
        return Choice(False, "the compiled core is not installed")
    if exporters != ("otlp",):
        return Choice(False, f"OTEL_{signal.upper()}_EXPORTER={','.join(exporters) or 'none'}")
    target = otlp_target(signal, os.environ if env is None else env)
    if isinstance(target, str):
        return Choice(False, target)
    return Choice(True, "")


_CHOICE = Choice(False, "not set up")
# Bumped whenever what Spans decided on may have changed (set-up, a processor added, the
# core's exporters shut down, a fork: the parent's export threads are not the child's).
_GENERATION = [0]


def _forked() -> None:
    _GENERATION[0] += 1
    _LINES[0] = None  # the parent's held lines are the parent's to write; its thread is not here


# The request lines of this process on their way to stdout (see ``native/src/stdout.rs``):
# made at first use, replaced in a forked child.
_LINES: list[LineBuffer | None] = [None]
_FLUSH_LINES: Final = guard("writing the request lines held for stdout", then="they may be lost")


def line_buffer() -> LineBuffer | None:
    """This process's buffer of request lines for stdout, made on first use (None without
    the core). Its thread writes what it holds within 50 ms."""
    buffer = _LINES[0]
    if buffer is None and _native is not None:
        with _LOCK:
            buffer = _LINES[0]
            if buffer is None:
                buffer = _LINES[0] = _native.LineBuffer()
    return buffer


def flush_lines() -> None:
    """Write the request lines held for stdout now, in this thread (before another line of
    ours reaches the stream, at flush and shutdown). Never raises."""
    buffer = _LINES[0]
    if buffer is not None:
        with _FLUSH_LINES:
            buffer.flush()


def _close_lines() -> None:
    """At exit: what is held written, and the writing thread stopped (waited for 1 s at most:
    it may be stuck on a blocked stdout). Later lines are written as they come."""
    buffer = _LINES[0]
    if buffer is not None:
        with _FLUSH_LINES:
            buffer.close(1.0)


# Before a fork the held lines are written by the parent, so that none is written twice or
# cut in half; the child starts with an empty buffer of its own.
os.register_at_fork(before=flush_lines, after_in_child=_forked)
# Registered at import, so it runs after set-up's shutdown (atexit runs the last first) and
# before logging's, which flushes our stdout handler (and with it anything held since).
atexit.register(_close_lines)
_LOCK = threading.Lock()
# Each queue of the core holds at most this many bytes (besides its count bound): with the
# collector away, long unique paths and user agents must not grow memory past a few MiB.
QUEUE_BYTES: Final = 2 << 20
# The core's exporters, per process id and signal: their threads do not survive a fork.
_EXPORTERS: dict[tuple[int, str], OtlpExporter] = {}


def activate(choice: Choice, provider: trace.TracerProvider | None = None) -> None:
    """Record the choice made at set-up; :class:`Spans` follow it from their next span.

    ``provider`` is the one set-up just built: from now on, a processor added to it moves
    our spans onto the SDK's tracer, so that processor sees them too.
    """
    global _CHOICE  # noqa: PLW0603  (process state, written by set-up)
    _CHOICE = choice
    _GENERATION[0] += 1
    if choice.native and isinstance(provider, sdk_trace.TracerProvider):
        _watch(provider, "add_span_processor")


# cfk_otel's own value-length limits per signal (OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT and the
# log-record one, 8192 by default), set by set-up; the core cuts with a marker at them.
_VALUE_LIMITS: dict[str, int] = {}


def log_record_limits() -> tuple[int | None, int | None]:
    """The SDK's limits on a log record's attributes: how many, and how long a value.

    SDK 1.44 added the record's own (``OTEL_LOGRECORD_ATTRIBUTE_*``, falling back to the
    global ones); before, a record took the global ``OTEL_ATTRIBUTE_*`` limits.
    """
    limits = LogRecordLimits()
    return (
        getattr(limits, "max_log_record_attributes", limits.max_attributes),
        getattr(limits, "max_log_record_attribute_length", limits.max_attribute_length),
    )


def set_value_limits(spans: int | None, logs: int | None) -> None:
    """The settings' value-length limits, for exporters made from now on (None: the SDK's
    from the environment, without a marker)."""
    _VALUE_LIMITS.clear()
    if spans is not None and logs is not None:
        _VALUE_LIMITS.update(traces=spans, logs=logs)


def _exporter(signal: str, resource: Resource, scopes: list[tuple[str, str]]) -> OtlpExporter:
    """The core's exporter of ``signal`` in this process, made on first use."""
    key = (os.getpid(), signal)
    exporter = _EXPORTERS.get(key)
    if exporter is not None:
        return exporter
    with _LOCK:
        exporter = _EXPORTERS.get(key)
        if exporter is None:
            env = os.environ
            target = otlp_target(signal, env)
            if isinstance(target, str):  # select() said yes, but a TLS file went since
                raise RuntimeError(f"cfk_otel cannot export {signal} from the core: {target}")
            assert _native is not None  # and that the core is there
            prefix = "OTEL_BSP" if signal == "traces" else "OTEL_BLRP"
            # Without set-up (tests, benchmarks): the SDK's limit from the environment.
            length = _VALUE_LIMITS.get(signal)
            if length is None and signal == "traces":
                length = sdk_trace.SpanLimits().max_attribute_length
            elif length is None:
                length = log_record_limits()[1]
            exporter = _native.OtlpExporter(
                signal,
                target.url,
                list(target.headers),
                dict(resource.attributes),
                scopes,
                gzip=target.gzip,
                timeout=target.timeout,
                max_queue_size=_number(env, f"{prefix}_MAX_QUEUE_SIZE", 2048),
                max_export_batch_size=_number(env, f"{prefix}_MAX_EXPORT_BATCH_SIZE", 512),
                schedule_delay=_number(env, f"{prefix}_SCHEDULE_DELAY", 5000 if signal == "traces" else 1000)
                / 1000,
                attribute_value_length_limit=length,
                truncation_marker=signal in _VALUE_LIMITS,
                max_queue_bytes=QUEUE_BYTES,
                certificate=target.certificate,
                client_certificate=target.client_certificate,
                client_key=target.client_key,
            )
            for stale in [k for k in _EXPORTERS if k[0] != key[0]]:
                del _EXPORTERS[stale]  # a parent's, inherited through fork, is not ours
            _EXPORTERS[key] = exporter
    return exporter


def flush(timeout: float) -> bool:
    """Write the request lines held for stdout, and export what the core has queued in this
    process within ``timeout`` seconds."""
    flush_lines()
    pid = os.getpid()
    exporters = [e for (p, _), e in list(_EXPORTERS.items()) if p == pid]
    return all([bool(e.force_flush(timeout)) for e in exporters])


def shutdown(timeout: float) -> bool:
    """Export what is queued within ``timeout`` seconds and stop (a later record starts anew).
    The request lines held for stdout are written (their buffer stays: the app may go on)."""
    flush_lines()
    pid = os.getpid()
    with _LOCK:
        exporters = [_EXPORTERS.pop(k) for k in [k for k in _EXPORTERS if k[0] == pid]]
        _GENERATION[0] += 1  # Spans take a new exporter at their next span
    deadline = time.monotonic() + timeout
    return all([bool(e.shutdown(max(0.0, deadline - time.monotonic()))) for e in exporters])


def stats() -> dict[str, dict[str, Any]]:
    """The core's export counters in this process, per signal (accepted, exported, dropped...);
    ``stdout``: the request lines written there, held, and dropped (the buffer full while the
    stream was blocked, or the stream failing)."""
    pid = os.getpid()
    counters = {signal: dict(e.stats()) for (p, signal), e in list(_EXPORTERS.items()) if p == pid}
    lines = _LINES[0]
    if lines is not None:
        counters["stdout"] = dict(lines.stats())
    return counters


DROP_REASONS: Final = ("queue_full", "export_failed")
_WHAT: Final = {"traces": "spans", "stdout": "request lines on stdout"}
_DROPS_SAID = [False]


def observe_drops(options: metrics.CallbackOptions) -> list[metrics.Observation]:
    """``cfk_otel_telemetry_dropped_total{signal,reason}``: what the core gave up on, a full
    queue (the collector away longer than the queue lasts) or an export retried past its
    time. The first drop is also said once in the log."""
    observations = []
    for signal, counters in sorted(stats().items()):
        for reason in DROP_REASONS:
            dropped = int(counters[f"dropped_{reason}"])
            observations.append(metrics.Observation(dropped, {"signal": signal, "reason": reason}))
            if dropped and not _DROPS_SAID[0]:
                _DROPS_SAID[0] = True
                _log.warning(
                    "cfk_otel: telemetry was dropped (%d %s, %s; last export error: %s); "
                    "counted in cfk_otel_telemetry_dropped_total and shown in /api/health",
                    dropped,
                    _WHAT.get(signal, "log records"),
                    reason.replace("_", " "),
                    counters.get("last_error") or "none",
                )
    return observations


def health() -> dict[str, dict[str, Any]]:
    """What ``/api/health`` shows of the core's export, per signal; the request lines on
    stdout once some were dropped (until then the body keeps its usual shape)."""
    return {
        signal: {
            "exported": counters["exported"],
            "queued": counters["queued"],
            "dropped": {reason: counters[f"dropped_{reason}"] for reason in DROP_REASONS},
            "rejected": counters["rejected"],
            "failedAttempts": counters["failed_attempts"],
            "lastError": counters["last_error"],
        }
        for signal, counters in sorted(stats().items())
        if signal != "stdout" or any(counters[f"dropped_{reason}"] for reason in DROP_REASONS)
    }


class CoreSpan(trace.Span):
    """One of cfk_otel's spans on the native path: plain fields while open, one call into
    the core when it ends. Behaves as the SDK's span does for everything the API allows."""

    __slots__ = (
        "_context",
        "_end_time",
        "_extra",
        "_flags",
        "_home",
        "_own",
        "_trace_state",
        "dropped_events",
        "events",
        "kind",
        "name",
        "parent",
        "sampled",
        "span_id",
        "start_time",
        "status",
        "trace_id",
    )

    def __init__(
        self,
        home: Spans,
        name: str,
        kind: SpanKind,
        trace_id: int,
        span_id: int,
        flags: TraceFlags,
        trace_state: TraceState | None,
        parent: SpanContext | None,
        attributes: dict[str, Any],
    ) -> None:
        self._home = home
        self.name = name
        self.kind = kind
        # The span's context is made only when asked for (get_span_context): most requests'
        # never are (no observer, no log line, no child span); it is the same whenever made.
        self.trace_id = trace_id
        self.span_id = span_id
        self._flags = flags
        self.sampled = flags.sampled
        self._trace_state = trace_state
        self._context: SpanContext | None = None
        self.parent = parent
        # Ours (known keys, plain values; the span owns the dict) and the app's, kept
        # apart: only the app's need the SDK's cleaning and limits.
        self._own = attributes
        self._extra: BoundedAttributes | None = None
        self.events: list[tuple[str, int, dict[str, Any]]] = []
        self.dropped_events = 0
        self.status = _UNSET
        self.start_time = time.time_ns()
        self._end_time: int | None = None

    @property
    def attributes(self) -> dict[str, Any]:
        return self._merged()[0]

    def _merged(self) -> tuple[dict[str, Any], int]:
        """Ours first, then the app's while the span's attribute limit allows; and how many
        of the app's were dropped."""
        extra = self._extra
        if extra is None:
            return self._own, 0
        merged = dict(self._own)
        limit = self._home.limits.max_span_attributes
        dropped = extra.dropped
        for key, value in extra.items():
            if key in merged or limit is None or len(merged) < limit:
                merged[key] = value
            else:
                dropped += 1
        return merged, dropped

    def get_span_context(self) -> SpanContext:
        context = self._context
        if context is None:
            context = self._context = SpanContext(
                self.trace_id,
                self.span_id,
                is_remote=False,
                trace_flags=self._flags,
                trace_state=self._trace_state,
            )
        return context

    @property
    def context(self) -> SpanContext:
        """The span's context, as the SDK's span has it (:meth:`get_span_context`)."""
        return self.get_span_context()

    def exemplar_ids(self, ended: bool = True) -> tuple[int, int]:
        """:func:`cfk_otel._core.sampling.exemplar_ids` of the span, without its context."""
        return _sampling.ids_for_exemplar(self.trace_id, self.span_id, self.sampled, ended)

    def is_recording(self) -> bool:
        return self._end_time is None

    def set_own(self, attributes: dict[str, Any]) -> None:
        """cfk_otel's own attributes: fixed keys, values already of OTLP types (the core
        cuts text at the attribute length limit). The span takes ``attributes`` over when
        it has none of its own yet (the caller lets go of it)."""
        if self._end_time is None:
            # A new dict rather than an update: a client span shares its call's (ClientCall).
            self._own = {**self._own, **attributes} if self._own else attributes

    def set_attributes(self, attributes: Mapping[str, types.AnyValue]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def set_attribute(self, key: str, value: types.AnyValue) -> None:
        if self._end_time is not None:
            _log.warning("Setting attribute on ended span.")
            return
        if self._extra is None:  # the app's: cleaned and bounded as the SDK does
            limits = self._home.limits
            self._extra = BoundedAttributes(
                limits.max_span_attributes, max_value_len=limits.max_attribute_length, immutable=False
            )
        self._extra[key] = value

    def add_event(self, name: str, attributes: types.Attributes = None, timestamp: int | None = None) -> None:
        if self._end_time is not None:
            return
        limits = self._home.limits
        if limits.max_events is not None and len(self.events) >= limits.max_events:
            self.dropped_events += 1
            return
        bounded = BoundedAttributes(
            limits.max_event_attributes, attributes, max_value_len=limits.max_attribute_length, immutable=True
        )
        self.events.append((name, timestamp or time.time_ns(), dict(bounded)))

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        # Links are set when a span starts; cfk_otel's spans start with none, and the core
        # does not carry links added later (the SDK ignores most of them too).
        _link_added()

    def update_name(self, name: str) -> None:
        if self._end_time is None:
            self.name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._end_time is None:
            self.status = _next_status(self.status, status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        self.add_event("exception", _exception_event(exception, attributes, escaped), timestamp)

    def end(self, end_time: int | None = None) -> None:
        ended = self.ending(end_time)
        if ended is not None:
            with _RECORD_SPAN:  # never into the app; the span alone is lost
                ended[0].record_span(*ended[1])

    def ending(self, end_time: int | None = None) -> Ended | None:
        """End the span, and give what queues it in the core when it is to be recorded now
        (sampled): the exporter and ``record_span``'s arguments, for the caller to hand over
        together with other work (:func:`end_request`, :func:`end_call`). None when there is
        nothing to queue now: ended already, or held by the keeper of sampled-out traces."""
        if self._end_time is not None:
            _log.warning("Calling end() on an ended span.")
            return None
        self._end_time = end = end_time if end_time is not None else time.time_ns()
        if not self.sampled:
            keeper = _sampling.KEEPER  # recorded only: its trace is kept if it fails or is slow
            if keeper is None:
                return None
            parent = self.parent
            if parent is None or parent.is_remote:
                failed = self.status.status_code is StatusCode.ERROR
                duration = _sampling.latency(self._own, end - self.start_time)
                keeper.finish(self.trace_id, CoreSpan._record, self, failed, duration)
            else:
                extra = self._extra
                size = _sampling.estimate(self._own, [event[2] for event in self.events])
                if extra is not None:
                    size += _sampling.estimate(extra) - _sampling.SPAN_BYTES
                keeper.hold(self.trace_id, CoreSpan._record, self, size)
            return None
        exporter = self._home.exporter
        assert exporter is not None  # a CoreSpan is only made with an exporter
        return exporter, self._arguments()

    def _record(self) -> None:
        """Hand the ended span to the core's exporter (the keeper's call, later)."""
        exporter = self._home.exporter
        assert exporter is not None  # a CoreSpan is only made with an exporter
        with _RECORD_SPAN:  # never into the app; the span alone is lost
            exporter.record_span(*self._arguments())

    def _arguments(self) -> tuple[Any, ...]:
        """The ended span as ``OtlpExporter.record_span`` takes it."""
        end = self._end_time
        assert end is not None
        parent, status, trace_state = self.parent, self.status, self._trace_state
        attributes, dropped = self._merged()
        return (
            0,
            self.trace_id,
            self.span_id,
            parent.span_id if parent is not None else 0,
            _HAS_IS_REMOTE | _IS_REMOTE if parent is not None and parent.is_remote else _HAS_IS_REMOTE,
            trace_state.to_header() if trace_state else "",  # mostly empty: no join
            self.name,
            _OTLP_KINDS[self.kind],
            self.start_time,
            end,
            attributes,
            self.events,
            0 if status is _UNSET else status.status_code.value,
            status.description or "",
            dropped,
            self.dropped_events,
        )

    def __repr__(self) -> str:
        return f"CoreSpan(name={self.name!r}, kind={self.kind!r}, context={self.context!r})"


# An ended span or a log record on its way into the core: the exporter that queues it, and
# the arguments of its record_span / record_log (see CoreSpan.ending, LogSink.prepared).
Ended = tuple["OtlpExporter", tuple[Any, ...]]
# A request line the core writes and queues itself (see ``cfk_otel._logs.requests``): its
# configuration, then created (epoch seconds), level, path, trace id, span id, trace flags
# and outputs (LINE_STDOUT | LINE_OTLP). With LINE_OWN_SPAN, the time, ids and flags are
# left to the core's server span the line ends with (``ServerSpan.end_request`` only): the
# time then, its own ids and flags.
Line = tuple["RequestLine", float, int, str, int, int, int, int]
LINE_STDOUT: Final = 1
LINE_OTLP: Final = 2
LINE_OWN_SPAN: Final = 4


def request_line(
    service_fields: str,
    write_held: Callable[[], object] | None,
    target: tuple[OtlpExporter, int] | None,
) -> RequestLine | None:
    """A request line's configuration in the core, built once per route (and again in a forked
    child: see :data:`_LINES`): the JSON line's service fields, what writes the lines
    :func:`line_buffer` holds on stdout (None: not written), and the logs exporter and scope
    its OTLP record goes to (None: not sent). None without the core."""
    if _native is None:
        return None
    exporter, scope = target if target is not None else (None, 0)
    buffer = line_buffer() if write_held is not None else None
    stdout = (buffer, write_held) if buffer is not None and write_held is not None else None
    line: RequestLine = _native.RequestLine(service_fields, stdout, exporter, scope)
    return line


_END_REQUEST: Final = guard("recording the end of a request", then="its span, metrics or line lost")
_END_CALL: Final = guard("recording the end of a client call", then="its span or metric lost")


def end_request(
    span: Ended | None,
    requests: Family | None,
    duration: Family | None,
    method: str,
    route: str,
    status: str,
    seconds: float,
    log: Ended | Line | None = None,
    trace_id: int = 0,
    span_id: int = 0,
) -> tuple[bool, bool]:
    """The end of one HTTP request in one call into the core: its server span and request
    line's log record queued (each when given), ``http_requests_total`` and
    ``http_request_duration_seconds`` recorded in ``requests`` and ``duration`` (when
    given), with ``trace_id`` and ``span_id`` as the duration's exemplar when non-zero
    (:func:`cfk_otel._core.sampling.exemplar_ids` decides). ``log`` is the line's OTLP
    record, or a :data:`Line` the core writes (its stdout line through Python's writer) and
    queues from these same values. Whether either metric folded a new label set into its
    overflow series."""
    if _native is None:  # nothing here is the core's: neither span, record nor family exists
        return False, False
    with _END_REQUEST:
        overflowed: tuple[bool, bool] = _native.end_request(
            span, requests, duration, method, route, status, seconds, log, trace_id, span_id
        )
        return overflowed
    return False, False


def end_call(
    span: CoreSpan | None,
    family: Family | None,
    labels: tuple[str, ...],
    seconds: float,
    trace_id: int = 0,
    span_id: int = 0,
) -> bool:
    """The end of one client call in one call into the core: its span ended (when given) and
    queued (when sampled, :meth:`CoreSpan.ending`), and ``seconds`` observed in ``family``
    (when given), with ``trace_id`` and ``span_id`` as its exemplar when non-zero. Whether the
    observation folded a new label set into the overflow series. One guard for it all: a
    failure is logged once, never raised."""
    if _native is None:
        return False
    with _END_CALL:
        ended = span.ending() if span is not None else None
        overflowed: bool = _native.end_call(ended, family, labels, seconds, trace_id, span_id)
        return overflowed
    return False


class ClientCall:
    """One kind of client call (a statement on a connection, a command shape on a Redis pool),
    prepared once by the instrumentation: its span's name and fixed attributes, and its
    duration's labels. Its spans share ``attributes`` (nobody writes them). ``core`` is the
    core's form of its span (``PreparedSpan``: scope, name, kind and attributes converted once),
    made at the first end that can use it, for the exporter of the time."""

    __slots__ = ("attributes", "core", "labels", "name")

    def __init__(self, name: str, labels: tuple[str, ...], attributes: dict[str, Any]) -> None:
        self.name = name
        self.labels = labels
        self.attributes = attributes
        self.core: PreparedSpan | None = None

    def prepared(self, exporter: OtlpExporter | None) -> PreparedSpan:
        """:attr:`core` for ``exporter`` (the client spans' exporter of the time), made anew
        when it was made for another (after a shutdown, or in a forked child)."""
        core = self.core
        if core is None or core.exporter is not exporter:
            assert _native is not None  # only asked for on the native path
            core = self.core = _native.PreparedSpan(
                exporter, 0, self.name, _OTLP_KINDS[SpanKind.CLIENT], self.attributes
            )
        return core

    def __repr__(self) -> str:
        return f"ClientCall(name={self.name!r}, labels={self.labels!r}, attributes={self.attributes!r})"


def end_client(client_span: CoreSpan, call: ClientCall, family: Family, seconds: float) -> bool:
    """The end of one call of ``call``'s kind (its span from :meth:`Spans.start_client`), as
    :func:`end_call` with ``call.labels`` and the span's ids as the exemplar when its trace is
    exported (the head decision: the call is inside its request). A sampled span that kept its
    call's name and attributes (its status and events may differ: an error, a slow query)
    crosses as ``call.core`` and its per-call values, ``_native.end_prepared``; any other goes
    :func:`end_call`'s way. Never raises."""
    try:
        if (
            client_span.sampled
            and client_span._extra is None
            and client_span._own is call.attributes
            and client_span.name is call.name
            and client_span._end_time is None
            and _native is not None
        ):
            core = call.prepared(client_span._home.exporter)
            client_span._end_time = end = time.time_ns()
            parent, status, trace_state = client_span.parent, client_span.status, client_span._trace_state
            overflowed: bool = _native.end_prepared(
                core,
                client_span.trace_id,
                client_span.span_id,
                parent.span_id if parent is not None else 0,
                _HAS_IS_REMOTE | _IS_REMOTE if parent is not None and parent.is_remote else _HAS_IS_REMOTE,
                trace_state.to_header() if trace_state else "",
                client_span.start_time,
                end,
                0 if status is _UNSET else status.status_code.value,
                "" if status is _UNSET else status.description or "",
                client_span.events or None,
                client_span.dropped_events,
                family,
                call.labels,
                seconds,
                _sampling.EXPORTED,
            )
            return overflowed
    except Exception as error:  # free until it raises, unlike a with block
        _END_CALL.failed(error)
        return False
    trace_id, span_id = client_span.exemplar_ids(ended=False)
    return end_call(client_span, family, call.labels, seconds, trace_id, span_id)


class Spans:
    """Starts cfk_otel's spans: in the core on the native path, with the SDK's tracer otherwise.

    ``tracer_provider`` defaults to the global one. On the native path the provider must
    be the SDK's, and nothing else may need to see our spans: a processor added to it later
    (``add_span_processor``) moves our spans back onto the SDK's tracer, so that processor
    sees them.
    """

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self._fixed_provider = tracer_provider
        self._provider: object = None
        self._generation = -1
        self._tracer: trace.Tracer | None = None
        self._native: sdk_trace.TracerProvider | None = None
        self.limits = sdk_trace.SpanLimits()
        self.exporter: OtlpExporter | None = None
        # Starts an HTTP request's server span in the core, in one call, while set-up's own
        # head sampler decides and nothing else needs our spans (see server_spans).
        self.server: ServerSpans | None = None

    def start(
        self,
        name: str,
        parent: context_api.Context | None,
        kind: SpanKind = SpanKind.SERVER,
        attributes: dict[str, Any] | None = None,
    ) -> trace.Span:
        """Start a span named ``name`` whose parent is found in ``parent`` (None: the
        current context). ``attributes`` are cfk_otel's own: plain OTLP values."""
        with _START_SPAN:  # a failing sampler or id generator: the call goes on, untraced
            provider = self._fixed_provider or trace.get_tracer_provider()
            if provider is not self._provider or _GENERATION[0] != self._generation:
                self._choose(provider)
            native = self._native
            if native is None:
                assert self._tracer is not None
                return self._tracer.start_span(name, context=parent, kind=kind, attributes=attributes)
            return self._start_native(native, name, parent, kind, attributes)
        return trace.INVALID_SPAN

    def start_client(self, call: ClientCall, parent: trace.Span) -> trace.Span:
        """A client span of ``call``'s kind, whose parent is ``parent``, the current span (as
        the caller read it): :meth:`start`'s span, made without its generic steps when the
        parent is one of ours and set-up's own parent-based head sampler decides (the
        parent's flag does). Such a span shares ``call.attributes`` (see :func:`end_client`)."""
        native = self._native
        kind = type(parent)
        if (
            (kind is CoreSpan or kind is ServerSpan)
            and native is not None
            and _GENERATION[0] == self._generation
        ):
            try:
                head = _sampling.HEAD
                # The global provider is not asked again: ``native`` is the SDK's provider
                # it answered (or the one given), and the API sets it once.
                if head is not None and head.parent_based and native.sampler is head.sampler:
                    ids = native.id_generator
                    if type(ids) is RandomIdGenerator:  # its generate_span_id, without the call
                        span_id = getrandbits(64)
                        while not span_id:
                            span_id = getrandbits(64)
                    else:
                        span_id = ids.generate_span_id()
                    return self._child(call, parent, span_id)
            except Exception as error:  # free until it raises; then start() decides
                _START_SPAN.failed(error)
        return self.start(call.name, None, SpanKind.CLIENT, call.attributes)

    def _child(self, call: ClientCall, parent: trace.Span, span_id: int) -> CoreSpan:
        """A client span of ``call``'s kind with id ``span_id`` under ``parent``, a
        :class:`CoreSpan` or the core's server span, and sampled as it is."""
        context = parent.get_span_context()
        if type(parent) is CoreSpan:  # its fields read as they are
            ours: CoreSpan = parent
            sampled, random, trace_state = ours.sampled, ours._flags & _RANDOM, ours._trace_state
            trace_id = ours.trace_id
        else:  # the core's server span: its own fields (its context's trace state)
            server: Any = parent  # the core's ServerSpan, as the callers tested
            flags, trace_id = server.flags, server.trace_id
            sampled, random, trace_state = bool(flags & 1), flags & _RANDOM, context.trace_state
        return CoreSpan(
            self,
            call.name,
            SpanKind.CLIENT,
            trace_id,
            span_id,
            _FLAGS[sampled, bool(random)],
            trace_state,
            context,
            call.attributes if sampled else {},
        )

    def timed(
        self,
        timer: CallTimer | None,
        call: ClientCall,
        parent: Any,
        family: Family | None,
        awaited: Awaitable[Any],
        slow: float,
        context: object,
    ) -> Awaitable[Any] | None:
        """``awaited``, a call of ``call``'s kind under ``parent`` (the core's server span),
        timed in the core (``_native.TimedCall``): when it returns, its span is queued and its
        duration observed in ``family`` (with the span's ids as the exemplar when its trace
        is exported), without Python. A call that fails, or lasts ``slow`` seconds or more,
        ends in ``timer``'s fallback instead, on :meth:`client_span`. None where the core
        does not take the call (the SDK path, another sampler, a keeper of sampled-out
        traces): the caller times it in Python. Never raises."""
        if _GENERATION[0] != self._generation:  # the first call, or the set-up changed
            self.refresh()
        native = self._native
        if timer is None or family is None or native is None or _sampling.KEEPER is not None:
            return None
        head = _sampling.HEAD
        if head is None or not head.parent_based or native.sampler is not head.sampler:
            return None
        try:
            core = call.prepared(self.exporter)
            return timer.time(core, parent, family, call.labels, awaited, _sampling.EXPORTED, slow, context)
        except Exception as error:  # free until it raises; the caller times the call
            _START_SPAN.failed(error)
            return None

    def client_span(self, call: ClientCall, parent: Any, span_id: int, start: int) -> CoreSpan:
        """The span of a call :meth:`timed` ended in Python (it failed, or was slow): the one
        :meth:`start_client` makes under ``parent``, the core's server span, with the id and
        the start the core gave it."""
        span = self._child(call, parent, span_id)
        span.start_time = start
        return span

    def refresh(self) -> ServerSpans | None:
        """:attr:`server` after deciding again when the provider or the set-up changed (as
        :meth:`start` does): what starts an HTTP request's server span in the core."""
        with _START_SPAN:
            provider = self._fixed_provider or trace.get_tracer_provider()
            if provider is not self._provider or _GENERATION[0] != self._generation:
                self._choose(provider)
            return self.server
        return None

    def _choose(self, provider: trace.TracerProvider) -> None:
        self._provider = provider
        self._generation = _GENERATION[0]
        self._tracer = provider.get_tracer(SCOPE, __version__)
        self._native = None
        self.server = None
        if not (
            _CHOICE.native
            and isinstance(provider, sdk_trace.TracerProvider)
            and isinstance(self._tracer, sdk_trace.Tracer)  # a disabled SDK gives a no-op tracer
        ):
            return
        if not _watch(provider, "add_span_processor"):
            return  # the app added a processor of its own: it must see our spans
        self.limits = sdk_trace.SpanLimits()
        self.exporter = _exporter("traces", provider.resource, [(SCOPE, __version__)])
        self._native = provider
        self.server = server_spans(self, provider)

    def _start_native(
        self,
        provider: sdk_trace.TracerProvider,
        name: str,
        parent: context_api.Context | None,
        kind: SpanKind,
        attributes: dict[str, Any] | None,
    ) -> trace.Span:
        # A forked worker, or after shutdown: the generation moved, and _choose took a new exporter.
        # Tracer.start_span, through the provider's public parts.
        parent_context: SpanContext | None = trace.get_current_span(parent).get_span_context()
        ids = provider.id_generator
        if parent_context is None or not parent_context.is_valid:
            parent_context = None
            trace_id = ids.generate_trace_id()
            random_trace_id = bool(_RANDOM) and ids.is_trace_id_random()
        else:
            trace_id = parent_context.trace_id
            random_trace_id = bool(parent_context.trace_flags & _RANDOM)
        sampler = provider.sampler
        head = _sampling.HEAD
        if head is not None and sampler is head.sampler:  # set-up's own: decided here, as it would
            sample = record = head.sample(parent_context, trace_id)
            trace_state = parent_context.trace_state if parent_context is not None else None
            sampled = dict(attributes) if attributes and sample else {}
        else:
            result = sampler.should_sample(parent, trace_id, name, kind, attributes, ())
            sample = result.decision is Decision.RECORD_AND_SAMPLE
            record = result.decision is not Decision.DROP
            trace_state = result.trace_state
            sampled = dict(result.attributes) if result.attributes else {}
        flags = _FLAGS[sample, bool(random_trace_id)]
        if not record:
            return trace.NonRecordingSpan(
                SpanContext(trace_id, ids.generate_span_id(), False, flags, trace_state)
            )
        return CoreSpan(
            self, name, kind, trace_id, ids.generate_span_id(), flags, trace_state, parent_context, sampled
        )


# Providers whose processors are known: only the set-up's, until the app adds one of its
# own through the provider's public add method, which is replaced on the instance to say so.
_WATCHED: weakref.WeakKeyDictionary[object, bool] = weakref.WeakKeyDictionary()


def _watch(provider: object, add_method: str) -> bool:
    """Whether only the set-up's processors are on ``provider`` (True until the app adds one
    through ``add_method``); watching starts at the first call."""
    if provider not in _WATCHED:
        _WATCHED[provider] = True
        add = getattr(provider, add_method)

        def add_processor(processor: object) -> None:
            add(processor)
            _WATCHED[provider] = False
            _GENERATION[0] += 1  # Spans and LogSinks decide again

        setattr(provider, add_method, add_processor)
    return _WATCHED[provider]


class LogSink:
    """Records from ``logging`` (request lines included) straight into the core, on the
    native path: one call per record, no SDK ``LogRecord``. The records the app emits
    through the OpenTelemetry Logs API stay the SDK's, exported by its own processor.

    Made by set-up for the provider it built; once the app adds a processor of its own
    to that provider, :attr:`active` turns False and records go through the SDK's logger,
    so that the processor sees them.
    """

    def __init__(self, provider: LoggerProvider) -> None:
        self.provider = provider
        self._max_attributes = log_record_limits()[0]
        self._exporter: OtlpExporter | None = None
        # logger name -> the exporter and its scope index (None: the SDK takes its records)
        self._targets: dict[str, tuple[OtlpExporter, int] | None] = {}
        self._active = _watch(provider, "add_log_record_processor")
        self._generation = _GENERATION[0]

    @property
    def active(self) -> bool:
        if self._generation != _GENERATION[0]:  # a processor added somewhere: ask again
            self._generation = _GENERATION[0]
            self._active = _watch(self.provider, "add_log_record_processor")
        return self._active

    def record(
        self,
        name: str,
        timestamp: int,
        observed: int,
        severity_number: int,
        severity_text: str,
        body: object,
        attributes: dict[str, Any],
        span: SpanContext | None,
    ) -> bool:
        """Queue one record in the core; False when the SDK must take it instead (more
        attributes than its count limit, or more distinct logger names than the core names)."""
        prepared = self.prepared(
            name, timestamp, observed, severity_number, severity_text, body, attributes, span
        )
        if prepared is None:
            return False
        prepared[0].record_log(*prepared[1])
        return True

    def takes(self, count: int) -> bool:
        """Whether a record of ``count`` attributes is within the SDK's count limit."""
        limit = self._max_attributes
        return limit is None or count <= limit

    def target(self, name: str) -> tuple[OtlpExporter, int] | None:
        """The exporter and scope index of logger ``name``'s records in the core: the same
        tuple while both hold. None when the SDK must take them (the core names no more
        scopes)."""
        exporter = _EXPORTERS.get((os.getpid(), "logs"))
        if exporter is None or exporter is not self._exporter:  # first use, a fork, a shutdown
            exporter = self._exporter = _exporter("logs", self.provider.resource, [])
            self._targets = {}
        targets = self._targets
        if name not in targets:
            index = exporter.scope(name, "")
            targets[name] = None if index is None else (exporter, index)
        return targets[name]

    def prepared(
        self,
        name: str,
        timestamp: int,
        observed: int,
        severity_number: int,
        severity_text: str,
        body: object,
        attributes: dict[str, Any],
        span: SpanContext | None,
    ) -> Ended | None:
        """What queues one record in the core (the exporter and ``record_log``'s arguments),
        for :meth:`record` or a caller that hands it over with other work; None when the SDK
        must take it instead (see :meth:`record`)."""
        if not self.takes(len(attributes)):
            return None
        target = self.target(name)
        if target is None:
            return None
        exporter, index = target
        if span is not None and span.is_valid:
            trace_id, span_id, flags = span.trace_id, span.span_id, int(span.trace_flags)
        else:
            trace_id = span_id = flags = 0
        return exporter, (
            index,
            timestamp,
            observed,
            severity_number,
            severity_text,
            body,
            attributes,
            trace_id,
            span_id,
            flags,
        )


# An HTTP request's server span as an object of the core (native/src/span.rs): started in one
# call, ended with the request's metrics and line in one call. It is an API span (registered
# below) and behaves as CoreSpan does; its rarer parts call the helpers below.
ServerSpan: Final[Any] = getattr(_native, "ServerSpan", None)
if ServerSpan is not None:
    trace.Span.register(ServerSpan)


def call_timer(
    fallback: Callable[[Any, int, int, float, BaseException | None], object],
    overflow: Callable[[Any], object],
) -> CallTimer | None:
    """What times an instrumentation's client calls in the core (:meth:`Spans.timed`): a failed
    or slow call ends in ``fallback(context, span_id, start, seconds, error)``, and a
    histogram's overflow is told to ``overflow(context)``; a failure of the core's own goes to
    this module's guard. None without the core."""
    if _native is None:
        return None
    timer: CallTimer = _native.CallTimer(fallback, overflow, _END_CALL)
    return timer


# The send an HTTP request's app is given on the core: notes the status, returns send(message).
Sender: Final[Any] = getattr(_native, "Sender", None)


def server_spans(spans: Spans, provider: sdk_trace.TracerProvider) -> ServerSpans | None:
    """What starts the server spans of ``spans``'s HTTP requests in the core, when the
    provider's sampler is set-up's own (:data:`cfk_otel._core.sampling.HEAD`) and no keeper
    holds sampled-out traces (None otherwise: :meth:`Spans.start` starts them). The ids are
    made in the core when the provider's id generator is the SDK's ``RandomIdGenerator``,
    asked from it otherwise. It stops (its ``start`` answers None) once any of that changes."""
    head = _sampling.HEAD
    exporter = spans.exporter
    if (
        _native is None
        or head is None
        or exporter is None
        or provider.sampler is not head.sampler
        or _sampling.KEEPER is not None
    ):
        return None
    ids = provider.id_generator
    exact = type(ids) is RandomIdGenerator
    # As _start_native: the random-trace-id flag only where the installed API has it.
    root_random = exact and bool(_RANDOM) and bool(ids.is_trace_id_random())
    server: ServerSpans = _native.ServerSpans(
        sys.modules[__name__],
        exporter,
        provider,
        head,
        head.bound,
        head.parent_based,
        not exact,
        root_random,
        _RANDOM,
        spans.limits,
    )
    return server


def _server_flags() -> tuple[TraceFlags, TraceFlags, TraceFlags, TraceFlags]:
    """The trace flags of a server span's context, by value (sampled 1, random 2)."""
    return _FLAGS[False, False], _FLAGS[True, False], _FLAGS[False, True], _FLAGS[True, True]


def _exception_event(
    exception: BaseException, attributes: types.Attributes, escaped: bool
) -> dict[str, types.AnyValue]:
    """An exception's event attributes, as the SDK's ``record_exception`` (and CoreSpan's)
    writes them."""
    module = type(exception).__module__
    qualname = type(exception).__qualname__
    event: dict[str, types.AnyValue] = {
        EXCEPTION_TYPE: f"{module}.{qualname}" if module and module != "builtins" else qualname,
        EXCEPTION_MESSAGE: str(exception),
        EXCEPTION_STACKTRACE: "".join(traceback.format_exception(exception)),
        # Deprecated by the conventions (no stable constant), still written by the SDK.
        "exception.escaped": str(escaped),
    }
    if attributes:
        event.update(attributes)
    return event


def _next_status(current: Status, status: Status | StatusCode, description: str | None) -> Status:
    """A span's status after ``set_status``, as the SDK's: OK is final, UNSET is ignored, a
    description only goes with ERROR."""
    if current.status_code is StatusCode.OK:
        return current
    if isinstance(status, Status):
        return current if status.status_code is StatusCode.UNSET else status
    return current if status is StatusCode.UNSET else Status(status, description)


def _link_added() -> None:
    warn_once("links", "cfk_otel: links added to cfk_otel's request or client spans are not exported")


def _span_failed(error: BaseException) -> None:
    """A server span the app ended could not be queued: logged once, never raised."""
    with _RECORD_SPAN:
        raise error


def _end_failed(error: BaseException) -> None:
    """A part of a request's end in the core failed (the others were done): logged once."""
    with _END_REQUEST:
        raise error
