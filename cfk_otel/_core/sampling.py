"""Sampling that keeps every failed and every slow trace (``CFK_TRACES_KEEP_SLOWER_THAN``).

A head sampler decides when a trace starts, before anyone knows whether the request will
fail or be slow. With a ratio sampler (``traceidratio``, ``parentbased_traceidratio``, or
the ratio ``SENTRY_TRACES_SAMPLE_RATE`` implies), cfk_otel wraps it:

- :class:`KeepSampler` turns the ratio's "no" for a new trace into ``RECORD_ONLY``: the
  spans are recorded but not sampled (their ``traceparent`` says ``sampled=0``). A remote
  parent's flag is honoured as before (sampled: kept; not sampled: dropped), and so is a
  local parent that was dropped.
- :class:`Keeper` holds those spans per trace until the trace's local root (the request's
  server span) ends. The trace is then exported whole when the root failed (status ERROR:
  an unhandled exception or a 5xx) or took at least the threshold (not a websocket
  connection: its length is not latency); otherwise it is dropped. Bounded per trace
  (:data:`MAX_SPANS_PER_TRACE` spans, :data:`MAX_TRACE_BYTES` of estimated size) and in all
  (:data:`MAX_SPANS`, :data:`MAX_BYTES`; the oldest trace is let go first).
- :class:`KeepProcessor` is the SDK side: it wraps the processor the SDK's configurator
  builds for the exporter (``export_span_processor``) and forwards kept spans to it, as
  sampled copies. The compiled core's spans take the same :class:`Keeper` (``_core``).

Metrics, request lines and ``errors_total`` do not depend on any of this: they count
every request. :func:`kept` answers "was this trace exported?" for a span context, and
:func:`exemplar_ids` gives the ids a histogram's exemplar may carry: an exemplar names
only an exported trace.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.sdk.util import BoundedList
from opentelemetry.semconv.attributes.url_attributes import URL_SCHEME
from opentelemetry.trace import Link, SpanContext, SpanKind, StatusCode, TraceFlags, TraceState
from opentelemetry.util.types import Attributes

from cfk_otel import _settings

MAX_SPANS_PER_TRACE: Final = 256
MAX_SPANS: Final = 2048  # as many as the batch processor's queue
MAX_TRACE_BYTES: Final = 1 << 20
MAX_BYTES: Final = 8 << 20
SPAN_BYTES: Final = 512  # a held span's fixed part: its object, ids, times, name
_KEPT_REMEMBERED: Final = 1024  # trace ids of recently kept traces, for spans ending late
RATIO_SAMPLERS: Final = ("traceidratio", "parentbased_traceidratio")
_WEBSOCKET_SCHEMES: Final = frozenset({"ws", "wss"})

Sink = Callable[[Any], None]


class KeepSampler(Sampler):
    """Wraps a ratio sampler: its "no" for a new trace becomes "record, decide at the end".

    >>> KeepSampler(TraceIdRatioBased(0.1)).get_description()
    'KeepFailedAndSlow{TraceIdRatioBased{0.1}}'
    """

    def __init__(self, inner: Sampler) -> None:
        self._inner = inner

    def should_sample(
        self,
        parent_context: context_api.Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        result = self._inner.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )
        if result.decision is not Decision.DROP:
            return result
        parent = trace.get_current_span(parent_context)
        context = parent.get_span_context()
        if context.is_valid and (context.is_remote or not parent.is_recording()):
            return result  # the caller said "not sampled", or a local parent was dropped
        # The span's attributes, as a "yes" carries them (a "no" carries none).
        return SamplingResult(Decision.RECORD_ONLY, attributes, result.trace_state)

    def get_description(self) -> str:
        return f"KeepFailedAndSlow{{{self._inner.get_description()}}}"


class _Trace:
    """The spans held for one trace, and their estimated size."""

    __slots__ = ("size", "spans")

    def __init__(self) -> None:
        self.spans: list[tuple[Sink, Any]] = []
        self.size = 0


def estimate(attributes: Mapping[str, Any], events: Iterable[Mapping[str, Any]] = ()) -> int:
    """A span's size in bytes, roughly: a fixed part and its text (attribute and event values;
    an exception's stack trace is the large one)."""
    size = SPAN_BYTES
    for value in attributes.values():
        size += len(value) if type(value) is str else 16
    for event in events:
        size += SPAN_BYTES // 4
        for value in event.values():
            size += len(value) if type(value) is str else 16
    return size


class Keeper:
    """The spans of unsampled traces, held per trace until the local root ends."""

    def __init__(
        self,
        threshold: float,
        max_per_trace: int = MAX_SPANS_PER_TRACE,
        max_spans: int = MAX_SPANS,
        max_trace_bytes: int = MAX_TRACE_BYTES,
        max_bytes: int = MAX_BYTES,
    ) -> None:
        self.threshold_ns = int(threshold * 1e9)
        self._max_per_trace = max_per_trace
        self._max_spans = max_spans
        self._max_trace_bytes = max_trace_bytes
        self._max_bytes = max_bytes
        self._held: OrderedDict[int, _Trace] = OrderedDict()
        self._count = 0
        self._bytes = 0
        self._kept: OrderedDict[int, None] = OrderedDict()
        self._lock = threading.Lock()
        # Counters, for tests and the report: traces kept and dropped, spans let go early.
        self.kept_traces = 0
        self.dropped_traces = 0
        self.overflow = 0

    def held(self) -> int:
        """How many spans are held now."""
        return self._count

    def held_bytes(self) -> int:
        """Their estimated size (:func:`estimate`)."""
        return self._bytes

    def hold(self, trace_id: int, sink: Sink, span: Any, size: int) -> None:
        """Hold ``span`` (not a local root; ``size`` bytes by :func:`estimate`) until its
        trace's root ends; ``sink`` exports it."""
        with self._lock:
            if trace_id in self._kept:  # it ended after its root, whose trace was kept
                late = True
            else:
                late = False
                held = self._held.get(trace_id)
                if held is None:
                    held = self._held[trace_id] = _Trace()
                if len(held.spans) >= self._max_per_trace or held.size + size > self._max_trace_bytes:
                    self.overflow += 1
                    return
                held.spans.append((sink, span))
                held.size += size
                self._count += 1
                self._bytes += size
                while self._count > self._max_spans or self._bytes > self._max_bytes:
                    _, old = self._held.popitem(last=False)  # the oldest trace goes first
                    self._count -= len(old.spans)
                    self._bytes -= old.size
                    self.overflow += len(old.spans)
        if late:
            sink(span)

    def finish(self, trace_id: int, sink: Sink, root: Any, failed: bool, duration_ns: int) -> bool:
        """The local root ``root`` ended: export its trace when it failed or was slow."""
        keep = failed or duration_ns >= self.threshold_ns
        with self._lock:
            held = self._held.pop(trace_id, None)
            if held is not None:
                self._count -= len(held.spans)
                self._bytes -= held.size
            if keep:
                self.kept_traces += 1
                self._kept[trace_id] = None
                if len(self._kept) > _KEPT_REMEMBERED:
                    self._kept.popitem(last=False)
            else:
                self.dropped_traces += 1
        if keep:
            for span_sink, span in held.spans if held is not None else ():
                span_sink(span)
            sink(root)
        return keep

    def was_kept(self, trace_id: int) -> bool:
        return trace_id in self._kept


def _sampled_copy(span: ReadableSpan) -> ReadableSpan:
    """``span`` as the export processor takes it: the same span, its flags saying sampled."""
    old = span.context
    assert old is not None  # an SDK span always has one
    context = SpanContext(
        old.trace_id,
        old.span_id,
        old.is_remote,
        TraceFlags(old.trace_flags | TraceFlags.SAMPLED),
        old.trace_state,
    )
    attributes = BoundedAttributes(None, span.attributes, immutable=True)
    attributes.dropped = span.dropped_attributes
    events = BoundedList.from_seq(None, span.events)
    events.dropped = span.dropped_events
    links = BoundedList.from_seq(None, span.links)
    links.dropped = span.dropped_links
    return ReadableSpan(
        name=span.name,
        context=context,
        parent=span.parent,
        resource=span.resource,
        attributes=attributes,
        events=events,
        links=links,
        kind=span.kind,
        status=span.status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


class KeepProcessor(SpanProcessor):
    """The SDK's export processor, with the spans of unsampled traces held by the
    :class:`Keeper` and forwarded (as sampled copies) when their trace is kept."""

    def __init__(self, inner: SpanProcessor, keeper: Keeper) -> None:
        self._inner = inner
        self._keeper = keeper

    def on_start(self, span: Any, parent_context: context_api.Context | None = None) -> None:
        self._inner.on_start(span, parent_context=parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        context = span.context
        if context is None or context.trace_flags.sampled:
            self._inner.on_end(span)
            return
        parent = span.parent
        if parent is None or parent.is_remote:
            failed = span.status.status_code is StatusCode.ERROR
            duration = latency(span.attributes, (span.end_time or 0) - (span.start_time or 0))
            self._keeper.finish(context.trace_id, self._forward, span, failed, duration)
        else:
            size = estimate(span.attributes or {}, [e.attributes or {} for e in span.events])
            self._keeper.hold(context.trace_id, self._forward, span, size)

    def _forward(self, span: ReadableSpan) -> None:
        self._inner.on_end(_sampled_copy(span))

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


def latency(attributes: Mapping[str, Any] | None, duration_ns: int) -> int:
    """What a local root's duration says of its latency: nothing for a websocket
    connection (``url.scheme`` ws or wss), whose length is the session's, not a wait."""
    if attributes and attributes.get(URL_SCHEME) in _WEBSOCKET_SCHEMES:
        return 0
    return duration_ns


# The process's keeper, made by set-up when the bias is on (None otherwise).
KEEPER: Keeper | None = None
# Whether sampled spans go anywhere (set-up: False when OTEL_TRACES_EXPORTER is none).
EXPORTED = True
NO_IDS: Final = (0, 0)


def kept(context: SpanContext) -> bool:
    """Whether the trace of ``context`` was (or will be) exported: sampled at its head, or
    kept when its local root ended. Meaningful once that root has ended."""
    if context.trace_flags.sampled:
        return EXPORTED
    keeper = KEEPER
    return keeper is not None and keeper.was_kept(context.trace_id)


def exemplar_ids(context: SpanContext, ended: bool = True) -> tuple[int, int]:
    """``(trace_id, span_id)`` of ``context`` for a histogram's exemplar, or ``(0, 0)`` when
    its trace is not exported. ``ended``: the span's local root has ended (a request's
    server span), so a trace kept for failing or being slow counts; a span inside a
    request (a client call) only has its head decision to go by."""
    if context.trace_flags.sampled:  # the parts read only when needed: each is a property
        return (context.trace_id, context.span_id) if EXPORTED else NO_IDS
    keeper = KEEPER
    if ended and keeper is not None and keeper.was_kept(context.trace_id):
        return context.trace_id, context.span_id
    return NO_IDS


def ids_for_exemplar(trace_id: int, span_id: int, sampled: bool, ended: bool = True) -> tuple[int, int]:
    """:func:`exemplar_ids` of a span context's parts (a span whose context is not made yet)."""
    if sampled:
        return (trace_id, span_id) if EXPORTED else NO_IDS
    keeper = KEEPER
    if ended and keeper is not None and keeper.was_kept(trace_id):
        return trace_id, span_id
    return NO_IDS


class Head:
    """The decision of a head sampler :func:`head_sampler` built, made without the SDK's
    generic call (the request path's span start). The caller uses it only while the
    provider's sampler *is* :attr:`sampler`; for anything else it asks the sampler.

    It decides as the SDK's samplers do (``tests/test_sampling.py`` compares both over
    every kind of parent): with a ``parentbased_`` sampler, a valid parent's sampled flag
    decides (remote or local alike); otherwise the root: always, never, or the low 64 bits
    of the trace id under the ratio's bound. A "yes" carries the span's attributes, and
    either carries the valid parent's trace state.
    """

    __slots__ = ("_bound", "parent_based", "sampler")

    def __init__(self, sampler: Sampler, parent_based: bool, bound: int) -> None:
        self.sampler = sampler
        self.parent_based = parent_based  # a valid parent's flag decides
        self._bound = bound

    @property
    def bound(self) -> int:
        """A root is sampled when its trace id's low 64 bits are under this."""
        return self._bound

    def sample(self, parent: SpanContext | None, trace_id: int) -> bool:
        """Whether a span with ``parent`` (None: no valid parent) in ``trace_id`` is sampled."""
        if parent is not None and self.parent_based:
            return parent.trace_flags.sampled
        return trace_id & _TRACE_ID_LIMIT < self._bound


_TRACE_ID_LIMIT: Final = TraceIdRatioBased.TRACE_ID_LIMIT
# The process's head sampler as set-up built it, when it is one Head decides (None otherwise).
HEAD: Head | None = None


def _head(settings: _settings.Settings) -> Head:
    ratio = 1.0 if settings.sampler_arg is None else settings.sampler_arg
    name = settings.sampler.removeprefix("parentbased_")
    root: Sampler
    if name == "always_on":
        root, bound = ALWAYS_ON, _TRACE_ID_LIMIT + 1  # every masked id is under it
    elif name == "always_off":
        root, bound = ALWAYS_OFF, 0
    else:
        ratio_sampler = TraceIdRatioBased(ratio)
        root, bound = ratio_sampler, ratio_sampler.bound
    parent_based = settings.sampler.startswith("parentbased_")
    return Head(ParentBased(root) if parent_based else root, parent_based, bound)


def head_sampler(settings: _settings.Settings) -> Sampler:
    """The head sampler the settings name, built from the SDK's public samplers."""
    return _head(settings).sampler


def sdk_arguments(settings: _settings.Settings) -> dict[str, Any]:
    """The SDK configurator's keyword arguments: the head sampler the settings chose and,
    with a ratio sampler and the bias on, what keeps failed and slow traces whole (sets
    :data:`KEEPER`)."""
    global KEEPER, EXPORTED, HEAD  # noqa: PLW0603  (process state, written by set-up)
    KEEPER = HEAD = None
    EXPORTED = bool(settings.traces_exporters)
    head = _head(settings)
    inner = head.sampler
    if settings.keep_slower_than is None or settings.sampler not in RATIO_SAMPLERS:
        HEAD = head  # the provider's sampler is this very object (unless the app sets another)
        return {"sampler": inner}
    keeper = KEEPER = Keeper(settings.keep_slower_than)

    def export_span_processor(exporter: SpanExporter) -> SpanProcessor:
        return KeepProcessor(BatchSpanProcessor(exporter), keeper)

    return {"sampler": KeepSampler(inner), "export_span_processor": export_span_processor}
