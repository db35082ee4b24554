"""The real collector fed by a real app (tests/apps/starlette_app.py under
opentelemetry-instrument), one backend at a time, each backend a local stand-in."""

from __future__ import annotations

import time
from typing import Any

import pytest
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality
from prometheus_client.parser import text_string_to_metric_families

from cfk_otel.testing import OtlpReceiver
from tests.collector.conftest import AWS_TEST_SECRET, CloudWatchStandIns, Collector, SentryOtlp
from tests.conftest import free_port, uvicorn_command

pytestmark = pytest.mark.timeout(60)

TICKET = "/api/tickets/{ticket_id}"
APP_ENV = {"SERVICE_NAME": "cf-kanban", "SERVICE_ENVIRONMENT": "staging", "SERVICE_VERSION": "1.2.3"}


def start_app(run_app: Any, collector: Collector) -> Any:
    port = free_port()
    env = {**APP_ENV, "OTEL_EXPORTER_OTLP_ENDPOINT": collector.http_endpoint}
    return run_app(uvicorn_command("starlette_app:app", port), env, port)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def ticket_requests(text: str) -> float:
    return sum(
        v
        for (name, labels), v in samples(text).items()
        if name == "http_requests_total" and ("path", TICKET) in labels
    )


def test_prometheus_exporter_names_and_labels(run_app: Any, collector: Collector) -> None:
    collector.start("prometheus")
    app = start_app(run_app, collector)
    sent = 7
    for i in range(sent):
        assert app.get(f"/api/tickets/{i}")[0] == 200

    deadline = time.monotonic() + 15
    while ticket_requests(collector.scrape()) < sent and time.monotonic() < deadline:
        time.sleep(0.2)
    text = collector.scrape()
    assert ticket_requests(text) == sent, text

    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert families["http_requests"] == "counter"  # exposed as http_requests_total
    assert families["http_request_duration_seconds"] == "histogram"
    names = {name for name, _ in samples(text)}
    assert {"http_requests_total", "http_request_duration_seconds_bucket"} <= names
    assert {"http_request_duration_seconds_sum", "http_request_duration_seconds_count"} <= names
    assert not any("_total_total" in n or "seconds_seconds" in n for n in names), names

    [(_, labels)] = [
        key for key in samples(text) if key[0] == "http_requests_total" and ("path", TICKET) in key[1]
    ]
    labels_ = dict(labels)
    assert labels_["method"] == "GET"
    assert labels_["status"] == "200"
    assert labels_["job"] == "cf-kanban"  # service.name
    assert labels_["service_name"] == "cf-kanban"
    assert labels_["deployment_environment_name"] == "staging"
    assert labels_["service_version"] == "1.2.3"
    assert len(labels_["instance"]) == 36  # service.instance.id, one per process
    assert not any(k.startswith("otel_scope") for k in labels_)
    buckets = {
        float(dict(k[1])["le"]) for k in samples(text) if k[0] == "http_request_duration_seconds_bucket"
    }
    assert {0.1, 0.5, 1.0, 2.0} <= buckets


def test_real_prometheus_scrapes_the_collector(
    run_app: Any, collector: Collector, start_prometheus: Any
) -> None:
    collector.start("prometheus")
    prometheus = start_prometheus(f"127.0.0.1:{collector.prometheus_port}")
    app = start_app(run_app, collector)
    sent = 5
    for i in range(sent):
        assert app.get(f"/api/tickets/{i}")[0] == 200

    query = f'sum(http_requests_total{{path="{TICKET}", deployment_environment_name="staging"}})'
    value = None
    deadline = time.monotonic() + 25
    while time.monotonic() < deadline:
        result = prometheus.query(query)
        value = float(result[0]["value"][1]) if result else None
        if value == sent:
            break
        time.sleep(0.5)
    assert value == sent, prometheus.log_path.read_text()[-2000:]
    [series] = prometheus.query(f'http_requests_total{{path="{TICKET}"}}')
    # deploy/prometheus/prometheus.yml's job, honor_labels: false: the collector is the target
    # (job/instance), the app's own job/instance are kept as exported_job/exported_instance,
    # so nothing lands in job="cf-kanban", where the direct /api/metrics scrape lives.
    assert series["metric"]["job"] == "otel-collector"
    assert series["metric"]["instance"] == f"127.0.0.1:{collector.prometheus_port}"
    assert series["metric"]["exported_job"] == "cf-kanban"  # service.name
    assert len(series["metric"]["exported_instance"]) == 36  # service.instance.id
    assert series["metric"]["__name__"] == "http_requests_total"
    assert prometheus.query(f'sum(http_request_duration_seconds_count{{path="{TICKET}"}})')[0]["value"][
        1
    ] == str(sent)


def test_loki_gets_the_logs_on_its_otlp_path(
    run_app: Any, collector: Collector, otlp_backend: OtlpReceiver
) -> None:
    collector.start("loki", LOKI_ENDPOINT=f"{otlp_backend.http_endpoint}/otlp")
    app = start_app(run_app, collector)
    assert app.get("/api/tickets/7")[0] == 200

    assert otlp_backend.wait_for(lambda: any(r.body == "ticket 7 requested" for r in otlp_backend.logs))
    [record] = [r for r in otlp_backend.logs if r.body == "ticket 7 requested"]
    assert record.resource["service.name"] == "cf-kanban"
    assert record.resource["deployment.environment.name"] == "staging"
    time.sleep(1)  # metrics are exported every 0.5 s: none may have reached Loki
    assert otlp_backend.spans == []
    assert otlp_backend.metrics == []
    assert otlp_backend.headers[0]["content-encoding"] == "gzip"


def test_sentry_gets_traces_and_logs_with_its_auth_header(
    run_app: Any, collector: Collector, sentry: SentryOtlp
) -> None:
    collector.start("sentry", SENTRY_DSN=sentry.dsn)
    app = start_app(run_app, collector)
    assert app.get("/api/tickets/11")[0] == 200

    assert sentry.wait_for(lambda: "/api/tickets/11" in sentry.span_paths())
    assert sentry.wait_for(lambda: any(r.body == "ticket 11 requested" for r in sentry.logs))
    span = next(s for s in sentry.spans if s.attributes.get("url.path") == "/api/tickets/11")
    assert span.name == f"GET {TICKET}"
    assert span.resource["service.name"] == "cf-kanban"
    time.sleep(1)
    assert sentry.unauthorized == 0
    assert not any(p.endswith("/v1/metrics") for p in sentry.paths)  # Sentry takes no OTLP metrics
    assert {p.rsplit("/", 1)[1] for p in sentry.paths} == {"traces", "logs"}


def test_sentry_with_a_wrong_key_is_refused(run_app: Any, collector: Collector, sentry: SentryOtlp) -> None:
    collector.start("sentry", SENTRY_DSN=sentry.dsn.replace(sentry.key, "0" * 32))
    app = start_app(run_app, collector)
    assert app.get("/api/tickets/1")[0] == 200
    assert sentry.wait_for(lambda: sentry.unauthorized > 0)
    assert sentry.spans == []


def test_datadog_agent_intake_gets_all_three_with_the_api_key(
    run_app: Any, collector: Collector, otlp_backend: OtlpReceiver
) -> None:
    collector.start("datadog", DD_OTLP_ENDPOINT=otlp_backend.http_endpoint, DD_API_KEY="a" * 32)
    app = start_app(run_app, collector)
    assert app.get("/api/tickets/3")[0] == 200

    otlp_backend.wait_for_span(lambda s: s.attributes.get("url.path") == "/api/tickets/3")
    assert otlp_backend.wait_for(lambda: any(r.body == "ticket 3 requested" for r in otlp_backend.logs))
    assert otlp_backend.wait_for(lambda: any(m.name == "http_requests_total" for m in otlp_backend.metrics))
    assert {h.get("dd-api-key") for h in otlp_backend.headers} == {"a" * 32}
    assert {h.get("dd-protocol") for h in otlp_backend.headers} == {"otlp"}


def test_cloudwatch_sidecar_intake_gets_the_log_group(  # the sidecar route (CLOUDWATCH_OTLP_ENDPOINT)
    run_app: Any, collector: Collector, otlp_backend: OtlpReceiver
) -> None:
    collector.start(
        "cloudwatch",
        CLOUDWATCH_OTLP_ENDPOINT=otlp_backend.http_endpoint,
        CLOUDWATCH_LOG_GROUP="/cf-kanban/test",
    )
    app = start_app(run_app, collector)
    assert app.get("/api/tickets/5")[0] == 200
    span = otlp_backend.wait_for_span(lambda s: s.attributes.get("url.path") == "/api/tickets/5")
    assert span.resource["aws.log.group.names"] == "/cf-kanban/test"
    assert otlp_backend.wait_for(lambda: any(r.body == "ticket 5 requested" for r in otlp_backend.logs))


def test_cloudwatch_direct_to_aws_endpoints_signed_with_sigv4(
    run_app: Any, collector: Collector, cloudwatch: CloudWatchStandIns
) -> None:
    """AWS_REGION + CLOUDWATCH_LOG_GROUP and the credential chain (here: the environment's
    keys and session token): each signal to its own AWS endpoint, signed for its service."""
    collector.start(
        "cloudwatch", CLOUDWATCH_LOG_GROUP="/cf-kanban/test", **cloudwatch.env(CLOUDWATCH_LOG_STREAM="pod-1")
    )
    app = start_app(run_app, collector)
    assert app.get("/api/tickets/21")[0] == 200

    cloudwatch.traces.wait_for_span(lambda s: s.attributes.get("url.path") == "/api/tickets/21")
    logs = cloudwatch.logs
    assert logs.wait_for(lambda: any(r.body == "ticket 21 requested" for r in logs.logs))
    metrics = cloudwatch.metrics
    assert metrics.wait_for(lambda: any(m.name == "http_requests_total" for m in metrics.metrics))
    for signal, check in cloudwatch.checks.items():
        assert check.failures == [], (signal, check.failures)
        assert check.seen, signal
        assert {s["service"] for s in check.seen} == {check.service}, signal  # logs, xray, monitoring
        assert {s["region"] for s in check.seen} == {"eu-west-3"}, signal
    assert {p for r in (logs, cloudwatch.traces, metrics) for p in r.paths} == {
        "/v1/logs",
        "/v1/traces",
        "/v1/metrics",
    }
    assert set(logs.paths) == {"/v1/logs"}
    assert {h["x-aws-log-group"] for h in logs.headers} == {"/cf-kanban/test"}
    assert {h["x-aws-log-stream"] for h in logs.headers} == {"pod-1"}
    assert {h.get("content-encoding") for h in logs.headers} == {"gzip"}  # signed as sent
    assert AWS_TEST_SECRET not in collector.output()


def test_cloudwatch_with_a_wrong_secret_is_refused(
    run_app: Any, collector: Collector, cloudwatch: CloudWatchStandIns
) -> None:
    collector.start(
        "cloudwatch", CLOUDWATCH_LOG_GROUP="/cf-kanban/test", **cloudwatch.env(secret="wrong" * 8)
    )
    app = start_app(run_app, collector)
    assert app.get("/api/tickets/22")[0] == 200
    assert cloudwatch.logs.wait_for(lambda: cloudwatch.logs.unauthorized > 0)
    assert cloudwatch.traces.wait_for(lambda: cloudwatch.traces.unauthorized > 0)
    assert cloudwatch.checks["traces"].failures[0] == "signature mismatch"
    assert cloudwatch.logs.logs == []
    assert cloudwatch.traces.spans == []


def test_datadog_agentless_intake_gets_all_three_with_deltas(run_app: Any, collector: Collector) -> None:
    """DD_API_KEY (+ DD_SITE; here the intake override): OTLP/HTTP to /v1/{traces,metrics,logs}
    with dd-api-key and dd-protocol, metrics as deltas."""
    key = "f" * 32
    with OtlpReceiver(path_prefix="", required_headers={"dd-api-key": key, "dd-protocol": "otlp"}) as intake:
        collector.start("datadog", DD_API_KEY=key, DD_OTLP_INTAKE_ENDPOINT=intake.http_endpoint)
        app = start_app(run_app, collector)
        for i in range(3):
            assert app.get(f"/api/tickets/dd-{i}")[0] == 200
        intake.wait_for_span(lambda s: s.attributes.get("url.path") == "/api/tickets/dd-2")
        assert intake.wait_for(lambda: any(r.body == "ticket dd-2 requested" for r in intake.logs))

        def ticket_requests() -> float:
            # Deltas add up to the number of requests (the first point of a series is kept
            # as is: its start time is after the collector's).
            return sum(
                p.as_int or p.as_double
                for m in intake.metrics
                if m.name == "http_requests_total"
                for p in m.metric.sum.data_points
                if any(a.key == "path" and a.value.string_value == TICKET for a in p.attributes)
            )

        assert intake.wait_for(lambda: ticket_requests() == 3), ticket_requests()
        for i in range(2):
            assert app.get(f"/api/tickets/dd-more-{i}")[0] == 200
        assert intake.wait_for(lambda: ticket_requests() == 5), ticket_requests()
        time.sleep(1)
        assert ticket_requests() == 5  # deltas: nothing counted twice
        # Datadog wants deltas for monotonic sums and histograms, and reads a cumulative
        # non-monotonic sum (an UpDownCounter: websocket_connections_active, exported at 0
        # from the first export) as a gauge, so cumulativetodelta leaves that one as it is.
        temporalities = {
            getattr(m.metric, kind).aggregation_temporality
            for m in intake.metrics
            for kind in ("sum", "histogram", "exponential_histogram")
            if m.metric.HasField(kind) and (kind != "sum" or m.metric.sum.is_monotonic)
        }
        assert temporalities == {AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA}
        assert any(m.name == "websocket_connections_active" for m in intake.metrics)
        assert intake.unauthorized == 0
        assert set(intake.paths) == {"/v1/traces", "/v1/metrics", "/v1/logs"}
        assert {h.get("content-type") for h in intake.headers} == {"application/x-protobuf"}
