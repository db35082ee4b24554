"""The collector under change and failure: switching backends, 30 s backend outages (503
and connection refused), a collector restart with the backend down (persistent queue), malformed OTLP input.
Every span is identified by its url.path, so "nothing lost" is checked exactly."""

from __future__ import annotations

import http.client
import shutil
import time
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from cfk_otel.testing import OtlpReceiver
from tests.collector.conftest import Collector, SentryOtlp
from tests.collector.test_backends import start_app
from tests.conftest import free_port

pytestmark = pytest.mark.timeout(60)


def delivered(backend: OtlpReceiver, prefix: str) -> set[str]:
    return {
        str(s.attributes.get("url.path"))
        for s in backend.iter_spans()
        if str(s.attributes.get("url.path", "")).startswith(prefix)
    }


def poll(predicate: Any, timeout: float) -> bool:
    """For counters that change without notifying (OtlpReceiver.rejected)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def send(app: Any, prefix: str, count: int, interval: float = 0.0) -> set[str]:
    paths = set()
    for i in range(count):
        path = f"{prefix}{i}"
        assert app.get(path)[0] == 200
        paths.add(path)
        if interval:
            time.sleep(interval)
    return paths


def test_switching_backends_with_the_same_running_app(
    run_app: Any, collector: Collector, sentry: SentryOtlp, otlp_backend: OtlpReceiver
) -> None:
    collector.start("sentry", SENTRY_DSN=sentry.dsn)
    app = start_app(run_app, collector)
    before = send(app, "/api/tickets/before-", 5)
    assert sentry.wait_for(lambda: before <= set(sentry.span_paths())), sentry.span_paths()

    collector.stop()
    collector.start("datadog", DD_OTLP_ENDPOINT=otlp_backend.http_endpoint, DD_API_KEY="b" * 32)
    after = send(app, "/api/tickets/after-", 5)  # the app was not restarted

    assert otlp_backend.wait_for(lambda: delivered(otlp_backend, "/api/tickets/after-") == after)
    time.sleep(1)
    assert not any(p.startswith("/api/tickets/after-") for p in sentry.span_paths())  # old backend: nothing
    assert delivered(otlp_backend, "/api/tickets/before-") == set()


OUTAGE = 30.0  # seconds: the figure


@pytest.mark.timeout(120)
def test_backend_outages_lose_nothing(run_app: Any, collector: Collector, otlp_backend: OtlpReceiver) -> None:
    """Two 30 s outages at once under one steady stream of requests (20/s): the datadog
    exporter's backend answers 503, the cloudwatch exporter's backend is gone (connection
    refused) and comes back on the same port. Each exporter has its own queue and retries
    with the shipped defaults (CFK_RETRY_MAX_ELAPSED_TIME 10m): every span arrives at both."""
    # A fixed port: stop() ... start() is a backend that refused connections for a while
    # and came back at its old address.
    with OtlpReceiver(http_port=free_port()) as refusing:
        collector.start(
            "datadog,cloudwatch",
            DD_OTLP_ENDPOINT=otlp_backend.http_endpoint,
            DD_API_KEY="c" * 32,
            CLOUDWATCH_OTLP_ENDPOINT=refusing.http_endpoint,
            CLOUDWATCH_LOG_GROUP="/cf-kanban/outage",
        )
        app = start_app(run_app, collector)
        assert app.get("/api/tickets/warm-up")[0] == 200
        assert refusing.wait_for(lambda: delivered(refusing, "/api/tickets/warm-up") != set())

        otlp_backend.status = 503
        refusing.stop()
        received_before = len(list(refusing.iter_spans()))
        sent: set[str] = set()
        start = time.monotonic()
        i = 0
        while time.monotonic() - start < OUTAGE:
            path = f"/api/tickets/outage-{i}"
            assert app.get(path)[0] == 200
            sent.add(path)
            i += 1
            time.sleep(max(0.0, start + i * 0.05 - time.monotonic()))
        rejected_while_down = otlp_backend.rejected
        received_while_down = len(list(refusing.iter_spans())) - received_before
        otlp_backend.status = 200
        refusing.start()
        recovered = time.monotonic()
        sent |= send(app, "/api/tickets/outage-after-", 10)

        assert len(sent) >= 0.9 * OUTAGE * 20, len(sent)  # the traffic was steady
        assert rejected_while_down > 0  # the 503 outage was real: the collector tried and was refused
        assert received_while_down == 0
        assert "connection refused" in collector.output()  # ... and so was the refused one
        for name, backend in (("503", otlp_backend), ("connection refused", refusing)):
            assert backend.wait_for(
                lambda b=backend: delivered(b, "/api/tickets/outage-") == sent, timeout=30
            ), (
                f"{name}: {len(delivered(backend, '/api/tickets/outage-'))} of {len(sent)} delivered"
                f"\n{collector.output()[-3000:]}"
            )
        took = time.monotonic() - recovered
        print(f"{len(sent)} spans sent; all at both backends {took:.1f} s after recovery")
        assert collector.health() == 200


@pytest.mark.parametrize("wipe_queue", [False, True], ids=["persistent-queue", "control-queue-wiped"])
def test_collector_restart_while_backend_down_keeps_the_queue(
    run_app: Any, collector: Collector, otlp_backend: OtlpReceiver, wipe_queue: bool
) -> None:
    env = {"DD_OTLP_ENDPOINT": otlp_backend.http_endpoint, "DD_API_KEY": "d" * 32}
    collector.start("datadog", **env)
    app = start_app(run_app, collector)
    otlp_backend.status = 503
    sent = send(app, "/api/tickets/restart-", 50)
    # Let the app's batch processor (0.2 s) and the collector's (0.2 s) hand everything to
    # the queue, and the exporter try at least once.
    assert poll(lambda: otlp_backend.rejected > 0, timeout=10)
    time.sleep(1.5)
    collector.stop()  # graceful: the batch processor flushes into the persistent queue
    assert any(p.stat().st_size > 0 for p in collector.storage.rglob("*") if p.is_file())
    assert delivered(otlp_backend, "/api/tickets/restart-") == set()
    if wipe_queue:
        shutil.rmtree(collector.storage)

    collector.start("datadog", **env)  # the backend is still down
    rejected = otlp_backend.rejected
    poll(lambda: otlp_backend.rejected > rejected, timeout=5)
    otlp_backend.status = 200
    if wipe_queue:
        # Control: the app had handed everything over, so without the queue files it is gone.
        time.sleep(3)
        assert delivered(otlp_backend, "/api/tickets/restart-") == set()
        return
    assert otlp_backend.rejected > rejected  # the restored queue was retried while still down
    assert otlp_backend.wait_for(
        lambda: delivered(otlp_backend, "/api/tickets/restart-") == sent, timeout=20
    ), (
        f"{len(delivered(otlp_backend, '/api/tickets/restart-'))} of {len(sent)} delivered "
        f"after the restart\n{collector.output()[-3000:]}"
    )


def span_request(size: int) -> bytes:
    request = trace_service_pb2.ExportTraceServiceRequest()
    span = request.resource_spans.add().scope_spans.add().spans.add()
    span.trace_id, span.span_id, span.name = b"\x01" * 16, b"\x02" * 8, "x" * size
    return request.SerializeToString()


def post(collector: Collector, path: str, body: bytes, content_type: str) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", collector.http_port, timeout=10)
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": content_type})
        return connection.getresponse().status
    finally:
        connection.close()


def test_malformed_otlp_is_refused_and_the_collector_keeps_going(
    run_app: Any, collector: Collector, otlp_backend: OtlpReceiver
) -> None:
    collector.start(
        "datadog",
        DD_OTLP_ENDPOINT=otlp_backend.http_endpoint,
        DD_API_KEY="e" * 32,
        CFK_OTLP_MAX_BODY_BYTES=str(1024 * 1024),
        CFK_OTLP_MAX_RECV_MIB="1",
    )
    garbage = b"\xff\xfe not a protobuf \x00\x01" * 10
    assert post(collector, "/v1/traces", garbage, "application/x-protobuf") == 400
    assert post(collector, "/v1/logs", b'{"resourceLogs": {not json', "application/json") == 400
    # Upstream quirk (v0.161): invalid UTF-8 in a JSON body gets 500 "failed to marshal
    # error message" instead of 400. Still refused, and 500 is not retried by OTLP clients.
    assert post(collector, "/v1/logs", garbage, "application/json") in {400, 500}
    assert post(collector, "/v1/metrics", b"{}", "text/plain") == 415
    # Valid OTLP, refused only for its size (the limit is 1 MiB here; 100 KiB passes).
    assert post(collector, "/v1/traces", span_request(100 * 1024), "application/x-protobuf") == 200
    huge = span_request(2 * 1024 * 1024)
    assert post(collector, "/v1/traces", huge, "application/x-protobuf") == 400
    # gRPC: an oversized message is refused as well.
    channel = grpc.insecure_channel(f"127.0.0.1:{collector.grpc_port}")
    call = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
    with pytest.raises(grpc.RpcError) as refused:
        call(huge, timeout=5)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as bad:
        call(garbage, timeout=5)
    assert bad.value.code() == grpc.StatusCode.INTERNAL  # undecodable protobuf
    channel.close()

    assert collector.health() == 200
    assert collector.process is not None
    assert collector.process.poll() is None
    app = start_app(run_app, collector)
    sent = send(app, "/api/tickets/after-garbage-", 3)
    assert otlp_backend.wait_for(lambda: delivered(otlp_backend, "/api/tickets/after-garbage-") == sent)
