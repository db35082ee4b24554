"""cfk_otel's own metrics over OTLP: the SDK's OTLP metric exporter, wrapped.

The metrics registered through :mod:`cfk_otel._metrics.catalogue` (the document's catalogue and the
custom ones) are aggregated there, not by SDK instruments, so no SDK metric reader sees
them. They join the OTLP push here, through the SDK's public ``MetricExporter``
interface: :class:`OtlpMetricExporter` (the ``cfk_otlp`` metric exporter, which set-up puts
in the place of ``otlp``) adds them to every batch the SDK's periodic reader hands it, and
passes the whole to the SDK's own OTLP exporter for the configured protocol.

Temporality follows ``OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE`` (read by
:mod:`cfk_otel._settings`), with the specification's meaning of each choice, for the SDK's
instruments and ours alike.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib.metadata import entry_points
from typing import Any, Final

from opentelemetry.sdk.metrics import (
    Counter,
    Histogram,
    ObservableCounter,
    ObservableGauge,
    ObservableUpDownCounter,
    UpDownCounter,
)
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    HistogramDataPoint,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.metrics.export import Histogram as HistogramData
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from cfk_otel._guard import guard
from cfk_otel._version import __version__

from . import catalogue as _metrics
from .reader import without_sdk_self

_log = logging.getLogger("cfk_otel")
SCOPE: Final = InstrumentationScope("cfk_otel", __version__)
_MERGE: Final = guard("adding our metrics to an OTLP export", then="the SDK's own still go out")
Source = Callable[[], Iterable[_metrics.Direct]]
_DELTA: Final = AggregationTemporality.DELTA
_CUMULATIVE: Final = AggregationTemporality.CUMULATIVE
# The SDK's OTLP metric exporters, by protocol, under their entry-point names.
_INNER: Final = {"http/protobuf": "otlp_proto_http", "grpc": "otlp_proto_grpc"}


def preferred_temporality(preference: str) -> dict[type, AggregationTemporality]:
    """The temporality per SDK instrument class for a
    ``OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE`` value, as the specification defines
    it: ``delta`` for counters (observable too) and histograms, ``lowmemory`` for the
    synchronous counter and histogram only; up-down counters and gauges stay cumulative."""
    delta = preference in ("delta", "lowmemory")
    observable = preference == "delta"
    return {
        Counter: _DELTA if delta else _CUMULATIVE,
        Histogram: _DELTA if delta else _CUMULATIVE,
        ObservableCounter: _DELTA if observable else _CUMULATIVE,
        UpDownCounter: _CUMULATIVE,
        ObservableUpDownCounter: _CUMULATIVE,
        ObservableGauge: _CUMULATIVE,
    }


# Per collection state for delta temporality: each series' last collection time and
# cumulative values, keyed by (metric name, label values).
_Previous = dict[tuple[str, tuple[str, ...]], tuple[int, Any]]


class Collection:
    """Reads our metrics as SDK ``Metric`` data, cumulative or as differences since the
    previous read (a histogram's min and max then stay cumulative: they cannot be taken
    back), as the SDK path's instruments give them. A metric nobody has used yet is still
    there, without data points, so that it is declared from the first export."""

    def __init__(
        self, source: Source, temporality: Mapping[type, AggregationTemporality] | None = None
    ) -> None:
        # Ours are read as the SDK path's instruments would be: a counter and a histogram
        # as synchronous ones, a gauge as an observable up-down counter.
        self._source = source
        prefers = temporality or {}
        self._delta_counters = prefers.get(Counter) is _DELTA
        self._delta_gauges = prefers.get(ObservableUpDownCounter) is _DELTA
        self._delta_histograms = prefers.get(Histogram) is _DELTA
        self._previous: _Previous = {}

    def metrics(self) -> list[Metric]:
        now = time.time_ns()
        out: list[Metric] = []
        for metric in self._source():
            if not metric.reported_here:  # an SDK instrument: in the SDK's own data
                continue
            data: HistogramData | Sum
            if isinstance(metric, _metrics.Histogram):
                delta = self._delta_histograms
                points = [
                    self._histogram_delta(metric.name, k, p, now) if delta else p
                    for k, p in metric.points(now)
                ]
                # As a synchronous instrument's: a delta holds the series recorded since the last.
                points = [p for p in points if p.count] if delta else points
                data = HistogramData(points, _DELTA if delta else _CUMULATIVE)
            else:
                delta = self._delta_counters if metric.monotonic else self._delta_gauges
                sums = [
                    self._sum_delta(metric.name, k, p, now) if delta else p for k, p in metric.points(now)
                ]
                if delta and metric.monotonic:
                    sums = [p for p in sums if p.value]
                data = Sum(sums, _DELTA if delta else _CUMULATIVE, metric.monotonic)
            out.append(Metric(metric.name, metric.description, metric.unit, data))
        return out

    def _histogram_delta(
        self, name: str, labels: tuple[str, ...], point: HistogramDataPoint, now: int
    ) -> HistogramDataPoint:
        previous = self._previous
        start, (counts, total, count) = previous.get(
            (name, labels), (point.start_time_unix_nano, ((), 0.0, 0))
        )
        previous[name, labels] = (now, (point.bucket_counts, point.sum, point.count))
        return HistogramDataPoint(
            attributes=point.attributes,
            start_time_unix_nano=start,
            time_unix_nano=now,
            count=point.count - count,
            sum=point.sum - total,
            bucket_counts=tuple(c - (counts[i] if counts else 0) for i, c in enumerate(point.bucket_counts)),
            explicit_bounds=point.explicit_bounds,
            min=point.min,
            max=point.max,
            # Those of the measurements in this delta: taken since the previous read.
            exemplars=[e for e in point.exemplars if e.time_unix_nano >= start],
        )

    def _sum_delta(
        self, name: str, labels: tuple[str, ...], point: NumberDataPoint, now: int
    ) -> NumberDataPoint:
        start, value = self._previous.get((name, labels), (point.start_time_unix_nano, 0.0))
        self._previous[name, labels] = (now, point.value)
        return NumberDataPoint(point.attributes, start, now, point.value - value)


def merged(data: MetricsData | None, ours: Sequence[Metric], resource: Resource) -> MetricsData:
    """``data`` with ``ours`` added to its first resource, in cfk_otel's scope."""
    if data is None or not data.resource_metrics:
        scope = ScopeMetrics(SCOPE, list(ours), "")
        return MetricsData([ResourceMetrics(resource, [scope], resource.schema_url)])
    first, *rest = data.resource_metrics
    scopes = list(first.scope_metrics)
    for index, scope_metrics in enumerate(scopes):
        if scope_metrics.scope.name == SCOPE.name:  # beside our SDK instruments (active_users...)
            scopes[index] = ScopeMetrics(
                scope_metrics.scope, [*scope_metrics.metrics, *ours], scope_metrics.schema_url
            )
            break
    else:
        scopes.append(ScopeMetrics(SCOPE, list(ours), ""))
    return MetricsData([ResourceMetrics(first.resource, scopes, first.schema_url), *rest])


def _protocol() -> str:
    env = os.environ
    return (
        env.get("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "").strip()
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "").strip()
        or "http/protobuf"
    )


def _sdk_exporter(temporality: dict[type, AggregationTemporality]) -> MetricExporter:
    """The SDK's OTLP metric exporter for the configured protocol, as ``otlp`` would give."""
    protocol = _protocol()
    name = _INNER.get(protocol)
    found = list(entry_points(group="opentelemetry_metrics_exporter", name=name)) if name else []
    if not found:
        raise RuntimeError(f"no OTLP metric exporter for OTEL_EXPORTER_OTLP_PROTOCOL={protocol} is installed")
    exporter = found[0].load()(preferred_temporality=temporality)
    if not isinstance(exporter, MetricExporter):
        raise RuntimeError(f"{name} is not a metric exporter")
    return exporter


class OtlpMetricExporter(MetricExporter):
    """The SDK's OTLP metric exporter with cfk_otel's metrics added to each export.

    >>> exporter = OtlpMetricExporter(inner=ConsoleMetricExporter())  # doctest: +SKIP

    The SDK's periodic reader calls it whenever it has data of its own, which on the global
    provider is every time (the registry's ``active_users`` gauge is always observed).
    ``inner`` defaults to the SDK's exporter for ``OTEL_EXPORTER_OTLP[_METRICS]_PROTOCOL``;
    ``source`` to the metrics of every registry on the global meter provider; ``resource``
    is used only when the SDK hands over no data of its own.
    """

    def __init__(
        self,
        inner: MetricExporter | None = None,
        preference: str = "cumulative",
        source: Source | None = None,
        resource: Resource | None = None,
    ) -> None:
        temporality = preferred_temporality(preference)
        super().__init__(preferred_temporality=temporality)
        self._inner = inner if inner is not None else _sdk_exporter(temporality)
        self._collection = Collection(source or _metrics.global_direct, temporality)
        self._resource = resource or Resource.create()

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        data = metrics_data
        with _MERGE:
            data = merged(without_sdk_self(metrics_data), self._collection.metrics(), self._resource)
        if not any(sm.metrics for rm in data.resource_metrics for sm in rm.scope_metrics):
            return MetricExportResult.SUCCESS  # nothing to send: no request at all
        return self._inner.export(data, timeout_millis=timeout_millis, **kwargs)

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self._inner.force_flush(timeout_millis=timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._inner.shutdown(timeout_millis=timeout_millis, **kwargs)


ENTRY_POINT: Final = "cfk_otlp"  # OtlpMetricExporter's name among the SDK's metric exporters


@contextmanager
def in_place_of_otlp(arguments: dict[str, Any]) -> Iterator[None]:
    """While the SDK's configurator runs: where ``OTEL_METRICS_EXPORTER`` names ``otlp``, our
    wrapper (``cfk_otlp``, with ``arguments``) is added to its ``metric_exporter_names`` and
    ``exporter_args_map`` (in the configurator's keyword ``arguments``) and ``otlp`` is taken
    out of the variable, which is put back afterwards."""
    env = os.environ
    value = env.get("OTEL_METRICS_EXPORTER")
    names = [n.strip() for n in (value or "").split(",") if n.strip()]
    if "otlp" not in (n.lower() for n in names):
        yield
        return
    arguments["metric_exporter_names"] = [*arguments.get("metric_exporter_names", []), ENTRY_POINT]
    rest = [n for n in names if n.lower() != "otlp"]
    env["OTEL_METRICS_EXPORTER"] = ",".join(rest) or "none"
    try:
        yield
    finally:
        if value is None:
            env.pop("OTEL_METRICS_EXPORTER", None)
        else:
            env["OTEL_METRICS_EXPORTER"] = value
