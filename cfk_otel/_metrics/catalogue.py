"""The document's metric catalogue and its custom-metrics API.

Every registered metric is recorded once and read out twice, scraped at ``/api/metrics``
and pushed over OTLP, through public interfaces only. On the native path the compiled
core aggregates it (its ``Family``, which also writes the scrape's text), and
:mod:`cfk_otel._metrics.scrape` and :mod:`cfk_otel._metrics.export` (the SDK's OTLP exporter,
wrapped) read it from there. On the SDK path (``CFK_OTEL_NATIVE=false``, or no compiled
module), the reference, it is an instrument of the SDK meter, read by the SDK's readers.
The process's own gauges (active users, memory, pools) are SDK observable instruments
on both. Names and labels are validated when a metric is
registered, never on the hot path: a recording call with the wrong labels is named once
in the log (metric, expected labels, given labels) and that measurement is dropped,
never recorded under empty label values; with ``CFK_OTEL_STRICT=true`` it raises
``ValueError`` instead.

Every registered metric is in every collection from the start, as with
prometheus_client: an unlabelled one at 0, a labelled one without any series as a
metric with no data points (on ``/api/metrics``: its HELP and TYPE lines alone).
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import os
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, ParamSpec, TypeVar, overload

from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import Exemplar
from opentelemetry.sdk.metrics.export import HistogramDataPoint, NumberDataPoint
from opentelemetry.trace import SpanContext, TraceFlags

from cfk_otel import _settings
from cfk_otel._core import seam as _seam
from cfk_otel._core.seam import _native
from cfk_otel._guard import guard
from cfk_otel._version import __version__

if TYPE_CHECKING:
    from cfk_otel._native import Family

_log = logging.getLogger("cfk_otel")
_RECORD_ENDING: Final = guard("recording a client call's duration")  # the SDK's histogram, beside a core span
# What both Prometheus and OpenTelemetry accept (an SDK instrument's name starts with a letter,
# at most 255 characters, no ':'), so that a metric registers alike on either path.
_NAME: Final = re.compile(r"[a-zA-Z][a-zA-Z0-9_]{0,254}\Z")
_LABEL: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
# Labels Prometheus gives a meaning of its own: a histogram's bucket bound, a summary's quantile.
RESERVED_LABELS: Final = frozenset({"le", "quantile"})

# Seconds; include the thresholds the alerts and dashboards use (0.1, 0.5, 1, 2).
DURATION_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)
# Database and Redis calls are faster than requests: finer low buckets, same alert thresholds.
CLIENT_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)

Labels = Mapping[str, object] | None
WEBSOCKET_BUCKETS: Final = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)
ACTIVE_USER_WINDOW: Final = 300.0
MAX_USERS: Final = 100_000
MAX_POOLS: Final = 64
_PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
# OpenTelemetry units as the SDK's Prometheus reader names them (cfk_otel's metrics use seconds).
_UNITS: Final = {"s": "seconds"}
# Like the SDK's default cardinality limit: past it, new label sets share one overflow series.
MAX_SERIES: Final = 2000
OVERFLOW: Final = "overflow"
P = ParamSpec("P")
R = TypeVar("R")
M = TypeVar("M", bound="_Metric")


class _Metric:
    kind = ""

    def __init__(self, name: str, description: str, labels: tuple[str, ...]) -> None:
        self.name = name
        self.description = description
        self.labels = labels
        self._warned: set[str] = set()
        self.family: Family | None = None
        # SDK path: once recorded, the SDK's instrument reports the metric; until then the
        # scrape and the push declare it themselves (see reported_here).
        self.used = False
        self._seen: dict[tuple[str, ...], None] = {}  # SDK path: the label sets admitted
        self._lock = threading.Lock()

    @property
    def reported_here(self) -> bool:
        """Whether the scrape and the OTLP push read this metric from here (always on the
        native path), rather than from the SDK's readers (the SDK path, once it was used)."""
        return self.family is not None or not self.used

    def _attributes(self, key: tuple[str, ...]) -> dict[str, str]:
        """SDK path: the attributes of a call, past MAX_SERIES label sets the overflow's."""
        if key not in self._seen:
            with self._lock:
                key = self._admit(key, self._seen)
                self._seen[key] = None
        self.used = True
        return dict(zip(self.labels, key, strict=True))

    def _checked_key(self, labels: object) -> tuple[str, ...] | None:
        """The label values of a call whose labels are not exactly the declared ones: None
        (the measurement is dropped, named once in the log), or ``()`` for an unlabelled
        metric called with none. Raises ``ValueError`` instead in strict mode."""
        given = sorted(str(k) for k in labels) if isinstance(labels, Mapping) else labels
        if not labels and not self.labels:
            return ()
        if isinstance(labels, Mapping) and set(labels) == set(self.labels):
            return tuple([str(labels[k]) for k in self.labels])
        problem = f"expected labels {list(self.labels)}, given {given!r}"
        if STRICT:
            raise ValueError(f"metric {self.name!r}: {problem}")
        self._misuse("labels", f"{problem}; measurement dropped")
        return None

    def _admit(self, key: tuple[str, ...], series: Mapping[tuple[str, ...], object]) -> tuple[str, ...]:
        # Called under the lock: past MAX_SERIES label sets, new ones share the overflow series.
        if key in series or len(series) < MAX_SERIES:
            return key
        self._overflowed()
        return (OVERFLOW,) * len(self.labels)

    def _overflowed(self) -> None:
        self._misuse("overflow", f"has more than {MAX_SERIES} label sets; new ones share one series")

    def _misuse(self, kind: str, problem: str) -> None:
        # Once per metric and kind of misuse: a wrong call in a loop must not flood the log.
        if kind not in self._warned:
            self._warned.add(kind)
            _log.warning("cfk_otel: metric %s: %s", self.name, problem)

    def shape(self) -> tuple[object, ...]:
        return (self.kind, self.labels)


class _Observed(_Metric):
    """A counter or gauge, read by the scrape and the OTLP push.

    On the native path the values live in the compiled core's ``Family`` (``family``):
    recording is one call, without the SDK's per-measurement attribute cleaning and
    hashing for every reader (about 15 us each on SDK 1.45), and the core writes the
    scrape's text. On the SDK path (the reference) a counter is an SDK ``Counter``, and a
    gauge's levels are held here (``set`` and the never-below-0 ``finish`` need them) and
    observed by an SDK ``ObservableUpDownCounter``.
    """

    unit = ""
    monotonic = True  # a counter; a gauge is an up-down sum

    def __init__(
        self, name: str, description: str, labels: tuple[str, ...], native: bool, meter: metrics.Meter
    ) -> None:
        super().__init__(name, description, labels)
        self.family = _family(self, native)
        # A gauge's held levels (SDK path). An unlabelled metric is at 0 from the start.
        self._values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}
        self._start = time.time_ns()
        if self.family is not None:
            if not labels:
                self.family.add((), 0.0)
        else:
            self._on_sdk(meter)

    def _on_sdk(self, meter: metrics.Meter) -> None:
        raise NotImplementedError

    def _key(self, labels: Labels) -> tuple[str, ...] | None:
        return _key_of(self, labels)

    def add_by_key(self, key: tuple[str, ...], value: float) -> None:
        """Add to the series whose label values are ``key``, in label order (the hot path)."""
        family = self.family
        if family is not None:
            if family.add(key, value):
                self._overflowed()
            return
        self._add_sdk(key, value)

    def _add_sdk(self, key: tuple[str, ...], value: float) -> None:
        raise NotImplementedError

    def values(self) -> list[tuple[tuple[str, ...], float]]:
        """Every series read from here: its label values (in label order) and its value."""
        if self.family is not None:
            return [(tuple(key), value) for key, value in self.family.values()]
        with self._lock:
            return list(self._values.items()) if not self.used else []

    def points(self, now: int) -> list[tuple[tuple[str, ...], NumberDataPoint]]:
        """Every series with its label values, cumulative since this metric was registered."""
        items = self.values()
        names, start = self.labels, self._start
        return [
            (key, NumberDataPoint(dict(zip(names, key, strict=True)), start, now, value))
            for key, value in items
        ]


class Counter(_Observed):
    """A monotonically increasing count.

    >>> usage = register_counter("my_feature_usage", "Feature usage count", ["feature"])
    >>> usage.inc({"feature": "bulk-update"})
    """

    kind = "counter"
    _counter: metrics.Counter

    def _on_sdk(self, meter: metrics.Meter) -> None:
        self._counter = meter.create_counter(self.name, self.unit, self.description)

    def _add_sdk(self, key: tuple[str, ...], value: float) -> None:
        self._counter.add(value, self._attributes(key))

    def inc(self, labels: Labels = None, value: float = 1.0) -> None:
        if not value >= 0:  # negative or NaN
            if STRICT:
                raise ValueError(f"metric {self.name!r}: a counter cannot decrease (inc by {value!r})")
            self._misuse("negative", f"a counter cannot decrease (inc by {value!r}); measurement dropped")
            return
        key = self._key(labels)
        if key is not None:
            self.add_by_key(key, value)


class Gauge(_Observed):
    """A value that goes up and down; ``set`` works per label set, in this process.

    Across workers, gauges are summed (right for counts such as connections).

    >>> agents = register_gauge("queue_depth", "Jobs waiting", ["queue"])
    >>> agents.set(3, {"queue": "email"})
    """

    kind = "gauge"
    monotonic = False

    def _on_sdk(self, meter: metrics.Meter) -> None:
        self.used = not self.labels  # observed at 0 from the start
        meter.create_observable_up_down_counter(self.name, [self._observe], self.unit, self.description)

    def _observe(self, options: metrics.CallbackOptions) -> list[metrics.Observation]:
        names = self.labels
        with self._lock:
            items = list(self._values.items())
        return [metrics.Observation(value, dict(zip(names, key, strict=True))) for key, value in items]

    def _add_sdk(self, key: tuple[str, ...], value: float) -> None:
        with self._lock:
            values = self._values
            current = values.get(key)
            if current is None:  # a new label set: admitted, or the overflow series
                key = self._admit(key, values)
                current = values.get(key, 0.0)
            values[key] = current + value
            self.used = True

    def inc(self, labels: Labels = None, value: float = 1.0) -> None:
        key = self._key(labels)
        if key is not None:
            self.add_by_key(key, value)

    def dec(self, labels: Labels = None, value: float = 1.0) -> None:
        key = self._key(labels)
        if key is not None:
            self.add_by_key(key, -value)

    def set(self, value: float, labels: Labels = None) -> None:
        key = self._key(labels)
        if key is None:
            return
        if self.family is not None:
            if self.family.set(key, value):
                self._overflowed()
            return
        with self._lock:
            self._values[self._admit(key, self._values)] = value
            self.used = True

    def finish(self, labels: Labels = None) -> None:
        """One fewer, never below 0: the end of a start/finish pair (a connection, an agent).

        A finish without its start (or after a ``set(0)``) is named once in the log.
        """
        key = self._key(labels)
        if key is None:
            return
        if self.family is not None:
            if not self.family.finish(key):
                self._misuse("finish", "finished more often than started; kept at 0")
            return
        with self._lock:
            current = self._values.get(key, 0.0)
            if current >= 1.0:
                self._values[key] = current - 1.0
                return
            if key in self._values:
                self._values[key] = 0.0
        self._misuse("finish", "finished more often than started; kept at 0")


class Histogram(_Metric):
    """A distribution of observed values (seconds, for timers).

    >>> latency = register_histogram("export_seconds", "Export time", ["format"], buckets=[0.1, 1, 10])
    >>> with latency.start_timer({"format": "csv"}):
    ...     export()  # doctest: +SKIP

    On the native path the compiled core's ``Family`` aggregates it (one call per
    measurement; the SDK aggregates each measurement once per metric reader, the scrape
    and OTLP, about 20 µs each on this project's benchmark machine). On the SDK path it is
    an SDK ``Histogram`` with these buckets as its advisory boundaries.
    """

    kind = "histogram"
    _histogram: metrics.Histogram

    def __init__(
        self,
        name: str,
        description: str,
        labels: tuple[str, ...],
        buckets: tuple[float, ...],
        unit: str,
        native: bool,
        meter: metrics.Meter,
    ) -> None:
        super().__init__(name, description, labels)
        self.buckets = buckets
        self.unit = unit
        self._size = len(buckets) + 1
        self._start = time.time_ns()
        self.family = _family(self, native)
        if self.family is not None:
            if not labels:  # there from the start, every bucket at 0
                self.family.touch(())
        else:
            self._histogram = meter.create_histogram(
                name, unit, description, explicit_bucket_boundaries_advisory=list(buckets)
            )

    def observe(self, value: float, labels: Labels = None) -> None:
        key = _key_of(self, labels)
        if key is not None:
            self.record_by_key(key, value)

    def record_by_key(self, key: tuple[str, ...], value: float, trace_id: int = 0, span_id: int = 0) -> None:
        """Record into the series whose label values are ``key``, in label order (the hot path).

        ``trace_id`` and ``span_id``: the measurement becomes its bucket's exemplar; give them
        only for a span whose trace is exported (:func:`cfk_otel._core.sampling.exemplar_ids`).
        The SDK path's instrument takes them as the context it records in, and without them
        records none (a request's span has left the context when its duration is recorded).
        """
        if not value >= 0.0:  # negative or NaN: as the SDK, dropped
            self._misuse("negative", f"records only non-negative numbers, got {value!r}; dropped")
            return
        family = self.family
        if family is not None:
            if family.observe(key, value, trace_id, span_id):
                self._overflowed()
            return
        exemplar = _exemplar_context(trace_id, span_id) if span_id else _NO_EXEMPLAR
        self._histogram.record(value, self._attributes(key), context=exemplar)

    def record_ending(
        self, key: tuple[str, ...], value: float, span: _seam.CoreSpan, trace_id: int = 0, span_id: int = 0
    ) -> None:
        """:meth:`record_by_key`, and end the core's ``span``, in one call into the core (a
        client call's span and its duration, see ``seam.end_call``). Never raises: a failure
        is logged once."""
        family = self.family
        if family is None or not value >= 0.0:  # the SDK's histogram, or a value it drops
            with _RECORD_ENDING:
                self.record_by_key(key, value, trace_id, span_id)
            family = None
        if _seam.end_call(span, family, key, value, trace_id, span_id):
            self._overflowed()

    def record_client(self, call: _seam.ClientCall, value: float, span: _seam.CoreSpan) -> None:
        """:meth:`record_ending` of a prepared client call's span (``seam.end_client``): the
        labels are ``call.labels``, the exemplar the span's ids when its trace is exported.
        Never raises: a failure is logged once."""
        family = self.family
        if family is not None and value >= 0.0:
            if _seam.end_client(span, call, family, value):
                self._overflowed()
            return
        trace_id, span_id = span.exemplar_ids(ended=False)
        self.record_ending(call.labels, value, span, trace_id, span_id)

    def start_timer(self, labels: Labels = None) -> Timer:
        """Start timing now; call the result (or leave its ``with`` block) to record seconds."""
        return Timer(self, labels)

    def shape(self) -> tuple[object, ...]:
        return (self.kind, self.labels, self.buckets)

    def rows(self) -> list[tuple[tuple[str, ...], list[float], float]]:
        """Every series: its label values, its bucket counts (the last above every bound), its sum."""
        return [(key, counts, total) for key, counts, total, *_ in self._rows()]

    def _rows(self) -> list[tuple[tuple[str, ...], list[float], float, float, float, float]]:
        # (label values, bucket counts, sum, count, min, max)
        if self.family is not None:
            return [
                (tuple(k), [float(c) for c in counts], total, count, low, high)
                for k, counts, total, count, low, high in self.family.rows()
            ]
        if self.used or self.labels:  # the SDK reports it, or nobody used it: no series here
            return []
        return [((), [0.0] * self._size, 0.0, 0.0, math.inf, -math.inf)]

    def exemplars(self) -> dict[tuple[str, ...], list[tuple[int, Exemplar]]]:
        """Native path: each series' exemplars by label values, as (bucket index, exemplar)."""
        if self.family is None:
            return {}
        return {
            tuple(key): [
                (bucket, Exemplar({}, value, time_ns, span_id, trace_id))
                for bucket, trace_id, span_id, value, time_ns in found
            ]
            for key, found in self.family.exemplars()
        }

    def points(self, now: int) -> list[tuple[tuple[str, ...], HistogramDataPoint]]:
        """Every series with its label values, cumulative since this histogram was registered,
        with its exemplars (the latest per bucket) on the native path."""
        exemplars = self.exemplars()
        return [
            (
                key,
                HistogramDataPoint(
                    attributes=dict(zip(self.labels, key, strict=True)),
                    start_time_unix_nano=self._start,
                    time_unix_nano=now,
                    count=int(count),
                    sum=total,
                    bucket_counts=tuple(int(c) for c in counts),
                    explicit_bounds=self.buckets,
                    # No observation yet: no infinities on the wire.
                    min=low if count else 0.0,
                    max=high if count else 0.0,
                    exemplars=[e for _, e in exemplars.get(key, ())],
                ),
            )
            for key, counts, total, count, low, high in self._rows()
        ]


# Without ids, no exemplar: the SDK would take the current span's, exported or not. (Not an
# empty Context: the SDK takes an empty one, which is falsy, for "the current context".)
_NO_EXEMPLAR: Final = trace.set_span_in_context(trace.INVALID_SPAN)


def _exemplar_context(trace_id: int, span_id: int) -> Context:
    """A context whose current span is the exported one of those ids: the SDK's exemplar
    filter (``trace_based``) and reservoir read the ids and the sampled flag from it."""
    span = trace.NonRecordingSpan(SpanContext(trace_id, span_id, False, TraceFlags(TraceFlags.SAMPLED)))
    return trace.set_span_in_context(span)


def _family(metric: _Metric, native: bool) -> Family | None:
    """The compiled core's family holding ``metric``'s series on the native path, else None.

    Written as the SDK's Prometheus reader writes the metric: a counter's samples end in
    ``_total``, a unit ("s": seconds) ends the name of a metric that has one.
    """
    if not native or _native is None:
        return None
    unit = _UNITS.get(getattr(metric, "unit", ""), getattr(metric, "unit", ""))
    name = metric.name
    if unit and not name.endswith(f"_{unit}"):
        name = f"{name}_{unit}"
    family: Family
    if isinstance(metric, Histogram):
        family = _native.Family(
            name,
            metric.description,
            unit,
            list(metric.labels),
            list(metric.buckets),
            [str(b) for b in metric.buckets],
            max_series=MAX_SERIES,
        )
        return family
    if isinstance(metric, Counter):
        name = f"{name.removesuffix('_total')}_total"
    family = _native.Family(
        name,
        metric.description,
        unit,
        list(metric.labels),
        gauge=isinstance(metric, Gauge),
        max_series=MAX_SERIES,
    )
    return family


def _key_of(metric: _Metric, labels: Labels) -> tuple[str, ...] | None:
    """The label values in declared order, or None when the call's labels are wrong."""
    if labels is not None:
        try:  # the common, correct call: no dict built at all
            if len(labels) == len(metric.labels):
                return tuple([str(labels[k]) for k in metric.labels])
        except (KeyError, TypeError):
            pass
    return metric._checked_key(labels)


# --- What reads our metrics: /api/metrics (_prometheus) and the OTLP push (_metric_export) ---

Direct = Histogram | _Observed  # the metrics we aggregate ourselves (all registered ones)
_global_metrics: weakref.WeakSet[Metrics] = weakref.WeakSet()
# The registries made for an explicit meter provider, per provider.
_provider_metrics: weakref.WeakKeyDictionary[object, weakref.WeakSet[Metrics]] = weakref.WeakKeyDictionary()


def global_direct() -> Iterable[Direct]:
    """Every metric of the registries on the global meter provider, one per name."""
    return direct_of(None)


def direct_of(provider: object | None) -> Iterable[Direct]:
    """Every metric of the registries made for ``provider`` (None: the global one), one per name."""
    registries = _global_metrics if provider is None else _provider_metrics.get(provider, ())
    seen: set[str] = set()
    for registry in list(registries):
        for metric in registry.direct():
            if metric.name not in seen:  # one registry's metric per name, as the SDK would
                seen.add(metric.name)
                yield metric


class Timer:
    """Records elapsed seconds into a histogram once.

    Call it to stop (``end = h.start_timer(labels); ...; seconds = end()``), use it as a
    context manager, or as a decorator on sync and async functions (each call timed).
    """

    def __init__(self, histogram: Histogram, labels: Labels) -> None:
        self._histogram = histogram
        self._labels = labels
        self._start = time.perf_counter()
        self._done = False

    def end(self) -> float:
        elapsed = time.perf_counter() - self._start
        if not self._done:
            self._done = True
            self._histogram.observe(elapsed, self._labels)
        return elapsed

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        self._done = False
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.end()

    @overload
    def __call__(self) -> float: ...
    @overload
    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]: ...
    def __call__(self, fn: Callable[P, R] | None = None) -> float | Callable[P, R]:
        if fn is None:
            return self.end()
        histogram, labels = self._histogram, self._labels
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def timed_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                with Timer(histogram, labels):
                    return await fn(*args, **kwargs)

            return timed_async  # type: ignore[return-value]

        @functools.wraps(fn)
        def timed(*args: P.args, **kwargs: P.kwargs) -> R:
            with Timer(histogram, labels):
                return fn(*args, **kwargs)

        return timed


class Metrics:
    """A registry of named metrics on one meter, with the document's catalogue built in.

    ``cfk_otel``'s module-level helpers use one instance bound to the global meter
    provider; tests and embedders can build their own with an explicit provider.
    """

    def __init__(
        self, meter_provider: metrics.MeterProvider | None = None, native: bool | None = None
    ) -> None:
        self._meter = metrics.get_meter("cfk_otel", __version__, meter_provider)
        # Where the series live: the compiled core's families (native), or dicts here.
        self.native = _native is not None and (native_path() if native is None else native)
        self._registry: dict[str, _Metric] = {}
        self._lock = threading.Lock()
        # Read by the scrape and the OTLP push (see global_direct); those of a registry
        # on an explicit provider are read through its own direct().
        if meter_provider is None:
            _global_metrics.add(self)
        else:
            _provider_metrics.setdefault(meter_provider, weakref.WeakSet()).add(self)
        self.http_requests = self.register_counter(
            "http_requests_total", "Total HTTP requests by method, path, status", ["method", "path", "status"]
        )
        self.http_request_duration = self.register_histogram(
            "http_request_duration_seconds",
            "Request duration by method, path",
            ["method", "path"],
            DURATION_BUCKETS,
            unit="s",
        )
        self.websocket_connections = self.register_gauge(
            "websocket_connections_active", "Active WebSocket connections", []
        )
        self.database_query_duration = self.register_histogram(
            "database_query_duration_seconds",
            "Database query latency",
            ["operation"],
            CLIENT_BUCKETS,
            unit="s",
        )
        self.redis_operation_duration = self.register_histogram(
            "redis_operation_duration_seconds",
            "Redis operation latency",
            ["command"],
            CLIENT_BUCKETS,
            unit="s",
        )
        self.active_agents = self.register_gauge("active_agents_count", "Active AI agents by type", ["type"])
        self.ticket_transitions = self.register_counter(
            "ticket_transitions_total", "Ticket state transitions", ["from", "to"]
        )
        self.errors = self.register_counter(
            "errors_total", "Error count by type and severity", ["type", "severity"]
        )
        # What the dashboards and alerts need beyond the document's table.
        self.websocket_messages = self.register_counter(
            "websocket_messages_total", "WebSocket messages by route and direction", ["path", "direction"]
        )
        self.websocket_duration = self.register_histogram(
            "websocket_connection_duration_seconds",
            "WebSocket connection duration",
            ["path"],
            WEBSOCKET_BUCKETS,
            unit="s",
        )
        self._users: dict[str, float] = {}
        # asyncpg pools have __slots__ without __weakref__: held here until they close.
        self._pools: list[Any] = []
        self._meter.create_observable_gauge(
            "active_users",
            callbacks=[self._observe_users],
            description="Distinct users seen in the last 5 minutes",
        )
        self._meter.create_observable_gauge(
            "process_resident_memory_bytes",
            callbacks=[_observe_rss],
            unit="By",
            description="Resident memory of the process",
        )
        self._meter.create_observable_gauge(
            "database_pool_connections",
            callbacks=[self._observe_pools],
            description="Pool connections by state",
        )
        self._meter.create_observable_gauge(
            "database_pool_max_connections", callbacks=[self._observe_pool_max], description="Pool capacity"
        )

    def record_request(
        self,
        method: str,
        route: str,
        status: str,
        seconds: float,
        trace_id: int = 0,
        span_id: int = 0,
        span: _seam.Ended | None = None,
        log: _seam.Ended | _seam.Line | None = None,
    ) -> None:
        """The end of one HTTP request: ``http_requests_total`` and ``http_request_duration_seconds``,
        with the request's ended span and its request line's log record when the core is to
        queue them (see ``seam.end_request``): one call into the core on the native path.
        ``trace_id`` and ``span_id``: the server span's, when its trace is exported (the
        duration bucket's exemplar)."""
        requests, duration = self.http_requests, self.http_request_duration
        if requests.family is None or duration.family is None or not seconds >= 0.0:
            requests.add_by_key((method, route, status), 1.0)
            duration.record_by_key((method, route), seconds, trace_id, span_id)
            if span is not None or log is not None:
                _seam.end_request(span, None, None, method, route, status, seconds, log)
            return
        counted, observed = _seam.end_request(
            span, requests.family, duration.family, method, route, status, seconds, log, trace_id, span_id
        )
        if counted:
            requests._overflowed()
        if observed:
            duration._overflowed()

    def note_user(self, user_id: str, now: float | None = None) -> None:
        """Count ``user_id`` in ``active_users`` for the next five minutes."""
        if user_id in self._users or len(self._users) < MAX_USERS:
            self._users[user_id] = time.monotonic() if now is None else now

    def active_users(self, now: float | None = None) -> int:
        cutoff = (time.monotonic() if now is None else now) - ACTIVE_USER_WINDOW
        for user_id, seen in list(self._users.items()):
            if seen < cutoff:
                self._users.pop(user_id, None)
        return len(self._users)

    def track_pool(self, pool: Any) -> None:
        """Report an asyncpg pool in ``database_pool_connections`` until it closes."""
        if len(self._pools) < MAX_POOLS:
            self._pools.append(pool)

    def _observe_users(self, options: metrics.CallbackOptions) -> list[metrics.Observation]:
        return [metrics.Observation(self.active_users())]

    def _pool_sizes(self) -> tuple[int, int, int]:
        used = idle = capacity = 0
        self._pools[:] = [p for p in self._pools if not _closing(p)]
        for pool in list(self._pools):
            with guard("reading an asyncpg pool's size", then="skipped this time"):  # closed, foreign
                size, free = pool.get_size(), pool.get_idle_size()
                used, idle, capacity = used + size - free, idle + free, capacity + pool.get_max_size()
        return used, idle, capacity

    def _observe_pools(self, options: metrics.CallbackOptions) -> list[metrics.Observation]:
        if not self._pools:
            return []
        used, idle, _ = self._pool_sizes()
        return [metrics.Observation(used, {"state": "used"}), metrics.Observation(idle, {"state": "idle"})]

    def _observe_pool_max(self, options: metrics.CallbackOptions) -> list[metrics.Observation]:
        return [metrics.Observation(self._pool_sizes()[2])] if self._pools else []

    def direct(self) -> list[Direct]:
        """Every registered metric: each is aggregated here and added to the readers' collections."""
        with self._lock:
            return [m for m in self._registry.values() if isinstance(m, Histogram | _Observed)]

    def register_counter(self, name: str, description: str, labels: Iterable[str] = ()) -> Counter:
        """Register (or get back) a counter. Raises ``ValueError`` on a conflicting shape."""
        names = _label_names(name, labels)
        return self._register(
            name, (Counter.kind, names), lambda: Counter(name, description, names, self.native, self._meter)
        )

    def register_gauge(self, name: str, description: str, labels: Iterable[str] = ()) -> Gauge:
        """Register (or get back) a gauge. Raises ``ValueError`` on a conflicting shape."""
        names = _label_names(name, labels)
        return self._register(
            name, (Gauge.kind, names), lambda: Gauge(name, description, names, self.native, self._meter)
        )

    def register_histogram(
        self,
        name: str,
        description: str,
        labels: Iterable[str] = (),
        buckets: Sequence[float] | None = None,
        *,
        unit: str = "",
    ) -> Histogram:
        """Register (or get back) a histogram; ``buckets`` are upper bounds, increasing."""
        names = _label_names(name, labels)
        bounds = tuple(float(b) for b in (DURATION_BUCKETS if buckets is None else buckets))
        if not bounds or any(b >= a for a, b in zip(bounds[1:], bounds, strict=False)):
            raise ValueError(f"metric {name!r}: buckets must be increasing and non-empty, got {list(bounds)}")
        return self._register(
            name,
            (Histogram.kind, names, bounds),
            lambda: Histogram(name, description, names, bounds, unit, self.native, self._meter),
        )

    def _register(self, name: str, shape: tuple[object, ...], build: Callable[[], M]) -> M:
        with self._lock:
            existing = self._registry.get(name)
            if existing is None:
                metric = build()
                self._registry[name] = metric
                return metric
        # The same shape means the same class.
        if existing.shape() != shape:
            raise ValueError(
                f"metric {name!r} is already registered as {_describe(existing.shape())}; "
                f"cannot register it again as {_describe(shape)}"
            )
        return existing  # type: ignore[return-value]


def _label_names(name: str, labels: Iterable[str]) -> tuple[str, ...]:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"invalid metric name {name!r}: use letters, digits and '_', starting with a letter, "
            "at most 255 characters"
        )
    if isinstance(labels, str):
        raise TypeError(f"metric {name!r}: labels must be a list of names, not the string {labels!r}")
    names = tuple(labels)
    for label in names:
        if not isinstance(label, str) or not _LABEL.match(label) or label.startswith("__"):
            raise ValueError(
                f"metric {name!r}: invalid label name {label!r}: use letters, digits and '_', "
                "no leading digit or '__'"
            )
        if label in RESERVED_LABELS:
            raise ValueError(
                f"metric {name!r}: label name {label!r} is reserved by Prometheus "
                "('le' holds histogram bucket bounds, 'quantile' summary quantiles)"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"metric {name!r}: duplicate label names in {list(names)}")
    return names


def _closing(pool: Any) -> bool:
    try:
        return bool(pool.is_closing())
    except Exception:
        return True


def _observe_rss(options: metrics.CallbackOptions) -> list[metrics.Observation]:
    try:
        with open("/proc/self/statm", "rb") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):  # not Linux: nothing to report
        return []
    return [metrics.Observation(pages * _PAGE_SIZE)]


def _describe(shape: tuple[object, ...]) -> str:
    kind, labels, *rest = shape
    text = f"a {kind} with labels {list(labels)}"  # type: ignore[call-overload]
    return text + (f" and buckets {list(rest[0])}" if rest else "")  # type: ignore[call-overload]


def path() -> str:
    """Which path records the process's metrics, as the start-up line says it (without
    making the process's registry: that is left to its first use)."""
    if _native is not None and native_path():
        return "native core"
    return (
        "OpenTelemetry SDK (" + ("CFK_OTEL_NATIVE=false" if _native is not None else "no compiled core") + ")"
    )


def native_path() -> bool:
    """Whether ``CFK_OTEL_NATIVE`` (read as the settings read it) leaves the native path on."""
    variable = _settings.variable("CFK_OTEL_NATIVE")
    value = os.environ.get(variable.name, "").strip()
    try:
        return bool(variable.parse(value)) if value else bool(variable.default)
    except Exception:  # invalid: the default, as the settings say at start-up
        return bool(variable.default)


# CFK_OTEL_STRICT: misuse raises instead of being logged once (set at start-up, see _sdk).
STRICT = False
_default: Metrics | None = None
_default_lock = threading.Lock()


def default() -> Metrics:
    """The process's metrics, on the global meter provider (created on first use)."""
    global _default  # noqa: PLW0603  (the one process-wide registry, like prometheus_client's REGISTRY)
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Metrics()
    return _default


def register_counter(name: str, description: str, labels: Iterable[str] = ()) -> Counter:
    """Register a counter in the process registry (see :class:`Counter`)."""
    return default().register_counter(name, description, labels)


def register_gauge(name: str, description: str, labels: Iterable[str] = ()) -> Gauge:
    """Register a gauge in the process registry (see :class:`Gauge`)."""
    return default().register_gauge(name, description, labels)


def register_histogram(
    name: str, description: str, labels: Iterable[str] = (), buckets: Sequence[float] | None = None
) -> Histogram:
    """Register a histogram in the process registry (see :class:`Histogram`)."""
    return default().register_histogram(name, description, labels, buckets)


def set_active_agents(agent_type: str, count: float) -> None:
    """Set ``active_agents_count{type}``; see also :func:`agent_started` / :func:`agent_finished`."""
    default().active_agents.set(count, {"type": agent_type})


def agent_started(agent_type: str) -> None:
    """One more active agent of this type."""
    default().active_agents.inc({"type": agent_type})


def agent_finished(agent_type: str) -> None:
    """One active agent of this type fewer; never below 0 (a finish without a start is logged once)."""
    default().active_agents.finish({"type": agent_type})


def record_ticket_transition(from_state: str, to_state: str) -> None:
    """Count a ticket moving between states in ``ticket_transitions_total{from,to}``."""
    default().ticket_transitions.inc({"from": from_state, "to": to_state})


class _LazyHistogram:
    """``http_request_duration`` importable at module level before the SDK starts."""

    def observe(self, value: float, labels: Labels = None) -> None:
        default().http_request_duration.observe(value, labels)

    def start_timer(self, labels: Labels = None) -> Timer:
        return default().http_request_duration.start_timer(labels)


http_request_duration: Final = _LazyHistogram()
