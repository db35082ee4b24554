"""native/src/call.rs: a client call under the core's server span, timed in the core.

The asyncpg and redis patches return the core's ``TimedCall`` in place of the call's own
awaitable (``Spans.timed``). It passes every step through, and when the call returns it queues
the call's span and observes its duration without Python; a failed or slow call ends in Python
(``db._timed_end``). Held to the SDK's spans and metrics (the oracle), and to the awaitable
protocol a coroutine keeps."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Generator, Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import Sampler
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from cfk_otel import _guard
from cfk_otel._asgi.middleware import TelemetryMiddleware
from cfk_otel._core.seam import ServerSpan, Spans
from cfk_otel._instrumentation import db as _db
from cfk_otel._metrics import catalogue as _metrics
from cfk_otel.testing import OtlpReceiver
from tests.conftest import IN_CI
from tests.test_core_client import PARENT, _comparable, _Connection, _Redis
from tests.test_core_span import (  # noqa: F401  (_native: the autouse fixture, the core's exporter per test)
    _flush,
    _native,
    _Other,
    _provider,
)
from tests.test_server_span import _head

# Off CI only: with CI=true a missing compiled core fails these tests rather than skipping them.
pytestmark = pytest.mark.skipif(ServerSpan is None and not IN_CI, reason="the compiled core is not installed")


@pytest.fixture
def head() -> Iterator[Sampler]:
    yield _head()
    _head({})


async def _one(*args: object, **kwargs: object) -> int:
    await asyncio.sleep(0)  # a step through the event loop, as a real query takes
    return 1


async def _missing(*args: object, **kwargs: object) -> int:
    await asyncio.sleep(0)
    raise ValueError("relation does not exist")


async def _hangs(*args: object, **kwargs: object) -> int:
    await asyncio.sleep(10)
    return 1


def _app(provider: TracerProvider, slow_threshold: float = 1.0) -> Starlette:
    """Routes whose client calls go through the patched asyncpg and redis methods."""
    client = _db._Client(provider, slow_query_threshold=slow_threshold)
    slow = _db._Client(provider, slow_query_threshold=0.0)  # every query of this one is slow
    query = _db._asyncpg_patch(client, "connection")
    slow_query = _db._asyncpg_patch(slow, "connection")
    command = _db._redis_patch(client, False, True)
    connection, cache = _Connection(), _Redis()

    async def board(request: Request) -> PlainTextResponse:
        rows = await query(_one)(connection, "SELECT 1")
        await command(_one)(cache, "SET", "board:7", "secret", "EX", 60)
        await slow_query(_one)(connection, "SELECT 2")
        try:
            await query(_missing)(connection, "SELECT * FROM gone")
        except ValueError as error:
            return PlainTextResponse(f"{rows} {error}")
        return PlainTextResponse("no error?", status_code=500)

    async def cancelled(request: Request) -> PlainTextResponse:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(query(_hangs)(connection, "SELECT pg_sleep(10)"), 0.01)
        return PlainTextResponse("timed out")

    return Starlette(routes=[Route("/boards/{board_id}", board), Route("/cancelled", cancelled)])


def _serve(provider: TracerProvider, metrics: _metrics.Metrics, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.setattr(_metrics, "_default", metrics)
    app = TelemetryMiddleware(_app(provider), tracer_provider=provider)
    with TestClient(app) as client:
        answers = [
            client.get("/boards/7").text,
            client.get("/boards/8", headers=PARENT).text,
            client.get("/cancelled").text,
        ]
    _flush(provider)
    return answers


def _client_spans(receiver: OtlpReceiver) -> list[dict[str, Any]]:
    """Every client span, as test_core_client compares them, each against its own request."""
    requests = {s.span.span_id for s in receiver.spans if s.span.kind == 2}
    spans = [_comparable(s, s.span.parent_span_id) for s in receiver.spans if s.span.kind == 3]
    assert all(s.span.parent_span_id in requests for s in receiver.spans if s.span.kind == 3)
    for span in spans:  # a new trace's id is random: only the one continued is known
        if span["trace_state"] != "vendor=value":
            span["trace_id"] = "new"
    return sorted(spans, key=lambda s: json.dumps(s, sort_keys=True, default=str))


def _counted(monkeypatch: pytest.MonkeyPatch, names: tuple[str, ...]) -> dict[str, int]:
    """How often each of ``db``'s functions ``names`` is called from now on."""
    counts = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(_db, name)

        def counting(*args: Any, _name: str = name, _original: Any = original) -> Any:
            counts[_name] += 1
            return _original(*args)

        monkeypatch.setattr(_db, name, counting)
    return counts


def test_timed_calls_arrive_as_the_sdks_spans_and_metrics(
    head: Sampler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call that returned, one that failed, a slow one and a cancelled one: the same OTLP
    spans and the same durations as the SDK's, each a child of its request."""
    ways = ("_traced_query", "_traced_redis", "_timed_end")
    with OtlpReceiver() as lean_receiver, OtlpReceiver() as sdk_receiver:
        native = _metrics.Metrics(MeterProvider(), native=True)
        with monkeypatch.context() as patch:
            lean_ways = _counted(patch, ways)
            lean_answers = _serve(_provider(lean_receiver, sampler=head), native, monkeypatch)
        sdk = _metrics.Metrics(MeterProvider(), native=False)
        with monkeypatch.context() as patch:
            sdk_ways = _counted(patch, ways)
            sdk_answers = _serve(_provider(sdk_receiver, _Other(), sampler=head), sdk, monkeypatch)
        total = 3 + 2 * 4 + 1  # the requests' server spans, four calls in each board, one cancelled
        assert lean_receiver.wait_for(lambda: len(lean_receiver.spans) == total)
        assert sdk_receiver.wait_for(lambda: len(sdk_receiver.spans) == total)
        lean, expected = _client_spans(lean_receiver), _client_spans(sdk_receiver)
        lean_ids = {(s.span.trace_id, s.span.span_id) for s in lean_receiver.spans if s.span.kind == 3}
    assert lean_answers == sdk_answers == ["1 relation does not exist"] * 2 + ["timed out"]
    assert lean == expected
    assert len(lean) == 9
    failed = [s for s in lean if s["status"][0] == 2]
    assert [s["status"][1] for s in failed] == ["ValueError: relation does not exist"] * 2
    assert all(s["events"][0][0] == "exception" and s["stacktrace"] == [True] for s in failed)
    slow = [s for s in lean if s["events"] and s["events"][0][0] == "slow_query"]
    assert [s["events"][0][1]["db.query.text"] for s in slow] == ["SELECT 2", "SELECT 2"]
    assert [s["name"] for s in lean if s["trace_state"] == "vendor=value"] == sorted(
        ["SELECT", "SELECT", "SELECT", "SET"]
    )
    assert {s["trace_id"] for s in lean if s["trace_state"]} == {PARENT["traceparent"][3:35]}
    # Every call was timed in the core; the failed and the slow ones ended in Python. Each
    # call's duration observed once, under its labels.
    assert lean_ways == {"_traced_query": 0, "_traced_redis": 0, "_timed_end": 4}
    assert sdk_ways == {"_traced_query": 7, "_traced_redis": 2, "_timed_end": 0}
    assert [(k, sum(c)) for k, c, _ in native.database_query_duration.rows()] == [(("SELECT",), 7)]
    assert [(k, sum(c)) for k, c, _ in native.redis_operation_duration.rows()] == [(("SET",), 2)]
    # The exemplars name client spans that arrived.
    for family in (native.database_query_duration, native.redis_operation_duration):
        [(key, exemplars)] = family.exemplars().items()
        assert exemplars, key
        for _, exemplar in exemplars:
            assert (exemplar.trace_id.to_bytes(16, "big"), exemplar.span_id.to_bytes(8, "big")) in lean_ids


# --- the awaitable ---------------------------------------------------------------------------


def _timed(
    provider: TracerProvider,
    metrics: _metrics.Metrics,
    awaited: Callable[[], Awaitable[Any]],
    client: _db._Client | None = None,
) -> tuple[Any, Any]:
    """A TimedCall of ``awaited()`` under a core server span (and that span)."""
    spans = Spans(provider)
    spans.start("GET", None)  # chooses the path, and makes its ServerSpans
    assert spans.server is not None
    server = spans.server.start("GET", None)
    assert type(server) is ServerSpan
    client = client or _db._Client(provider)
    call = _db._asyncpg_call(client, _Connection(), "SELECT 1", "")
    histogram = metrics.database_query_duration
    context = (client, call, "SELECT 1", histogram, server, 1.0)
    timed = client.spans.timed(client.timer, call, server, histogram.family, awaited(), 1.0, context)
    assert type(timed).__name__ == "TimedCall"
    return timed, server


class _Stepping:
    """An awaitable that is no coroutine: it takes the values sent in, and returns their sum."""

    def __await__(self) -> Generator[str, int, int]:
        first = yield "first"
        second = yield "second"
        return first + second


class _Waits:
    """An awaitable that waits until something is thrown in, or it is closed."""

    def __await__(self) -> Generator[str, None, None]:
        while True:
            yield "waiting"


def test_a_timed_call_passes_each_step_value_and_error_through(head: Sampler) -> None:
    with OtlpReceiver() as receiver:
        provider = _provider(receiver, sampler=head)
        metrics = _metrics.Metrics(MeterProvider(), native=True)
        marker = object()

        async def returns() -> object:
            await asyncio.sleep(0)
            return marker

        assert asyncio.run(_await(_timed(provider, metrics, returns)[0])) is marker

        # Not a coroutine: its iterator steps, and what is sent goes in.
        stepping = _timed(provider, metrics, _Stepping)[0].__await__()
        assert next(stepping) == "first"
        assert stepping.send(2) == "second"
        with pytest.raises(StopIteration) as stopped:
            stepping.send(3)
        assert stopped.value.value == 5
        with pytest.raises(RuntimeError, match="already awaited"):
            next(stepping)

        error = ValueError("app error")

        async def fails() -> None:
            await asyncio.sleep(0)
            raise error

        with pytest.raises(ValueError, match="app error") as raised:
            asyncio.run(_await(_timed(provider, metrics, fails)[0]))
        assert raised.value is error

        # Thrown in (a cancellation, say): the call sees it, and it comes back out.
        thrown = _timed(provider, metrics, _Waits)[0]
        assert next(thrown.__await__()) == "waiting"
        with pytest.raises(KeyError):
            thrown.throw(KeyError("in"))

        # Closed before it started: nothing recorded; after: ended as it stands.
        before = sum(sum(c) for _, c, _ in metrics.database_query_duration.rows())
        unstarted = _timed(provider, metrics, _Waits)[0]
        unstarted.close()
        started = _timed(provider, metrics, _Waits)[0]
        assert next(started) == "waiting"
        started.close()
        after = sum(sum(c) for _, c, _ in metrics.database_query_duration.rows())
        assert after - before == 1
        _flush(provider)
        names = [s.name for s in receiver.spans]
        assert names.count("SELECT") == 5  # returns, stepping, fails, thrown, the started one


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def test_a_returned_call_runs_no_python_of_ours(head: Sampler) -> None:
    """The point of the core's timing: between the patched method's return and the app's
    next line, a call that returned runs none of cfk_otel's Python."""
    with OtlpReceiver() as receiver:
        provider = _provider(receiver, sampler=head)
        metrics = _metrics.Metrics(MeterProvider(), native=True)
        timed, _ = _timed(provider, metrics, _one)
        ours: list[str] = []

        def profile(frame: Any, event: str, arg: object) -> None:
            if event == "call" and "/cfk_otel/" in frame.f_code.co_filename:
                ours.append(frame.f_code.co_name)

        async def run() -> None:
            sys.setprofile(profile)
            try:
                await timed
            finally:
                sys.setprofile(None)

        asyncio.run(run())
        assert ours == []
        assert [(k, sum(c)) for k, c, _ in metrics.database_query_duration.rows()] == [(("SELECT",), 1)]


def test_a_failure_of_ours_at_the_end_never_reaches_the_app(
    head: Sampler, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("fallback broke")

    _guard._reset_for_tests()  # said once per kind: this test's must be said
    monkeypatch.setattr(_db, "_timed_end", broken)  # read when a client is made
    with OtlpReceiver() as receiver:
        provider = _provider(receiver, sampler=head)
        metrics = _metrics.Metrics(MeterProvider(), native=True)
        client = _db._Client(provider)
        error = ValueError("app error")

        async def fails() -> None:
            raise error

        with pytest.raises(ValueError, match="app error") as raised:
            asyncio.run(_await(_timed(provider, metrics, fails, client)[0]))
        assert raised.value is error
        assert "recording the end of a client call" in caplog.text
        assert "fallback broke" in caplog.text


def test_a_timed_call_runs_wherever_the_calls_coroutine_ran(head: Sampler) -> None:
    """asyncio takes it as a coroutine (``collections.abc.Coroutine``: it has ``send``,
    ``throw`` and ``close``): a task, a task group, ``gather``, ``wait_for`` and ``asyncio.run``
    run it as they ran the call's own coroutine."""
    with OtlpReceiver() as receiver:
        provider = _provider(receiver, sampler=head)
        metrics = _metrics.Metrics(MeterProvider(), native=True)
        client = _db._Client(provider)

        def timed() -> Any:
            return _timed(provider, metrics, _one, client)[0]

        async def main() -> list[object]:
            created = await asyncio.create_task(timed())
            gathered = await asyncio.gather(timed(), timed())
            async with asyncio.TaskGroup() as group:
                task = group.create_task(timed())
            waited = await asyncio.wait_for(timed(), 5)
            return [created, *gathered, task.result(), waited]

        assert asyncio.run(main()) == [1] * 5
        alone = timed()
        assert asyncio.iscoroutine(alone)
        assert asyncio.run(alone) == 1
        assert [(k, sum(c)) for k, c, _ in metrics.database_query_duration.rows()] == [(("SELECT",), 6)]
