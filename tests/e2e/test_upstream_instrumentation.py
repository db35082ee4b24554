"""An upstream instrumentation installed beside cfk_otel (issue 18): under
``opentelemetry-instrument`` with our distro, httpx's client span is a child of our
request span, in the same trace, and the call carries that trace on."""

from __future__ import annotations

import importlib.metadata
import json

import pytest

from cfk_otel.testing import OtlpReceiver
from tests.conftest import free_port, uvicorn_command

pytestmark = pytest.mark.timeout(120)


def test_httpx_client_span_is_a_child_of_our_request_span(run_app, receiver: OtlpReceiver) -> None:
    # In the test extra: without it this test must fail, not skip.
    assert importlib.metadata.version("opentelemetry-instrumentation-httpx")
    port = free_port()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "SERVICE_NAME": "cf-kanban-test",
        "OUTBOUND_URL": f"http://127.0.0.1:{port}/inner",
    }
    app = run_app(uvicorn_command("outbound_app:app", port), env, port)
    status, _, body = app.get("/outbound")
    assert status == 200, body
    reply = json.loads(body)
    assert reply["status"] == 200

    server = receiver.wait_for_span(lambda s: s.name == "GET /outbound")
    client = receiver.wait_for_span(lambda s: s.span.kind == s.span.SPAN_KIND_CLIENT)
    inner = receiver.wait_for_span(lambda s: s.name == "GET /inner")

    # The client span is upstream's (its scope), ours is the request span around it.
    assert client.scope == "opentelemetry.instrumentation.httpx", client.scope
    assert client.trace_id == server.trace_id
    assert client.parent_span_id == server.span_id
    assert client.attributes.get("http.request.method", client.attributes.get("http.method")) == "GET"
    # The call carried the trace on: the inner request continues it under the client span.
    assert inner.trace_id == server.trace_id
    assert inner.parent_span_id == client.span_id
    assert reply["inner"]["traceparent"].split("-")[2] == client.span_id
