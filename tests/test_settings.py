"""cfk_otel/_settings.py: every variable parsed once, bad values named and defaulted."""

from __future__ import annotations

import pytest

from cfk_otel import ConfigurationError
from cfk_otel._settings import VARIABLES, load, markdown_table


def test_defaults() -> None:
    s = load({})
    assert (s.service_name, s.service_version, s.environment) == ("cf-kanban", "unknown", "production")
    assert (s.log_level, s.log_format) == ("info", "json")
    assert s.traces_exporters == s.metrics_exporters == s.logs_exporters == ("otlp",)
    assert s.otlp_protocol == "http/protobuf"
    assert s.sentry_dsn is None
    assert s.shutdown_timeout == 3.0
    assert s.problems == ()


def test_service_name_precedence() -> None:
    attrs = "service.name=from-attributes,service.version=9.9,deployment.environment.name=qa"
    assert load({"OTEL_RESOURCE_ATTRIBUTES": attrs}).service_name == "from-attributes"
    assert load({"OTEL_RESOURCE_ATTRIBUTES": attrs, "SERVICE_NAME": "doc"}).service_name == "doc"
    both = {"OTEL_RESOURCE_ATTRIBUTES": attrs, "SERVICE_NAME": "doc", "OTEL_SERVICE_NAME": "otel"}
    assert load(both).service_name == "otel"
    s = load({"OTEL_RESOURCE_ATTRIBUTES": attrs})
    assert (s.service_version, s.environment) == ("9.9", "qa")


def test_version_and_environment_fall_back_to_sentry_and_datadog() -> None:
    s = load({"SENTRY_RELEASE": "cf-kanban@1.0.0", "SENTRY_ENVIRONMENT": "staging"})
    assert (s.service_version, s.environment, s.sentry_environment) == ("1.0.0", "staging", "staging")
    assert load({"DD_ENV": "dd"}).environment == "dd"
    s = load({"SERVICE_VERSION": "2.0", "SERVICE_ENVIRONMENT": "prod-eu", "SENTRY_RELEASE": "x@1"})
    assert (s.service_version, s.environment) == ("2.0", "prod-eu")


@pytest.mark.parametrize(
    ("name", "value", "accepted", "default"),
    [
        ("LOG_LEVEL", "verbose", "debug, info, warn, error, fatal", "info"),
        ("LOG_FORMAT", "xml", "json, pretty", "json"),
        ("SENTRY_TRACES_SAMPLE_RATE", "1.5", "a number from 0 to 1", "(unset)"),
        ("SENTRY_PROFILES_SAMPLE_RATE", "ten", "a number from 0 to 1", "(unset)"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "carrier-pigeon", "grpc, http/protobuf", "http/protobuf"),
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "udp", "grpc, http/protobuf", "(unset)"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317", "an http:// or https:// URL", "(unset)"),
        ("OTEL_TRACES_EXPORTER", "jaeger", "otlp, console, none (comma-separated)", "otlp"),
        ("OTEL_METRICS_EXPORTER", "none,otlp", "otlp, console, none (comma-separated)", "otlp"),
        ("OTEL_TRACES_SAMPLER", "sometimes", "always_on, always_off", "parentbased_always_on"),
        ("OTEL_TRACES_SAMPLER_ARG", "-0.1", "a number from 0 to 1", "(unset)"),
        ("OTEL_SDK_DISABLED", "maybe", "true, false", "false"),
        ("CFK_OTEL_SHUTDOWN_TIMEOUT", "0", "seconds, more than 0 and at most 30", "3.0"),
        ("CFK_OTEL_SHUTDOWN_TIMEOUT", "nan", "seconds, more than 0 and at most 30", "3.0"),
        ("CFK_OTEL_DEFER_INIT", "sometimes", "auto, true, false", "auto"),
        # The SDK's own numbers: it would raise half-way through its set-up, naming neither.
        ("OTEL_BSP_MAX_QUEUE_SIZE", "0", "a whole number above 0", "2048"),
        ("OTEL_BLRP_SCHEDULE_DELAY", "-1", "a whole number of milliseconds above 0", "1000"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "abc", "a whole number of milliseconds above 0", "60000"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "inf", "a number of seconds above 0", "10.0"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4096", "a whole number from 1 to the queue size, 2048", "512"),
    ],
)
def test_bad_value_is_named_with_what_is_accepted(name: str, value: str, accepted: str, default: str) -> None:
    s = load({name: value})
    [problem] = s.problems
    text = str(problem)
    assert text.startswith(f"cfk_otel: {name}={value!r} is not valid (accepted: ")
    assert accepted in text
    assert text.endswith(f"using the default {default}")
    with pytest.raises(ConfigurationError, match=f"{name}={value!r} is not valid"):
        load({name: value, "CFK_OTEL_STRICT": "true"})


def test_bad_value_falls_back_to_default() -> None:
    s = load({"LOG_LEVEL": "verbose", "OTEL_TRACES_EXPORTER": "jaeger", "SENTRY_TRACES_SAMPLE_RATE": "2"})
    assert (s.log_level, s.traces_exporters, s.sentry_traces_sample_rate) == ("info", ("otlp",), None)


def test_secret_values_are_never_echoed() -> None:
    s = load({"SENTRY_DSN": "not a dsn but a s3cret"})
    [problem] = s.problems
    assert "s3cret" not in str(problem)
    assert "<redacted>" in str(problem)
    with pytest.raises(ConfigurationError) as info:
        load({"SENTRY_DSN": "s3cret", "CFK_OTEL_STRICT": "1"})
    assert "s3cret" not in str(info.value)


def test_accepted_forms() -> None:
    s = load(
        {
            "LOG_LEVEL": "WARNING",
            "OTEL_TRACES_EXPORTER": "otlp, console",
            "OTEL_LOGS_EXPORTER": "none",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "SENTRY_DSN": "https://public@o1.ingest.sentry.io/42",
            "SENTRY_TRACES_SAMPLE_RATE": "0.1",
            "OTEL_SDK_DISABLED": "TRUE",
        }
    )
    assert s.problems == ()
    assert s.log_level == "warn"
    assert s.traces_exporters == ("otlp", "console")
    assert s.logs_exporters == ()
    assert s.otlp_protocol == "http/protobuf"
    assert s.sentry_traces_sample_rate == 0.1
    assert s.sdk_disabled is True


def test_every_variable_is_documented_in_the_readme() -> None:
    from tests.conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    assert markdown_table() in readme, "README's variable table is stale: paste `cfk-otel env`"
    assert len({v.name for v in VARIABLES}) == len(VARIABLES)
