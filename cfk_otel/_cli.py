"""The ``cfk-otel`` command: ``doctor`` checks a deployment, ``env`` documents it."""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

from . import _checklist, _settings
from ._version import __version__

_HIDDEN = "<set, hidden>"


def mask(var: _settings.Variable[object], raw: str) -> str:
    """A variable's value as it may be printed: secrets hidden, URL credentials removed."""
    if var.secret:
        return _HIDDEN if raw else ""
    parts = urlsplit(raw) if "://" in raw else None
    if parts is not None and (parts.username or parts.password):
        host = parts.hostname or ""
        netloc = f"****@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return raw


def _endpoint(settings: _settings.Settings) -> tuple[str, int]:
    default = "http://localhost:4317" if settings.otlp_protocol == "grpc" else "http://localhost:4318"
    parts = urlsplit(settings.otlp_endpoint or default)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.hostname or "localhost", port


def _check_endpoint(settings: _settings.Settings, timeout: float) -> str | None:
    host, port = _endpoint(settings)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        return f"OTLP endpoint {host}:{port} does not answer ({reason}); telemetry would be dropped"


def doctor(env: Mapping[str, str], timeout: float = 2.0, production: bool = False) -> int:
    """Print the effective configuration and the problems found; 0 when there are none.

    With ``production``, every failed item of the document's production checklist is a
    problem too.
    """
    problems: list[str] = []
    try:
        settings = _settings.load(env)
    except _settings.ConfigurationError as exc:
        problems.extend(str(p) for p in exc.problems)
        settings = _settings.load({k: v for k, v in env.items() if k != "CFK_OTEL_STRICT"})
    else:
        problems.extend(str(p) for p in settings.problems)

    print(f"cfk_otel {__version__}: effective configuration")
    width = max(len(v.name) for v in _settings.VARIABLES)
    for var in _settings.VARIABLES:
        raw = env.get(var.name)
        default = var.default_text()
        if raw is not None:
            shown = mask(var, raw)
        else:
            shown = default if default == "(unset)" else f"{default} (default)"
        print(f"  {var.name:<{width}}  {shown}")
    print(
        f"service {settings.service_name!r}, version {settings.service_version!r}, "
        f"environment {settings.environment!r}"
    )

    if settings.sdk_disabled:
        print("telemetry is disabled (OTEL_SDK_DISABLED=true)")
    elif any(
        "otlp" in e for e in (settings.traces_exporters, settings.metrics_exporters, settings.logs_exporters)
    ):
        failure = _check_endpoint(settings, timeout)
        if failure:
            problems.append(failure)
        else:
            host, port = _endpoint(settings)
            print(f"OTLP endpoint {host}:{port} answers ({settings.otlp_protocol})")
    if settings.sentry_dsn is None:
        print("Sentry: SENTRY_DSN is not set; errors are not sent to Sentry")

    problems.extend(_checklist.report(settings, env, strict=production))
    if problems:
        print(f"\n{len(problems)} problem(s):")
        for problem in problems:
            print(f"  - {problem.removeprefix('cfk_otel: ')}")
        return 1
    print("\nno problems found")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cfk-otel", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("doctor", help="check the configuration and the collector")
    check.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the endpoint")
    check.add_argument(
        "--production", action="store_true", help="fail on every unmet item of the production checklist"
    )
    commands.add_parser("env", help="print the table of environment variables (Markdown)")
    args = parser.parse_args(argv)
    if args.command == "env":
        print(_settings.markdown_table())
        return 0
    import os  # noqa: PLC0415

    return doctor(os.environ, args.timeout, args.production)


if __name__ == "__main__":
    sys.exit(main())
