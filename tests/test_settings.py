"""cfk_otel/_settings.py: every variable parsed once, bad values named and defaulted."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import pytest

from cfk_otel import ConfigurationError
from cfk_otel._settings import DECLARED, VARIABLES, Settings, Variable, load, markdown_table, variable


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
        # Under the default batch size: the SDK would raise (here, a KeyError did before).
        ("OTEL_BLRP_MAX_QUEUE_SIZE", "100", "a whole number of at least the export batch size, 512", "2048"),
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


def test_each_variable_is_declared_once_on_its_field() -> None:
    """Issue 21 point 4: the Settings field is where its variable is declared, so a field
    cannot exist without a variable, nor a variable without a field, nor be read twice."""
    declared = [f for f in dataclasses.fields(Settings) if f.name != "problems"]
    assert [variable(v.name) for v in VARIABLES] == list(VARIABLES)
    assert len(declared) == len(VARIABLES)
    for f, var in zip(declared, VARIABLES, strict=True):
        assert f.default == var.default, f.name
    s = load({"HEALTH_PATH": "/ready", "OTEL_EXPORTER_OTLP_HEADERS": "a=b", "LOG_LEVEL": "debug"})
    assert (s.health_path, s.otlp_headers, s.log_level) == ("/ready", "a=b", "debug")


def test_secret_fields_stay_out_of_the_settings_repr() -> None:
    env = {v.name: f"https://user:{SECRET}@host/1" for v in VARIABLES if v.secret}
    env["OTEL_EXPORTER_OTLP_HEADERS"] = f"authorization=Bearer {SECRET}"
    settings = load(env)
    assert SECRET in str(settings.sentry_dsn)  # parsed, not lost
    assert SECRET not in repr(settings)


# --- hostile values (issue 20) --------------------------------------------------------------

SECRET = "S3CRET"  # every hostile value hides it where no message may show it
HOSTILE = (
    # brackets, bad ports, empty values
    "",
    " ",
    "[",
    "]",
    "[::1",
    "x:99999",
    # control characters, huge values, numbers Python reads in surprising ways
    "\x00",
    "a\nb",
    "\r\n",
    "\x1b[31mred",
    "ok\x7f",
    "x" * 1_000_000,
    "9" * 5000,  # over int()'s digit limit: ValueError
    "1e999",
    "nan",
    "-0",
    "\uff11",  # a full-width 1, which int() and float() accept
    "true\x00",
    "/api/\x00health",
)
HOSTILE_URLS = (
    "{scheme}://u:{secret}@[::1/db",
    "{scheme}://u:{secret}@[::1]]:5432/db",
    "{scheme}://u:{secret}@h:99999/db",
    "{scheme}://u:{secret}@h:43x8/db",
    "{scheme}://u:{secret}@h:-1/db",
    "{scheme}://{secret}@[::1/1",
    "{scheme}://{secret}@h:port/1",
    "{scheme}://u:{secret}@[fe80::1%25eth0]:1/db",
    "{scheme}://u:{secret}@[::1]:5432/db",
    "{scheme}://%75:%{secret}@h/%2F%00",
    "{scheme}://u:p%40{secret}@h/db",
    "{scheme}://u:{secret}/x@h/db",
    "{scheme}://h/db?password={secret}&user=a@b",
    "{scheme}://h/db#{secret}",
    "{scheme}://@/",
    "{scheme}:///",
    "{scheme}://u:{secret}@h/\udcff",
    "{scheme}://u:{secret}@h/" + "x" * 1_000_000,
    "u:{secret}@h:4317",
)
SCHEMES = ("http", "https", "postgresql", "redis", "unix", "ftp")
HOSTILE_BYTES = (
    b"\xff",
    b"caf\xc3",
    b"\xc3\x28",
    b"http://u:" + SECRET.encode() + b"@h\xff/1",
    b"\xed\xa0\x80",
)


def hostile_values() -> list[str]:
    urls = [u.format(scheme=s, secret=SECRET) for u in HOSTILE_URLS for s in SCHEMES]
    return [*HOSTILE, *dict.fromkeys(urls)]


def check_hostile(name: str, value: str, env: Mapping[str, str]) -> None:
    """The parser never raises but ConfigurationError in strict mode; its one problem names
    the variable, is short and shows no secret; what it accepts, its consumers can use."""
    [var] = [v for v in DECLARED if v.name == name]
    settings = load(env)  # must not raise
    mine = [p for p in settings.problems if p.variable == name]
    if env is not os.environ:  # (the process's own may hold other bad values)
        assert mine == list(settings.problems)
    assert len(mine) <= 1
    messages = [str(p) for p in mine]
    assert all(m.startswith(f"cfk_otel: {name}=") for m in messages)
    assert all(len(m) < 1000 for m in messages)
    for message in messages:
        assert SECRET not in message, message
        if var.secret and "://" not in value:
            assert f"{name}='<redacted>'" in message, message
    for url in (settings.database_url, settings.redis_url, settings.sentry_dsn, settings.otlp_endpoint):
        if url is not None:
            urlsplit(url).port  # noqa: B018  (an accepted URL is one its users can split)
    if not mine or name == "CFK_OTEL_STRICT":  # (strict mode needs it valid)
        return
    with pytest.raises(ConfigurationError) as refused:
        load({**env, "CFK_OTEL_STRICT": "true"})
    assert f"  - {name}=" in str(refused.value)
    assert SECRET not in str(refused.value)


@pytest.mark.parametrize("var", DECLARED, ids=lambda v: v.name)
def test_hostile_values_of_every_declared_variable(var: Variable[Any]) -> None:
    values = hostile_values()
    for value in values:
        check_hostile(var.name, value, {var.name: value})
    print(f"FIGURES settings-fuzz[{var.name}]: values={len(values)}")


@pytest.mark.parametrize("var", DECLARED, ids=lambda v: v.name)
def test_non_utf8_bytes_in_every_declared_variable(
    var: Variable[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # What os.environ holds for them (surrogateescape), through the process's own environment.
    for raw in HOSTILE_BYTES:
        monkeypatch.setitem(os.environb, var.name.encode(), raw)
        value = os.environ[var.name]
        assert "\udc80" <= max(value) <= "\udcff"
        check_hostile(var.name, value, os.environ)
        [problem] = [p for p in load().problems if p.variable == var.name]
        assert "printable UTF-8 text" in problem.accepted


def test_issue_20_urls_are_named_redacted_and_defaulted() -> None:
    for name, value, shown_as in (
        ("DATABASE_URL", "postgresql://u:p4ss@[::1/db", "'postgresql://<redacted>@[::1/db'"),
        ("REDIS_URL", "redis://:p4ss@cache:6x79/0", "'redis://<redacted>@cache:6x79/0'"),
        ("SENTRY_DSN", "https://k3y@[::1/42", "'https://<redacted>@[::1/42'"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://u:p4ss@h:43x8", "'http://<redacted>@h:43x8'"),
    ):
        s = load({name: value})
        [problem] = s.problems
        assert str(problem).startswith(f"cfk_otel: {name}={shown_as} is not valid (accepted: ")
        assert getattr(s, name.lower().replace("otel_exporter_", "")) is None


def test_huge_and_control_values_are_refused_and_shown_short() -> None:
    s = load({"SERVICE_NAME": "x" * 1_000_000, "K8S_POD_NAME": "pod\n2024-01-01 ERROR forged"})
    assert (s.service_name, s.k8s_pod_name) == ("cf-kanban", "")
    long, forged = (str(p) for p in s.problems)
    assert "(1000000 characters)" in long
    assert len(long) < 400
    assert "\n" not in forged
    assert "'pod\\n2024-01-01 ERROR forged'" in forged
    # Whitespace around a value is still just trimmed (a secret mounted with its newline).
    assert load({"METRICS_BEARER_TOKEN": "t0ken\n"}).metrics_bearer_token == "t0ken"
