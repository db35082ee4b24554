"""deploy/alertmanager: amtool check-config, the routing tree per severity, a real delivery."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import free_port
from tests.deploy.conftest import ALERTMANAGER_DIR, PROMETHEUS_DIR, load_yaml, run, tool

pytestmark = pytest.mark.timeout(60)

CONFIG = ALERTMANAGER_DIR / "alertmanager.yml"


def test_amtool_check_config() -> None:
    result = run(tool("amtool"), "check-config", str(CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (["severity=critical", "alertname=DatabaseDown"], "pagerduty-critical"),
        (["severity=warning", "alertname=HighErrorRate"], "slack-notifications"),
        (["severity=info", "alertname=Other"], "slack-notifications"),  # the default route
        (["alertname=NoSeverity"], "slack-notifications"),
    ],
)
def test_routes_by_severity(labels: list[str], receiver: str) -> None:
    result = run(tool("amtool"), "config", "routes", "test", f"--config.file={CONFIG}", *labels)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == receiver


def test_every_alert_severity_reaches_a_receiver() -> None:
    """Each severity the rules use routes where the document says (critical pages)."""
    expected = {"critical": "pagerduty-critical", "warning": "slack-notifications"}
    rules = [r for g in load_yaml(PROMETHEUS_DIR / "alerting-rules.yml")["groups"] for r in g["rules"]]
    for rule in rules:
        severity = rule["labels"]["severity"]
        result = run(
            tool("amtool"),
            "config",
            "routes",
            "test",
            f"--config.file={CONFIG}",
            f"severity={severity}",
            f"alertname={rule['alert']}",
        )
        assert result.stdout.strip() == expected[severity], rule["alert"]


def test_timings_and_no_inline_secrets() -> None:
    config = load_yaml(CONFIG)
    route = config["route"]
    assert route["group_by"] == ["alertname", "severity"]
    assert (route["group_wait"], route["group_interval"], route["repeat_interval"]) == ("30s", "5m", "4h")
    text = CONFIG.read_text()
    for inline in ("slack_api_url:", "api_url:", "service_key:", "routing_key:", "hooks.slack.com/services/"):
        assert inline not in text, inline
    assert config["global"]["slack_api_url_file"].startswith("/etc/alertmanager/secrets/")
    [pagerduty] = next(r for r in config["receivers"] if r["name"] == "pagerduty-critical")[
        "pagerduty_configs"
    ]
    assert pagerduty["routing_key_file"].startswith("/etc/alertmanager/secrets/")


# --- a real Alertmanager delivering to local stand-ins for Slack and PagerDuty ------------


class Sink:
    """Records every JSON body POSTed to it, by path."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Condition()

        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with sink.lock:
                    sink.received.append((self.path, json.loads(body)))
                    sink.lock.notify_all()
                self.send_response(202 if "enqueue" in self.path else 200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def wait(self, count: int, timeout: float = 20) -> list[tuple[str, dict[str, Any]]]:
        deadline = time.monotonic() + timeout
        with self.lock:
            while len(self.received) < count and time.monotonic() < deadline:
                self.lock.wait(0.2)
            return list(self.received)


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    threading.Thread(target=s.server.serve_forever, daemon=True).start()
    yield s
    s.server.shutdown()
    s.server.server_close()


def test_real_alertmanager_pages_critical_and_posts_warning_to_slack(tmp_path: Path, sink: Sink) -> None:
    binary = tool("prometheus-alertmanager")
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "slack-api-url").write_text(f"{sink.url}/slack/hook\n")
    (secrets / "pagerduty-routing-key").write_text("0123456789abcdef0123456789abcdef\n")
    config = load_yaml(CONFIG)
    text = yaml.safe_dump(config).replace("/etc/alertmanager/secrets", str(secrets))
    config = yaml.safe_load(text)
    config["global"]["pagerduty_url"] = f"{sink.url}/v2/enqueue"
    config["route"]["group_wait"] = "1s"  # the only change besides the paths: keep the test short
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp_path / "alertmanager.log").open("w")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'alertmanager.yml'}",
            f"--storage.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",  # no gossip port
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        api = f"http://127.0.0.1:{port}/api/v2"
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "alertmanager.log").read_text()
                time.sleep(0.2)
        alerts = [
            {"labels": {"alertname": "DatabaseDown", "severity": "critical", "job": "postgresql"},
             "annotations": {"summary": "Database is down"}},
            {"labels": {"alertname": "HighErrorRate", "severity": "warning", "job": "cf-kanban"},
             "annotations": {"summary": "High error rate detected"}},
        ]  # fmt: skip
        request = urllib.request.Request(
            f"{api}/alerts",
            data=json.dumps(alerts).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200
        received = sink.wait(2)
    finally:
        process.terminate()
        process.wait(10)
        log.close()
    by_path = dict(received)
    assert set(by_path) == {"/slack/hook", "/v2/enqueue"}, received
    page = by_path["/v2/enqueue"]
    assert page["routing_key"] == "0123456789abcdef0123456789abcdef"  # read from the file
    assert page["payload"]["severity"] == "critical"
    assert "DatabaseDown" in page["payload"]["summary"]
    slack = by_path["/slack/hook"]
    assert slack["channel"] == "#cf-kanban-alerts"
    [attachment] = slack["attachments"]
    assert attachment["title"] == "firing: 1 alerts"
    assert attachment["text"] == "High error rate detected\n"
