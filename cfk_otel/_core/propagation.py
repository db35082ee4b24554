"""W3C Trace Context as the current specification reads it (issue 24 point 4).

The stock ``tracecontext`` propagator passes 36 of the 41 tests of the W3C's own harness.
What it gets wrong, each from the specification's text (w3c/trace-context, spec/):

- two ``traceparent`` headers: it takes the first. The field is a single value
  (RFC 9110 section 5.3): two are invalid, and the request starts a new trace.
- a ``tracestate`` with a duplicated key: it drops the whole header. "Vendors MAY also
  discard duplicate keys": the first is kept, the rest of the header too.
- keys: ``key = ( lcalpha / DIGIT ) 0*255 ( keychar )`` with ``@`` among the key
  characters, up to 256 characters in all; the stock grammar is the older one (a tenant
  of at most 241 characters, one ``@``, a vendor of at most 14), which refuses
  ``foo@``, ``foo@bar@baz`` or a 242-character tenant, and drops the whole header for them.

:class:`W3CTraceContextPropagator` reads ``traceparent`` through the stock propagator (one
value only) and ``tracestate`` itself, into a :class:`W3CTraceState` that keeps the
current grammar's keys; injecting is the stock propagator's. Set-up registers it where
``OTEL_PROPAGATORS`` names ``tracecontext`` (the default, ``tracecontext,baggage``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import ItemsView, Iterator, KeysView, Sequence, ValuesView
from importlib.metadata import entry_points
from typing import Final

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import (
    CarrierT,
    Getter,
    Setter,
    TextMapPropagator,
    default_getter,
    default_setter,
)
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from cfk_otel._guard import guard

_log = logging.getLogger("cfk_otel")
MAX_MEMBERS: Final = 32
MAX_LENGTH: Final = 8192  # of all tracestate fields together, as the stock propagator bounds it
_KEY: Final = r"[a-z0-9][_0-9a-z\-*/@]{0,255}"
_VALUE: Final = r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
_KEY_RE: Final = re.compile(_KEY)
_VALUE_RE: Final = re.compile(_VALUE)
_MEMBER_RE: Final = re.compile(f"({_KEY})=({_VALUE})")


def _valid(key: str, value: str) -> bool:
    return bool(_KEY_RE.fullmatch(key) and _VALUE_RE.fullmatch(value))


class W3CTraceState(TraceState):
    """A ``TraceState`` whose keys follow the specification's current grammar.

    >>> W3CTraceState([("tenant@vendor@x", "1"), ("z" * 256, "2")]).to_header()[:18]
    'tenant@vendor@x=1,'
    """

    def __init__(self, entries: Sequence[tuple[str, str]] | None = None) -> None:
        super().__init__()  # empty: this class keeps its members itself
        self._members: dict[str, str] = {}
        if entries is None:
            return
        if len(entries) > MAX_MEMBERS:
            return
        for key, value in entries:
            if _valid(key, value):
                self._members.setdefault(key, value)  # a duplicate: the first is kept

    def __contains__(self, item: object) -> bool:
        return item in self._members

    def __getitem__(self, key: str) -> str:
        return self._members[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def __repr__(self) -> str:
        pairs = [f"{{key={key}, value={value}}}" for key, value in self._members.items()]
        return str(pairs)

    def keys(self) -> KeysView[str]:
        return self._members.keys()

    def items(self) -> ItemsView[str, str]:
        return self._members.items()

    def values(self) -> ValuesView[str]:
        return self._members.values()

    def add(self, key: str, value: str) -> TraceState:
        if key in self._members or len(self._members) >= MAX_MEMBERS or not _valid(key, value):
            return self
        return W3CTraceState([(key, value), *self._members.items()])

    def update(self, key: str, value: str) -> TraceState:
        if not _valid(key, value) or (key not in self._members and len(self._members) >= MAX_MEMBERS):
            return self
        rest = [(k, v) for k, v in self._members.items() if k != key]
        return W3CTraceState([(key, value), *rest])  # a modified member moves to the left

    def delete(self, key: str) -> TraceState:
        if key not in self._members:
            return self
        return W3CTraceState([(k, v) for k, v in self._members.items() if k != key])

    def to_header(self) -> str:
        return ",".join(f"{key}={value}" for key, value in self._members.items())

    @classmethod
    def from_header(cls, header_list: list[str]) -> TraceState:
        """The ``tracestate`` fields, combined (RFC 9110 section 5.3); empty when one member
        is not ``key=value`` by the grammar, or when there are more than 32."""
        pairs: list[tuple[str, str]] = []
        if sum(len(h) for h in header_list) + len(header_list) - 1 > MAX_LENGTH:
            return cls()
        for header in header_list:
            for raw in header.split(","):
                member = raw.strip(" \t")  # optional whitespace (RFC 9110 section 5.6.3)
                if not member:
                    continue  # empty members are allowed
                match = _MEMBER_RE.fullmatch(member)
                if match is None:
                    return cls()
                pairs.append((match.group(1), match.group(2)))
        return cls(pairs)


class W3CTraceContextPropagator(TextMapPropagator):
    """``traceparent`` and ``tracestate`` as the current W3C specification reads them.

    >>> from opentelemetry import trace
    >>> headers = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    ...            "tracestate": "t61@dt=1,congo=a,congo=b"}
    >>> context = W3CTraceContextPropagator().extract(headers)
    >>> trace.get_current_span(context).get_span_context().trace_state.to_header()
    't61@dt=1,congo=a'
    """

    def __init__(self) -> None:
        self._stock = TraceContextTextMapPropagator()

    def extract(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        getter: Getter[CarrierT] = default_getter,
    ) -> Context:
        if context is None:
            context = Context()
        traceparent = getter.get(carrier, "traceparent")
        if not traceparent or len(traceparent) != 1:
            return context  # none, or more than one: a new trace
        parent = trace.get_current_span(self._stock.extract({"traceparent": traceparent[0]}))
        found = parent.get_span_context()
        if not found.is_valid:
            return context
        tracestate = getter.get(carrier, "tracestate")
        span_context = SpanContext(
            found.trace_id,
            found.span_id,
            is_remote=True,
            trace_flags=found.trace_flags,
            trace_state=W3CTraceState.from_header(list(tracestate)) if tracestate else None,
        )
        return trace.set_span_in_context(NonRecordingSpan(span_context), context)

    def inject(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        setter: Setter[CarrierT] = default_setter,
    ) -> None:
        self._stock.inject(carrier, context, setter)

    @property
    def fields(self) -> set[str]:
        return self._stock.fields


def install(names: Sequence[str]) -> bool:
    """Make :class:`W3CTraceContextPropagator` the global ``tracecontext`` propagator.

    ``OTEL_PROPAGATORS`` is read by the API when ``opentelemetry.propagate`` is first
    imported, before any distro runs: the global propagator is set again here, from the
    same names, ours standing for ``tracecontext``. False (nothing changed) when the
    variable does not name it, or a name cannot be loaded.
    """
    if "tracecontext" not in names:
        return False
    propagators: list[TextMapPropagator] = []
    for name in names:
        if name == "tracecontext":
            propagators.append(W3CTraceContextPropagator())
            continue
        if name == "none":
            continue
        found = list(entry_points(group="opentelemetry_propagator", name=name))
        if not found:
            return False  # the API said so already when it read the variable
        loaded = None
        with guard(f"loading the propagator {name!r}", then="propagators left as they are"):
            loaded = found[0].load()()
        if loaded is None:
            return False
        propagators.append(loaded)
    propagate.set_global_textmap(CompositePropagator(propagators))
    return True
