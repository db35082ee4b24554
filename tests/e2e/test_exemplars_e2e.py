"""Exemplars on the real stack: Debian's Prometheus 2.42 with exemplar storage scrapes the
app, and ``/api/v1/query_exemplars`` names traces the app exported (issue 24)."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from cfk_otel.testing import OtlpReceiver
from tests.collector.conftest import Prometheus, launch_prometheus, stop_prometheus
from tests.conftest import Services, free_port, launch, uvicorn_command

pytestmark = pytest.mark.timeout(180)

HISTOGRAMS = (
    "http_request_duration_seconds",
    "database_query_duration_seconds",
    "redis_operation_duration_seconds",
)
THRESHOLD = 0.05


def query_exemplars(prometheus: Prometheus, metric: str, start: float) -> list[dict[str, Any]]:
    query = urlencode({"query": f"{metric}_bucket", "start": f"{start:.3f}", "end": f"{time.time() + 1:.3f}"})
    url = f"http://127.0.0.1:{prometheus.port}/api/v1/query_exemplars?{query}"
    with urllib.request.urlopen(url, timeout=5) as response:
        data = json.loads(response.read())
    assert data["status"] == "success", data
    return [e for series in data["data"] for e in series["exemplars"]]


def test_prometheus_stores_exemplars_that_name_exported_traces(tmp_path: Path, services: Services) -> None:
    with OtlpReceiver() as receiver:
        port = free_port()
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint,
            "SERVICE_NAME": "cf-kanban-exemplars",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.1",
            "CFK_TRACES_KEEP_SLOWER_THAN": str(THRESHOLD),
            "DATABASE_URL": services.database_url,
            "REDIS_URL": services.redis_url,
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_LOGS_EXPORTER": "none",
        }
        app = launch(tmp_path, uvicorn_command("sampling_app:app", port), env, port)
        start = time.time() - 5
        config = f"""
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: app
    metrics_path: /api/metrics
    static_configs:
      - targets: ["127.0.0.1:{port}"]
"""
        prometheus = launch_prometheus(tmp_path, config, "--enable-feature=exemplar-storage")
        try:
            for path, count in (("/ok", 40), ("/failed", 3), ("/slow", 2), ("/ok", 40)):
                for _ in range(count):
                    app.get(path)
            found: dict[str, list[dict[str, Any]]] = {}
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                found = {name: query_exemplars(prometheus, name, start) for name in HISTOGRAMS}
                if all(found.values()):
                    break
                time.sleep(0.5)
        finally:
            stop_prometheus(prometheus)
            app.terminate()  # flushes the spans still queued
        exported = {(s.trace_id, s.span_id) for s in receiver.spans}
        traces = {s.trace_id for s in receiver.spans}

    assert all(found.values()), (found, prometheus.log_path.read_text()[-2000:])
    for name, exemplars in found.items():
        for exemplar in exemplars:
            ids = (exemplar["labels"]["trace_id"], exemplar["labels"]["span_id"])
            assert ids in exported, (name, exemplar)
    # Most requests' traces were dropped (10%): the exemplars still name only exported ones.
    assert len(traces) < 85
