"""Client timings: ``database_query_duration_seconds`` (asyncpg) and
``redis_operation_duration_seconds`` (redis), plus slow-query reports.

The OpenTelemetry asyncpg and redis instrumentations make the spans; these small
wrappers time the same calls for the metrics, whatever the trace sampler decided.
Labels are bounded: the statement's leading keyword (never the SQL text) and the
Redis command name.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Final

import wrapt
from opentelemetry import trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor
from opentelemetry.instrumentation.utils import is_instrumentation_enabled, suppress_instrumentation

from . import _errors, _metrics, _sdk

_log = logging.getLogger("cfk_otel.db")

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
_ASYNCPG_METHODS: Final = ("execute", "executemany", "fetch", "fetchval", "fetchrow", "fetchmany")
_MAX_SQL: Final = 2048


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


def _report_slow(query: object, seconds: float) -> None:
    sql = query[:_MAX_SQL] if isinstance(query, str) else repr(query)[:_MAX_SQL]
    _log.warning(
        "slow query: %.3fs %s",
        seconds,
        sql,
        extra={"duration_ms": round(seconds * 1000, 1), "db_statement": sql, "slow_query": True},
    )
    # Arguments are never recorded: they carry user data and secrets.
    trace.get_current_span().add_event(
        "slow_query", {"db.query.text": sql, "db.operation.name": sql_operation(query), "duration_s": seconds}
    )
    _errors.report_slow_query(sql, seconds)  # a Sentry warning when Sentry is on


async def _time_asyncpg(
    wrapped: Callable[..., Awaitable[Any]], instance: object, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    if not is_instrumentation_enabled():  # e.g. the health checks' own probes
        return await wrapped(*args, **kwargs)
    start = time.perf_counter()
    try:
        return await wrapped(*args, **kwargs)
    finally:
        elapsed = time.perf_counter() - start
        query = args[0] if args else kwargs.get("query")
        try:
            _metrics.default().database_query_duration.record_by_key((sql_operation(query),), elapsed)
            if elapsed >= _sdk.settings().slow_query_threshold:
                _report_slow(query, elapsed)
        except Exception:
            _log.debug("cfk_otel: recording a query failed", exc_info=True)


def _record_redis(args: tuple[Any, ...], elapsed: float, pipeline: bool) -> None:
    try:
        command = "PIPELINE" if pipeline else redis_command(args)
        _metrics.default().redis_operation_duration.record_by_key((command,), elapsed)
    except Exception:
        _log.debug("cfk_otel: recording a redis call failed", exc_info=True)


def _time_redis(pipeline: bool) -> Callable[..., Any]:
    def timed(
        wrapped: Callable[..., Any], instance: object, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if not is_instrumentation_enabled():
            return wrapped(*args, **kwargs)
        start = time.perf_counter()
        try:
            return wrapped(*args, **kwargs)
        finally:
            _record_redis(args, time.perf_counter() - start, pipeline)

    return timed


def _time_redis_async(pipeline: bool) -> Callable[..., Awaitable[Any]]:
    async def timed(
        wrapped: Callable[..., Awaitable[Any]],
        instance: object,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        if not is_instrumentation_enabled():
            return await wrapped(*args, **kwargs)
        start = time.perf_counter()
        try:
            return await wrapped(*args, **kwargs)
        finally:
            _record_redis(args, time.perf_counter() - start, pipeline)

    return timed


async def _quiet_reset(
    wrapped: Callable[..., Awaitable[None]], instance: object, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    # A pool resets every connection it takes back with a query of its own (RESET ALL,
    # UNLISTEN *, ...): plumbing, not the app's work. Neither a span nor a timing for it.
    with suppress_instrumentation():
        await wrapped(*args, **kwargs)


def _track_pool(
    wrapped: Callable[..., None], instance: object, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    wrapped(*args, **kwargs)
    try:
        _metrics.default().track_pool(instance)  # database_pool_connections, while it lives
    except Exception:
        _log.debug("cfk_otel: could not track an asyncpg pool", exc_info=True)


class AsyncpgTimingInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """``database_query_duration_seconds`` and slow-query reports for asyncpg."""

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("asyncpg >= 0.27",)

    def _instrument(self, **kwargs: Any) -> None:
        for method in _ASYNCPG_METHODS:
            wrapt.wrap_function_wrapper("asyncpg.connection", f"Connection.{method}", _time_asyncpg)
        wrapt.wrap_function_wrapper("asyncpg.pool", "Pool.__init__", _track_pool)
        wrapt.wrap_function_wrapper("asyncpg.connection", "Connection.reset", _quiet_reset)

    def _uninstrument(self, **kwargs: Any) -> None:
        import asyncpg.connection  # noqa: PLC0415
        import asyncpg.pool  # noqa: PLC0415

        for method in _ASYNCPG_METHODS:
            _unwrap(asyncpg.connection.Connection, method)
        _unwrap(asyncpg.pool.Pool, "__init__")
        _unwrap(asyncpg.connection.Connection, "reset")


_REDIS_TARGETS: Final = (
    ("redis.client", "Redis.execute_command", False, False),
    ("redis.client", "Pipeline.execute", True, False),
    ("redis.asyncio.client", "Redis.execute_command", False, True),
    ("redis.asyncio.client", "Pipeline.execute", True, True),
)


class RedisTimingInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """``redis_operation_duration_seconds`` for redis-py, sync and asyncio."""

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("redis >= 4.0",)

    def _instrument(self, **kwargs: Any) -> None:
        for module, name, pipeline, is_async in _REDIS_TARGETS:
            wrapper = _time_redis_async(pipeline) if is_async else _time_redis(pipeline)
            wrapt.wrap_function_wrapper(module, name, wrapper)

    def _uninstrument(self, **kwargs: Any) -> None:
        import importlib  # noqa: PLC0415

        for module, name, _, _ in _REDIS_TARGETS:
            cls_name, method = name.split(".")
            _unwrap(getattr(importlib.import_module(module), cls_name), method)


def _unwrap(cls: type, method: str) -> None:
    current = getattr(cls, method, None)
    original = getattr(current, "__wrapped__", None)
    if original is not None:
        setattr(cls, method, original)
