"""The SDK's metrics for ``/api/metrics``: our own reader, through the SDK's public interfaces.

:class:`SdkReader` is an ``InMemoryMetricReader`` with cumulative temporality that a scrape
collects on demand; :class:`SdkCollector` translates what it reads into ``prometheus_client``
families, so ``prometheus_client`` writes both text formats. The translation follows the
OpenTelemetry specification's Prometheus compatibility rules as the SDK's own Prometheus
reader (``opentelemetry-exporter-prometheus``) applies them, with its ``target_info`` and
``otel_scope_*`` labels left out: the scrape shows exactly the document's names and labels.
Unlike that reader, it keeps the histograms' exemplars: the latest one of each bucket, shown
on the ``_bucket`` lines of an OpenMetrics scrape.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

from opentelemetry.sdk import environment_variables
from opentelemetry.sdk.metrics import (
    Counter,
    Exemplar,
    Histogram,
    ObservableCounter,
    ObservableGauge,
    ObservableUpDownCounter,
    UpDownCounter,
)
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    HistogramDataPoint,
    InMemoryMetricReader,
    MetricsData,
    ResourceMetrics,
    Sum,
)
from opentelemetry.sdk.metrics.export import Histogram as HistogramData
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.samples import Exemplar as PromExemplar
from prometheus_client.samples import Timestamp

_log = logging.getLogger("cfk_otel")

# Names and units as the specification's Prometheus compatibility section maps them (and
# the SDK's Prometheus reader, whose tables these are).
_NAME_INVALID: Final = re.compile(r"[^a-zA-Z0-9:]+")
_LABEL_INVALID: Final = re.compile(r"[^a-zA-Z0-9]+")
_UNIT_ANNOTATION: Final = re.compile(r"{.*}")
_UNITS: Final = {
    **{"d": "days", "h": "hours", "min": "minutes", "s": "seconds"},
    **{"ms": "milliseconds", "us": "microseconds", "ns": "nanoseconds"},
    **{"By": "bytes", "KiBy": "kibibytes", "MiBy": "mebibytes", "GiBy": "gibibytes", "TiBy": "tibibytes"},
    **{"KBy": "kilobytes", "MBy": "megabytes", "GBy": "gigabytes", "TBy": "terabytes"},
    **{"m": "meters", "V": "volts", "A": "amperes", "J": "joules", "W": "watts", "g": "grams"},
    **{"Cel": "celsius", "Hz": "hertz", "1": "", "%": "percent"},
}
_PER_UNITS: Final = {
    **{"s": "second", "m": "minute", "h": "hour", "d": "day"},
    **{"w": "week", "mo": "month", "y": "year"},
}


# Before 1.42 the SDK always records metrics about itself (otel.sdk.span.*, its scope
# "opentelemetry-sdk"); from 1.42 only when OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED=true. The
# scrape follows the newer rule on every release: left out where that variable does not exist.
_ASKED: Final = hasattr(environment_variables, "OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED")
SDK_SELF: Final = None if _ASKED else "opentelemetry-sdk"


def without_sdk_self(data: MetricsData | None) -> MetricsData | None:
    """``data`` without the SDK's metrics about itself, where the SDK records them unasked."""
    if data is None or SDK_SELF is None:
        return data
    return MetricsData(
        [
            ResourceMetrics(
                rm.resource, [sm for sm in rm.scope_metrics if sm.scope.name != SDK_SELF], rm.schema_url
            )
            for rm in data.resource_metrics
        ]
    )


def metric_name(name: str) -> str:
    """A Prometheus metric name: a leading digit and every run of invalid characters become ``_``."""
    if name[:1].isdigit():
        name = "_" + name[1:]
    return _NAME_INVALID.sub("_", name)


def label_name(key: str) -> str:
    """A Prometheus label name (as a metric name, without ``:``)."""
    if key[:1].isdigit():
        key = "_" + key[1:]
    return _LABEL_INVALID.sub("_", key)


def unit_suffix(unit: str) -> str:
    """The unit as a name suffix: ``s`` is ``seconds``, ``m/s`` is ``meters_per_second``."""
    unit = _UNIT_ANNOTATION.sub("", unit)
    if unit in _UNITS:
        return _UNITS[unit]
    top, slash, bottom = unit.partition("/")
    bottom = _NAME_INVALID.sub("_", bottom)
    if slash and bottom:
        top = _NAME_INVALID.sub("_", top)
        top = _UNITS.get(top, top)
        bottom = _PER_UNITS.get(bottom, bottom)
        return f"{top}_per_{bottom}" if top else f"per_{bottom}"
    return _NAME_INVALID.sub("_", unit).strip("_")


def label_value(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


class _Millis(Timestamp):
    """An exemplar's time as OpenMetrics shows it here: seconds, with milliseconds."""

    def __str__(self) -> str:
        return f"{self.sec}.{self.nsec // 1_000_000:03d}"


# The latest exemplar of each bucket: (metric, label values, bucket index) -> (time, exemplar).
Latest = dict[tuple[str, tuple[str, ...], int], tuple[int, PromExemplar]]
# One family per name, description, unit and type, whichever scopes its points come from.
Families = dict[tuple[str, str, str, str], Metric]


class SdkCollector:
    """A ``prometheus_client`` collector over the SDK's metrics, read on each ``collect()``."""

    def __init__(self, read: Callable[[], MetricsData | None]) -> None:
        self._read = read
        self._latest: Latest = {}
        self._unsupported: set[str] = set()

    def describe(self) -> list[Metric]:
        # Nothing to declare up front: a registry with auto_describe would otherwise
        # collect once at registration, before the reader belongs to a meter provider.
        return []

    def collect(self) -> Iterator[Metric]:
        data = self._read()
        if data is None:
            return
        families: Families = {}
        for resource_metrics in data.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                if scope_metrics.scope.name == SDK_SELF:
                    continue
                for m in scope_metrics.metrics:
                    self._translate(m.name, m.description or "", m.unit or "", m.data, families)
        yield from families.values()

    def _translate(
        self, raw_name: str, description: str, unit: str, data: object, families: Families
    ) -> None:
        name, unit = metric_name(raw_name), unit_suffix(unit)
        if isinstance(data, Sum):
            # A cumulative non-monotonic sum is a gauge (the specification's rule).
            cumulative = data.aggregation_temporality == AggregationTemporality.CUMULATIVE
            kind: Any = GaugeMetricFamily if cumulative and not data.is_monotonic else CounterMetricFamily
        elif isinstance(data, Gauge):
            kind = GaugeMetricFamily
        elif isinstance(data, HistogramData):
            kind = HistogramMetricFamily
        else:
            if raw_name not in self._unsupported:  # an exponential histogram, say: said once
                self._unsupported.add(raw_name)
                _log.warning("cfk_otel: /api/metrics cannot show %s (%s)", raw_name, type(data).__name__)
            return
        points: Sequence[Any] = data.data_points
        rows = [{label_name(k): label_value(v) for k, v in (p.attributes or {}).items()} for p in points]
        keys = sorted({key for row in rows for key in row})
        family_id = (name, description, unit, kind.__name__)
        family: Any = families.get(family_id)
        if family is None:
            family = families[family_id] = kind(name, description, labels=keys, unit=unit)
        for point, row in zip(points, rows, strict=True):
            values = [row.get(key, "") for key in keys]
            if isinstance(point, HistogramDataPoint):
                buckets = self._buckets(name, values, point)
                family.add_metric(values, buckets, point.sum)
            else:
                family.add_metric(values, point.value)

    def _buckets(self, name: str, values: list[str], point: HistogramDataPoint) -> list[Any]:
        """Cumulative buckets, each with the latest exemplar that fell in it, if any."""
        latest = self._latest
        series = (name, tuple(values))
        for exemplar in point.exemplars or ():
            shown = _shown(exemplar)
            if shown is not None:
                # The bucket the SDK counted the value in: (bound[i-1], bound[i]].
                key = (*series, bisect.bisect_left(point.explicit_bounds, exemplar.value))
                previous = latest.get(key)
                if previous is None or previous[0] <= exemplar.time_unix_nano:
                    latest[key] = (exemplar.time_unix_nano, shown)
        buckets: list[Any] = []
        running = 0
        bounds: Sequence[float | str] = [*point.explicit_bounds, "+Inf"]
        for index, (bound, count) in enumerate(zip(bounds, point.bucket_counts, strict=True)):
            running += count
            kept = latest.get((*series, index)) if latest else None
            buckets.append((str(bound), running) if kept is None else (str(bound), running, kept[1]))
        return buckets


def _shown(exemplar: Exemplar) -> PromExemplar | None:
    """The exemplar as the scrape shows it; None without the span it came from."""
    if not exemplar.trace_id or not exemplar.span_id:
        return None
    ids = {"trace_id": f"{exemplar.trace_id:032x}", "span_id": f"{exemplar.span_id:016x}"}
    seconds, nanos = divmod(exemplar.time_unix_nano, 1_000_000_000)
    return PromExemplar(ids, exemplar.value, _Millis(seconds, nanos))


# prometheus_client writes an exemplar's labels sorted (span_id first); the form this project
# gives both paths is trace_id first. The ids are hex, and a quote inside a label value or a
# HELP text is always escaped, so this pattern matches exemplars and nothing else.
_SORTED_IDS: Final = re.compile(rb'# \{span_id="([0-9a-f]{16})",trace_id="([0-9a-f]{32})"\}')


def trace_id_first(body: bytes) -> bytes:
    """An OpenMetrics body with each exemplar's ``trace_id`` before its ``span_id``."""
    if b'# {span_id="' not in body:
        return body
    return _SORTED_IDS.sub(rb'# {trace_id="\2",span_id="\1"}', body)


_CUMULATIVE: Final[dict[type, AggregationTemporality]] = dict.fromkeys(
    (Counter, UpDownCounter, Histogram, ObservableCounter, ObservableUpDownCounter, ObservableGauge),
    AggregationTemporality.CUMULATIVE,
)


class SdkReader(InMemoryMetricReader):
    """Reads the SDK's metrics when ``/api/metrics`` is scraped, into ``registry``.

    >>> registry = CollectorRegistry()
    >>> provider = MeterProvider(metric_readers=[SdkReader(registry)])  # doctest: +SKIP
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(preferred_temporality=_CUMULATIVE)
        self._scrape_registry = registry
        self._scrape_collector = SdkCollector(self.get_metrics_data)
        registry.register(self._scrape_collector)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        with contextlib.suppress(KeyError):  # shut down twice
            self._scrape_registry.unregister(self._scrape_collector)
        super().shutdown(timeout_millis, **kwargs)
