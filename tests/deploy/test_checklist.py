"""cfk_otel/_cli/checklist.py: the document's production checklist, from settings alone."""

from __future__ import annotations

import re

import pytest

from cfk_otel import _settings
from cfk_otel._cli import checklist as _checklist
from cfk_otel._cli import live as _live
from tests.conftest import ROOT, unavailable
from tests.deploy.conftest import RUNBOOKS, anchors

pytestmark = pytest.mark.timeout(10)

GOOD = {
    "SENTRY_DSN": "https://0123456789abcdef@o1.ingest.sentry.io/42",
    "DATABASE_URL": "postgresql://cfk@db/cfk",
    "REDIS_URL": "redis://redis:6379/0",
}


def findings(env: dict[str, str]) -> dict[str, _checklist.Finding]:
    return {f.item: f for f in _checklist.check(_settings.load(env), env)}


def test_every_item_of_the_document_in_its_order() -> None:
    path = ROOT.parent / "shared" / "spec" / "monitoring-setup.md"  # beside the checkout, as in CI
    if not path.exists():
        unavailable(f"the monitoring document is not at {path}")
    documented = re.findall(r"^- \[ \] (.+)$", path.read_text().split("## Production Checklist", 1)[1], re.M)
    assert len(documented) == 12
    assert list(_checklist.ITEMS) == documented
    assert [f.item for f in _checklist.check(_settings.load({}), {})] == list(_checklist.ITEMS)


def test_a_complete_configuration_passes_every_checkable_item() -> None:
    statuses = {item: f.status for item, f in findings(GOOD).items()}
    assert set(statuses.values()) == {"ok", "manual"}
    assert statuses["Sentry DSN configured"] == "ok"


def test_each_failure_names_its_cause() -> None:
    without_dsn = {k: v for k, v in GOOD.items() if k != "SENTRY_DSN"}
    cases = {
        "Sentry DSN configured": (without_dsn, "SENTRY_DSN"),
        "Metrics endpoint accessible": ({**GOOD, "METRICS_PATH": "/prom"}, "metrics_path"),
        "Log aggregation configured": ({**GOOD, "LOG_FORMAT": "pretty"}, "LOG_FORMAT=pretty"),
        "Health endpoints working": ({"SENTRY_DSN": GOOD["SENTRY_DSN"]}, "readiness checks no dependency"),
        "Kubernetes probes configured": ({**GOOD, "HEALTH_LIVE_PATH": "/live"}, "deployment.yaml"),
    }
    for item, (env, reason) in cases.items():
        finding = findings(env)[item]
        assert finding.status == "fail", item
        assert reason in finding.detail, (item, finding.detail)


def test_kubernetes_without_downward_api_variables_fails() -> None:
    env = {**GOOD, "KUBERNETES_SERVICE_HOST": "10.0.0.1", "K8S_POD_NAME": "p"}
    finding = findings(env)["Kubernetes probes configured"]
    assert finding.status == "fail"
    assert "K8S_NAMESPACE_NAME, K8S_NODE_NAME" in finding.detail
    env |= {"K8S_NAMESPACE_NAME": "cf-kanban", "K8S_NODE_NAME": "node-a"}
    assert findings(env)["Kubernetes probes configured"].status == "ok"


def test_otlp_only_logs_with_export_off_go_nowhere() -> None:
    finding = findings({**GOOD, "LOG_OUTPUT": "otlp", "OTEL_LOGS_EXPORTER": "none"})[
        "Log aggregation configured"
    ]
    assert finding.status == "fail"


def test_report_prints_all_and_returns_failures_only_when_strict() -> None:
    lines: list[str] = []
    settings = _settings.load({})
    assert _checklist.report(settings, {}, out=lines.append) == []
    assert len(lines) == 1 + len(_checklist.ITEMS)
    problems = _checklist.report(settings, {}, strict=True, out=lines.append)
    assert problems == [
        "Sentry DSN configured: SENTRY_DSN is not set; errors are not sent to Sentry",
        "Health endpoints working: neither DATABASE_URL nor REDIS_URL is set: readiness checks no dependency",
    ]


def test_manual_items_point_at_documents_that_exist() -> None:
    headings = anchors(RUNBOOKS)
    for finding in _checklist.check(_settings.load(GOOD), GOOD):
        if finding.status != "manual":
            continue
        for path, anchor in re.findall(
            r"((?:docs|deploy)/[\w./-]+?)(?:#([\w-]+))?(?=[ ,;]|$)", finding.detail
        ):
            assert (ROOT / path).exists(), (finding.item, path)
            if anchor:
                assert anchor in headings, anchor


def test_live_results_amend_the_items_they_stand_for() -> None:
    """Issue 19 point 7: a failed live check fails its item, whatever the settings say; a
    passed one makes a manual item ok; items not asked live say how to ask them."""
    base = _checklist.check(_settings.load(GOOD), GOOD)
    live = [
        _live.Result(
            "PostgreSQL", False, "postgresql://<redacted>@db:5432/cfk: connection refused", _live.HEALTH_ITEM
        ),
        _live.Result("Redis", True, "ok", _live.HEALTH_ITEM),
        _live.Result("Prometheus", True, "1 target(s) of job 'cf-kanban' up", _live.PROMETHEUS_ITEM),
        _live.Result("OTLP traces", False, "does not answer", None),
    ]
    amended = {f.item: f for f in _checklist.with_live(base, live)}
    health = amended["Health endpoints working"]
    assert health.status == "fail"
    assert (
        health.detail
        == "live check failed: PostgreSQL postgresql://<redacted>@db:5432/cfk: connection refused"
    )
    assert amended["Prometheus scraping metrics"].status == "ok"
    assert amended["Metrics endpoint accessible"].detail.endswith("not asked live (give --app-url)")
    assert [f.item for f in amended.values()] == list(_checklist.ITEMS)
    lines: list[str] = []
    settings = _settings.load(GOOD)
    assert _checklist.report(settings, GOOD, strict=True, out=lines.append, live=live) == [
        f"Health endpoints working: {health.detail}"
    ]
