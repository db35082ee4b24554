"""The CF-Kanban example app under ``opentelemetry-instrument``, against real services."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cfk_otel.testing import OtlpReceiver
from tests.conftest import ROOT, RunningApp, Services, free_port, launch, uvicorn_command

EXAMPLES = ROOT / "examples"
RATE_LIMIT = 20  # requests a minute per user, low enough to reach in a test


def kanban_command(port: int) -> list[str]:
    """What production runs: opentelemetry-instrument uvicorn kanban.app:app."""
    return uvicorn_command("kanban.app:app", port, "--app-dir", str(EXAMPLES))


def kanban_env(services: Services, receiver: OtlpReceiver) -> dict[str, str]:
    return {
        "DATABASE_URL": services.database_url,
        "REDIS_URL": services.redis_url,
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint,
        "KANBAN_RATE_LIMIT": str(RATE_LIMIT),
    }


@dataclass
class Kanban:
    """A running example app and the OTLP receiver it exports to."""

    app: RunningApp
    receiver: OtlpReceiver

    @property
    def url(self) -> str:
        return self.app.url

    def call(
        self, method: str, path: str, body: object = None, user: str | None = None
    ) -> tuple[int, dict[str, str], Any]:
        """One API request as ``user`` (X-User-Id); returns status, headers and body (JSON decoded).

        Without ``user``, each call is a new user: only the rate-limit test meets the limit.
        """
        user = user or f"tester-{uuid.uuid4().hex[:8]}"
        data = json.dumps(body).encode() if body is not None else None
        headers = {"content-type": "application/json", "X-User-Id": user}
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                status, head, raw = response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            status, head, raw = exc.code, dict(exc.headers), exc.read()
        try:
            return status, head, json.loads(raw) if raw else None
        except ValueError:  # Starlette's plain-text 500
            return status, head, raw.decode()

    def metric(self, name: str, **labels: str) -> float:
        """A sample of the app's own /api/metrics (0 when absent)."""
        status, _, body = self.app.get("/api/metrics")
        assert status == 200, body
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return 0.0


@pytest.fixture(scope="module")
def kanban(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kanban]:
    """One app for the module: start-up (schema, pool) takes a few seconds."""
    with OtlpReceiver() as receiver:
        port = free_port()
        tmp: Path = tmp_path_factory.mktemp("kanban")
        app = launch(tmp, kanban_command(port), kanban_env(services, receiver), port, "/api/health/live")
        try:
            yield Kanban(app, receiver)
        finally:
            app.terminate()
