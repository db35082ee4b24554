"""asyncpg and redis: one wrapper per call makes the client span and the timing.

The span carries the attributes of the OpenTelemetry asyncpg and redis
instrumentations, built here (``_Conventions``) in every mode that
``OTEL_SEMCONV_STABILITY_OPT_IN`` selects, as theirs are; neither is a dependency.
The span is the core's on the native path (``_core``). The timing feeds
``database_query_duration_seconds`` and ``redis_operation_duration_seconds`` whatever
the sampler decided; their labels are bounded: the statement's leading keyword (never
the SQL text) and the command name. A slow query is also logged, added to its span
and reported to Sentry.

These replace the upstream asyncpg and redis instrumentations, which the distro then
does not load: the same spans from two wrappers per call cost about twice as much.
Disabling ``cfk_asyncpg`` or ``cfk_redis`` brings the upstream one back, when it is
installed (spans without the timings).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import math
import os
import time
import weakref
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Final

from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.semconv.attributes.db_attributes import (
    DB_NAMESPACE,
    DB_QUERY_TEXT,
    DB_SYSTEM_NAME,
    DbSystemNameValues,
)
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.semconv.attributes.network_attributes import NETWORK_TRANSPORT, NetworkTransportValues
from opentelemetry.semconv.attributes.server_attributes import SERVER_ADDRESS, SERVER_PORT
from opentelemetry.trace import Status, StatusCode

from cfk_otel._bootstrap import setup as _sdk
from cfk_otel._core.sampling import exemplar_ids
from cfk_otel._core.seam import ClientCall, CoreSpan, ServerSpan, Spans, call_timer
from cfk_otel._errors import total as _errors_total
from cfk_otel._guard import guard
from cfk_otel._metrics import catalogue as _metrics
from cfk_otel._redact import Known, exception_attributes, scrub_text

_log = logging.getLogger("cfk_otel.db")
# What can fail on a call's way through, each logged once (never into the app's call).
_ASYNCPG_ATTRIBUTES: Final = guard("reading an asyncpg span's attributes")
_REDIS_ATTRIBUTES: Final = guard("reading a redis span's attributes")
_RECORD_QUERY: Final = guard("recording a query")
_RECORD_REDIS: Final = guard("recording a redis call")
_RECORD_FAILURE: Final = guard("recording a failed call on its span")
_END_SPAN: Final = guard("ending a client span")
_RECORD_METRIC: Final = guard("recording a client call's duration")

_SQL_OPERATIONS: Final = frozenset(
    {
        "SELECT",
        "INSERT",
        "UPDATE",
        "DELETE",
        "MERGE",
        "WITH",
        "VALUES",
        "TABLE",
        "CREATE",
        "ALTER",
        "DROP",
        "TRUNCATE",
        "COPY",
        "BEGIN",
        "START",
        "COMMIT",
        "END",
        "ROLLBACK",
        "SAVEPOINT",
        "RELEASE",
        "SET",
        "RESET",
        "SHOW",
        "EXPLAIN",
        "ANALYZE",
        "VACUUM",
        "LISTEN",
        "NOTIFY",
        "UNLISTEN",
        "LOCK",
        "PREPARE",
        "EXECUTE",
        "DEALLOCATE",
        "DECLARE",
        "FETCH",
        "MOVE",
        "CLOSE",
        "DISCARD",
        "DO",
        "CALL",
        "GRANT",
        "REVOKE",
        "COMMENT",
        "REFRESH",
        "CLUSTER",
        "REINDEX",
    }
)
# The conventions before the stable database and HTTP ones (semantic conventions 1.24),
# which the upstream instrumentations still write by default. They are frozen, and the
# semantic-conventions package has them only in its deprecated or private modules.
_OLD_DB_SYSTEM: Final = "db.system"
_OLD_DB_NAME: Final = "db.name"
_OLD_DB_USER: Final = "db.user"
_OLD_DB_STATEMENT: Final = "db.statement"
_OLD_DB_REDIS_DATABASE_INDEX: Final = "db.redis.database_index"
_OLD_NET_PEER_NAME: Final = "net.peer.name"
_OLD_NET_PEER_PORT: Final = "net.peer.port"
_OLD_NET_TRANSPORT: Final = "net.transport"
_OPT_IN: Final = "OTEL_SEMCONV_STABILITY_OPT_IN"
_ASYNCPG_METHODS: Final = ("execute", "executemany", "fetch", "fetchval", "fetchrow", "fetchmany")
_MAX_SQL: Final = 2048
# A connection's (or redis pool's) calls remembered: each distinct statement or command
# shape's span name, metric labels and attributes, built once. Emptied when full (SQL
# built per call, values in its text, would otherwise grow it without end).
_MAX_CALLS: Final = 256
# What patches a library's method: its original in, the replacement out (see _wrap).
_Patch = Callable[[Callable[..., Any]], Callable[..., Any]]
# inspect.markcoroutinefunction (Python 3.12+): a patched coroutine method still reads as one.
_MARK_COROUTINE: Final = getattr(inspect, "markcoroutinefunction", None)


def sql_operation(query: object) -> str:
    """The statement's leading keyword (``SELECT``), or ``OTHER``; never any SQL text."""
    if not isinstance(query, str):
        return "OTHER"
    text = query.lstrip()
    # Leading comments (often added by query tags) do not name the operation.
    while text.startswith(("--", "/*")):
        end = text.find("\n") if text.startswith("--") else text.find("*/")
        if end < 0:
            return "OTHER"
        text = text[end + (1 if text.startswith("--") else 2) :].lstrip()
    head = text[:12].split(None, 1)
    word = head[0].rstrip("(;").upper() if head else ""
    return word if word in _SQL_OPERATIONS else "OTHER"


def redis_command(args: tuple[Any, ...]) -> str:
    """The command name (``GET``), bounded: anything unusual becomes ``OTHER``."""
    if not args:
        return "OTHER"
    name = args[0]
    if isinstance(name, bytes):
        name = name.decode("latin-1")
    if not isinstance(name, str) or not 0 < len(name) <= 32:
        return "OTHER"
    name = name.upper()
    return name if name.replace(" ", "").replace(".", "").replace("_", "").isalnum() else "OTHER"


def _report_slow(span: trace.Span, query: object, seconds: float) -> None:
    sql = query[:_MAX_SQL] if isinstance(query, str) else repr(query)[:_MAX_SQL]
    _log.warning(
        "slow query: %.3fs %s",
        seconds,
        sql,
        extra={"duration_ms": round(seconds * 1000, 1), "db_statement": sql, "slow_query": True},
    )
    # Arguments are never recorded: they carry user data and secrets.
    span.add_event(
        "slow_query", {"db.query.text": sql, "db.operation.name": sql_operation(query), "duration_s": seconds}
    )
    _errors_total.slow_query(sql, sql_operation(query), seconds)  # counted; Sentry hears of it


class _Conventions:
    """Which attribute names one group of conventions writes: the old ones, the stable
    ones, or both, as ``OTEL_SEMCONV_STABILITY_OPT_IN`` selects for ``signal``
    (``database`` or ``http``) the way the upstream instrumentations read it."""

    __slots__ = ("new", "old")

    def __init__(self, signal: str, opt_in: str | None = None) -> None:
        raw = os.environ.get(_OPT_IN, "") if opt_in is None else opt_in
        chosen = {part.strip() for part in raw.split(",")}
        dup = f"{signal}/dup" in chosen
        self.new: bool = dup or signal in chosen
        self.old: bool = dup or not self.new

    def string(self, attributes: dict[str, Any], old: str, new: str | None, value: object) -> None:
        if value:  # as upstream: an empty name is left out
            if self.old:
                attributes[old] = value
            if self.new and new is not None:
                attributes[new] = value

    def port(self, attributes: dict[str, Any], value: object) -> None:
        if not value:
            return
        try:
            port = int(value)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            return
        if self.old:
            attributes[_OLD_NET_PEER_PORT] = port
        if self.new:
            attributes[SERVER_PORT] = port

    def transport(self, attributes: dict[str, Any], old: str, new: NetworkTransportValues) -> None:
        if self.old:
            attributes[_OLD_NET_TRANSPORT] = old
        if self.new:
            attributes[NETWORK_TRANSPORT] = new.value

    def statement(self, attributes: dict[str, Any], text: str) -> None:
        if self.old:
            attributes[_OLD_DB_STATEMENT] = text
        if self.new:
            attributes[DB_QUERY_TEXT] = text


class _Target:
    """A connection's (or redis pool's) fixed attributes, built once, and its calls
    prepared so far (at most ``_MAX_CALLS``)."""

    __slots__ = ("calls", "fixed")

    def __init__(self, fixed: dict[str, Any]) -> None:
        self.fixed = fixed
        self.calls: dict[object, ClientCall] = {}

    def remember(self, key: object, call: ClientCall) -> None:
        calls = self.calls
        if len(calls) >= _MAX_CALLS:
            calls.clear()
        calls[key] = call


# The last context a client call ran in (any instrumentation's): whether instrumentation is
# enabled there, and its span. A context never changes, so a request's calls (its queries and
# its Redis commands alike) share the answer, and keep that one context alive until the next
# call. Starts with no context seen.
_SEEN: Final[list[tuple[object, bool, trace.Span]]] = [(None, False, trace.INVALID_SPAN)]


def _look(context: context_api.Context) -> tuple[object, bool, trace.Span]:
    """:data:`_SEEN` for ``context``, the current one."""
    seen = _SEEN[0] = (context, is_instrumentation_enabled(), trace.get_current_span(context))
    return seen


class _Client:
    """What one instrumentor's wrappers share: where spans start, the semantic
    conventions in force, and each connection's fixed attributes and calls (built once)."""

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None,
        slow_query_threshold: float = 1.0,
        secrets: Known | None = None,
    ) -> None:
        self.spans = Spans(tracer_provider)
        # Times a call under the core's server span in the core (Spans.timed).
        self.timer = call_timer(_timed_end, _timed_overflow)
        self.slow_query_threshold = slow_query_threshold  # SLOW_QUERY_THRESHOLD, read once
        self.known = secrets or Known()  # the configured secret values, withheld from errors
        self.db = _Conventions("database")
        self.http = _Conventions("http")  # the redis instrumentation names its server by these
        self.new = self.db.new
        # id(owner) -> (a weak reference to owner, its target): read without a Python call
        # on every client call (a WeakKeyDictionary's get is one); forgotten with the owner.
        self.targets: dict[int, tuple[weakref.ref[Any], _Target]] = {}

    def target(self, owner: Any, build: Callable[[Any, _Client], dict[str, Any]]) -> _Target:
        """``owner``'s fixed attributes (its server) and prepared calls, built once per owner
        (which must be weakly referable)."""
        key = id(owner)
        targets = self.targets
        entry = targets.get(key)
        if entry is not None and entry[0]() is owner:
            return entry[1]

        def forget(reference: weakref.ref[Any]) -> None:
            if targets.get(key, _NO_ENTRY)[0] is reference:  # not a newer owner's, at the same id
                targets.pop(key, None)

        target = _Target(build(owner, self))
        targets[key] = (weakref.ref(owner, forget), target)
        return target

    def failed(self, span: trace.Span, error: BaseException) -> None:
        # As both instrumentations do (the SDK's default for a span that an error left).
        # An error whose str() fails: the app still gets its own error.
        with _RECORD_FAILURE:
            span.record_exception(error, exception_attributes(error, self.known))
            span.set_status(
                Status(StatusCode.ERROR, scrub_text(f"{type(error).__name__}: {error}", self.known))
            )
            if self.new:
                span.set_attribute(ERROR_TYPE, type(error).__qualname__)

    def end(self, span: trace.Span) -> None:
        with _END_SPAN:  # a failing span processor: never into the app's call
            span.end()

    def finish(
        self, span: trace.Span, histogram: _metrics.Histogram, key: tuple[str, ...], seconds: float
    ) -> None:
        """The call's duration recorded in ``histogram`` (with the span's ids as its exemplar
        when its trace is exported) and its span ended: one call into the core when the span
        is the core's, else the two apart, each under its own guard."""
        # Inside a request: a trace kept later is not known yet, the head decision is.
        if type(span) is CoreSpan:  # its ids read as they are: no SpanContext made for them
            trace_id, span_id = span.exemplar_ids(ended=False)
            histogram.record_ending(key, seconds, span, trace_id, span_id)  # guarded inside
            return
        trace_id, span_id = exemplar_ids(span.get_span_context(), ended=False)
        with _RECORD_METRIC:
            histogram.record_by_key(key, seconds, trace_id, span_id)
        self.end(span)


_NO_ENTRY: Final = (None, None)


def _client(kwargs: dict[str, Any]) -> _Client:
    """An instrumentor's client, from the process's settings (read once, at instrument())."""
    settings = _sdk.settings()
    return _Client(
        kwargs.get("tracer_provider"), settings.slow_query_threshold, Known(settings.secret_values())
    )


# asyncpg


def _asyncpg_target(connection: Any, client: _Client) -> dict[str, Any]:
    """The upstream asyncpg instrumentation's attributes for ``connection``: the system,
    database, user and server (asyncpg keeps them in its connection's ``_params`` and
    ``_addr``, a host and port or a Unix socket path), in the database conventions."""
    db = client.db
    attributes: dict[str, Any] = {}
    db.string(attributes, _OLD_DB_SYSTEM, DB_SYSTEM_NAME, DbSystemNameValues.POSTGRESQL.value)
    params = getattr(connection, "_params", None)
    db.string(attributes, _OLD_DB_NAME, DB_NAMESPACE, getattr(params, "database", None))
    db.string(attributes, _OLD_DB_USER, None, getattr(params, "user", None))  # no stable name
    address = getattr(connection, "_addr", None)
    if isinstance(address, tuple):
        db.string(attributes, _OLD_NET_PEER_NAME, SERVER_ADDRESS, address[0])
        db.port(attributes, address[1])
        db.transport(attributes, "ip_tcp", NetworkTransportValues.TCP)
    elif isinstance(address, str):
        db.string(attributes, _OLD_NET_PEER_NAME, SERVER_ADDRESS, address)
        db.transport(attributes, "other", NetworkTransportValues.PIPE)
    return attributes


def _asyncpg_call(client: _Client, connection: Any, query: object, prefix: str) -> ClientCall:
    """The span name, labels and attributes of running ``query`` on ``connection``, made
    once per connection and statement."""
    target: _Target | None = None
    with _ASYNCPG_ATTRIBUTES:  # an unusual connection object: the span goes without them
        target = client.target(connection, _asyncpg_target)
        if type(query) is str:
            found = target.calls.get((prefix, query))
            if found is not None:
                return found
    operation = sql_operation(query)
    name = prefix + (operation if operation != "OTHER" else "postgresql")
    call = ClientCall(name, (operation,), {})
    with _ASYNCPG_ATTRIBUTES:
        if target is None:
            return call
        attributes = dict(target.fixed)
        call = ClientCall(name, call.labels, attributes)
        if isinstance(query, str):
            client.db.statement(attributes, query)
        if type(query) is str:
            target.remember((prefix, query), call)
    return call


def _query(
    client: _Client, connection: Any, query: object, prefix: str, parent: trace.Span, awaited: Awaitable[Any]
) -> Awaitable[Any]:
    """One asyncpg call on ``connection`` running ``query`` (``awaited``), in a client span
    whose parent is ``parent`` (the current span), timed: in the core under its server span
    (:meth:`Spans.timed`), else here (:func:`_traced_query`)."""
    call = None
    if type(query) is str:  # a prepared call, found without a Python call (_asyncpg_call's first step)
        entry = client.targets.get(id(connection))
        if entry is not None and entry[0]() is connection:
            call = entry[1].calls.get((prefix, query))
    if call is None:
        call = _asyncpg_call(client, connection, query, prefix)
    histogram = _metrics.default().database_query_duration
    if type(parent) is ServerSpan:
        slow = client.slow_query_threshold
        ending = (client, call, query, histogram, parent, slow)  # for the fallback
        timed = client.spans.timed(client.timer, call, parent, histogram.family, awaited, slow, ending)
        if timed is not None:
            return timed
    return _traced_query(client, call, query, parent, histogram, awaited)


async def _traced_query(
    client: _Client,
    call: ClientCall,
    query: object,
    parent: trace.Span,
    histogram: _metrics.Histogram,
    awaited: Awaitable[Any],
) -> Any:
    span = client.spans.start_client(call, parent)
    start = time.perf_counter()
    try:
        return await awaited
    except StopAsyncIteration:  # a cursor's end: not an error
        raise
    except Exception as error:
        client.failed(span, error)
        raise
    finally:
        elapsed = time.perf_counter() - start
        if elapsed >= client.slow_query_threshold:
            with _RECORD_QUERY:
                _report_slow(span, query, elapsed)
        if type(span) is CoreSpan:
            histogram.record_client(call, elapsed, span)  # guarded inside
        else:
            client.finish(span, histogram, call.labels, elapsed)


def _timed_end(
    context: tuple[_Client, ClientCall, object, _metrics.Histogram, trace.Span, float],
    span_id: int,
    start: int,
    seconds: float,
    error: BaseException | None,
) -> None:
    """The end of a call the core timed (:meth:`Spans.timed`) that failed or lasted its slow
    threshold or more: its span made here with the core's id and start, and ended as
    :func:`_traced_query` ends one (the core's guard takes what fails here)."""
    client, call, query, histogram, parent, slow = context
    span = client.spans.client_span(call, parent, span_id, start)
    if error is not None:
        client.failed(span, error)
    if seconds >= slow:
        with _RECORD_QUERY:
            _report_slow(span, query, seconds)
    histogram.record_client(call, seconds, span)  # guarded inside


def _timed_overflow(context: tuple[Any, ...]) -> None:
    """A call the core timed folded a new label set into its histogram's overflow series."""
    histogram: _metrics.Histogram = context[3]
    histogram._overflowed()


def _asyncpg_patch(client: _Client, source: str) -> _Patch:
    """``source`` says where the connection and the query are: in the call
    (``connection``), or on the cursor or prepared statement it is made on."""
    prefix = "CURSOR: " if source == "cursor" else ""

    def patch(original: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        def method(instance: Any, *args: Any, **kwargs: Any) -> Awaitable[Any]:
            context = context_api.get_current()
            seen = _SEEN[0]
            if seen[0] is not context:
                seen = _look(context)
            if not seen[1]:  # instrumentation suppressed, e.g. the health checks' own probes
                return original(instance, *args, **kwargs)
            if source == "connection":
                query = args[0] if args else kwargs.get("query")
                if query is not None and query is getattr(instance, "_reset_query", None):
                    # A pool resets every connection it takes back with a query of its own
                    # (RESET ALL, UNLISTEN *...): plumbing, not the app's work. No span, no timing.
                    return original(instance, *args, **kwargs)
                return _query(client, instance, query, prefix, seen[2], original(instance, *args, **kwargs))
            return _query(
                client,
                instance._connection,
                instance._query,
                prefix,
                seen[2],
                original(instance, *args, **kwargs),
            )

        return method

    return patch


def _track_pool(original: Callable[..., None]) -> Callable[..., None]:
    def __init__(pool: Any, *args: Any, **kwargs: Any) -> None:  # the method it replaces
        original(pool, *args, **kwargs)
        with guard("tracking an asyncpg pool"):
            _metrics.default().track_pool(pool)  # database_pool_connections, while it lives

    return __init__


_ASYNCPG_TARGETS: Final = (
    *(("asyncpg.connection", f"Connection.{method}", "connection") for method in _ASYNCPG_METHODS),
    *(("asyncpg.cursor", f"Cursor.{method}", "cursor") for method in ("fetch", "forward", "fetchrow")),
    ("asyncpg.cursor", "CursorIterator.__anext__", "cursor"),
    *(
        ("asyncpg.prepared_stmt", f"PreparedStatement.{method}", "prepared")
        for method in ("fetch", "fetchval", "fetchrow", "fetchmany", "executemany")
    ),
)


class AsyncpgInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """asyncpg: client spans, ``database_query_duration_seconds`` and slow-query reports."""

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("asyncpg >= 0.27",)

    def _instrument(self, **kwargs: Any) -> None:
        client = _client(kwargs)
        for module, name, source in _present(_ASYNCPG_TARGETS):
            _wrap(module, name, _asyncpg_patch(client, source))
        _wrap("asyncpg.pool", "Pool.__init__", _track_pool)

    def _uninstrument(self, **kwargs: Any) -> None:
        for module, name, _ in _present(_ASYNCPG_TARGETS):
            _unwrap(module, name)
        _unwrap("asyncpg.pool", "Pool.__init__")


# redis


def _redis_target(owner: Any, client: _Client) -> dict[str, Any]:
    """The upstream redis instrumentation's attributes for a client's pool (``owner``):
    the system and database index in the database conventions, the server in the HTTP
    ones (as upstream names them)."""
    attributes: dict[str, Any] = {}
    client.db.string(attributes, _OLD_DB_SYSTEM, DB_SYSTEM_NAME, "redis")
    options = getattr(owner, "connection_kwargs", None)
    if options is None:  # a cluster client: no single server to name
        return attributes
    index = options.get("db")
    if client.db.old:  # no stable name
        attributes[_OLD_DB_REDIS_DATABASE_INDEX] = int(index or 0)  # from_url passes db=None
    net = client.http
    if "path" in options:
        net.string(attributes, _OLD_NET_PEER_NAME, SERVER_ADDRESS, options.get("path", ""))
        net.transport(attributes, "other", NetworkTransportValues.UNIX)
    else:
        net.string(attributes, _OLD_NET_PEER_NAME, SERVER_ADDRESS, options.get("host", "localhost"))
        net.port(attributes, options.get("port", 6379))
        net.transport(attributes, "ip_tcp", NetworkTransportValues.TCP)
    return attributes


_REDIS_STATEMENT_MAX: Final = 1000


def _redis_statement(args: Any) -> str:
    """A command without its values, as upstream writes it: ``SET ? ?``, at most 1000 characters."""
    if not args:
        return ""
    text = " ".join([str(args[0]), *("?" * (len(args) - 1))])
    return text if len(text) <= _REDIS_STATEMENT_MAX else text[: _REDIS_STATEMENT_MAX - 3] + "..."


def _redis_name(instance: Any, args: tuple[Any, ...]) -> str:
    """The span name upstream gives a command: its name (two search commands renamed),
    or the database index when there is none."""
    if args and args[0]:
        if args[0] == "FT.SEARCH":
            return "redis.search"
        if args[0] == "FT.CREATE":
            return "redis.create_index"
        return str(args[0])
    index = instance.connection_pool.connection_kwargs.get("db")
    return str(0 if index is None else index)


def _redis_pipeline(instance: Any) -> tuple[int, str, str]:
    """A pipeline's length, statement (one line per command) and span name (the command
    names), from its public ``command_stack``; a pipeline without one is just "redis"."""
    try:
        commands = [c.args if hasattr(c, "args") else c[0] for c in instance.command_stack]
        statement = "\n".join(_redis_statement(args) for args in commands)
        name = " ".join(args[0] for args in commands)
    except (AttributeError, IndexError):
        return 0, "", "redis"
    return len(commands), statement, name or "redis"


_PIPELINE: Final = ("PIPELINE",)


def _redis_call(client: _Client, instance: Any, args: tuple[Any, ...], pipeline: bool) -> ClientCall:
    """The span name, labels and attributes of one command (or pipeline) on ``instance``.
    A command's depend on its name and count of arguments alone (its values are never
    written): made once per pool for each."""
    target: _Target | None = None
    head = args[0] if args and not pipeline else None
    shape = (head, len(args)) if type(head) is str else None  # a plain name: kept
    with _REDIS_ATTRIBUTES:  # e.g. an argument whose str() fails: the span goes without them
        pool = getattr(instance, "connection_pool", None)
        target = client.target(instance if pool is None else pool, _redis_target)
        if shape is not None:
            found = target.calls.get(shape)
            if found is not None:
                return found
    command = _PIPELINE
    if not pipeline:
        label = "OTHER"
        with _RECORD_REDIS:
            label = redis_command(args)
        command = (label,)
    call = ClientCall("redis", command, {})
    with _REDIS_ATTRIBUTES:
        if target is None:
            return call
        attributes = dict(target.fixed)
        if pipeline:
            length, statement, name = _redis_pipeline(instance)
            client.db.statement(attributes, statement)
            attributes["db.redis.pipeline_length"] = length
        else:
            name = _redis_name(instance, args)
            client.db.statement(attributes, _redis_statement(args))
            attributes["db.redis.args_length"] = len(args)
        call = ClientCall(name, command, attributes)
        if shape is not None:
            target.remember(shape, call)
    return call


def _redis_prepared(client: _Client, instance: Any, args: tuple[Any, ...], pipeline: bool) -> ClientCall:
    """:func:`_redis_call`, its first step (a command prepared before on this pool) done
    here, without its guards and its target lookup's call."""
    if args and not pipeline:
        head = args[0]
        try:  # free until it raises
            if type(head) is str:
                pool = getattr(instance, "connection_pool", None)
                owner = instance if pool is None else pool
                entry = client.targets.get(id(owner))
                if entry is not None and entry[0]() is owner:
                    found = entry[1].calls.get((head, len(args)))
                    if found is not None:
                        return found
        except Exception:  # an odd client's connection_pool: _redis_call's guards take it
            return _redis_call(client, instance, args, pipeline)
    return _redis_call(client, instance, args, pipeline)


def _redis_done(
    client: _Client,
    span: trace.Span,
    call: ClientCall,
    pipeline: bool,
    start: float,
    error: Exception | None,
    histogram: _metrics.Histogram,
) -> None:
    elapsed = time.perf_counter() - start
    if error is not None and not (pipeline and _is_watch_error(error)):
        client.failed(span, error)
    if type(span) is CoreSpan:
        histogram.record_client(call, elapsed, span)  # guarded inside
    else:
        client.finish(span, histogram, call.labels, elapsed)


def _is_watch_error(error: Exception) -> bool:
    # A watched key changed: the app retries the transaction; not a failure.
    from redis.exceptions import WatchError  # noqa: PLC0415

    return isinstance(error, WatchError)


def _redis_patch(client: _Client, pipeline: bool, is_async: bool) -> _Patch:
    def patch(original: Callable[..., Any]) -> Callable[..., Any]:
        if is_async:
            return _redis_method_async(client, pipeline, original)

        def method(instance: Any, *args: Any, **kwargs: Any) -> Any:
            context = context_api.get_current()
            seen = _SEEN[0]
            if seen[0] is not context:
                seen = _look(context)
            if not seen[1]:
                return original(instance, *args, **kwargs)
            call = _redis_prepared(client, instance, args, pipeline)
            span = client.spans.start_client(call, seen[2])
            start = time.perf_counter()
            error = None
            try:
                return original(instance, *args, **kwargs)
            except Exception as exc:
                error = exc
                raise
            finally:
                histogram = _metrics.default().redis_operation_duration
                _redis_done(client, span, call, pipeline, start, error, histogram)

        return method

    return patch


def _redis_method_async(
    client: _Client, pipeline: bool, original: Callable[..., Awaitable[Any]]
) -> Callable[..., Awaitable[Any]]:
    def method(instance: Any, *args: Any, **kwargs: Any) -> Awaitable[Any]:
        # The context's look-up is written out in each patched method (not a helper's frame):
        # it runs on every call.
        context = context_api.get_current()
        seen = _SEEN[0]
        if seen[0] is not context:
            seen = _look(context)
        if not seen[1]:
            return original(instance, *args, **kwargs)
        call = _redis_prepared(client, instance, args, pipeline)
        parent = seen[2]
        awaited = original(instance, *args, **kwargs)
        histogram = _metrics.default().redis_operation_duration
        if not pipeline and type(parent) is ServerSpan:  # a pipeline's watch error is no failure
            never = math.inf  # no slow-query report for a command
            ending = (client, call, None, histogram, parent, never)  # for the fallback
            timed = client.spans.timed(client.timer, call, parent, histogram.family, awaited, never, ending)
            if timed is not None:
                return timed
        return _traced_redis(client, call, parent, pipeline, histogram, awaited)

    return method


async def _traced_redis(
    client: _Client,
    call: ClientCall,
    parent: trace.Span,
    pipeline: bool,
    histogram: _metrics.Histogram,
    awaited: Awaitable[Any],
) -> Any:
    span = client.spans.start_client(call, parent)
    start = time.perf_counter()
    error = None
    try:
        return await awaited
    except Exception as exc:
        error = exc
        raise
    finally:
        _redis_done(client, span, call, pipeline, start, error, histogram)


_REDIS_TARGETS: Final = (
    # module, method, a pipeline's execute, asyncio
    ("redis.client", "Redis.execute_command", False, False),
    ("redis.client", "Pipeline.execute", True, False),
    ("redis.client", "Pipeline.immediate_execute_command", False, False),
    ("redis.cluster", "RedisCluster.execute_command", False, False),
    ("redis.cluster", "ClusterPipeline.execute", True, False),
    ("redis.asyncio.client", "Redis.execute_command", False, True),
    ("redis.asyncio.client", "Pipeline.execute", True, True),
    ("redis.asyncio.client", "Pipeline.immediate_execute_command", False, True),
    ("redis.asyncio.cluster", "RedisCluster.execute_command", False, True),
    ("redis.asyncio.cluster", "ClusterPipeline.execute", True, True),
)


class RedisInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """redis-py, sync and asyncio: client spans and ``redis_operation_duration_seconds``."""

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("redis >= 4.3",)

    def _instrument(self, **kwargs: Any) -> None:
        client = _client(kwargs)
        for module, name, pipeline, is_async in _present(_REDIS_TARGETS):
            _wrap(module, name, _redis_patch(client, pipeline, is_async))

    def _uninstrument(self, **kwargs: Any) -> None:
        for module, name, *_ in _present(_REDIS_TARGETS):
            _unwrap(module, name)


def _present(targets: tuple[tuple[Any, ...], ...]) -> list[tuple[Any, ...]]:
    """The targets this version of the library has (a missing module or method is skipped)."""
    found = []
    for target in targets:
        module, name = target[0], target[1]
        cls_name, method = name.split(".")
        try:
            cls = getattr(importlib.import_module(module), cls_name)
        except (ImportError, AttributeError):
            continue
        if hasattr(cls, method):
            found.append(target)
    return found


def _wrap(module: str, name: str, patch: _Patch) -> None:
    """Replace method ``name`` (``Class.method``) of ``module`` by ``patch(original)``: a plain
    function, with the original in its ``__wrapped__`` (as ``functools.wraps`` keeps it).

    Not ``wrapt``'s proxies, which the upstream instrumentations use: a method call through
    one binds a proxy object and calls the wrapper through it, about 0.5 µs a call here
    against 0.1 µs for a plain function, and three such calls per request of the benchmark's
    work route cost 20 µs of CPU side by side (docs/hello-profile.md, session 34).
    """
    cls_name, method = name.split(".")
    cls = getattr(importlib.import_module(module), cls_name)
    original = getattr(cls, method)
    patched = functools.wraps(original)(patch(original))
    if _MARK_COROUTINE is not None and inspect.iscoroutinefunction(original):
        _MARK_COROUTINE(patched)  # a sync function that returns the original's coroutine
    setattr(cls, method, patched)


def _unwrap(module: str, name: str) -> None:
    cls_name, method = name.split(".")
    cls = getattr(importlib.import_module(module), cls_name)
    current = cls.__dict__.get(method)
    original = getattr(current, "__wrapped__", None)
    if original is not None:
        setattr(cls, method, original)
