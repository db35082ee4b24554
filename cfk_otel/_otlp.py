"""OTLP protobuf, written straight to bytes for the span and log-record exporters.

The upstream encoder builds one protobuf object per span, attribute and value, and
serialises the tree afterwards: about 85 µs per server span on this project's benchmark
machine, paid by the exporter thread on the same core as the app. Here each message is
written as wire bytes in one pass (about a tenth of that), with the bytes of attribute
keys and of repeated string attributes (method, route, scheme...) cached.

Only the encoding changes. The SDK still builds the exporter from the standard variables
(endpoint, headers, TLS, compression, timeout) and its HTTP client still sends, retries
and backs off; :func:`span_processor` and :func:`log_processor` are the factories the SDK
configurator calls with that exporter. Other exporters (console, gRPC) are left as
they are. ``tests/test_otlp.py`` checks that every message decodes equal to the upstream
encoding.

Wire format: https://protobuf.dev/programming-guides/encoding/ and the OTLP ``.proto``
files (field numbers noted beside each tag below).
"""

from __future__ import annotations

import gc
import logging
import os
import struct
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, NamedTuple

from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as _HttpLogExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as _HttpSpanExporter
from opentelemetry.sdk._logs import LogRecordProcessor, ReadableLogRecord, ReadWriteLogRecord
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, LogRecordExporter, LogRecordExportResult
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext

_log = logging.getLogger("cfk_otel")

_SMALL: Final = tuple(bytes((i,)) for i in range(128))
_INT64_MIN: Final = -(1 << 63)
_INT64_MAX: Final = (1 << 63) - 1
_U64: Final = (1 << 64) - 1
_fixed64 = struct.Struct("<Q").pack
_fixed32 = struct.Struct("<I").pack
_double = struct.Struct("<d").pack

# Span.flags: the parent's remoteness is always known to the SDK (as upstream encodes it).
_HAS_IS_REMOTE: Final = 0x100
_IS_REMOTE: Final = 0x200
_CACHE_LIMIT: Final = 4096  # entries per cache; a full cache is emptied, never grown
# Values the string cache never keeps: one per request (paths, queries, user agents),
# they would only push out the values that repeat, and 4096 8 KB paths are 64 MiB.
_UNCACHED_KEYS: Final = frozenset({"url.path", "path", "url.query", "url.full", "user_agent.original"})
_CACHED_LENGTH: Final = 256  # nor any longer text: what repeats is short
_NO_LIMIT: Final = 1 << 62
TRUNCATED: Final = "…[truncated {} chars]"
# A log record's ceiling in encoded bytes: far below what log backends take (Loki and
# CloudWatch Logs 256 KB, Datadog 1 MB), far above an ordinary record (a few hundred).
RECORD_MAX_BYTES: Final = 64 << 10
_NO_RESOURCE: Final = Resource.create({})


def cut(value: str, limit: int) -> str:
    """``value`` cut to ``limit`` characters, with a marker saying how many went.

    >>> cut("abcdef", 3)
    'abc…[truncated 3 chars]'
    """
    if len(value) <= limit:
        return value
    return value[:limit] + TRUNCATED.format(len(value) - limit)


class _Limits:
    """Text attribute values are cut at these lengths (``OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT``,
    ``OTEL_LOGRECORD_ATTRIBUTE_VALUE_LENGTH_LIMIT``); set by :func:`set_value_limits`."""

    span = 8192
    log = 8192
    cached = _CACHED_LENGTH  # the longest value the cache keeps: never one that is cut


def set_value_limits(span: int, log: int) -> None:
    """Set once by the SDK set-up from the settings (tests set and restore it)."""
    _Limits.span, _Limits.log = span, log
    _Limits.cached = min(_CACHED_LENGTH, span, log)
    _strings.clear()


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _SMALL[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _text(value: str) -> bytes:
    """A length-prefixed UTF-8 string (a lone surrogate becomes "?", not a failed batch)."""
    raw = value.encode("utf-8", "replace")
    return _varint(len(raw)) + raw


def _message(payload: bytes) -> bytes:
    return _varint(len(payload)) + payload


_keys: dict[str, bytes] = {}  # attribute key -> KeyValue.key field (1), tag included
# (key, value) -> length-prefixed KeyValue, for strings and small ints (never bools: the
# type is checked before any lookup, so (k, True) and (k, 1) cannot meet).
_strings: dict[tuple[str, object], bytes] = {}


def _key(key: str) -> bytes:
    encoded = _keys.get(key)
    if encoded is None:
        if len(_keys) >= _CACHE_LIMIT:
            _keys.clear()
        encoded = _keys[key] = b"\x0a" + _text(key)
    return encoded


def _any(value: object, limit: int = _NO_LIMIT) -> bytes:
    """The AnyValue message's payload for an attribute value or log body, its text cut
    at ``limit`` characters."""
    kind = type(value)
    if kind is str:
        if len(value) > limit:  # type: ignore[arg-type]
            value = cut(value, limit)  # type: ignore[arg-type]
        return b"\x0a" + _text(value)  # type: ignore[arg-type]  # string_value = 1
    if kind is bool:
        return b"\x10\x01" if value else b"\x10\x00"  # bool_value = 2
    if kind is int:
        return b"\x18" + _int64(value)  # type: ignore[arg-type]  # int_value = 3
    if kind is float:
        return b"\x21" + _double(value)  # double_value = 4
    return _any_other(value, limit)


def _any_other(value: object, limit: int) -> bytes:
    # None, subclasses (enums, str-based constants...) and containers.
    if value is None:
        return b""
    for base in (bool, str, int, float):  # bool before int: it is one
        if isinstance(value, base):
            return _any(base(value), limit)
    if isinstance(value, bytes | bytearray):
        return b"\x3a" + _message(bytes(value))  # bytes_value = 7
    if isinstance(value, Sequence):  # array_value = 5 (ArrayValue.values = 1)
        return b"\x2a" + _message(b"".join(b"\x0a" + _message(_any(item, limit)) for item in value))
    if isinstance(value, Mapping):  # kvlist_value = 6 (KeyValueList.values = 1)
        return b"\x32" + _message(b"".join(b"\x0a" + _key_value(str(k), v, limit) for k, v in value.items()))
    raise TypeError(f"cannot encode a {type(value).__name__} as an OTLP value")


def _int64(value: int) -> bytes:
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(f"{value} is outside the int64 range of OTLP")
    return _varint(value & _U64)


def _key_value(key: str, value: object, limit: int = _NO_LIMIT) -> bytes:
    """A length-prefixed KeyValue message, its text cut at ``limit`` characters."""
    kind = type(value)
    if kind is str:
        if key in _UNCACHED_KEYS or len(value) > _Limits.cached:  # type: ignore[arg-type]
            return _text_key_value(key, cut(value, limit))  # type: ignore[arg-type]
    elif not (kind is int and -1024 < value < 65536):  # type: ignore[operator]  # statuses, ports
        return _message(_key(key) + b"\x12" + _message(_any(value, limit)))
    cache_key = (key, value)
    encoded = _strings.get(cache_key)
    if encoded is None:
        if len(_strings) >= _CACHE_LIMIT:
            _strings.clear()
        encoded = _strings[cache_key] = _message(_key(key) + b"\x12" + _message(_any(value)))
    return encoded


def _text_key_value(key: str, value: str) -> bytes:
    """:func:`_key_value` for a text value it does not cache: the same bytes, in one
    join for the short values that are most of them (a path, a user agent)."""
    raw = value.encode("utf-8", "replace")
    size = len(raw)
    field = _keys.get(key) or _key(key)
    total = len(field) + size + 4  # KeyValue: key = 1, value = 2 (AnyValue: string_value = 1)
    if total < 0x80:
        return b"".join((_SMALL[total], field, b"\x12", _SMALL[size + 2], b"\x0a", _SMALL[size], raw))
    return _message(field + b"\x12" + _message(b"\x0a" + _varint(size) + raw))


def _attributes(
    tag: bytes, attributes: Mapping[str, object] | None, parts: list[bytes], limit: int = _NO_LIMIT
) -> None:
    if not attributes:
        return
    # The SDK's BoundedAttributes keeps a plain dict; iterating it directly skips a lock
    # and a method call per key (the span or record has ended: nothing writes to it).
    plain: Mapping[str, object] = getattr(attributes, "_dict", attributes)
    strings = _strings
    for key, value in plain.items():
        kind = type(value)
        if kind is str and key in _UNCACHED_KEYS:  # one per request: no lookup (nor hash of it)
            text: str = value if len(value) <= limit else cut(value, limit)  # type: ignore[arg-type, assignment]
            parts += (tag, _text_key_value(key, text))
            continue
        if kind is str or kind is int:
            encoded = strings.get((key, value))
            if encoded is not None:
                parts += (tag, encoded)
                continue
        try:
            encoded = _key_value(key, value, limit)
        except (TypeError, ValueError) as exc:  # dropped alone, as upstream does
            _log.warning("cfk_otel: attribute %r not exported: %s", key, exc)
            continue
        parts += (tag, encoded)


# Resources and scopes are a handful of long-lived objects: their bytes are kept by
# identity (holding the object keeps its id unique), not by their costly hash.
_resources: dict[int, tuple[Resource, bytes]] = {}
_scopes: dict[int, tuple[InstrumentationScope | None, bytes]] = {}


def _resource(resource: Resource) -> bytes:
    cached = _resources.get(id(resource))
    if cached is None:
        if len(_resources) >= 64:
            _resources.clear()
        parts: list[bytes] = []
        _attributes(b"\x0a", resource.attributes, parts)  # Resource.attributes = 1
        cached = _resources[id(resource)] = (resource, _message(b"".join(parts)))
    return cached[1]


def _scope(scope: InstrumentationScope | None) -> bytes:
    cached = _scopes.get(id(scope))
    if cached is None:
        if len(_scopes) >= 256:
            _scopes.clear()
        parts: list[bytes] = []
        if scope is not None:
            if scope.name:
                parts += (b"\x0a", _text(scope.name))  # name = 1
            if scope.version:
                parts += (b"\x12", _text(scope.version))  # version = 2
            _attributes(b"\x1a", scope.attributes, parts)  # attributes = 3
        cached = _scopes[id(scope)] = (scope, _message(b"".join(parts)))
    return cached[1]


# Items are bytes, or views of them past their one-byte prefix (see Groups.group).
Grouped = dict[int, tuple[Resource, dict[int, tuple[InstrumentationScope | None, list[bytes | memoryview]]]]]


def _request(groups: Grouped) -> bytes:
    """ExportTraceServiceRequest / ExportLogsServiceRequest: the two share one layout.

    Written in one join: each item's bytes are copied once, into the request (a batch
    of long values is megabytes, and each copy would be as large).
    """
    out: list[bytes | memoryview] = []
    for resource, scopes in groups.values():
        entry: list[bytes | memoryview] = [b"\x0a", _resource(resource)]  # Resource{Spans,Logs}.resource = 1
        for scope, items in scopes.values():
            inner: list[bytes | memoryview] = [b"\x0a", _scope(scope)]  # Scope{Spans,Logs}.scope = 1
            for item in items:
                inner += (b"\x12", _varint(len(item)), item)  # .spans / .log_records = 2
            schema = scope.schema_url if scope is not None else None
            if schema:
                inner += (b"\x1a", _text(schema))  # schema_url = 3
            entry += (b"\x12", _varint(sum(map(len, inner))), *inner)  # scope_spans / scope_logs = 2
        if resource.schema_url:
            entry += (b"\x1a", _text(resource.schema_url))
        out += (b"\x0a", _varint(sum(map(len, entry))), *entry)  # resource_spans / resource_logs = 1
    return b"".join(out)


def _group(
    groups: Grouped, resource: Resource, scope: InstrumentationScope | None, encoded: bytes | memoryview
) -> None:
    by_resource = groups.get(id(resource))
    if by_resource is None:
        by_resource = groups[id(resource)] = (resource, {})
    by_scope = by_resource[1].get(id(scope))
    if by_scope is None:
        by_scope = by_resource[1][id(scope)] = (scope, [])
    by_scope[1].append(encoded)


class Encoded(NamedTuple):
    """A span or log record encoded as it ended or was emitted, waiting in the batch queue.

    Queued bytes rather than SDK objects: a few hundred bytes each instead of a graph of
    dicts and deques, and nothing for the garbage collector to walk while they wait (a
    full queue is 2048 of them when the collector is down).
    """

    resource: Resource
    scope: InstrumentationScope | None
    data: bytes


class Groups:
    """The (resource, scope) pairs of a processor's hot callers, each named by one byte.

    The lean spans and the request lines queue their message as plain ``bytes`` whose
    first byte names its pair: no tuple per item, and nothing the garbage collector
    tracks (bytes hold no references). Anything else is queued as :class:`Encoded`.
    """

    LIMIT: Final = 255

    def __init__(self) -> None:
        self._pairs: list[tuple[Resource, InstrumentationScope | None]] = []
        self._lock = threading.Lock()

    def prefix(self, resource: Resource, scope: InstrumentationScope | None) -> bytes | None:
        """The byte naming this pair (None once :attr:`LIMIT` pairs are named). Called
        once per caller, not per item: scopes are compared by value."""
        with self._lock:
            pair = (resource, scope)
            index = next((i for i, (r, s) in enumerate(self._pairs) if r is resource and s == scope), None)
            if index is None:
                if len(self._pairs) >= self.LIMIT:
                    return None
                index = len(self._pairs)
                self._pairs.append(pair)
            return bytes((index,))

    def group(self, groups: Grouped, item: bytes) -> None:
        resource, scope = self._pairs[item[0]]
        _group(groups, resource, scope, memoryview(item)[1:])  # a view: no copy


def encode_spans(spans: Sequence[ReadableSpan | Encoded | bytes], named: Groups | None = None) -> bytes:
    """An ExportTraceServiceRequest, serialised (``bytes`` items are named in ``named``)."""
    groups: Grouped = {}
    for span in spans:
        if isinstance(span, bytes):
            named.group(groups, span)  # type: ignore[union-attr]  # bytes come with their names
        elif isinstance(span, Encoded):
            _group(groups, span.resource, span.scope, span.data)
        else:
            _group(groups, span.resource, span.instrumentation_scope, encode_span(span))
    return _request(groups)


def _ids(context: SpanContext) -> list[bytes]:
    # trace_id = 1 and span_id = 2, in Span and in Span.Link alike.
    trace_id, span_id = context.trace_id.to_bytes(16, "big"), context.span_id.to_bytes(8, "big")
    return [b"\x0a\x10", trace_id, b"\x12\x08", span_id]


def encode_span(span: ReadableSpan, prefix: bytes = b"") -> bytes:
    """One Span message (without its length prefix), after ``prefix`` (see :class:`Groups`)."""
    context = span.context
    parts = [
        prefix,
        b"\x0a\x10",
        context.trace_id.to_bytes(16, "big"),
        b"\x12\x08",
        context.span_id.to_bytes(8, "big"),
    ]
    if context.trace_state:
        state = ",".join(f"{k}={v}" for k, v in context.trace_state.items())
        parts += (b"\x1a", _text(state))  # trace_state = 3
    parent = span.parent
    flags = _HAS_IS_REMOTE
    if parent is not None:
        parts += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))  # parent_span_id = 4
        if parent.is_remote:
            flags |= _IS_REMOTE
    if span.name:
        parts += (b"\x2a", _text(span.name))  # name = 5
    parts += (b"\x30", _SMALL[span.kind.value + 1])  # kind = 6 (the proto's enum is offset by one)
    if span.start_time:
        parts += (b"\x39", _fixed64(span.start_time))  # start_time_unix_nano = 7
    if span.end_time:
        parts += (b"\x41", _fixed64(span.end_time))  # end_time_unix_nano = 8
    # The span's own BoundedAttributes rather than the read-only proxy around it.
    limit = _Limits.span
    _attributes(
        b"\x4a", getattr(span, "_attributes", None) or span.attributes, parts, limit
    )  # attributes = 9
    if span.dropped_attributes:
        parts += (b"\x50", _varint(span.dropped_attributes))  # = 10
    if span.events:
        _events(span, parts, limit)
    if span.links:
        _links(span, parts, limit)
    status = span.status
    status_parts = b""  # status = 15, always present (as upstream)
    if status.description:
        status_parts += b"\x12" + _text(status.description)
    if status.status_code.value:
        status_parts += b"\x18" + _SMALL[status.status_code.value]
    parts += (b"\x7a", _message(status_parts), b"\x85\x01", _fixed32(flags))  # flags = 16
    return b"".join(parts)


def _events(span: ReadableSpan, parts: list[bytes], limit: int) -> None:
    for event in span.events:  # events = 11
        event_parts = [b"\x09", _fixed64(event.timestamp)]
        if event.name:
            event_parts += (b"\x12", _text(event.name))
        _attributes(b"\x1a", event.attributes, event_parts, limit)
        if event.dropped_attributes:
            event_parts += (b"\x20", _varint(event.dropped_attributes))
        parts += (b"\x5a", _message(b"".join(event_parts)))
    if span.dropped_events:
        parts += (b"\x60", _varint(span.dropped_events))  # = 12


def _links(span: ReadableSpan, parts: list[bytes], limit: int) -> None:
    for link in span.links:  # links = 13
        link_parts = _ids(link.context)
        _attributes(b"\x22", link.attributes, link_parts, limit)
        if link.dropped_attributes:
            link_parts += (b"\x28", _varint(link.dropped_attributes))
        link_flags = _HAS_IS_REMOTE | (_IS_REMOTE if link.context.is_remote else 0)
        link_parts += (b"\x35", _fixed32(link_flags))  # flags = 6
        parts += (b"\x6a", _message(b"".join(link_parts)))
    if span.dropped_links:
        parts += (b"\x70", _varint(span.dropped_links))  # = 14


def encode_logs(records: Sequence[ReadableLogRecord | Encoded | bytes], named: Groups | None = None) -> bytes:
    """An ExportLogsServiceRequest, serialised (``bytes`` items are named in ``named``)."""
    groups: Grouped = {}
    for record in records:
        if isinstance(record, bytes):
            named.group(groups, record)  # type: ignore[union-attr]  # bytes come with their names
        elif isinstance(record, Encoded):
            _group(groups, record.resource, record.scope, record.data)
        else:
            _group(groups, record.resource, record.instrumentation_scope, _log_record(record))
    return _request(groups)


def _log_record(readable: ReadableLogRecord) -> bytes:
    record = readable.log_record
    severity = record.severity_number
    return encode_log_record(
        timestamp=record.timestamp,
        observed_timestamp=record.observed_timestamp,
        severity_number=severity.value if severity is not None else 0,
        severity_text=record.severity_text,
        body=record.body,
        attributes=record.attributes,
        dropped_attributes=readable.dropped_attributes,
        trace_flags=int(record.trace_flags or 0),
        trace_id=record.trace_id,
        span_id=record.span_id,
        event_name=record.event_name,
    )


def encode_log_record(
    *,
    timestamp: int | None,
    observed_timestamp: int | None,
    severity_number: int,
    severity_text: str | None,
    body: object,
    attributes: Mapping[str, object] | None,
    dropped_attributes: int = 0,
    trace_flags: int = 0,
    trace_id: int | None = None,
    span_id: int | None = None,
    event_name: str | None = None,
    prefix: bytes = b"",
) -> bytes:
    """One LogRecord message (without its length prefix), after ``prefix`` (see :class:`Groups`).

    Text attribute values are cut at the log limit (see :func:`set_value_limits`), and a
    record over :data:`RECORD_MAX_BYTES` is encoded again within it (:func:`_fitted`).
    """
    parts: list[bytes] = [prefix]
    if timestamp:
        parts += (b"\x09", _fixed64(timestamp))  # time_unix_nano = 1
    if severity_number:
        parts += (b"\x10", _varint(severity_number))  # severity_number = 2
    if severity_text:
        parts += (b"\x1a", _text(severity_text))  # severity_text = 3
    try:
        encoded_body = _any(body)
    except (TypeError, ValueError):
        encoded_body = _any(str(body))
    parts += (b"\x2a", _message(encoded_body))  # body = 5, always present (as upstream)
    _attributes(b"\x32", attributes, parts, _Limits.log)  # attributes = 6
    if dropped_attributes:
        parts += (b"\x38", _varint(dropped_attributes))  # = 7
    if trace_flags:
        parts += (b"\x45", _fixed32(trace_flags))  # flags = 8
    if trace_id:
        parts += (b"\x4a\x10", trace_id.to_bytes(16, "big"))  # trace_id = 9
    if span_id:
        parts += (b"\x52\x08", span_id.to_bytes(8, "big"))  # span_id = 10
    if observed_timestamp:
        parts += (b"\x59", _fixed64(observed_timestamp))  # observed_time_unix_nano = 11
    if event_name:
        parts += (b"\x62", _text(event_name))  # event_name = 12
    data = b"".join(parts)
    if len(data) > RECORD_MAX_BYTES:
        return _fitted(
            body,
            attributes,
            dropped_attributes,
            timestamp=timestamp,
            observed_timestamp=observed_timestamp,
            severity_number=severity_number,
            severity_text=severity_text,
            trace_flags=trace_flags,
            trace_id=trace_id,
            span_id=span_id,
            event_name=event_name,
            prefix=prefix,
        )
    return data


_FITTED_BODY: Final = 8192  # characters: at most 32 KiB in UTF-8, half the ceiling


def _fitted(
    body: object, attributes: Mapping[str, object] | None, dropped_attributes: int, **fields: Any
) -> bytes:
    """A record that was over :data:`RECORD_MAX_BYTES`, encoded within it: the body cut
    to :data:`_FITTED_BODY` characters, then the attributes in order while they fit; the
    others are counted in ``dropped_attributes_count``, as the SDK counts those over its limit."""
    try:
        encoded_body = _any(body)
    except (TypeError, ValueError):
        body = str(body)
        encoded_body = _any(body)
    if len(encoded_body) > RECORD_MAX_BYTES // 2:
        body = cut(body if type(body) is str else repr(body), _FITTED_BODY)
        encoded_body = _any(body)
    room = RECORD_MAX_BYTES - 1024 - len(encoded_body)  # 1 KiB: the fixed fields
    kept: dict[str, object] = {}
    for key, value in (attributes or {}).items():
        try:
            size = len(_key_value(key, value, _Limits.log)) + 2
        except (TypeError, ValueError):
            continue  # dropped by the encoder anyway, with its warning
        if size <= room:
            kept[key] = value
            room -= size
        else:
            dropped_attributes += 1
    return encode_log_record(body=body, attributes=kept, dropped_attributes=dropped_attributes, **fields)


# A request line's attributes, in this order: method, path, route, status, duration_ms.
# The last is a double: its whole KeyValue but the 8 value bytes is fixed.
_DURATION_KV: Final = b"\x32\x18\x0a\x0bduration_ms\x12\x09\x21"  # attributes = 6
_severities: dict[tuple[int, str], bytes] = {}


def encode_request_record(
    prefix: bytes,
    timestamp: int,
    severity_number: int,
    severity_text: str,
    body: str,
    method: str,
    path: str,
    route: str,
    status: int,
    duration_ms: float,
    span_context: SpanContext | None,
) -> bytes:
    """The LogRecord :func:`encode_log_record` gives for a request line, byte for byte,
    after ``prefix`` (see :class:`Groups`).

    It runs once per request, so it skips the general path: the fixed parts are
    constants, the strings and the status come from the attribute cache.
    """
    severity = _severities.get((severity_number, severity_text))
    if severity is None:
        severity = _severities[severity_number, severity_text] = (
            b"\x10" + _varint(severity_number) + b"\x1a" + _text(severity_text)
        )
    stamp = _fixed64(timestamp)
    cached = _strings.get
    parts = [
        prefix,
        b"\x09",
        stamp,
        severity,
        b"\x2a",
        _message(b"\x0a" + _text(body)),
        b"\x32",
        cached(("method", method)) or _key_value("method", method),
        b"\x32",
        _text_key_value("path", path),  # never cached: one per request (cut by the caller)
        b"\x32",
        cached(("route", route)) or _key_value("route", route),
        b"\x32",
        cached(("status", status)) or _key_value("status", status),
        _DURATION_KV,
        _double(duration_ms),
    ]
    if span_context is not None:
        flags = span_context.trace_flags
        if flags:
            parts += (b"\x45", _fixed32(flags))
        parts += (
            b"\x4a\x10",
            span_context.trace_id.to_bytes(16, "big"),
            b"\x52\x08",
            span_context.span_id.to_bytes(8, "big"),
        )
    parts += (b"\x59", stamp)
    return b"".join(parts)


class _Sender:
    """Sends our bytes through the upstream OTLP/HTTP exporter's own client."""

    def __init__(self, exporter: _HttpSpanExporter | _HttpLogExporter) -> None:
        self._exporter = exporter
        # Private SDK attributes (here `_client` and `_shutdown`; `_batch_processor`, its
        # `_queue` and `_max_queue_size` in the processors below): the SDK's HTTP client
        # takes serialised bytes and owns compression, headers, TLS, retries with backoff
        # and the timeout. Pinned versions (pyproject) and tests/test_otlp.py, which goes
        # through each of them, keep this honest.
        self._client = exporter._client

    def send(self, what: str, encode: Callable[[Any], bytes], batch: Sequence[Any]) -> bool:
        if self._exporter._shutdown:
            return False
        try:
            data = encode(batch)
        except Exception:  # a batch that cannot be encoded is dropped, never raised
            _log.exception("cfk_otel: could not encode %d %s; dropped", len(batch), what)
            return False
        if self._client.export(data).success:
            return True
        _failed(len(data))
        return False

    def shutdown(self) -> None:
        self._exporter.shutdown()  # type: ignore[no-untyped-call]


# A failed export leaves its request body behind in reference cycles: each attempt's
# exception holds its traceback, whose frames hold the body and the exception. Only a
# full collection frees them, and Python starts one by counts of objects, not bytes:
# with the collector down and long values, RSS grew by 78 MiB over 50,000 requests
# (tests/failure/test_collector.py). So once the bodies of failed exports add up to
# _GARBAGE_BYTES, the exporter's thread runs one: with the collector down and ordinary
# spans (a batch is some 200 KB), about one every 40 failed exports.
_GARBAGE_BYTES: Final = 8 << 20
_garbage = [0]  # bytes of failed bodies since the last collection (both exporters; roughly)


def _failed(size: int) -> None:
    _garbage[0] += size
    if _garbage[0] >= _GARBAGE_BYTES:
        _garbage[0] = 0
        gc.collect()


class OtlpHttpSpanExporter(SpanExporter):
    """OTLP/HTTP spans, encoded by :func:`encode_spans`."""

    def __init__(self, exporter: _HttpSpanExporter) -> None:
        self._sender = _Sender(exporter)
        self.groups = Groups()
        self.queue = _Queue("span")  # the processor's: what each batch gives back

    def export(self, spans: Sequence[ReadableSpan | Encoded | bytes]) -> SpanExportResult:
        try:
            ok = self._sender.send("spans", lambda batch: encode_spans(batch, self.groups), spans)
        finally:
            self.queue.release(spans)
        return SpanExportResult.SUCCESS if ok else SpanExportResult.FAILURE

    def shutdown(self) -> None:
        self._sender.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class OtlpHttpLogExporter(LogRecordExporter):
    """OTLP/HTTP log records, encoded by :func:`encode_logs`."""

    def __init__(self, exporter: _HttpLogExporter) -> None:
        self._sender = _Sender(exporter)
        self.groups = Groups()
        self.queue = _Queue("log record")  # the processor's: what each batch gives back

    def export(self, batch: Sequence[ReadableLogRecord | Encoded | bytes]) -> LogRecordExportResult:
        try:
            ok = self._sender.send("log records", lambda items: encode_logs(items, self.groups), batch)
        finally:
            self.queue.release(batch)
        return LogRecordExportResult.SUCCESS if ok else LogRecordExportResult.FAILURE

    def shutdown(self) -> None:
        self._sender.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _size(item: object) -> int:
    kind = type(item)
    return len(item) if kind is bytes else len(item.data) if kind is Encoded else 0  # type: ignore[arg-type, attr-defined]


class _Queue:
    """Puts encoded items into an SDK batch processor's queue, turning them away when full.

    Full is the SDK's count (``OTEL_BSP_MAX_QUEUE_SIZE``, ``OTEL_BLRP_MAX_QUEUE_SIZE``) or
    :attr:`MAX_BYTES` of encoded items, counting the batch being exported (it is still in
    memory, and with the collector down it is retried for seconds): 2048 spans of 8 KB
    paths and 4 KB user agents would otherwise hold 24 MiB per queue.

    The SDK warns for every item a full queue drops: a logging record (with its stack
    walk) per span or log line, filtered as a duplicate only after it is built. With
    the collector down that is most of what telemetry then costs the app. Here a full
    queue drops the item for the price of a length check, and one warning a minute
    says how many were dropped.
    """

    WARN_EVERY: Final = 60.0  # seconds
    # About 10,000 ordinary spans or request lines (a few hundred bytes each): for them the
    # count bounds first; only long values reach this.
    MAX_BYTES: Final = 2 << 20

    def __init__(self, what: str, max_bytes: int = MAX_BYTES) -> None:
        self._batch: Any = None  # the SDK's BatchProcessor (private `_batch_processor`), see attach
        self._what = what
        self.max_bytes = max_bytes
        self.bytes = 0  # queued or being exported; changed under the lock only
        self._lock = threading.Lock()
        self.dropped = 0
        self._warn_at = 0.0

    def attach(self, batch: Any) -> None:
        self._batch = batch
        if hasattr(os, "register_at_fork"):  # the SDK empties its queue in a forked child
            forked = weakref.WeakMethod(self._forked)  # as the SDK: no queue kept alive by this
            os.register_at_fork(after_in_child=lambda: (method := forked()) and method())

    def _forked(self) -> None:
        self._lock = threading.Lock()
        self.bytes = 0

    def release(self, items: Sequence[object]) -> None:
        """``items`` (a batch taken from the queue) are exported or dropped: their bytes go."""
        size = sum(map(_size, items))
        with self._lock:
            self.bytes = max(0, self.bytes - size)

    def put(self, item: Encoded | bytes) -> None:
        batch = self._batch
        size = len(item) if type(item) is bytes else len(item.data)  # type: ignore[union-attr]
        with self._lock:  # the check, the SDK's append and the count as one step
            if len(batch._queue) < batch._max_queue_size and self.bytes + size <= self.max_bytes:
                self.bytes += size
                batch.emit(item)
                return
        self.dropped += 1
        now = time.monotonic()
        if now >= self._warn_at:
            self._warn_at = now + self.WARN_EVERY
            _log.warning(
                "cfk_otel: the %s export queue is full (collector down or slow?); %d dropped so far",
                self._what,
                self.dropped,
            )


class _EncodedQueue:
    """What both processors below queue: items encoded by their callers."""

    queue: _Queue
    groups: Groups

    def emit_encoded(
        self, resource: Resource, scope: InstrumentationScope | None, data: bytes, named: bool = False
    ) -> None:
        """Queue one item already encoded; ``named``: ``data`` starts with a prefix from
        :attr:`groups` and goes in as it is (no tuple), else with its resource and scope."""
        # The SDK's batching (queue bound, schedule, fork and shutdown handling), reused.
        self.queue.put(data if named else Encoded(resource, scope, data))


class OtlpHttpSpanProcessor(_EncodedQueue, BatchSpanProcessor):
    """The SDK's batch processor (queue bound, schedule, fork and shutdown handling) over
    our encoder; each span is encoded as it ends and queued as bytes (see :class:`Encoded`)."""

    def __init__(self, exporter: _HttpSpanExporter, *args: Any, **kwargs: Any) -> None:
        ours = OtlpHttpSpanExporter(exporter)
        super().__init__(ours, *args, **kwargs)
        self.queue = ours.queue
        self.queue.attach(self._batch_processor)
        self.groups = ours.groups

    def on_end(self, span: ReadableSpan) -> None:
        if not (span.context and span.context.trace_flags.sampled):
            return
        try:
            data = encode_span(span)
        except Exception:  # never into the app; the span alone is lost
            _log.warning("cfk_otel: span %r could not be encoded; dropped", span.name, exc_info=True)
            return
        self.emit_encoded(span.resource, span.instrumentation_scope, data)


def span_processor(exporter: SpanExporter, *args: Any, **kwargs: Any) -> SpanProcessor:
    """The SDK's batch processor; over our encoder when the exporter is the OTLP/HTTP one."""
    if type(exporter) is _HttpSpanExporter:
        return OtlpHttpSpanProcessor(exporter, *args, **kwargs)
    return BatchSpanProcessor(exporter, *args, **kwargs)


class OtlpHttpLogProcessor(_EncodedQueue, BatchLogRecordProcessor):
    """The SDK's batch processor over our encoder, with a second door for hot records.

    Records from the SDK's Logger API arrive through ``on_emit`` and are encoded there.
    The request line, written once per request, comes through :meth:`emit_encoded`,
    encoded by :func:`encode_request_record`: it skips the SDK's LogRecord objects and
    attribute cleaning (fixed keys, scalar values), and so the SDK's other log
    processors, which this provider does not have.
    """

    def __init__(self, exporter: _HttpLogExporter, *args: Any, **kwargs: Any) -> None:
        ours = OtlpHttpLogExporter(exporter)
        super().__init__(ours, *args, **kwargs)
        self.queue = ours.queue
        self.queue.attach(self._batch_processor)
        self.groups = ours.groups

    def on_emit(self, log_record: ReadWriteLogRecord) -> None:
        # Encoded now and queued as bytes: nothing keeps the record (or its context) alive.
        try:
            data = _log_record(log_record)  # type: ignore[arg-type]  # the same fields as a ReadableLogRecord
        except Exception:  # never into the app; the record alone is lost
            _log.debug("cfk_otel: a log record could not be encoded; dropped", exc_info=True)
            return
        resource = log_record.resource if log_record.resource is not None else _NO_RESOURCE
        self.queue.put(Encoded(resource, log_record.instrumentation_scope, data))


def log_processor(exporter: LogRecordExporter, *args: Any, **kwargs: Any) -> LogRecordProcessor:
    """The SDK's batch processor; over our encoder when the exporter is the OTLP/HTTP one."""
    if type(exporter) is _HttpLogExporter:
        return OtlpHttpLogProcessor(exporter, *args, **kwargs)
    return BatchLogRecordProcessor(exporter, *args, **kwargs)
