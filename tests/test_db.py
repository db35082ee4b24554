"""cfk_otel/_instrumentation/db.py: bounded labels for query and command timings; span attributes."""

from __future__ import annotations

import importlib
import inspect
import types
from types import SimpleNamespace
from typing import Any

import pytest

from cfk_otel._core.seam import ClientCall
from cfk_otel._instrumentation import db as _db
from cfk_otel._instrumentation.db import (
    _asyncpg_call,
    _asyncpg_target,
    _Client,
    _Conventions,
    _redis_call,
    _redis_name,
    _redis_pipeline,
    _redis_statement,
    _redis_target,
    redis_command,
    sql_operation,
)


@pytest.mark.parametrize(
    ("sql", "operation"),
    [
        ("SELECT 1", "SELECT"),
        ("  select * from t", "SELECT"),
        ("INSERT INTO t VALUES ($1)", "INSERT"),
        ("/* tag */ UPDATE t SET x = 1", "UPDATE"),
        ("-- comment\nDELETE FROM t", "DELETE"),
        ("WITH x AS (SELECT 1) SELECT * FROM x", "WITH"),
        ("(SELECT 1)", "OTHER"),
        ("DROP TABLE users; -- secret", "DROP"),
        ("password='hunter2'", "OTHER"),
        ("", "OTHER"),
        ("/* never closed", "OTHER"),
        (None, "OTHER"),
    ],
)
def test_sql_operation(sql: object, operation: str) -> None:
    assert sql_operation(sql) == operation


@pytest.mark.parametrize(
    ("args", "command"),
    [
        (("get", "k"), "GET"),
        ((b"SET", "k", "v"), "SET"),
        (("CLIENT LIST",), "CLIENT LIST"),
        (("x" * 40,), "OTHER"),
        (("GET;rm -rf",), "OTHER"),
        ((), "OTHER"),
        ((42,), "OTHER"),
    ],
)
def test_redis_command(args: tuple[object, ...], command: str) -> None:
    assert redis_command(args) == command


# The attributes the upstream asyncpg and redis instrumentations would write, for what
# tests/integration/test_db_spans.py cannot reach there: Unix sockets, odd arguments.


@pytest.mark.parametrize(
    ("opt_in", "old", "new"),
    [
        ("", True, False),
        ("database", False, True),
        ("database/dup", True, True),
        (" http , database/dup ,database", True, True),  # dup wins, as upstream
        ("http/dup", True, False),  # another signal's choice
        ("databases", True, False),
    ],
)
def test_conventions_follow_the_opt_in(opt_in: str, old: bool, new: bool) -> None:
    conventions = _Conventions("database", opt_in)
    assert (conventions.old, conventions.new) == (old, new)


class _Asyncpg:
    def __init__(self, address: object) -> None:
        self._params = SimpleNamespace(database="kanban", user="app")
        self._addr = address


def test_asyncpg_unix_socket_and_missing_parts() -> None:
    client = _Client(None)
    client.db = _Conventions("database", "database/dup")
    assert _asyncpg_target(_Asyncpg("/run/postgresql/.s.PGSQL.5432"), client) == {
        "db.system": "postgresql",
        "db.system.name": "postgresql",
        "db.name": "kanban",
        "db.namespace": "kanban",
        "db.user": "app",
        "net.peer.name": "/run/postgresql/.s.PGSQL.5432",
        "server.address": "/run/postgresql/.s.PGSQL.5432",
        "net.transport": "other",
        "network.transport": "pipe",
    }
    client.db = _Conventions("database", "")
    assert _asyncpg_target(object(), client) == {"db.system": "postgresql"}


def _fields(call: ClientCall) -> tuple[str, tuple[str, ...], dict[str, Any]]:
    """What a prepared call holds for its spans: name, labels, attributes."""
    return call.name, call.labels, call.attributes


def test_asyncpg_calls_are_prepared_once_per_connection_and_statement(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The span name, labels and attributes of a statement on a connection are built on
    its first call only; what is remembered stays bounded; odd queries are not kept."""
    seen: list[object] = []

    def counting(query: object) -> str:
        seen.append(query)
        return sql_operation(query)

    monkeypatch.setattr(_db, "sql_operation", counting)
    client = _Client(None)
    client.db = _Conventions("database", "database/dup")
    connection, other = _Asyncpg(("db", 5432)), _Asyncpg(("db", 5432))
    sql = "SELECT 1"
    first = _asyncpg_call(client, connection, sql, "")
    assert _asyncpg_call(client, connection, "SELECT 1", "") is first
    assert seen == [sql]
    name, key, attributes = _fields(first)
    assert (name, key) == ("SELECT", ("SELECT",))
    assert attributes == {**_asyncpg_target(connection, client), "db.statement": sql, "db.query.text": sql}
    assert _asyncpg_call(client, connection, sql, "CURSOR: ").name == "CURSOR: SELECT"
    assert _fields(_asyncpg_call(client, other, sql, "")) == _fields(first)
    assert len(seen) == 3  # another prefix, another connection: prepared again
    assert _fields(_asyncpg_call(client, connection, None, "")) == (
        "postgresql",
        ("OTHER",),
        _asyncpg_target(connection, client),
    )
    for i in range(_db._MAX_CALLS * 2 + 5):
        _asyncpg_call(client, connection, f"SELECT {i}", "")
    assert 0 < len(client.target(connection, _asyncpg_target).calls) <= _db._MAX_CALLS
    # An object no fixed attributes can be kept for (not weakly referable): the span goes
    # without them, its name and labels as always.
    assert _fields(_asyncpg_call(client, 3, "DELETE FROM t", "")) == ("DELETE", ("DELETE",), {})


def test_redis_unix_socket_and_cluster() -> None:
    client = _Client(None)
    client.http = _Conventions("http", "http/dup")
    pool = SimpleNamespace(connection_kwargs={"path": "/run/redis.sock", "db": None})
    assert _redis_target(pool, client) == {
        "db.system": "redis",
        "db.redis.database_index": 0,
        "net.peer.name": "/run/redis.sock",
        "server.address": "/run/redis.sock",
        "net.transport": "other",
        "network.transport": "unix",
    }
    assert _redis_target(SimpleNamespace(), client) == {"db.system": "redis"}


class _Pool:  # weakly referable, as redis's pools are
    def __init__(self, kwargs: dict[str, Any]) -> None:
        self.connection_kwargs = kwargs


def test_redis_calls_are_prepared_once_per_pool_and_command_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """A command's span name, label and attributes depend on its name and argument count
    only: made once per pool for each; a name that is not a plain str, and pipelines, each
    time; what is kept stays bounded."""
    made: list[tuple[object, ...]] = []

    def counting(args: tuple[object, ...]) -> str:
        made.append(args)
        return _redis_statement(args)

    monkeypatch.setattr(_db, "_redis_statement", counting)
    client = _Client(None)
    pool = _Pool({"host": "cache", "port": 6379, "db": 2})
    instance = SimpleNamespace(connection_pool=pool)
    first = _redis_call(client, instance, ("SET", "k1", "secret-1"), False)
    assert _redis_call(client, instance, ("SET", "k2", "secret-2"), False) is first
    assert made == [("SET", "k1", "secret-1")]
    assert _fields(first) == (
        "SET",
        ("SET",),
        {**_redis_target(pool, client), "db.statement": "SET ? ?", "db.redis.args_length": 3},
    )
    assert (
        _redis_call(client, instance, ("SET", "k", "v", "EX", 60), False).attributes["db.statement"]
        == "SET ? ? ? ?"
    )
    other = SimpleNamespace(connection_pool=_Pool({"host": "other"}))
    assert _redis_call(client, other, ("SET", "k", "v"), False).attributes["net.peer.name"] == "other"
    assert _fields(_redis_call(client, instance, (b"get", "k"), False))[:2] == ("b'get'", ("GET",))
    assert _fields(_redis_call(client, instance, (b"get", "k"), False))[:2] == ("b'get'", ("GET",))
    assert len(made) == 5  # another shape, another pool, a bytes name each time
    pipeline = SimpleNamespace(connection_pool=pool, command_stack=[(("SET", "k", "v"), {})])
    name, labels, attributes = _fields(_redis_call(client, pipeline, (), True))
    assert (name, labels, attributes["db.redis.pipeline_length"]) == ("SET", ("PIPELINE",), 1)
    for i in range(_db._MAX_CALLS * 2 + 5):
        _redis_call(client, instance, ("GET", *range(i)), False)
    assert 0 < len(client.target(pool, _redis_target).calls) <= _db._MAX_CALLS


def test_redis_names_and_statements() -> None:
    instance = SimpleNamespace(connection_pool=SimpleNamespace(connection_kwargs={"db": 3}))
    assert _redis_name(instance, ("FT.SEARCH", "idx", "q")) == "redis.search"
    assert _redis_name(instance, ("FT.CREATE", "idx")) == "redis.create_index"
    assert _redis_name(instance, (b"GET", "k")) == "b'GET'"  # as upstream: str() of the name
    assert _redis_name(instance, ()) == "3"
    assert _redis_statement(("SET", "secret-key", "secret-value")) == "SET ? ?"
    assert _redis_statement(()) == ""
    long = _redis_statement(("MSET", *range(600)))
    assert len(long) == 1000
    assert long.endswith("? ...")
    pipeline = SimpleNamespace(command_stack=[(("SET", "k", "v"), {}), (("GET", "k"), {})])
    assert _redis_pipeline(pipeline) == (2, "SET ? ?\nGET ?", "SET GET")
    assert _redis_pipeline(SimpleNamespace()) == (0, "", "redis")


# --- issue 22: one call into the core per client call ---------------------------------------


def test_a_client_call_ends_in_one_call_into_the_core(
    monkeypatch: pytest.MonkeyPatch, core_calls: Any
) -> None:
    """The client span and its duration cross into the core together; both arrive."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import SpanKind

    from cfk_otel._core import seam as _core
    from cfk_otel._metrics import catalogue as _metrics
    from cfk_otel.testing import OtlpReceiver

    with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.http_endpoint)
        _core.shutdown(1.0)
        provider = TracerProvider()
        _core.activate(_core.Choice(True, ""), provider)
        try:
            client = _Client(provider)
            histogram = _metrics.Metrics(MeterProvider(), native=True).database_query_duration
            client.finish(
                client.spans.start("SELECT", None, SpanKind.CLIENT, {}), histogram, ("SELECT",), 0.001
            )
            span = client.spans.start("SELECT", None, SpanKind.CLIENT, {"db.system.name": "postgresql"})
            with core_calls.watch() as calls:
                client.finish(span, histogram, ("SELECT",), 0.002)
            assert calls == ["end_call"]
            assert histogram.rows() == [(("SELECT",), [0.0, 1.0, 1.0, *[0.0] * 11], 0.003)]
            assert _core.flush(5.0)
            assert receiver.wait_for(lambda: len(receiver.spans) == 2)
            assert [s.name for s in receiver.spans] == ["SELECT", "SELECT"]
            assert receiver.spans[1].attributes == {"db.system.name": "postgresql"}
            # The exemplar's ids travelled in the same call: the second call's, in its bucket.
            [(_, exemplars)] = histogram.family.exemplars()  # type: ignore[union-attr]
            context = span.get_span_context()
            assert {i: (t, s) for i, t, s, _, _ in exemplars}[2] == (context.trace_id, context.span_id)
        finally:
            _core.activate(_core.Choice(False, "not set up"))
            _core.shutdown(1.0)


def test_a_failing_end_of_a_client_call_never_reaches_the_app(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """One guard around the span's end and the duration (the core's histogram, or the SDK's
    beside a core span): what fails there is logged, the app's call goes on."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import SpanKind

    from cfk_otel import _guard
    from cfk_otel._core import seam as _core
    from cfk_otel._metrics import catalogue as _metrics

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("broken")

    monkeypatch.setattr(_guard, "warn_once", lambda kind, *args, **kwargs: _guard._log.warning(kind))
    _core.shutdown(1.0)
    provider = TracerProvider()
    _core.activate(_core.Choice(True, ""), provider)
    try:
        client = _Client(provider)
        native = _metrics.Metrics(MeterProvider(), native=True).database_query_duration
        sdk = _metrics.Metrics(MeterProvider(), native=False).redis_operation_duration
        span = client.spans.start("SELECT", None, SpanKind.CLIENT, {})
        assert type(span) is _core.CoreSpan
        with monkeypatch.context() as patch:
            patch.setattr(_core.CoreSpan, "ending", broken)
            client.finish(span, native, ("SELECT",), 0.001)  # no error
        assert native.rows() == []  # the whole end was lost, and said so
        span = client.spans.start("SET", None, SpanKind.CLIENT, {})
        monkeypatch.setattr(sdk, "record_by_key", broken)
        with caplog.at_level("WARNING", "cfk_otel"):
            client.finish(span, sdk, ("SET",), 0.001)  # no error; the span still ends
        assert not span.is_recording()
        assert "recording a client call's duration" in caplog.text
    finally:
        _core.activate(_core.Choice(False, "not set up"))
        _core.shutdown(1.0)


def test_an_odd_redis_client_never_fails_the_call() -> None:
    """A client whose pool cannot be read: the span goes without the pool's attributes,
    its name and label as always, and nothing reaches the app (the lookup's fast step
    hands over to the guarded one)."""

    class Odd:
        @property
        def connection_pool(self) -> object:
            raise RuntimeError("odd")

    client = _Client(None)
    call = _db._redis_prepared(client, Odd(), ("GET", "k"), False)
    assert _fields(call) == ("redis", ("GET",), {})
    assert client.targets == {}


@pytest.mark.parametrize(
    ("instrumentor", "module", "name"),
    [
        (_db.AsyncpgInstrumentor, "asyncpg.connection", "Connection.fetchval"),
        (_db.AsyncpgInstrumentor, "asyncpg.pool", "Pool.__init__"),
        (_db.RedisInstrumentor, "redis.asyncio.client", "Redis.execute_command"),
        (_db.RedisInstrumentor, "redis.client", "Pipeline.execute"),
    ],
)
def test_a_patched_method_is_a_plain_function_that_keeps_the_original(
    instrumentor: type[Any], module: str, name: str
) -> None:
    """The instrumentors replace a method by a plain function (not a proxy object, which
    costs a bound proxy per call), with the original in ``__wrapped__``, its name and
    signature, and (where Python can mark it) its being a coroutine function; uninstrument
    puts the original itself back."""
    cls_name, method = name.split(".")
    cls = getattr(importlib.import_module(module), cls_name)
    inst = instrumentor()
    already = inst.is_instrumented_by_opentelemetry
    if already:
        inst.uninstrument()
    original = cls.__dict__[method]
    try:
        inst.instrument()
        patched = cls.__dict__[method]
        assert type(patched) is types.FunctionType
        assert patched is not original
        assert patched.__wrapped__ is original
        assert (patched.__name__, patched.__qualname__) == (original.__name__, original.__qualname__)
        assert inspect.signature(patched) == inspect.signature(original)
        if hasattr(inspect, "markcoroutinefunction") or inspect.iscoroutinefunction(patched):
            assert inspect.iscoroutinefunction(patched) == inspect.iscoroutinefunction(original)
    finally:
        inst.uninstrument()
        assert cls.__dict__[method] is original
        if already:
            inst.instrument()
