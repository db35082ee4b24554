"""deploy/prometheus: the scrape config and the alerting rules, checked with the real promtool."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from cfk_otel import _settings
from tests.deploy.conftest import PROMETHEUS_DIR, RUNBOOKS, anchors, load_yaml, run, tool

pytestmark = pytest.mark.timeout(60)

CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULES = PROMETHEUS_DIR / "alerting-rules.yml"
RULE_TESTS = PROMETHEUS_DIR / "alerting-rules.test.yml"
DOCUMENT_ALERTS = {
    "HighErrorRate",
    "SlowResponseTime",
    "HighMemoryUsage",
    "DatabaseDown",
    "RedisDown",
    "HighWebSocketConnections",
}


def rules() -> dict[str, dict[str, object]]:
    return {r["alert"]: r for g in load_yaml(RULES)["groups"] for r in g["rules"] if "alert" in r}


def test_promtool_check_config() -> None:
    result = run(tool("promtool"), "check", "config", CONFIG.name, cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout  # rule_files resolves to alerting-rules.yml


def test_promtool_check_rules() -> None:
    result = run(tool("promtool"), "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(rules())} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = run(tool("promtool"), "test", "rules", RULE_TESTS.name, cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_and_a_non_firing_case() -> None:
    assert set(rules()) >= DOCUMENT_ALERTS
    cases: dict[str, set[bool]] = {}
    for group in load_yaml(RULE_TESTS)["tests"]:
        for case in group["alert_rule_test"]:
            cases.setdefault(case["alertname"], set()).add(bool(case["exp_alerts"]))
    assert {name: cases.get(name) for name in rules()} == {name: {True, False} for name in rules()}


# The document's own expressions, put back one at a time: the unit tests must catch each.
DOCUMENT_EXPRESSIONS = {
    "HighErrorRate": "rate(errors_total[5m]) > 0.1",
    "SlowResponseTime": "histogram_quantile(0.95, rate(http_request_duration_seconds_bucket[5m])) > 2",
    "DatabaseDown": 'up{job="postgresql"} == 0',
    "RedisDown": 'up{job="redis"} == 0',
}


@pytest.mark.parametrize("alert", sorted(DOCUMENT_EXPRESSIONS))
def test_the_documents_expression_fails_the_unit_tests(alert: str, tmp_path: Path) -> None:
    document = load_yaml(RULES)
    for group in document["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                rule["expr"] = DOCUMENT_EXPRESSIONS[alert]
    (tmp_path / RULES.name).write_text(yaml.safe_dump(document))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    result = run(tool("promtool"), "test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert result.returncode != 0, result.stdout
    assert f"alertname: {alert}," in result.stdout + result.stderr


def test_alerts_carry_severity_and_a_runbook_that_exists() -> None:
    headings = anchors(RUNBOOKS)
    for name, rule in rules().items():
        labels, annotations = rule["labels"], rule["annotations"]
        assert labels["severity"] in {"warning", "critical"}, name  # type: ignore[index]
        url = annotations["runbook_url"]  # type: ignore[index]
        assert url == f"docs/runbooks.md#{name.lower()}", name
        assert name.lower() in headings, f"docs/runbooks.md has no section '## {name}'"


# Server metrics the collector collects itself (CFK_RECEIVERS): only the collector carries them.
COLLECTOR_RECEIVER_JOBS = {"redis", "postgresql"}


def test_alerts_read_only_the_direct_scrape() -> None:
    """The collector path carries the app's metrics too: counting both would double every
    rate. A selector on job="otel-collector" must name one of the collector's own receivers."""
    for name, rule in rules().items():
        for metric, matchers in re.findall(r"\b([a-z_]+)\{([^}]*)\}", str(rule["expr"])):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', matchers))
            assert "job" in labels, (name, metric)
            if labels["job"] == "otel-collector":
                assert labels.get("exported_job") in COLLECTOR_RECEIVER_JOBS, (name, metric)


def test_scrape_job_is_the_documents() -> None:
    config = load_yaml(CONFIG)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    app = jobs["cf-kanban"]
    assert app["metrics_path"] == _settings.variable("METRICS_PATH").default == "/api/metrics"
    assert app["scrape_interval"] == "15s"
    assert app["dns_sd_configs"][0]["port"] == 3000
    # The collector is one more target: the app's job/instance it relays become
    # exported_job/exported_instance (collector/README.md, "Prometheus").
    assert jobs["otel-collector"]["honor_labels"] is False
    assert {"postgresql", "redis"} <= set(jobs)  # the jobs DatabaseDown / RedisDown watch
    assert config["rule_files"] == ["alerting-rules.yml"]
