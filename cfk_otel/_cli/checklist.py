"""The monitoring document's production checklist, item by item.

Items software can check from the app's own configuration are checked here, by pure
functions of the parsed :class:`~cfk_otel._settings.Settings` and the environment, then
amended by what ``cfk-otel doctor``'s live checks (:mod:`cfk_otel._cli.live`) saw; the
others (Sentry alert rules, Alertmanager, PagerDuty, Grafana, on-call, runbooks) are
listed as ``manual`` with where they are documented. ``cfk-otel doctor`` prints the list.

>>> from cfk_otel import _settings
>>> [f.status for f in check(_settings.load({"SENTRY_DSN": "https://k@o1.ingest.sentry.io/1"}), {})][:1]
['ok']
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from cfk_otel import _settings

from . import live as _live

Status = Literal["ok", "fail", "manual"]

# The document's twelve items, in its order, and where the manual ones are handled.
ITEMS: Final = (
    "Sentry DSN configured",
    "Sentry alerts configured for error spikes",
    "Metrics endpoint accessible",
    "Prometheus scraping metrics",
    "Log aggregation configured",
    "Health endpoints working",
    "Kubernetes probes configured",
    "Alertmanager rules configured",
    "PagerDuty integration for critical alerts",
    "Grafana dashboards created",
    "On-call rotation established",
    "Runbooks documented for common alerts",
)
_MANUAL: Final = {
    "Sentry alerts configured for error spikes": "set up in Sentry: docs/sentry.md",
    "Prometheus scraping metrics": "deploy/prometheus/prometheus.yml; alert MetricsScrapeFailing",
    "Alertmanager rules configured": "deploy/prometheus/alerting-rules.yml, deploy/alertmanager/",
    "PagerDuty integration for critical alerts": "docs/runbooks.md#pagerduty-integration",
    "Grafana dashboards created": "import docs/dashboards/cf-kanban.json",
    "On-call rotation established": "docs/runbooks.md#on-call-rotation",
    "Runbooks documented for common alerts": "docs/runbooks.md (one section per alert)",
}
# What to give ``cfk-otel doctor`` for an item to be checked live rather than from settings.
_NOT_LIVE: Final = {
    "Metrics endpoint accessible": "not asked live (give --app-url)",
    "Health endpoints working": "endpoints not asked live (give --app-url)",
}
_DOWNWARD_API: Final = ("K8S_POD_NAME", "K8S_NAMESPACE_NAME", "K8S_NODE_NAME")


@dataclass(frozen=True, slots=True)
class Finding:
    """One checklist item: ``ok``, ``fail`` (with the reason) or ``manual`` (with where)."""

    item: str
    status: Status
    detail: str = ""

    def __str__(self) -> str:
        return f"[{self.status}]".ljust(9) + self.item + (f": {self.detail}" if self.detail else "")


def _sentry(s: _settings.Settings, env: Mapping[str, str]) -> Finding:
    if s.sentry_dsn is None:
        return Finding(ITEMS[0], "fail", "SENTRY_DSN is not set; errors are not sent to Sentry")
    return Finding(ITEMS[0], "ok")


def _metrics(s: _settings.Settings, env: Mapping[str, str]) -> Finding:
    if not s.metrics_enabled:
        return Finding(ITEMS[2], "fail", "METRICS_ENABLED=false: there is nothing for Prometheus to scrape")
    if s.metrics_path != _settings.variable("METRICS_PATH").default:
        return Finding(
            ITEMS[2],
            "fail",
            f"served at {s.metrics_path}, but deploy/prometheus/prometheus.yml scrapes "
            f"{_settings.variable('METRICS_PATH').default}: change its metrics_path",
        )
    return Finding(
        ITEMS[2], "ok", f"{s.metrics_path}" + ("" if s.metrics_bearer_token else ", no bearer token")
    )


def _logs(s: _settings.Settings, env: Mapping[str, str]) -> Finding:
    if s.log_format != "json":
        return Finding(ITEMS[4], "fail", f"LOG_FORMAT={s.log_format}: aggregators need json")
    over_otlp = s.log_output in ("otlp", "both") and "otlp" in s.logs_exporters and not s.sdk_disabled
    if s.log_output == "otlp" and not over_otlp:
        return Finding(ITEMS[4], "fail", "LOG_OUTPUT=otlp but OTLP log export is off: records go nowhere")
    where = (["JSON on stdout"] if s.log_output != "otlp" else []) + (["OTLP"] if over_otlp else [])
    return Finding(ITEMS[4], "ok", " and ".join(where))


def _health(s: _settings.Settings, env: Mapping[str, str]) -> Finding:
    if not s.health_enabled:
        return Finding(ITEMS[5], "fail", "HEALTH_ENABLED=false: the probes get 404")
    if s.database_url is None and s.redis_url is None:
        return Finding(
            ITEMS[5], "fail", "neither DATABASE_URL nor REDIS_URL is set: readiness checks no dependency"
        )
    return Finding(ITEMS[5], "ok")


def _probes(s: _settings.Settings, env: Mapping[str, str]) -> Finding:
    moved = [
        f"{var.name}={actual}"
        for var, actual in (
            (_settings.variable("HEALTH_LIVE_PATH"), s.health_live_path),
            (_settings.variable("HEALTH_READY_PATH"), s.health_ready_path),
        )
        if actual != var.default
    ]
    if moved:
        return Finding(
            ITEMS[6],
            "fail",
            f"{', '.join(moved)}: update the probes of deploy/kubernetes/app/deployment.yaml",
        )
    if "KUBERNETES_SERVICE_HOST" not in env:
        return Finding(ITEMS[6], "ok", "not running in Kubernetes")
    missing = [name for name in _DOWNWARD_API if not env.get(name)]
    if missing:
        return Finding(
            ITEMS[6],
            "fail",
            f"in Kubernetes without {', '.join(missing)} (downward API): resource incomplete",
        )
    return Finding(ITEMS[6], "ok")


_CHECKS: Final[dict[str, Callable[[_settings.Settings, Mapping[str, str]], Finding]]] = {
    ITEMS[0]: _sentry,
    ITEMS[2]: _metrics,
    ITEMS[4]: _logs,
    ITEMS[5]: _health,
    ITEMS[6]: _probes,
}


def check(settings: _settings.Settings, env: Mapping[str, str]) -> list[Finding]:
    """Every item of the document's checklist, in its order."""
    return [
        _CHECKS[item](settings, env) if item in _CHECKS else Finding(item, "manual", _MANUAL[item])
        for item in ITEMS
    ]


def with_live(findings: list[Finding], live: Sequence[_live.Result]) -> list[Finding]:
    """``findings`` amended by what the live checks saw: an item whose live check failed
    fails (naming it), a manual item a live check passed is ``ok``, and the others say
    what was checked live or that it was not."""
    by_item: dict[str, list[_live.Result]] = {}
    for result in live:
        if result.item is not None:
            by_item.setdefault(result.item, []).append(result)
    amended = []
    for finding in findings:
        results = by_item.get(finding.item)
        hint = _NOT_LIVE.get(finding.item)
        if not results:
            if hint and finding.status == "ok":
                amended.append(Finding(finding.item, "ok", "; ".join(filter(None, (finding.detail, hint)))))
            else:
                amended.append(finding)
            continue
        failed = [r for r in results if not r.ok]
        if failed:
            detail = "live check failed: " + "; ".join(f"{r.name} {r.detail}" for r in failed)
            amended.append(Finding(finding.item, "fail", detail))
        elif finding.status == "fail":
            amended.append(finding)
        else:
            checked = ", ".join(dict.fromkeys(r.name for r in results))
            if any(r.name.startswith("app ") for r in results):
                hint = None
            kept = finding.detail if finding.status == "ok" else ""
            detail = "; ".join(filter(None, (kept, f"live: {checked} answered", hint)))
            amended.append(Finding(finding.item, "ok", detail))
    return amended


def report(
    settings: _settings.Settings,
    env: Mapping[str, str],
    strict: bool = False,
    out: Callable[[str], None] = print,
    live: Sequence[_live.Result] = (),
) -> list[str]:
    """Print the checklist (with what the live checks saw); return the failed items as
    problems when ``strict``, else none (``doctor`` lists failed live checks itself)."""
    findings = with_live(check(settings, env), live)
    out("\nproduction checklist (monitoring document; the files it names: cfk-otel deploy-files DIR):")
    for finding in findings:
        out(f"  {finding}")
    return [str(f).removeprefix("[fail]").strip() for f in findings if f.status == "fail"] if strict else []
