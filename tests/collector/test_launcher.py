"""collector/run and the config files: every backend validates alone and together; the
launcher refuses a bad environment before anything starts, without printing secrets."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.collector.conftest import COLLECTOR, run_launcher

BACKENDS = ["debug", "prometheus", "loki", "sentry", "datadog", "cloudwatch"]
RECEIVERS = ["redis", "postgresql"]
SECRET = "0123456789abcdef0123456789abcdef"
# Dummy values: enough for an offline `otelcol-cfk validate`.
DUMMY = {
    "LOKI_ENDPOINT": "http://loki.invalid:3100/otlp",
    "SENTRY_DSN": f"https://{SECRET}@o1.ingest.sentry.invalid/4242",
    "DD_OTLP_ENDPOINT": "http://datadog-agent.invalid:4318",
    "DD_API_KEY": SECRET,
    "CLOUDWATCH_OTLP_ENDPOINT": "http://cloudwatch-agent.invalid:4318",
    "CLOUDWATCH_LOG_GROUP": "/cf-kanban/production",
    "REDIS_EXPORTER_ENDPOINT": "redis-exporter.invalid:9121",
    "POSTGRES_EXPORTER_ENDPOINT": "postgres-exporter.invalid:9187",
    "K8S_NODE_NAME": "node-1.invalid",
}
# Datadog's agentless intake and CloudWatch's own endpoints (no Agent, no sidecar).
DIRECT = {k: v for k, v in DUMMY.items() if k not in {"DD_OTLP_ENDPOINT", "CLOUDWATCH_OTLP_ENDPOINT"}}
# sigv4auth resolves the AWS credentials when the collector starts, `validate` included.
DIRECT |= {
    "DD_SITE": "datadoghq.eu",
    "AWS_REGION": "eu-west-3",
    "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
    "AWS_SECRET_ACCESS_KEY": SECRET,
    "AWS_EC2_METADATA_DISABLED": "true",
}
ROUTES = {"agent": DUMMY, "direct": DIRECT}


def test_every_backend_has_a_config_file() -> None:
    files = {p.stem for p in (COLLECTOR / "config").glob("*.yaml")}
    assert files == {"base", "kubernetes", *BACKENDS, *RECEIVERS, "datadog-agent", "cloudwatch-agent"}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_each_backend_validates_alone(collector_bin: Path, backend: str, route: str) -> None:
    result = run_launcher(collector_bin, "--validate", CFK_BACKENDS=backend, **ROUTES[route])
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("receiver", RECEIVERS)
def test_each_receiver_validates_with_the_prometheus_backend(collector_bin: Path, receiver: str) -> None:
    result = run_launcher(
        collector_bin, "--validate", CFK_BACKENDS="prometheus", CFK_RECEIVERS=receiver, **DUMMY
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("kubernetes", ["false", "true"])
def test_all_backends_validate_together(collector_bin: Path, kubernetes: str, route: str) -> None:
    result = run_launcher(
        collector_bin,
        "--validate",
        CFK_BACKENDS=",".join(BACKENDS),
        CFK_RECEIVERS=",".join(RECEIVERS),
        CFK_KUBERNETES=kubernetes,
        **ROUTES[route],
    )
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout + result.stderr


def test_default_backend_is_debug(collector_bin: Path) -> None:
    result = run_launcher(collector_bin, "--dry-run")
    assert result.returncode == 0, result.stderr
    configs = [Path(a).name for a in result.stdout.split() if a.endswith(".yaml")]
    assert configs == ["base.yaml", "debug.yaml"]


def test_binary_comes_from_build_sh_by_default(collector_bin: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CFK_", "SENTRY_", "DD_", "LOKI_"))}
    result = subprocess.run(
        [str(COLLECTOR / "run"), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    built = subprocess.run(
        [str(COLLECTOR / "build.sh")], capture_output=True, text=True, timeout=60, check=True
    ).stdout.splitlines()[-1]
    assert result.stdout.split()[0] == built
    assert "cached build" not in result.stderr  # the launcher keeps quiet about the cache hit


def test_dry_run_assembles_base_then_backends_in_order(collector_bin: Path) -> None:
    result = run_launcher(collector_bin, "--dry-run", CFK_BACKENDS="sentry, prometheus,sentry", **DUMMY)
    assert result.returncode == 0, result.stderr
    configs = [Path(a).name for a in result.stdout.split() if a.endswith(".yaml")]
    assert configs == ["base.yaml", "sentry.yaml", "prometheus.yaml"]  # duplicates dropped
    assert SECRET not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("backend", "missing"),
    [
        ("loki", ["LOKI_ENDPOINT"]),
        ("sentry", ["SENTRY_DSN"]),
        ("datadog", ["DD_API_KEY"]),
        ("cloudwatch", ["CLOUDWATCH_LOG_GROUP"]),
    ],
)
def test_missing_variables_are_named_before_start(
    collector_bin: Path, backend: str, missing: list[str]
) -> None:
    for mode in ("--validate", "--dry-run"):
        env = {k: v for k, v in DUMMY.items() if k not in missing}
        result = run_launcher(collector_bin, mode, CFK_BACKENDS=f"prometheus,{backend}", **env)
        assert result.returncode == 2, result
        for name in missing:
            assert f"missing environment variable: {name} ({backend})" in result.stderr
        assert result.stdout == ""  # nothing was started
        assert SECRET not in result.stderr


def test_direct_routes_name_their_missing_variables(collector_bin: Path) -> None:
    env = {k: v for k, v in DIRECT.items() if k not in {"AWS_REGION", "CLOUDWATCH_LOG_GROUP", "DD_API_KEY"}}
    result = run_launcher(collector_bin, "--validate", CFK_BACKENDS="datadog,cloudwatch", **env)
    assert result.returncode == 2, result
    for name, backend in (("DD_API_KEY", "datadog"), ("AWS_REGION", "cloudwatch")):
        assert f"missing environment variable: {name} ({backend})" in result.stderr
    assert "missing environment variable: CLOUDWATCH_LOG_GROUP (cloudwatch)" in result.stderr
    assert "DD_SITE" not in result.stderr  # defaults to datadoghq.com


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("DD_SITE", f"{SECRET}.example.com", "DD_SITE is not a Datadog site"),
        ("AWS_REGION", f"us-east-1;{SECRET}", "AWS_REGION is not an AWS region"),
    ],
)
def test_bad_site_or_region_is_refused_without_echoing_it(
    collector_bin: Path, variable: str, value: str, message: str
) -> None:
    env = {**DIRECT, variable: value}
    result = run_launcher(collector_bin, "--validate", CFK_BACKENDS="datadog,cloudwatch", **env)
    assert result.returncode == 2
    assert message in result.stderr
    assert SECRET not in result.stderr


@pytest.mark.parametrize(
    ("env", "derived"),
    [
        (
            {"AWS_REGION": "eu-west-3", "DD_SITE": "us3.datadoghq.com", "HOSTNAME": "node-a"},
            "https://logs.eu-west-3.amazonaws.com/v1/logs|https://xray.eu-west-3.amazonaws.com/v1/traces"
            "|https://monitoring.eu-west-3.amazonaws.com/v1/metrics|node-a|https://otlp.us3.datadoghq.com",
        ),
        (
            {"AWS_REGION": "us-east-1", "CLOUDWATCH_LOG_STREAM": "cf-kanban"},
            "https://logs.us-east-1.amazonaws.com/v1/logs|https://xray.us-east-1.amazonaws.com/v1/traces"
            "|https://monitoring.us-east-1.amazonaws.com/v1/metrics|cf-kanban|https://otlp.datadoghq.com",
        ),
        (  # the overrides (proxies, tests)
            {
                "AWS_REGION": "us-east-1",
                "CLOUDWATCH_LOGS_ENDPOINT": "http://127.0.0.1:1/l",
                "CLOUDWATCH_TRACES_ENDPOINT": "http://127.0.0.1:1/t",
                "CLOUDWATCH_METRICS_ENDPOINT": "http://127.0.0.1:1/m",
                "CLOUDWATCH_LOG_STREAM": "s",
                "DD_OTLP_INTAKE_ENDPOINT": "http://127.0.0.1:2",
            },
            "http://127.0.0.1:1/l|http://127.0.0.1:1/t|http://127.0.0.1:1/m|s|http://127.0.0.1:2",
        ),
    ],
)
def test_direct_endpoints_derived_from_region_and_site(
    tmp_path: Path, env: dict[str, str], derived: str
) -> None:
    fake = tmp_path / "otelcol"
    names = ("LOGS_ENDPOINT", "TRACES_ENDPOINT", "METRICS_ENDPOINT", "LOG_STREAM")
    fields = [f"$CFK_CLOUDWATCH_{n}" for n in names] + ["$CFK_DATADOG_INTAKE_ENDPOINT"]
    fake.write_text('#!/bin/sh\necho "' + "|".join(fields) + '"\n')
    fake.chmod(0o755)
    result = run_launcher(
        fake,
        "--validate",
        CFK_BACKENDS="datadog,cloudwatch",
        DD_API_KEY=SECRET,
        CLOUDWATCH_LOG_GROUP="/g",
        **env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == derived


def test_agent_routes_pick_their_own_files(collector_bin: Path) -> None:
    configs = {}
    for route, env in ROUTES.items():
        result = run_launcher(collector_bin, "--dry-run", CFK_BACKENDS="datadog,cloudwatch", **env)
        assert result.returncode == 0, result.stderr
        configs[route] = [Path(a).name for a in result.stdout.split() if a.endswith(".yaml")]
    assert configs["agent"] == ["base.yaml", "datadog-agent.yaml", "cloudwatch-agent.yaml"]
    assert configs["direct"] == ["base.yaml", "datadog.yaml", "cloudwatch.yaml"]


@pytest.mark.parametrize(
    ("receiver", "missing"),
    [("redis", ["REDIS_EXPORTER_ENDPOINT"]), ("postgresql", ["POSTGRES_EXPORTER_ENDPOINT"])],
)
def test_missing_receiver_variables_are_named_before_start(
    collector_bin: Path, receiver: str, missing: list[str]
) -> None:
    env = {k: v for k, v in DUMMY.items() if k not in missing}
    result = run_launcher(
        collector_bin, "--validate", CFK_BACKENDS="prometheus", CFK_RECEIVERS=receiver, **env
    )
    assert result.returncode == 2, result
    for name in missing:
        assert f"missing environment variable: {name} ({receiver})" in result.stderr
    assert result.stdout == ""
    assert SECRET not in result.stderr


def test_receivers_need_the_prometheus_backend(collector_bin: Path) -> None:
    result = run_launcher(collector_bin, "--dry-run", CFK_BACKENDS="sentry", CFK_RECEIVERS="redis", **DUMMY)
    assert result.returncode == 2
    assert "add prometheus to CFK_BACKENDS" in result.stderr
    assert result.stdout == ""


def test_unknown_receiver_lists_the_known_ones(collector_bin: Path) -> None:
    result = run_launcher(
        collector_bin, "--dry-run", CFK_BACKENDS="prometheus", CFK_RECEIVERS="mysql", **DUMMY
    )
    assert result.returncode == 2
    assert "unknown receiver 'mysql'" in result.stderr
    assert "known receivers: redis postgresql" in result.stderr


def test_receivers_come_after_the_backends(collector_bin: Path) -> None:
    result = run_launcher(
        collector_bin, "--dry-run", CFK_BACKENDS="prometheus", CFK_RECEIVERS="postgresql redis", **DUMMY
    )
    assert result.returncode == 0, result.stderr
    configs = [Path(a).name for a in result.stdout.split() if a.endswith(".yaml")]
    assert configs == ["base.yaml", "prometheus.yaml", "postgresql.yaml", "redis.yaml"]


def test_empty_variable_counts_as_missing(collector_bin: Path) -> None:
    result = run_launcher(collector_bin, "--validate", CFK_BACKENDS="datadog", **{**DUMMY, "DD_API_KEY": ""})
    assert result.returncode == 2
    assert "DD_API_KEY (datadog)" in result.stderr
    assert "DD_OTLP_ENDPOINT" not in result.stderr


def test_every_missing_variable_of_every_backend_at_once(collector_bin: Path) -> None:
    result = run_launcher(
        collector_bin, "--validate", CFK_BACKENDS=",".join(BACKENDS), CFK_RECEIVERS=",".join(RECEIVERS)
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if "missing environment variable" in line]
    # The Agent / sidecar endpoints are optional now (issue 23): the direct routes need these.
    assert [line.split(": ")[-1] for line in lines] == [
        "LOKI_ENDPOINT (loki)",
        "SENTRY_DSN (sentry)",
        "DD_API_KEY (datadog)",
        "CLOUDWATCH_LOG_GROUP (cloudwatch)",
        "AWS_REGION (cloudwatch)",
        "REDIS_EXPORTER_ENDPOINT (redis)",
        "POSTGRES_EXPORTER_ENDPOINT (postgresql)",
    ], result.stderr


def test_unknown_backend_lists_the_known_ones(collector_bin: Path) -> None:
    result = run_launcher(collector_bin, "--validate", CFK_BACKENDS="prometheus,splunk", **DUMMY)
    assert result.returncode == 2
    assert "unknown backend 'splunk'" in result.stderr
    assert "debug prometheus loki sentry datadog cloudwatch" in result.stderr


def test_malformed_dsn_is_refused_without_echoing_it(collector_bin: Path) -> None:
    result = run_launcher(
        collector_bin, "--validate", CFK_BACKENDS="sentry", SENTRY_DSN=f"{SECRET}-not-a-dsn"
    )
    assert result.returncode == 2
    assert "SENTRY_DSN is not a Sentry DSN" in result.stderr
    assert SECRET not in result.stderr


@pytest.mark.parametrize(
    ("dsn", "endpoint"),
    [
        ("https://abc@o1.ingest.sentry.io/42", "https://o1.ingest.sentry.io/api/42/integration/otlp"),
        (
            "https://abc:old@sentry.example.com:9000/sub/7",
            "https://sentry.example.com:9000/sub/api/7/integration/otlp",
        ),
        ("http://abc@127.0.0.1:8000/42/", "http://127.0.0.1:8000/api/42/integration/otlp"),
    ],
)
def test_sentry_endpoint_and_key_derived_from_dsn(tmp_path: Path, dsn: str, endpoint: str) -> None:
    # A fake "collector" that prints the two derived variables the config reads.
    fake = tmp_path / "otelcol"
    fake.write_text('#!/bin/sh\necho "$CFK_SENTRY_OTLP_ENDPOINT|$CFK_SENTRY_KEY"\n')
    fake.chmod(0o755)
    result = run_launcher(fake, "--validate", CFK_BACKENDS="sentry", SENTRY_DSN=dsn)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{endpoint}|abc"


def test_unknown_option_is_refused(collector_bin: Path) -> None:
    result = run_launcher(collector_bin, "--frobnicate")
    assert result.returncode == 2
    assert "unknown argument" in result.stderr


def test_secrets_only_from_the_environment_and_loopback_only_defaults() -> None:
    secretish = re.compile(r"^\s*[\w-]*(key|auth|token|password)\s*:\s*(.+)$", re.IGNORECASE)
    for path in (COLLECTOR / "config").glob("*.yaml"):
        for line in path.read_text().splitlines():
            if line.lstrip().startswith("#"):
                continue
            assert "0.0.0.0" not in line, (path, line)
            match = secretish.match(line)
            if match:
                assert "${env:" in match.group(2), (path, line)


# What each backend accepts: Sentry traces+logs, Loki logs, Prometheus metrics.
PIPELINES = {
    "debug": {"traces/debug", "metrics/debug", "logs/debug"},
    "prometheus": {"metrics/prometheus"},
    "loki": {"logs/loki"},
    "sentry": {"traces/sentry", "logs/sentry"},
    "datadog": {"traces/datadog", "metrics/datadog", "logs/datadog"},
    "cloudwatch": {"traces/cloudwatch", "metrics/cloudwatch", "logs/cloudwatch"},
}
# Receivers: one metrics pipeline each, into the prometheus backend's exporter.
RECEIVER_PIPELINES = {"redis": ["prometheus/redis"], "postgresql": ["prometheus/postgresql"]}


def merged_config(collector_bin: Path, backends: str, **env: str) -> dict[str, Any]:
    result = run_launcher(
        collector_bin, "--print-config", "--", "--format=json", CFK_BACKENDS=backends, **env
    )
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout  # redacted
    return dict(json.loads(result.stdout))


def test_backends_compose_into_their_own_pipelines(collector_bin: Path) -> None:
    config = merged_config(collector_bin, ",".join(BACKENDS), CFK_RECEIVERS=",".join(RECEIVERS), **DUMMY)
    pipelines = config["service"]["pipelines"]
    receiver_pipelines = {f"metrics/{r}" for r in RECEIVERS}
    assert set(pipelines) == set().union(*PIPELINES.values(), receiver_pipelines)  # nothing lost
    for receiver, receivers in RECEIVER_PIPELINES.items():
        pipeline = pipelines.pop(f"metrics/{receiver}")
        assert pipeline["receivers"] == receivers, receiver
        assert pipeline["exporters"] == ["prometheus"], receiver
        assert pipeline["processors"][0] == "memory_limiter", receiver
        assert "batch" not in pipeline["processors"], receiver
    for name, pipeline in pipelines.items():
        assert pipeline["receivers"] == ["otlp"], name
        assert pipeline["processors"][0] == "memory_limiter", name
        # No in-memory batch processor: what the collector acknowledged is already on disk.
        assert "batch" not in pipeline["processors"], name
        [exporter] = pipeline["exporters"]
        assert (
            exporter.split("/")[-1].split("_")[0] == name.split("/")[1] or exporter == name.split("/")[1]
        ), name
    assert "k8s_attributes" not in config["processors"]
    assert "batch" not in config["processors"]


NETWORK_EXPORTERS = {
    "agent": {"otlp_http/loki", "otlp_http/sentry", "otlp_http/datadog", "otlp_http/cloudwatch"},
    "direct": {
        "otlp_http/loki",
        "otlp_http/sentry",
        "otlp_http/datadog",
        "otlp_http/cloudwatch_logs",
        "otlp_http/cloudwatch_traces",
        "otlp_http/cloudwatch_metrics",
    },
}


@pytest.mark.parametrize("route", ROUTES)
def test_every_network_exporter_queues_on_disk_and_retries(collector_bin: Path, route: str) -> None:
    config = merged_config(collector_bin, ",".join(BACKENDS), **ROUTES[route])
    network = {k: v for k, v in config["exporters"].items() if k not in {"debug", "prometheus"}}
    assert set(network) == NETWORK_EXPORTERS[route]
    for name, exporter in network.items():
        # v0.161 prints an enabled queue as present (an optional section), not enabled: true.
        assert exporter["sending_queue"], name
        assert exporter["sending_queue"]["storage"] == "file_storage", name
        retry = exporter["retry_on_failure"]
        assert retry["enabled"] is True, name
        # Durations in nanoseconds. A 30 s outage is far inside the retry budget, and the
        # backoff tops out at 30 s (x1.5 randomization): delivery resumes within 45 s.
        assert retry["max_elapsed_time"] >= 10 * 60 * 10**9, name
        assert retry["max_interval"] <= 30 * 10**9, name
        assert exporter["sending_queue"]["queue_size"] >= 5000, name  # batches: > 1 h at 1/s
        # Batching happens in the persistent queue (after the data is on disk). The sizers
        # print as {} here: test_queue_sizers_in_the_files checks them.
        batch = exporter["sending_queue"]["batch"]
        assert 0 < batch["min_size"] <= batch["max_size"], name
        assert 0 < batch["flush_timeout"] <= 5 * 10**9, name
    assert config["extensions"]["file_storage"]["directory"]
    assert config["service"]["extensions"][:2] == ["health_check", "file_storage"]


def test_queue_sizers_in_the_files() -> None:
    """The queue counts requests (CFK_QUEUE_SIZE), its batches count items (spans, points, records)."""
    import yaml

    queues = [
        exporter["sending_queue"]
        for path in sorted((COLLECTOR / "config").glob("*.yaml"))
        for exporter in (yaml.safe_load(path.read_text()).get("exporters") or {}).values()
        if "sending_queue" in exporter
    ]
    assert len(queues) == 8  # loki, sentry, datadog x2, cloudwatch-agent, cloudwatch x3
    for queue in queues:
        assert queue["storage"] == "file_storage"
        assert queue["sizer"] == "requests"
        assert queue["batch"]["sizer"] == "items"


def test_direct_routes_sign_with_sigv4_and_send_deltas_to_datadog(collector_bin: Path) -> None:
    config = merged_config(collector_bin, ",".join(BACKENDS), **DIRECT)
    exporters, pipelines = config["exporters"], config["service"]["pipelines"]
    services = {
        name: ext["service"] for name, ext in config["extensions"].items() if name.startswith("sigv4")
    }
    assert set(services.values()) == {"logs", "xray", "monitoring"}
    assert set(services) <= set(config["service"]["extensions"])
    for signal, service in (("logs", "logs"), ("traces", "xray"), ("metrics", "monitoring")):
        exporter = exporters[f"otlp_http/cloudwatch_{signal}"]
        assert services[exporter["auth"]["authenticator"]] == service, signal
        assert config["extensions"][exporter["auth"]["authenticator"]]["region"] == "eu-west-3"
        assert pipelines[f"{signal}/cloudwatch"]["exporters"] == [f"otlp_http/cloudwatch_{signal}"]
    assert (
        exporters["otlp_http/cloudwatch_logs"]["logs_endpoint"]
        == "https://logs.eu-west-3.amazonaws.com/v1/logs"
    )
    headers = {h["name"] for h in exporters["otlp_http/cloudwatch_logs"]["headers"]}
    assert {"x-aws-log-group", "x-aws-log-stream"} <= headers
    assert exporters["otlp_http/datadog"]["endpoint"] == "https://otlp.datadoghq.eu"
    assert pipelines["metrics/datadog"]["processors"][-1] == "cumulative_to_delta"
    others = [p for name, p in pipelines.items() if name != "metrics/datadog"]
    assert all("cumulative_to_delta" not in p["processors"] for p in others)


def test_kubernetes_overlay_adds_the_node_to_every_otlp_pipeline(collector_bin: Path) -> None:
    config = merged_config(
        collector_bin, ",".join(BACKENDS), CFK_RECEIVERS=",".join(RECEIVERS), CFK_KUBERNETES="true", **DUMMY
    )
    for name, pipeline in config["service"]["pipelines"].items():
        if pipeline["receivers"] == ["otlp"]:
            assert pipeline["processors"][:2] == ["memory_limiter", "resource/kubernetes"], name
        else:  # the collector's node is not where Redis/PostgreSQL metrics come from
            assert "resource/kubernetes" not in pipeline["processors"], name
    assert config["service"]["pipelines"]["logs/cloudwatch"]["processors"][-2:] == [
        "resource",
        "resource/cloudwatch",
    ]


def test_prometheus_names_are_pinned(collector_bin: Path) -> None:
    # The binary's default feature gates change the default naming (DisableAddMetricSuffixes):
    # the strategy is set explicitly so that names never depend on them.
    exporter = merged_config(collector_bin, "prometheus")["exporters"]["prometheus"]
    assert exporter["translation_strategy"] == "UnderscoreEscapingWithSuffixes"
    assert exporter["resource_constant_labels"]["included"] == [
        "service.name",
        "service.version",
        "deployment.environment.name",
    ]
    assert exporter["endpoint"].startswith("127.0.0.1:")


def test_kubernetes_overlay_needs_the_node_name(collector_bin: Path) -> None:
    env = {k: v for k, v in DUMMY.items() if k != "K8S_NODE_NAME"}
    result = run_launcher(collector_bin, "--validate", CFK_BACKENDS="debug", CFK_KUBERNETES="true", **env)
    assert result.returncode == 2
    assert "CFK_KUBERNETES=true needs K8S_NODE_NAME" in result.stderr


def test_print_config_withholds_what_the_collector_does_not_know_is_secret(collector_bin: Path) -> None:
    """The collector redacts only the fields it types as secret; a password in an endpoint
    URL, or a secret variable's value copied elsewhere, goes through the package's policy."""
    password = "Lk1Passw0rdInUrl"
    env = {**DUMMY, "LOKI_ENDPOINT": f"http://cfk:{password}@loki.invalid:3100/otlp"}
    result = run_launcher(
        collector_bin, "--print-config", "--", "--format=json", CFK_BACKENDS="loki,datadog", **env
    )
    assert result.returncode == 0, result.stderr
    assert password not in result.stdout
    assert SECRET not in result.stdout
    config = json.loads(result.stdout)  # still the collector's JSON
    assert "loki.invalid:3100" in json.dumps(config)
