"""W3C Trace Context as the specification reads it (cfk_otel._core.propagation, issue 24 point 4).

The four cases the stock propagator gets wrong in the W3C harness, written from the
specification's text (w3c/trace-context, spec/20-http_request_header_format.md and
spec/30-processing-model.md), not from the harness's code.
"""

from __future__ import annotations

import http.client
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import propagate, trace
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from cfk_otel import _settings
from cfk_otel._core.propagation import W3CTraceContextPropagator, W3CTraceState, install
from tests.conftest import free_port, launch, uvicorn_command

TRACE = "12345678901234567890123456789012"
PARENT = f"00-{TRACE}-1234567890123456-00"


def _extract(headers: dict[str, list[str]], propagator: Any = None) -> SpanContext:
    context = (propagator or W3CTraceContextPropagator()).extract(headers)
    return trace.get_current_span(context).get_span_context()


def _state(*tracestate: str, propagator: Any = None) -> dict[str, str]:
    found = _extract({"traceparent": [PARENT], "tracestate": list(tracestate)}, propagator)
    assert f"{found.trace_id:032x}" == TRACE  # a tracestate never costs the traceparent
    return dict(found.trace_state.items())


def test_two_traceparent_headers_start_a_new_trace() -> None:
    """traceparent is one field: two of them are invalid, and the vendor "creates a new
    traceparent" (processing model, step 2)."""
    two = {"traceparent": [f"00-{TRACE[:-1]}1-1234567890123456-01", f"00-{TRACE}-1234567890123456-01"]}
    assert not _extract(two).is_valid
    assert _extract(two, TraceContextTextMapPropagator()).is_valid  # the stock one took the first
    assert f"{_extract({'traceparent': [PARENT]}).trace_id:032x}" == TRACE


def test_a_duplicated_key_keeps_the_header() -> None:
    """ "Vendors MAY also discard duplicate keys": the first is kept, and the rest."""
    assert _state("foo=1,foo=1") == {"foo": "1"}
    assert _state("foo=1,foo=2") == {"foo": "1"}
    assert _state("foo=1", "foo=2") == {"foo": "1"}  # two fields are combined (RFC 9110 5.3)
    assert _state("foo=1,bar=2,foo=3") == {"foo": "1", "bar": "2"}
    assert _state("foo=1,foo=2", propagator=TraceContextTextMapPropagator()) == {}  # the stock one: all lost


def test_keys_may_hold_at_signs_anywhere_but_first() -> None:
    """key = ( lcalpha / DIGIT ) 0*255 ( keychar ), keychar including "@"."""
    assert _state("foo@=1,bar=2") == {"foo@": "1", "bar": "2"}
    assert _state("foo@@bar=1,bar=2") == {"foo@@bar": "1", "bar": "2"}
    assert _state("foo@bar@baz=1,bar=2") == {"foo@bar@baz": "1", "bar": "2"}
    assert _state("tenant@vendor=1") == {"tenant@vendor": "1"}
    assert _state("@foo=1,bar=2") == {}  # a key must begin with a letter or a digit
    assert _state("foo@=1,bar=2", propagator=TraceContextTextMapPropagator()) == {}


def test_a_key_holds_up_to_256_characters() -> None:
    longest = "z" * 256
    assert _state("foo=1", f"{longest}=1") == {"foo": "1", longest: "1"}
    assert _state("foo=1", "z" * 257 + "=1") == {}  # the header cannot be parsed: discarded
    for key in ("t" * 241 + "@" + "v" * 14, "t" * 242 + "@v"):
        assert _state("foo=1", f"{key}=1") == {"foo": "1", key: "1"}
    tenant = "t" * 242 + "@v"
    assert _state("foo=1", f"{tenant}=1", propagator=TraceContextTextMapPropagator()) == {}


def test_the_rest_of_the_grammar_is_kept() -> None:
    members = [f"bar{i:02}={i:02}" for i in range(1, 34)]
    assert len(_state(",".join(members[:32]))) == 32
    assert _state(",".join(members)) == {}  # 33 members
    assert _state(" foo=1 ,\t, bar= x y") == {"foo": "1", "bar": " x y"}  # OWS, empty members
    assert _state("Foo=1") == {}
    assert _state("foo=a,b") == {}
    assert _state("x" * 9000 + "=1") == {}
    without = _extract({"traceparent": [PARENT]})
    assert without.trace_state == W3CTraceState() == {}
    bad = _extract({"traceparent": ["00-" + "0" * 32 + "-1234567890123456-01"], "tracestate": ["foo=1"]})
    assert not bad.is_valid


def test_what_is_received_is_sent_on() -> None:
    context = W3CTraceContextPropagator().extract(
        {"traceparent": [PARENT], "tracestate": ["foo@bar@baz=1", "foo=2,foo=3"]}
    )
    carrier: dict[str, str] = {}
    W3CTraceContextPropagator().inject(carrier, context)
    assert carrier == {"traceparent": PARENT, "tracestate": "foo@bar@baz=1,foo=2"}
    state = trace.get_current_span(context).get_span_context().trace_state
    assert state.add("ours", "x").to_header() == "ours=x,foo@bar@baz=1,foo=2"
    assert state.update("foo", "9").to_header() == "foo=9,foo@bar@baz=1"
    assert state.delete("foo").to_header() == "foo@bar@baz=1"
    assert state.add("Bad", "x") is state
    assert W3CTraceContextPropagator().fields == {"traceparent", "tracestate"}
    span = NonRecordingSpan(SpanContext(1, 2, False, TraceFlags(1), W3CTraceState([("a@b@c", "1")])))
    carrier = {}
    W3CTraceContextPropagator().inject(carrier, trace.set_span_in_context(span))
    assert carrier["tracestate"] == "a@b@c=1"


@pytest.fixture
def restore_propagator() -> Iterator[None]:
    saved = propagate.get_global_textmap()
    yield
    propagate.set_global_textmap(saved)


@pytest.mark.usefixtures("restore_propagator")
def test_install_stands_in_for_tracecontext_only() -> None:
    assert install(_settings.load({}).propagators)
    composite = propagate.get_global_textmap()
    assert isinstance(composite, CompositePropagator)
    assert composite.fields == {"traceparent", "tracestate", "baggage"}
    assert _extract({"traceparent": [PARENT, PARENT]}, composite) == trace.INVALID_SPAN_CONTEXT
    assert install(_settings.load({"OTEL_PROPAGATORS": "tracecontext"}).propagators)
    assert propagate.get_global_textmap().fields == {"traceparent", "tracestate"}
    before = propagate.get_global_textmap()
    # The user chose: left alone.
    assert not install(_settings.load({"OTEL_PROPAGATORS": "baggage"}).propagators)
    assert not install(_settings.load({"OTEL_PROPAGATORS": "Tracecontext, no-such-propagator"}).propagators)
    assert propagate.get_global_textmap() is before


# End to end: the app under opentelemetry-instrument, its outgoing calls made with httpx and
# the upstream httpx instrumentation, as the W3C harness drives it.


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[dict[str, list[str]]] = []  # noqa: RUF012  (one test at a time)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        headers: dict[str, list[str]] = {}
        for key, value in self.headers.items():
            headers.setdefault(key.lower(), []).append(value)
        _Recorder.seen.append(headers)
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _call(port: int, target: str, headers: list[tuple[str, str]]) -> dict[str, list[str]]:
    """POST /test with ``headers`` (repeated names kept), as the harness does: the app calls
    ``target``; returns the headers that call carried."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    body = json.dumps([{"url": target, "arguments": []}]).encode()
    try:
        connection.putrequest("POST", "/test")
        for key, value in [
            *headers,
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
        ]:
            connection.putheader(key, value)
        connection.endheaders(body)
        response = connection.getresponse()
        response.read()
        assert response.status == 200
    finally:
        connection.close()
    return _Recorder.seen.pop()


def test_the_app_passes_the_four_cases_on(tmp_path: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    target = f"http://127.0.0.1:{server.server_address[1]}/callback"
    port = free_port()
    env = {"OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none", "OTEL_LOGS_EXPORTER": "none"}
    app = launch(tmp_path, uvicorn_command("tracecontext_app:app", port), env, port)
    try:
        sent = _call(port, target, [("traceparent", PARENT), ("tracestate", "foo=1")])
        (traceparent,) = sent["traceparent"]
        assert traceparent.split("-")[1] == TRACE
        assert sent["tracestate"] == ["foo=1"]
        # Two traceparent headers: a new trace.
        sent = _call(port, target, [("traceparent", PARENT), ("traceparent", PARENT.replace("12-", "13-"))])
        assert TRACE not in sent["traceparent"][0]
        assert TRACE[:-2] + "13" not in sent["traceparent"][0]
        # Duplicated keys: the first kept.
        sent = _call(
            port, target, [("traceparent", PARENT), ("tracestate", "foo=1"), ("tracestate", "foo=2")]
        )
        assert sent["tracestate"] == ["foo=1"]
        # At signs, and the 256-character key.
        sent = _call(port, target, [("traceparent", PARENT), ("tracestate", "foo@bar@baz=1,bar=2")])
        assert sent["tracestate"] == ["foo@bar@baz=1,bar=2"]
        key = "t" * 242 + "@v"
        sent = _call(
            port, target, [("traceparent", PARENT), ("tracestate", "foo=1"), ("tracestate", f"{key}=1")]
        )
        assert sent["tracestate"] == [f"foo=1,{key}=1"]
        sent = _call(port, target, [("traceparent", PARENT), ("tracestate", "z" * 257 + "=1")])
        assert "tracestate" not in sent
    finally:
        app.terminate()
        server.shutdown()
        server.server_close()
