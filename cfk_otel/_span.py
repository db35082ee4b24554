"""Our spans (the request's, and asyncpg's and redis's), kept lean when nothing but
our exporter would see them.

The SDK's span is built for every possible processor: a lock, bounded and cleaned
attributes, a ``ReadableSpan`` copy at the end, and the processor fan-out. Per request
that is about 60 µs on this project's benchmark machine, most of the telemetry budget.

When the tracer provider's only span processor is our OTLP/HTTP one (or it has none),
nobody else can observe our spans, so :class:`Spans` starts a :class:`LeanSpan`
instead: the same trace and span ids (the provider's id generator),
the same sampling decision (the provider's sampler, called as the SDK calls it), the
same span limits for anything the app adds, encoded to OTLP bytes when it ends and
queued on the same batch processor. The app's own spans are ordinary SDK spans,
parented through the context as usual.

Any other set-up (a console exporter, a processor added by the app or a vendor SDK,
tracer configurators, the SDK's own tracer metrics) gets the SDK's span, unchanged.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Mapping
from typing import Any, Final

from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.trace import sampling as sdk_sampling
from opentelemetry.sdk.trace._tracer_metrics import NoOpTracerMetrics
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util import types

from . import _otlp
from ._version import __version__

_log = logging.getLogger("cfk_otel")
_UNSET: Final = Status(StatusCode.UNSET)
# Trace flags by (sampled, random trace id): four values, built once.
_FLAGS: Final = {
    (sampled, random): TraceFlags(
        (TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
        | (TraceFlags.RANDOM_TRACE_ID if random else 0)
    )
    for sampled in (False, True)
    for random in (False, True)
}


class LeanSpan(trace.Span):
    """A span that is encoded when it ends (see the module docstring).

    It reads like an SDK ``ReadableSpan`` to the encoder (``context``, ``parent``,
    ``attributes``, ``events``...); the app sees the API ``Span`` it asked for.
    """

    __slots__ = (
        "_end_time",
        "_extra",
        "_home",
        "_own",
        "context",
        "dropped_events",
        "dropped_links",
        "events",
        "kind",
        "links",
        "name",
        "parent",
        "start_time",
        "status",
    )
    # The encoder reads an SDK span's attributes from ``_attributes``; a lean span's
    # come from the ``attributes`` property.
    _attributes: Final = None

    def __init__(
        self,
        home: Spans,
        name: str,
        kind: SpanKind,
        context: SpanContext,
        parent: SpanContext | None,
        attributes: dict[str, Any],
    ) -> None:
        self._home = home
        self.name = name
        self.kind = kind
        self.context = context
        self.parent = parent
        # Ours (set by cfk_otel: known keys, plain values; the span owns the dict) and
        # the app's, kept apart: only the app's need the SDK's cleaning and limits.
        self._own = attributes
        self._extra: BoundedAttributes | None = None
        # Most spans have neither: a list is made for the first one.
        self.events: list[sdk_trace.Event] | tuple[()] = ()
        self.links: list[Link] | tuple[()] = ()
        self.dropped_events = 0
        self.dropped_links = 0
        self.status = _UNSET
        self.start_time = time.time_ns()
        self._end_time: int | None = None

    # ReadableSpan's view, for the encoder.
    @property
    def end_time(self) -> int | None:
        return self._end_time

    @property
    def attributes(self) -> Mapping[str, Any]:
        return self._own if self._extra is None else self._merged()[0]

    @property
    def dropped_attributes(self) -> int:
        return 0 if self._extra is None else self._merged()[1]

    def _merged(self) -> tuple[dict[str, Any], int]:
        # Ours first, then the app's while the span's attribute limit allows.
        assert self._extra is not None
        merged = dict(self._own)
        limit = self._home.limits.max_span_attributes
        dropped = self._extra.dropped
        for key, value in self._extra._dict.items():
            if key in merged or limit is None or len(merged) < limit:
                merged[key] = value
            else:
                dropped += 1
        return merged, dropped

    # The API.
    def get_span_context(self) -> SpanContext:
        return self.context

    def is_recording(self) -> bool:
        return self._end_time is None

    def set_own(self, attributes: dict[str, Any]) -> None:
        """cfk_otel's own attributes: fixed keys, values already of OTLP types."""
        if self._end_time is None:
            limit = self._home.limits.max_attribute_length
            self._own.update(attributes if limit is None else _cut(attributes, limit))

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
        bounded = _bounded(limits.max_event_attributes, attributes, limits)
        event = sdk_trace.Event(name, bounded, timestamp or time.time_ns())
        if self.events:
            self.events.append(event)
        else:
            self.events = [event]

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        if self._end_time is not None or not (context.is_valid or attributes):
            return
        limits = self._home.limits
        if limits.max_links is not None and len(self.links) >= limits.max_links:
            self.dropped_links += 1
            return
        link = Link(context, _bounded(limits.max_link_attributes, attributes, limits))
        if self.links:
            self.links.append(link)
        else:
            self.links = [link]

    def update_name(self, name: str) -> None:
        if self._end_time is None:
            self.name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        # As the SDK: OK is final, UNSET is ignored, a description only goes with ERROR.
        if self._end_time is not None or self.status.status_code is StatusCode.OK:
            return
        if isinstance(status, Status):
            if status.status_code is not StatusCode.UNSET:
                self.status = status
        elif status is not StatusCode.UNSET:
            self.status = Status(status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        module = type(exception).__module__
        qualname = type(exception).__qualname__
        event: dict[str, types.AnyValue] = {
            "exception.type": f"{module}.{qualname}" if module and module != "builtins" else qualname,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            event.update(attributes)
        self.add_event("exception", event, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            _log.warning("Calling end() on an ended span.")
            return
        self._end_time = end_time if end_time is not None else time.time_ns()
        if self.context.trace_flags.sampled:
            self._home.export(self)

    def __repr__(self) -> str:
        return f"LeanSpan(name={self.name!r}, kind={self.kind!r}, context={self.context!r})"


def _static(sampler: object) -> tuple[Decision, ...] | None:
    """The decisions of a ``ParentBased`` sampler whose delegates all decide alike for
    every span, as (root, remote sampled, remote not sampled, local sampled, local not
    sampled); None for any other sampler. Private SDK attributes, read once per provider;
    tests/test_span.py compares the outcome with the sampler's own for every parent."""
    if type(sampler) is not sdk_sampling.ParentBased:
        return None
    delegates = (
        sampler._root,
        sampler._remote_parent_sampled,
        sampler._remote_parent_not_sampled,
        sampler._local_parent_sampled,
        sampler._local_parent_not_sampled,
    )
    static = [d for d in delegates if type(d) is sdk_sampling.StaticSampler]
    if len(static) != len(delegates):
        return None
    return tuple(d._decision for d in static)


def _cut(attributes: Mapping[str, Any], limit: int) -> dict[str, Any]:
    """Our own attributes with text values cut to the span limit's length, as the SDK cuts."""
    return {k: v[:limit] if isinstance(v, str) else v for k, v in attributes.items()}


def _bounded(
    count: int | None, attributes: types.Attributes, limits: sdk_trace.SpanLimits
) -> BoundedAttributes:
    """An event's or link's attributes, cleaned and bounded as the SDK does."""
    return BoundedAttributes(count, attributes, max_value_len=limits.max_attribute_length, immutable=True)


class Spans:
    """Starts cfk_otel's spans: lean where they can be, the SDK's otherwise."""

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self._fixed_provider = tracer_provider
        self._warned = False
        # What the lean path was last decided for: the provider and its processor tuple
        # (the SDK replaces the tuple when a processor is added).
        self._seen: tuple[object, object] | None = None
        self._tracer: trace.Tracer | None = None
        self._lean: sdk_trace.Tracer | None = None
        self._processor: _otlp.OtlpHttpSpanProcessor | None = None
        self.limits = sdk_trace.SpanLimits()
        self._resource: Any = None
        self._scope: Any = None
        self._prefix: bytes | None = None
        # The sampler, and its decisions when it is the SDK's default kind (see _static).
        self._sampler: object = None
        self._decisions: tuple[Decision, ...] | None = None

    def start(
        self,
        name: str,
        parent: context_api.Context | None,
        kind: SpanKind = SpanKind.SERVER,
        attributes: dict[str, Any] | None = None,
    ) -> trace.Span:
        """Start a span named ``name`` whose parent is found in ``parent`` (None: the
        current context). ``attributes`` are cfk_otel's own: plain OTLP values."""
        try:
            provider = self._fixed_provider or trace.get_tracer_provider()
            active = getattr(provider, "_active_span_processor", None)
            processors = getattr(active, "_span_processors", None)
            if self._seen is None or self._seen[0] is not provider or self._seen[1] is not processors:
                self._choose(provider, processors)
            lean = self._lean
            if lean is None:
                assert self._tracer is not None
                return self._tracer.start_span(name, context=parent, kind=kind, attributes=attributes)
            return self._start_lean(lean, name, parent, kind, attributes)
        except Exception:  # a failing sampler or id generator: the call goes on, untraced
            if not self._warned:
                self._warned = True
                _log.warning("cfk_otel: a span could not be started; continuing without it", exc_info=True)
            return trace.INVALID_SPAN

    def _choose(self, provider: trace.TracerProvider, processors: object) -> None:
        self._seen = (provider, processors)
        self._tracer = provider.get_tracer("cfk_otel", __version__)
        self._lean = None
        tracer = self._tracer
        if not (
            isinstance(tracer, sdk_trace.Tracer)
            and tracer._is_enabled()
            and type(tracer._tracer_metrics) is NoOpTracerMetrics
            and isinstance(processors, tuple)
            and (
                not processors
                or (len(processors) == 1 and type(processors[0]) is _otlp.OtlpHttpSpanProcessor)
            )
        ):
            return
        self._lean = tracer
        self._processor = processors[0] if processors else None
        self.limits = tracer._span_limits
        self._resource = tracer.resource
        self._scope = tracer._instrumentation_scope
        self._sampler = tracer.sampler
        self._decisions = _static(tracer.sampler)
        # Our spans' (resource, scope), named once: each is then queued as plain bytes.
        self._prefix = self._processor.groups.prefix(self._resource, self._scope) if self._processor else None

    def _start_lean(
        self,
        tracer: sdk_trace.Tracer,
        name: str,
        parent: context_api.Context | None,
        kind: SpanKind,
        attributes: dict[str, Any] | None,
    ) -> trace.Span:
        # Tracer.start_span of SDK 1.45, step by step (tests/test_span.py compares the two).
        parent_context: SpanContext | None = trace.get_current_span(parent).get_span_context()
        ids = tracer.id_generator
        if parent_context is None or not parent_context.is_valid:
            parent_context = None
            trace_id = ids.generate_trace_id()
            random_trace_id = ids.is_trace_id_random()
        else:
            trace_id = parent_context.trace_id
            random_trace_id = parent_context.trace_flags.random_trace_id
        sampler = tracer.sampler
        decisions = self._decisions
        if decisions is not None and sampler is self._sampler:
            # ParentBased over static samplers (the SDK's default, ParentBased(ALWAYS_ON)):
            # the decision its should_sample would return, without the call.
            if parent_context is None:
                decision = decisions[0]
                trace_state = None
            else:
                flags_sampled = parent_context.trace_flags.sampled
                decision = decisions[(2 if parent_context.is_remote else 4) - flags_sampled]
                trace_state = parent_context.trace_state
            sampled: dict[str, Any] = attributes if attributes is not None else {}
        else:
            result = sampler.should_sample(parent, trace_id, name, kind, attributes, ())
            decision, trace_state, sampled = result.decision, result.trace_state, dict(result.attributes)
        span_context = SpanContext(
            trace_id,
            ids.generate_span_id(),
            is_remote=False,
            trace_flags=_FLAGS[decision is Decision.RECORD_AND_SAMPLE, bool(random_trace_id)],
            trace_state=trace_state,
        )
        if decision is Decision.DROP:
            return trace.NonRecordingSpan(span_context)
        limit = self.limits.max_attribute_length
        return LeanSpan(
            self, name, kind, span_context, parent_context, sampled if limit is None else _cut(sampled, limit)
        )

    def export(self, span: LeanSpan) -> None:
        processor = self._processor
        if processor is None:
            return
        prefix = self._prefix
        try:
            data = _otlp.encode_span(span, prefix or b"")  # type: ignore[arg-type]  # a ReadableSpan to the encoder
        except Exception:  # never into the app; the span alone is lost
            _log.warning("cfk_otel: span %r could not be encoded; dropped", span.name, exc_info=True)
            return
        processor.emit_encoded(self._resource, self._scope, data, named=prefix is not None)
