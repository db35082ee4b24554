"""cfk_otel/_metrics/catalogue.py: the custom-metrics API on an injected meter provider."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from cfk_otel._metrics.catalogue import Metrics
from cfk_otel.testing import MetricsReader


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return MetricsReader()


def registry(*readers: MetricsReader) -> tuple[MeterProvider, Metrics]:
    """A registry on a fresh provider whose readers read its metrics too."""
    provider = MeterProvider(metric_readers=list(readers))
    for reader in readers:
        reader.read_from(provider)
    return provider, Metrics(provider)


@pytest.fixture
def m(reader: MetricsReader) -> Iterator[Metrics]:
    provider, metrics = registry(reader)
    yield metrics
    provider.shutdown()


def points(reader: InMemoryMetricReader, name: str) -> dict[tuple[tuple[str, Any], ...], Any]:
    data = reader.get_metrics_data()
    found = {}
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == name:
                    for p in metric.data.data_points:
                        found[tuple(sorted(p.attributes.items()))] = p
    return found


def test_counter(m: Metrics, reader: InMemoryMetricReader) -> None:
    c = m.register_counter("my_feature_usage", "Feature usage count", ["feature"])
    c.inc({"feature": "bulk-update"})
    c.inc({"feature": "bulk-update"}, value=2)
    [p] = points(reader, "my_feature_usage").values()
    assert p.value == 3


def test_gauge_set_inc_dec(m: Metrics, reader: InMemoryMetricReader) -> None:
    g = m.register_gauge("queue_depth", "Jobs waiting", ["queue"])
    g.set(5, {"queue": "a"})
    g.inc({"queue": "a"})
    g.dec({"queue": "a"}, 2)
    g.set(7, {"queue": "b"})
    g.set(1, {"queue": "b"})
    values = {k: p.value for k, p in points(reader, "queue_depth").items()}
    assert values == {(("queue", "a"),): 4, (("queue", "b"),): 1}


def test_histogram_buckets_and_timer(m: Metrics, reader: InMemoryMetricReader) -> None:
    h = m.register_histogram("export_seconds", "Export time", ["format"], buckets=[0.1, 1, 10])
    h.observe(0.5, {"format": "csv"})
    end = h.start_timer({"format": "csv"})
    seconds = end()
    assert 0 <= seconds < 1
    assert end() >= seconds  # a second call returns the time but records nothing more
    with h.start_timer({"format": "csv"}) as timer:
        pass
    assert isinstance(timer.end(), float)
    [p] = points(reader, "export_seconds").values()
    assert list(p.explicit_bounds) == [0.1, 1, 10]
    assert p.count == 3


def test_timer_decorates_sync_and_async(m: Metrics, reader: InMemoryMetricReader) -> None:
    h = m.register_histogram("job_seconds", "Job time", ["job"])

    @h.start_timer({"job": "sync"})
    def work(x: int) -> int:
        return x * 2

    @h.start_timer({"job": "async"})
    async def work_async(x: int) -> int:
        await asyncio.sleep(0)
        return x * 3

    assert work(2) == 4
    assert work(3) == 6
    assert asyncio.run(work_async(2)) == 6
    counts = {dict(k)["job"]: p.count for k, p in points(reader, "job_seconds").items()}
    assert counts == {"sync": 2, "async": 1}


def test_http_request_duration_is_the_catalogue_histogram(m: Metrics, reader: InMemoryMetricReader) -> None:
    end = m.http_request_duration.start_timer({"method": "GET", "path": "/api/tickets"})
    end()
    [p] = points(reader, "http_request_duration_seconds").values()
    assert {0.1, 0.5, 1.0, 2.0} <= set(p.explicit_bounds)


def test_same_shape_returns_the_same_metric(m: Metrics) -> None:
    first = m.register_counter("jobs", "Jobs", ["kind"])
    assert m.register_counter("jobs", "Jobs again", ("kind",)) is first
    h = m.register_histogram("lat", "Latency", [], buckets=[1, 2])
    assert m.register_histogram("lat", "Latency", [], buckets=(1.0, 2.0)) is h


@pytest.mark.parametrize(
    ("register", "message"),
    [
        (lambda m: m.register_gauge("jobs", "Jobs", ["kind"]), "already registered as a counter"),
        (lambda m: m.register_counter("jobs", "Jobs", ["other"]), "with labels \\['kind'\\]"),
        (lambda m: m.register_histogram("lat", "L", [], buckets=[1, 3]), "buckets \\[1.0, 2.0\\]"),
        (lambda m: m.register_counter("http_requests_total", "x", ["path"]), "already registered"),
    ],
)
def test_conflicting_shape_raises(m: Metrics, register: Any, message: str) -> None:
    m.register_counter("jobs", "Jobs", ["kind"])
    m.register_histogram("lat", "Latency", [], buckets=[1, 2])
    with pytest.raises(ValueError, match=message):
        register(m)


@pytest.mark.parametrize(
    ("name", "labels", "error"),
    [
        ("2fast", [], "invalid metric name"),
        ("has-dash", [], "invalid metric name"),
        ("", [], "invalid metric name"),
        ("ns:jobs", [], "invalid metric name"),  # Prometheus' recording rules' form; not an SDK name
        ("_private", [], "invalid metric name"),
        ("x" * 256, [], "invalid metric name"),
        ("ok", ["bad-label"], "invalid label name"),
        ("ok", ["__reserved"], "invalid label name"),
        ("ok", ["a", "a"], "duplicate label names"),
    ],
)
def test_invalid_names_are_rejected_at_registration(
    m: Metrics, name: str, labels: list[str], error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        m.register_counter(name, "d", labels)


def test_labels_as_a_string_are_rejected(m: Metrics) -> None:
    with pytest.raises(TypeError, match="list of names"):
        m.register_counter("ok", "d", "feature")


@pytest.mark.parametrize("buckets", [[], [1, 1], [2, 1]])
def test_bad_buckets_are_rejected(m: Metrics, buckets: list[float]) -> None:
    with pytest.raises(ValueError, match="increasing"):
        m.register_histogram("h", "d", [], buckets=buckets)


def test_wrong_labels_on_use_never_raise(
    m: Metrics, reader: InMemoryMetricReader, caplog: pytest.LogCaptureFixture
) -> None:
    c = m.register_counter("jobs", "Jobs", ["kind"])
    c.inc({"kind": "a", "extra": "dropped"})
    c.inc()
    c.inc({"kind": "a"}, value=-1)  # counters never go down
    c.inc({"kind": "b"})
    c.inc({"kind": "b"}, value=-2)
    # The wrong calls are dropped, never recorded under "" (issue 19 changed this).
    assert {k: p.value for k, p in points(reader, "jobs").items()} == {(("kind", "b"),): 1}
    assert caplog.text.count("metric jobs: expected labels ['kind'], given ['extra', 'kind']") == 1
    assert caplog.text.count("metric jobs: expected") == 1  # once per metric and kind of misuse
    assert caplog.text.count("a counter cannot decrease") == 1


@pytest.mark.parametrize(
    "call",
    [
        lambda c, h, g: c.inc({"kind": "a", "typo": "x"}),
        lambda c, h, g: c.inc({"knd": "a"}),
        lambda c, h, g: c.inc(),
        lambda c, h, g: c.inc(["a"]),
        lambda c, h, g: h.observe(0.5, {"op": "x"}),
        lambda c, h, g: h.observe(0.5),
        lambda c, h, g: g.set(3, {"kind": "a"}),
        lambda c, h, g: g.inc({"queue": "x", "more": "y"}),
        lambda c, h, g: g.dec(),
    ],
)
def test_wrong_labels_drop_the_measurement_and_name_metric_expected_given(
    m: Metrics, reader: InMemoryMetricReader, caplog: pytest.LogCaptureFixture, call: Any
) -> None:
    c = m.register_counter("jobs", "Jobs", ["kind"])
    h = m.register_histogram("took", "Time", ["kind"])
    g = m.register_gauge("depth", "Depth", ["queue"])
    with caplog.at_level(logging.WARNING, "cfk_otel"):
        call(c, h, g)
        call(c, h, g)
    for name in ("jobs", "took", "depth"):
        assert not points(reader, name)
    [record] = [r for r in caplog.records if "expected labels" in r.getMessage()]
    assert re.search(
        r"metric (jobs|took|depth): expected labels \['(kind|queue)'\], given ", record.getMessage()
    )
    assert record.getMessage().endswith("measurement dropped")


def test_wrong_labels_raise_in_strict_mode(m: Metrics, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("cfk_otel._metrics.catalogue.STRICT", True)
    c = m.register_counter("jobs", "Jobs", ["kind"])
    with pytest.raises(ValueError, match=r"metric 'jobs': expected labels \['kind'\], given \['kind', 'x'\]"):
        c.inc({"kind": "a", "x": "y"})
    with pytest.raises(ValueError, match="expected labels"):
        m.register_histogram("took", "Time", ["op"]).observe(1.0)
    with pytest.raises(ValueError, match="cannot decrease"):
        c.inc({"kind": "a"}, value=-1)
    c.inc({"kind": "a"})  # a right call still records


@pytest.mark.parametrize("label", ["le", "quantile"])
@pytest.mark.parametrize("kind", ["counter", "gauge", "histogram"])
def test_reserved_labels_are_refused_at_registration(m: Metrics, label: str, kind: str) -> None:
    register = getattr(m, f"register_{kind}")
    with pytest.raises(ValueError, match=f"label name '{label}' is reserved by Prometheus"):
        register("bad", "d", ["path", label])


def test_pair_gauges_never_go_below_zero(
    m: Metrics, reader: InMemoryMetricReader, caplog: pytest.LogCaptureFixture
) -> None:
    g = m.register_gauge("active_things", "Active", ["type"])
    with caplog.at_level(logging.WARNING, "cfk_otel"):
        g.finish({"type": "a"})  # no start
        g.inc({"type": "b"})
        g.finish({"type": "b"})
        g.finish({"type": "b"})
        g.finish({"type": "b"})
    assert {dict(k)["type"]: p.value for k, p in points(reader, "active_things").items()} == {"b": 0}
    assert caplog.text.count("finished more often than started; kept at 0") == 1


def test_label_sets_beyond_the_limit_share_one_overflow_series(
    m: Metrics, reader: InMemoryMetricReader, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("cfk_otel._metrics.catalogue.MAX_SERIES", 3)
    c = m.register_counter("ids", "Per id", ["id"])
    for i in range(10):
        c.inc({"id": str(i)})
    values = {dict(k)["id"]: p.value for k, p in points(reader, "ids").items()}
    assert values == {"0": 1, "1": 1, "2": 1, "overflow": 7}


def gauge_value(reader: InMemoryMetricReader, name: str) -> dict[tuple[tuple[str, Any], ...], float]:
    return {k: p.value for k, p in points(reader, name).items()}


def test_active_users_count_distinct_ids_for_five_minutes(m: Metrics) -> None:
    m.note_user("ann", now=1000.0)
    m.note_user("bob", now=1100.0)
    m.note_user("ann", now=1200.0)
    assert m.active_users(now=1250.0) == 2
    assert m.active_users(now=1450.0) == 1  # bob last seen 350 s before
    assert m.active_users(now=1600.0) == 0


class FakePool:
    def __init__(self, size: int, idle: int, maximum: int) -> None:
        self.size, self.idle, self.maximum, self.closing = size, idle, maximum, False

    def get_size(self) -> int:
        return self.size

    def get_idle_size(self) -> int:
        return self.idle

    def get_max_size(self) -> int:
        return self.maximum

    def is_closing(self) -> bool:
        return self.closing


def test_pool_gauges_sum_open_pools(m: Metrics, reader: InMemoryMetricReader) -> None:
    assert gauge_value(reader, "database_pool_connections") == {}
    first, second = FakePool(4, 1, 10), FakePool(2, 2, 5)
    m.track_pool(first)
    m.track_pool(second)
    assert gauge_value(reader, "database_pool_connections") == {
        (("state", "used"),): 3,
        (("state", "idle"),): 3,
    }
    assert gauge_value(reader, "database_pool_max_connections") == {(): 15}
    second.closing = True
    assert gauge_value(reader, "database_pool_max_connections") == {(): 10}


def test_process_memory_is_reported(reader: InMemoryMetricReader, m: Metrics) -> None:
    [rss] = gauge_value(reader, "process_resident_memory_bytes").values()
    assert rss > 10 * 1024 * 1024


VALUES = (0.0, 0.004, 0.005, 0.0051, 0.1, 1.0, 9.99, 10.0, 10.5, 2.0, 0.1, 1e-9)


def test_histograms_aggregate_as_the_sdk_does(m: Metrics, reader: InMemoryMetricReader) -> None:
    # Ours beside an SDK histogram with the same buckets, on the same provider and reader.
    ours = m.register_histogram("ours_seconds", "ours", ["k"], buckets=[0.005, 0.1, 1, 10])
    sdk = m._meter.create_histogram("sdk_seconds", explicit_bucket_boundaries_advisory=[0.005, 0.1, 1, 10])
    for value in VALUES:
        ours.observe(value, {"k": "v"})
        sdk.record(value, {"k": "v"})
    [mine] = points(reader, "ours_seconds").values()
    [theirs] = points(reader, "sdk_seconds").values()
    fields = ("count", "sum", "bucket_counts", "explicit_bounds", "min", "max", "attributes")
    assert {f: getattr(mine, f) for f in fields} == {f: getattr(theirs, f) for f in fields}
    assert tuple(mine.explicit_bounds) == (0.005, 0.1, 1, 10)
    assert tuple(mine.bucket_counts) == (4, 3, 1, 3, 1)  # (..0.005] (..0.1] (..1] (..10] (10..)


def test_histograms_follow_a_readers_delta_temporality() -> None:
    from opentelemetry.sdk.metrics import Histogram as SdkHistogram
    from opentelemetry.sdk.metrics.export import AggregationTemporality

    cumulative = MetricsReader()
    delta = MetricsReader(preferred_temporality={SdkHistogram: AggregationTemporality.DELTA})
    provider, metrics = registry(cumulative, delta)
    h = metrics.register_histogram("d_seconds", "d", [], buckets=[1])
    h.observe(0.5)
    h.observe(2)
    [first] = points(delta, "d_seconds").values()
    h.observe(0.25)
    [second] = points(delta, "d_seconds").values()
    [total] = points(cumulative, "d_seconds").values()
    assert (first.count, first.sum, tuple(first.bucket_counts)) == (2, 2.5, (1, 1))
    assert (second.count, second.sum, tuple(second.bucket_counts)) == (1, 0.25, (1, 0))
    assert second.start_time_unix_nano == first.time_unix_nano
    assert (total.count, total.sum, tuple(total.bucket_counts)) == (3, 2.75, (2, 1))
    provider.shutdown()


def test_counters_and_gauges_arrive_as_the_sdk_paths_instruments_would() -> None:
    # The SDK's counter and observable up-down counter, fed the same values, are the
    # reference (what ours are on the SDK path), in cumulative and delta readers.
    from opentelemetry.metrics import Observation

    # Ours are read as the SDK's synchronous counter and up-down counter would be.
    from opentelemetry.sdk.metrics import Counter, ObservableCounter, ObservableUpDownCounter, UpDownCounter
    from opentelemetry.sdk.metrics.export import AggregationTemporality

    delta = AggregationTemporality.DELTA
    delta_for = {
        ObservableCounter: delta,
        ObservableUpDownCounter: delta,
        Counter: delta,
        UpDownCounter: delta,
    }
    readers = {
        "cumulative": MetricsReader(),
        "delta": MetricsReader(preferred_temporality=delta_for),
    }
    provider, m = registry(*readers.values())
    counter = m.register_counter("c_total", "c", ["k"])
    gauge = m.register_gauge("g", "g", ["k"])
    expected: dict[str, dict[str, float]] = {"c_total": {}, "g": {}}

    def observe(name: str) -> Any:
        return lambda options: [Observation(v, {"k": k}) for k, v in expected[name].items()]

    meter = provider.get_meter("reference")
    # The SDK path's instruments: a synchronous counter, an observed gauge.
    sdk_counter = meter.create_counter("sdk_c_total")
    meter.create_observable_up_down_counter("sdk_g", callbacks=[observe("g")])

    def shapes(reader: InMemoryMetricReader) -> dict[str, tuple[object, ...]]:
        data = reader.get_metrics_data()  # one collection: a delta reader's counts reset
        assert data is not None
        found = {}
        for metric in (x for rm in data.resource_metrics for sm in rm.scope_metrics for x in sm.metrics):
            if metric.name not in ("c_total", "g", "sdk_c_total", "sdk_g"):
                continue
            values = {dict(p.attributes)["k"]: p.value for p in metric.data.data_points}
            if values:  # a metric without points is declared by ours, left out by the SDK's
                found[metric.name] = (metric.data.is_monotonic, metric.data.aggregation_temporality, values)
        return found

    steps: list[dict[str, Any]] = []
    for step in ({"a": (2.0, 5.0)}, {"a": (3.0, -4.0), "b": (1.0, 7.0)}, {}):
        for key, (add, level) in step.items():
            counter.inc({"k": key}, add)
            sdk_counter.add(add, {"k": key})
            gauge.set(expected["g"].get(key, 0.0) + level, {"k": key})
            expected["c_total"][key] = expected["c_total"].get(key, 0.0) + add
            expected["g"][key] = expected["g"].get(key, 0.0) + level
        for kind, reader in readers.items():
            found = shapes(reader)
            ours = (found.get("c_total"), found.get("g"))
            theirs = (found.get("sdk_c_total"), found.get("sdk_g"))
            assert ours == theirs, (kind, step)
            steps.append({"kind": kind, "ours": ours})
    deltas = [s["ours"][0] and s["ours"][0][2] for s in steps if s["kind"] == "delta"]
    # Nothing counted in the last step: as the SDK's counter, no delta points at all.
    assert deltas == [{"a": 2.0}, {"a": 3.0, "b": 1.0}, None]
    provider.shutdown()


def test_a_delta_counter_point_starts_where_the_last_one_ended() -> None:
    from opentelemetry.sdk.metrics import Counter
    from opentelemetry.sdk.metrics.export import AggregationTemporality

    reader = MetricsReader(preferred_temporality={Counter: AggregationTemporality.DELTA})
    provider, metrics = registry(reader)
    counter = metrics.register_counter("s_total", "s", [])
    counter.inc()
    [first] = points(reader, "s_total").values()
    counter.inc()
    [second] = points(reader, "s_total").values()
    assert second.start_time_unix_nano == first.time_unix_nano
    assert (first.value, second.value) == (1.0, 1.0)
    provider.shutdown()


@pytest.mark.parametrize("value", [-1.0, float("nan")])
def test_histograms_drop_what_the_sdk_drops(
    m: Metrics, reader: InMemoryMetricReader, value: float, caplog: pytest.LogCaptureFixture
) -> None:
    h = m.register_histogram("n_seconds", "n", [])
    h.observe(value)
    h.observe(value)
    h.observe(1.0)
    [p] = points(reader, "n_seconds").values()
    assert (p.count, p.sum) == (1, 1.0)
    assert caplog.text.count("non-negative") == 1


CATALOGUE = {
    "http_requests_total",
    "http_request_duration_seconds",
    "websocket_connections_active",
    "database_query_duration_seconds",
    "redis_operation_duration_seconds",
    "active_agents_count",
    "ticket_transitions_total",
    "errors_total",
}


def test_every_metric_is_in_the_first_collection(m: Metrics, reader: InMemoryMetricReader) -> None:
    m.register_counter("my_feature_usage", "Feature usage count", ["feature"])
    m.register_counter("jobs_done", "Jobs done")
    m.register_histogram("export_seconds", "Export time", [], buckets=[0.1, 1])
    data = reader.get_metrics_data()
    assert data is not None
    found = {
        metric.name: metric
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
    }
    assert CATALOGUE | {"my_feature_usage", "jobs_done", "export_seconds"} <= set(found)
    # Unlabelled: one series at 0, as prometheus_client shows them.
    for name in ("websocket_connections_active", "jobs_done"):
        [point] = found[name].data.data_points
        assert (dict(point.attributes), point.value) == ({}, 0)
    [hist] = found["export_seconds"].data.data_points
    assert (hist.count, hist.sum, list(hist.bucket_counts), hist.min, hist.max) == (0, 0, [0, 0, 0], 0, 0)
    # Labelled and unused: declared (name, description), without a series under made-up labels.
    for name in ("http_requests_total", "active_agents_count", "errors_total", "my_feature_usage"):
        assert list(found[name].data.data_points) == []
        assert found[name].description


def test_strict_mode_follows_cfk_otel_strict(monkeypatch: pytest.MonkeyPatch) -> None:
    """_sdk's start-up hands CFK_OTEL_STRICT to the metrics."""
    from cfk_otel import _settings
    from cfk_otel._bootstrap import setup as _sdk
    from cfk_otel._metrics import catalogue as _metrics

    monkeypatch.setattr(_metrics, "STRICT", False)
    monkeypatch.setattr(_sdk, "build_attributes", lambda settings: {})
    monkeypatch.setattr(_sdk._errors, "start", lambda settings: None)

    class Stop(Exception):
        pass

    def initialize(*args: object) -> None:
        raise Stop

    with pytest.raises(Stop):
        _sdk._initialize(initialize, _settings.load({"CFK_OTEL_STRICT": "true", "METRICS_ENABLED": "false"}))
    assert _metrics.STRICT is True
