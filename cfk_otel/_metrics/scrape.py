"""``/api/metrics``: the Prometheus scrape endpoint, summed across a process group's workers.

Two sources make one scrape, both through ``prometheus_client``'s public collector
interface: :class:`ScrapeReader` (our reader of the SDK's metrics, registered through the
configurator as the ``cfk_prometheus`` metric exporter) translates what SDK instruments
record into a ``prometheus_client`` registry that this module owns, and :class:`DirectCollector` reads
the metrics cfk_otel aggregates itself (:mod:`cfk_otel._metrics.catalogue`). With several workers
(``uvicorn --workers N``, gunicorn), each worker also writes its own exposition to a
shared directory every :data:`SHARE_INTERVAL` seconds, and whichever worker is scraped
sums its live numbers with the others' files: one scrape shows the whole app, with no
extra per-worker labels. Counters of workers that have exited keep counting (so totals
never go backwards); gauges only count live workers. The files are OpenMetrics text, so
they carry the histograms' exemplars; of a bucket's exemplars across workers the newest
is shown.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Final

from prometheus_client import CollectorRegistry
from prometheus_client import exposition as text_format
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Exemplar, Timestamp

from cfk_otel._asgi.http import respond
from cfk_otel._asgi.types import Receive, Scope, Send
from cfk_otel._core.seam import _native
from cfk_otel._guard import guard, warn_once

from . import catalogue as _metrics
from .reader import SdkReader, trace_id_first

_log = logging.getLogger("cfk_otel")

GROUP_ENV: Final = "CFK_OTEL_PROCESS_GROUP"
SHARE_INTERVAL: Final = 2.0
_RENDER: Final = guard("rendering /api/metrics", then="answering 500")


class ScrapeReader(SdkReader):
    """Our reader of the SDK's metrics, as the ``cfk_prometheus`` metric exporter entry point."""


def reader_arguments(registry: CollectorRegistry) -> dict[str, Any]:
    """The configurator's arguments for :class:`ScrapeReader`: the registry the scrape reads."""
    return {"registry": registry}


def join_process_group() -> None:
    """Mark this process as a group leader unless it inherited a group from its parent.

    Called once at start-up, before any worker is spawned or forked, so every worker
    inherits the leader's marker.
    """
    os.environ.setdefault(GROUP_ENV, f"{os.getpid()}-{os.urandom(4).hex()}")


def group_directory() -> Path | None:
    """The shared directory when this process is a worker of a group, else None."""
    group = os.environ.get(GROUP_ENV, "")
    leader = group.split("-", 1)[0]
    if not leader.isdigit() or int(leader) == os.getpid():
        return None
    return Path(tempfile.gettempdir()) / "cfk-otel-metrics" / group


Source = Callable[[], Iterable[_metrics.Direct]]
# OpenTelemetry units as the SDK's Prometheus reader names them (ours use seconds only).
_UNITS: Final = {"s": "seconds", "": ""}


class DirectCollector:
    """cfk_otel's own metrics as ``prometheus_client`` families, written as the SDK's
    Prometheus reader writes an SDK instrument's: label names sorted, bucket bounds as
    ``str()`` of each float, a non-monotonic sum as a gauge. A labelled metric nobody has
    used yet is its HELP and TYPE lines alone; an unlabelled one is at 0."""

    def __init__(self, source: Source) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        for metric in self._source():
            if not metric.reported_here:  # the SDK's reader has it in the registry
                continue
            unit = _UNITS.get(metric.unit, metric.unit)
            names = sorted(metric.labels)
            order = [metric.labels.index(n) for n in names]
            family: Metric
            if isinstance(metric, _metrics.Histogram):
                histogram = HistogramMetricFamily(metric.name, metric.description, labels=names, unit=unit)
                bounds = [*(str(b) for b in metric.buckets), "+Inf"]
                exemplars = metric.exemplars()  # the core's, for the workers' shared files
                for key, counts, total in metric.rows():
                    running = 0.0
                    buckets: list[tuple[str, float] | tuple[str, float, Exemplar]] = []
                    kept = dict(exemplars.get(key, ()))
                    for index, (bound, count) in enumerate(zip(bounds, counts, strict=True)):
                        running += count
                        exemplar = kept.get(index)
                        if exemplar is None:
                            buckets.append((bound, running))
                        else:
                            buckets.append((bound, running, _exemplar(exemplar)))
                    histogram.add_metric([key[i] for i in order], buckets, total)
                family = histogram
            else:
                kind = CounterMetricFamily if metric.monotonic else GaugeMetricFamily
                family = kind(metric.name, metric.description, labels=names, unit=unit)
                for key, value in metric.values():
                    family.add_metric([key[i] for i in order], value)
            yield family


def _exemplar(exemplar: Any) -> Exemplar:
    """An SDK exemplar (``opentelemetry.sdk.metrics.Exemplar``) as prometheus_client's."""
    seconds, nanoseconds = divmod(exemplar.time_unix_nano, 1_000_000_000)
    ids = {"trace_id": f"{exemplar.trace_id:032x}", "span_id": f"{exemplar.span_id:016x}"}
    return Exemplar(ids, exemplar.value, Timestamp(seconds, nanoseconds))


class _Both:
    """The registry's families, then ours."""

    def __init__(self, registry: CollectorRegistry, collector: DirectCollector) -> None:
        self._registry = registry
        self._collector = collector

    def collect(self) -> Iterator[Metric]:
        yield from self._registry.collect()
        yield from self._collector.collect()


class Scrape:
    """Renders the scrape body; in a worker group, also shares this worker's numbers.

    ``direct`` gives cfk_otel's own metrics (by default, those on the global meter provider).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        directory: Path | None = None,
        direct: Source = _metrics.global_direct,
    ) -> None:
        self._sdk = registry
        self._direct = direct
        self._registry: Any = _Both(registry, DirectCollector(direct))
        self._directory = directory
        self._stop = threading.Event()
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            self._file = directory / f"{os.getpid()}.prom"
            threading.Thread(target=self._share_forever, name="cfk-otel-metrics-share", daemon=True).start()

    def render(self, openmetrics_format: bool) -> tuple[bytes, str]:
        if self._directory is None:
            fast = self._render_native(openmetrics_format)
            if fast is not None:
                return fast
        source: Any = self._registry if self._directory is None else _Merged(self._registry, self._directory)
        if openmetrics_format:
            body = openmetrics.generate_latest(source)  # type: ignore[no-untyped-call]
            return trace_id_first(body), openmetrics.CONTENT_TYPE_LATEST
        return text_format.generate_latest(source), text_format.CONTENT_TYPE_LATEST

    def _render_native(self, openmetrics_format: bool) -> tuple[bytes, str] | None:
        """The registry's text, then the core's for our metrics (the same text the collector
        gives, written by the core in one call); None when one of ours is not in the core."""
        families = [metric.family for metric in self._direct()]
        if _native is None or any(f is None for f in families):
            return None
        ours = _native.render(families, openmetrics_format).encode()
        if openmetrics_format:
            theirs = trace_id_first(openmetrics.generate_latest(self._sdk))  # type: ignore[no-untyped-call]
            return theirs.removesuffix(b"# EOF\n") + ours + b"# EOF\n", openmetrics.CONTENT_TYPE_LATEST
        return text_format.generate_latest(self._sdk) + ours, text_format.CONTENT_TYPE_LATEST

    def share_now(self) -> None:
        if self._directory is None:
            return
        temporary = self._file.with_suffix(".tmp")
        # OpenMetrics: the Prometheus text format would leave the exemplars out.
        temporary.write_bytes(openmetrics.generate_latest(self._registry))  # type: ignore[no-untyped-call]
        temporary.replace(self._file)  # atomic: a reader never sees half a file

    def stop(self) -> None:
        self._stop.set()
        try:
            self.share_now()
        except OSError:
            _log.debug("cfk_otel: could not write the final metrics share", exc_info=True)

    def _share_forever(self) -> None:
        while not self._stop.wait(SHARE_INTERVAL):
            with guard("sharing this worker's metrics", then="tried again shortly"):
                self.share_now()


class _Merged:
    """A ``collect()``-able view summing this worker's registry and the others' files."""

    def __init__(self, registry: _Both, directory: Path) -> None:
        self._registry = registry
        self._directory = directory

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        totals: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        newest: dict[tuple[str, tuple[tuple[str, str], ...]], Exemplar] = {}
        own = f"{os.getpid()}.prom"
        sources: list[Iterable[Metric]] = [self._registry.collect()]
        for path in sorted(self._directory.glob("*.prom")):
            if path.name == own:
                continue
            try:
                text = path.read_text()
            except OSError:
                continue
            alive = _alive(path.stem)
            sources.append([f for f in _parse(text, path.name) if alive or f.type != "gauge"])
        for source in sources:
            for family in source:
                families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                sums = totals.setdefault(family.name, {})
                for sample in family.samples:
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    sums[key] = sums.get(key, 0.0) + sample.value
                    exemplar = sample.exemplar
                    if exemplar is not None:
                        seen = newest.get(key)
                        if seen is None or _when(exemplar) > _when(seen):
                            newest[key] = exemplar
        for name, family in families.items():
            for (sample_name, labels), value in totals[name].items():
                exemplar = newest.get((sample_name, labels))
                family.add_sample(sample_name, dict(labels), value, exemplar=exemplar)
            yield family


def _parse(text: str, name: str) -> list[Metric]:
    """A worker's shared file: OpenMetrics (ends with ``# EOF``), or the Prometheus text an
    earlier version wrote. A file that does not parse is left out of this scrape."""
    parse = parse_openmetrics if text.endswith("# EOF\n") else text_string_to_metric_families
    try:
        return list(parse(text))
    except ValueError:
        # Once: the scrape still answers with the other workers' numbers.
        warn_once("metrics share", "cfk_otel: a worker's metrics share (%s) does not parse; left out", name)
        return []


def _when(exemplar: Exemplar) -> float:
    return float(exemplar.timestamp) if exemplar.timestamp is not None else 0.0


def _alive(pid_text: str) -> bool:
    try:
        os.kill(int(pid_text), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


class MetricsEndpoint:
    """The ASGI app behind ``/api/metrics`` (optionally behind a bearer token)."""

    def __init__(self, scrape: Callable[[], Scrape | None], bearer_token: str | None = None) -> None:
        # Looked up per scrape: under gunicorn the SDK starts after the app is built.
        self._scrape = scrape
        self._expected = bearer_token.encode() if bearer_token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_headers = scope.get("headers") or ()
        if scope.get("method") not in ("GET", "HEAD"):
            await respond(send, 405, b"method not allowed\n", headers=[(b"allow", b"GET, HEAD")])
            return
        if self._expected is not None and not _authorized(raw_headers, self._expected):
            challenge = [(b"www-authenticate", b'Bearer realm="metrics"')]
            await respond(send, 401, b"unauthorized\n", headers=challenge)
            return
        wants_openmetrics = b"application/openmetrics-text" in dict(raw_headers).get(b"accept", b"")
        scrape = self._scrape()
        if scrape is None:
            await respond(send, 503, b"metrics are not configured (OTEL_SDK_DISABLED?)\n")
            return
        rendered = None
        with _RENDER:
            rendered = await asyncio.to_thread(scrape.render, wants_openmetrics)
        if rendered is None:
            await respond(send, 500, b"metrics unavailable\n")
            return
        body, content_type = rendered
        await respond(send, 200, body, content_type=content_type.encode(), head=scope.get("method") == "HEAD")


def _authorized(headers: Iterable[tuple[bytes, bytes]], token: bytes) -> bool:
    """One ``Authorization: Bearer <token>`` header, the scheme in any case (RFC 7235 2.1).

    More than one ``Authorization`` header is refused: which one a proxy or framework
    keeps differs, so no choice between them would be safe.
    """
    values = [value for name, value in headers if name.lower() == b"authorization"]
    if len(values) != 1:
        return False
    scheme, _, credentials = values[0].strip().partition(b" ")
    # Compared even when the scheme is wrong, so the time taken says nothing about the token.
    token_matches = hmac.compare_digest(credentials.lstrip(b" "), token)
    return scheme.lower() == b"bearer" and token_matches
