"""deploy/kubernetes: schemas (kubernetes-validate, offline), and the ties between the
manifests, the collector configuration, the app's settings and the Prometheus jobs."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from cfk_otel import _settings
from tests.collector.conftest import RUN, clean_env
from tests.conftest import ROOT
from tests.deploy.conftest import KUBERNETES_DIR, PROMETHEUS_DIR, load_yaml
from tests.deploy.kustomize import build

pytestmark = pytest.mark.timeout(60)

KUBERNETES_VERSION = "1.37.0"  # the newest schemas kubernetes-validate bundles
TREES = ["collector", "app", "overlays/production"]
COLLECTOR_TREES = ["collector", "overlays/production"]
ENV_REF = re.compile(r"\$\{env:([A-Z0-9_]+)(:-[^}]*)?\}")
# What collector/run derives itself before it starts the collector.
DERIVED_BY_RUN = {
    "CFK_SENTRY_OTLP_ENDPOINT": "SENTRY_DSN",
    "CFK_SENTRY_KEY": "SENTRY_DSN",
    "CFK_DATADOG_INTAKE_ENDPOINT": "DD_API_KEY",  # https://otlp.${DD_SITE:-datadoghq.com}
    "CFK_CLOUDWATCH_LOGS_ENDPOINT": "AWS_REGION",
    "CFK_CLOUDWATCH_TRACES_ENDPOINT": "AWS_REGION",
    "CFK_CLOUDWATCH_METRICS_ENDPOINT": "AWS_REGION",
    "CFK_CLOUDWATCH_LOG_STREAM": "AWS_REGION",  # CLOUDWATCH_LOG_STREAM, else the pod's name
}


def render(tree: str) -> list[dict[str, Any]]:
    return build(KUBERNETES_DIR / tree)


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [doc] = [
        d
        for d in docs
        if d["kind"] == kind and re.fullmatch(rf"{name}(-[0-9a-f]{{10}})?", d["metadata"]["name"])
    ]
    return doc


def container(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [c] = one(docs, kind, name)["spec"]["template"]["spec"]["containers"]
    return dict(c)


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


@pytest.mark.parametrize("tree", TREES)
def test_manifests_match_the_kubernetes_schemas(tree: str) -> None:
    docs = render(tree)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # raises on any error


def test_config_map_is_collector_config() -> None:
    """The ConfigMap holds exactly collector/config/*.yaml (kustomize needs copies in its root)."""
    config_map = one(render("overlays/production"), "ConfigMap", "otelcol-cfk-config")
    expected = {p.name: p.read_text() for p in sorted((ROOT / "collector" / "config").glob("*.yaml"))}
    stale = [name for name in expected if config_map["data"].get(name) != expected[name]]
    assert not stale, (
        f"refresh with: cp collector/config/*.yaml deploy/kubernetes/collector/config/ ({stale})"
    )
    assert set(config_map["data"]) == set(expected)


def daemonset_environment(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The collector container's environment as the kubelet would build it (fake pod values)."""
    c = container(docs, "DaemonSet", "otelcol-cfk")
    env_config_map = one(docs, "ConfigMap", "otelcol-cfk-env")
    assert c["envFrom"] == [{"configMapRef": {"name": env_config_map["metadata"]["name"]}}]
    env: dict[str, str] = dict(env_config_map["data"])
    fields = {"status.podIP": "127.0.0.1", "spec.nodeName": "node-a"}
    secrets = {
        "SENTRY_DSN": "https://0123456789abcdef0123456789abcdef@o1.ingest.sentry.io/42",
        "DD_API_KEY": "a" * 32,
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "b" * 40,
    }
    for var in c["env"]:
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], var["value"])
        elif "fieldRef" in var["valueFrom"]:
            env[var["name"]] = fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            env[var["name"]] = secrets[var["valueFrom"]["secretKeyRef"]["key"]]
    return env


@pytest.mark.parametrize("tree", COLLECTOR_TREES)
def test_every_env_var_of_the_loaded_config_is_provided(tree: str) -> None:
    docs = render(tree)
    env = daemonset_environment(docs)
    files = one(docs, "ConfigMap", "otelcol-cfk-config")["data"]
    backends = env["CFK_BACKENDS"].split(",")
    assert env["CFK_KUBERNETES"] == "true"
    receivers = [r for r in env.get("CFK_RECEIVERS", "").split(",") if r]
    loaded = ["base.yaml", *(f"{name}.yaml" for name in backends + receivers), "kubernetes.yaml"]
    for name in loaded:
        for var, default in ENV_REF.findall(files[name]):
            provided = var in env or DERIVED_BY_RUN.get(var) in env
            assert default or provided, (
                f"{tree}: {name} reads ${{env:{var}}}, which the DaemonSet does not set"
            )


@pytest.mark.parametrize("tree", COLLECTOR_TREES)
def test_collector_run_validates_the_daemonsets_config(
    tree: str, collector_bin: Path, tmp_path: Path
) -> None:
    """The real collector/run --validate, with the ConfigMap's files and the DaemonSet's env."""
    docs = render(tree)
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    for name, text in one(docs, "ConfigMap", "otelcol-cfk-config")["data"].items():
        (config_dir / name).write_text(text)
    env = daemonset_environment(docs)
    env.update(
        CFK_COLLECTOR_BIN=str(collector_bin),
        CFK_COLLECTOR_CONFIG_DIR=str(config_dir),
        CFK_STORAGE_DIR=str(tmp_path / "storage"),
    )
    result = subprocess.run(
        [str(RUN), "--validate"],
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_collector_probes_and_ports_match_its_config() -> None:
    docs = render("collector")
    c = container(docs, "DaemonSet", "otelcol-cfk")
    env = env_of(c)
    ports = {p["name"]: p for p in c["ports"]}
    base = load_yaml(KUBERNETES_DIR / "collector" / "config" / "base.yaml")
    health = base["extensions"]["health_check"]
    assert "path" not in health  # the extension's default path, "/"
    assert ENV_REF.match(health["endpoint"]).group(1) == "CFK_HEALTH_CHECK_ENDPOINT"  # type: ignore[union-attr]
    assert env["CFK_HEALTH_CHECK_ENDPOINT"]["value"] == f"$(K8S_POD_IP):{ports['health']['containerPort']}"
    for probe in (c["livenessProbe"], c["readinessProbe"]):
        assert probe["httpGet"] == {"path": "/", "port": "health"}
    for name, port in (("otlp-grpc", 4317), ("otlp-http", 4318)):
        assert ports[name]["containerPort"] == ports[name]["hostPort"] == port
    assert env["CFK_OTLP_GRPC_ENDPOINT"]["value"] == "$(K8S_POD_IP):4317"
    assert env["CFK_OTLP_HTTP_ENDPOINT"]["value"] == "$(K8S_POD_IP):4318"
    assert (
        env["CFK_PROMETHEUS_ENDPOINT"]["value"] == f"$(K8S_POD_IP):{ports['prom-exporter']['containerPort']}"
    )
    assert env["K8S_NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    service = one(docs, "Service", "otelcol-cfk")
    assert service["spec"]["internalTrafficPolicy"] == "Local"
    assert {(p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        (4317, "otlp-grpc"),
        (4318, "otlp-http"),
    }


def test_collector_security_queue_and_scheduling() -> None:
    docs = render("collector")
    pod = one(docs, "DaemonSet", "otelcol-cfk")["spec"]["template"]["spec"]
    c = container(docs, "DaemonSet", "otelcol-cfk")
    security = c["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    [init] = pod["initContainers"]  # the one root container: chown of the queue, CHOWN only
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    assert {"operator": "Exists"} in pod["tolerations"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert volumes["queue"]["hostPath"]["path"] == mounts["queue"] == env_of(c)["CFK_STORAGE_DIR"]["value"]
    assert mounts["config"] == env_of(c)["CFK_COLLECTOR_CONFIG_DIR"]["value"]
    sa = one(docs, "ServiceAccount", "otelcol-cfk")
    assert pod["serviceAccountName"] == sa["metadata"]["name"]


def mebibytes(quantity: str) -> float:
    units = {"Mi": 1, "MiB": 1, "Gi": 1024, "GiB": 1024}
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]+)", quantity).groups()  # type: ignore[union-attr]
    return int(number) * units[unit]


def test_gomemlimit_sits_between_the_memory_limiters_soft_and_hard_limits() -> None:
    c = container(render("collector"), "DaemonSet", "otelcol-cfk")
    env = env_of(c)
    limit = mebibytes(c["resources"]["limits"]["memory"])
    hard = limit * int(env["CFK_MEMORY_LIMIT_PERCENTAGE"]["value"]) / 100
    soft = hard - limit * int(env["CFK_MEMORY_SPIKE_LIMIT_PERCENTAGE"]["value"]) / 100
    assert soft <= mebibytes(env["GOMEMLIMIT"]["value"]) <= hard < limit
    assert mebibytes(c["resources"]["requests"]["memory"]) <= limit


def test_the_collector_has_no_kubernetes_api_access() -> None:
    """k8s_attributes, the one reader of the API, is not in the 0.165 build: no RBAC, no token."""
    docs = render("collector")
    assert not [d for d in docs if d["kind"] in {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"}]
    account = one(docs, "ServiceAccount", "otelcol-cfk")
    assert account["automountServiceAccountToken"] is False


def test_app_probes_are_the_documents_on_the_apps_paths() -> None:
    c = container(render("app"), "Deployment", "cf-kanban")
    port = {p["name"]: p["containerPort"] for p in c["ports"]}["http"]
    assert port == 3000
    assert c["livenessProbe"] == {
        "httpGet": {"path": _settings.variable("HEALTH_LIVE_PATH").default, "port": port},
        "initialDelaySeconds": 10,
        "periodSeconds": 30,
    }
    assert c["readinessProbe"] == {
        "httpGet": {"path": _settings.variable("HEALTH_READY_PATH").default, "port": port},
        "initialDelaySeconds": 5,
        "periodSeconds": 10,
    }
    assert c["startupProbe"] == {
        "httpGet": {"path": _settings.variable("HEALTH_READY_PATH").default, "port": port},
        "failureThreshold": 30,
        "periodSeconds": 10,
    }
    assert f"--port={port}" in c["command"]
    assert c["command"][:2] == ["opentelemetry-instrument", "uvicorn"]


def test_app_sends_otlp_to_its_nodes_collector_with_downward_api_identity() -> None:
    docs = render("overlays/production")
    app = env_of(container(docs, "Deployment", "cf-kanban"))
    collector = container(docs, "DaemonSet", "otelcol-cfk")
    http_host_port = {p["name"]: p.get("hostPort") for p in collector["ports"]}["otlp-http"]
    assert app["HOST_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.hostIP"}}
    assert app["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == f"http://$(HOST_IP):{http_host_port}"
    assert app["OTEL_EXPORTER_OTLP_PROTOCOL"]["value"] == "http/protobuf"
    downward = {
        "K8S_POD_NAME": "metadata.name",
        "K8S_POD_UID": "metadata.uid",
        "K8S_NAMESPACE_NAME": "metadata.namespace",
        "K8S_NODE_NAME": "spec.nodeName",
    }
    for name, field in downward.items():
        assert app[name]["valueFrom"] == {"fieldRef": {"fieldPath": field}}
    declared = {v.name for v in _settings.VARIABLES}
    assert set(app) - {"HOST_IP"} <= declared, set(app) - declared - {"HOST_IP"}
    for name, var in app.items():  # secrets only from Secrets
        if any(v.name == name and v.secret for v in _settings.VARIABLES):
            assert "secretKeyRef" in var["valueFrom"], name


def test_prometheus_dns_sd_names_are_the_headless_services() -> None:
    docs = render("overlays/production")
    jobs = {j["job_name"]: j for j in load_yaml(PROMETHEUS_DIR / "prometheus.yml")["scrape_configs"]}
    for job, service_name in (("cf-kanban", "cf-kanban-metrics"), ("otel-collector", "otelcol-cfk-metrics")):
        service = one(docs, "Service", service_name)
        assert service["spec"]["clusterIP"] == "None"
        [sd] = jobs[job]["dns_sd_configs"]
        assert sd["names"] == [f"{service_name}.{service['metadata']['namespace']}.svc.cluster.local"]
        assert sd["port"] == service["spec"]["ports"][0]["port"]
    assert one(docs, "Service", "cf-kanban-metrics")["spec"]["publishNotReadyAddresses"] is True


def test_the_renderer_refuses_what_kustomize_refuses(tmp_path: Path) -> None:
    """Why the collector config is copied: a file outside the kustomization root is refused."""
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "kustomization.yaml").write_text(
        yaml.safe_dump({"configMapGenerator": [{"name": "c", "files": ["../base.yaml"]}]})
    )
    (tmp_path / "base.yaml").write_text("a: 1\n")
    with pytest.raises(ValueError, match="outside the kustomization root"):
        build(tmp_path / "k")
