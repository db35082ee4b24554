"""The ``cfk-otel`` command: ``doctor`` checks a deployment, ``env`` documents it,
``deploy-files`` writes its operations files."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from cfk_otel import _settings
from cfk_otel._logs.render import escape_control
from cfk_otel._redact import scrub_text
from cfk_otel._version import __version__

from . import checklist as _checklist
from . import deploy_files as _deploy_files
from . import live as _live

_HIDDEN = "<set, hidden>"


def mask(var: _settings.Variable[object], raw: str) -> str:
    """A variable's value as it may be printed: secrets hidden; URL credentials, queries and
    fragments redacted as the settings' messages redact them; control characters escaped.
    Never raises, whatever the value (a bad port, an unclosed bracket, stray bytes)."""
    if var.secret:
        return _HIDDEN if raw else ""
    return _printable(raw)


def _printable(value: str) -> str:
    """Any other value as the terminal may show it (see :func:`mask`), through the secrets
    policy too (a ``token=`` pair in ``OTEL_RESOURCE_ATTRIBUTES``)."""
    return _terminal(scrub_text(_settings.shown(value, secret=False)))


def _terminal(text: str) -> str:
    """``text`` with control characters escaped and lone surrogates (undecodable bytes in
    the environment) written as escapes, so that printing it cannot fail."""
    return escape_control(text).encode("utf-8", "backslashreplace").decode("utf-8")


def _print_configuration(env: Mapping[str, str], settings: _settings.Settings) -> None:
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
    service, version, environment = (
        _printable(v) for v in (settings.service_name, settings.service_version, settings.environment)
    )
    print(f"service {service!r}, version {version!r}, environment {environment!r}")


def doctor(
    env: Mapping[str, str],
    timeout: float = 2.0,
    production: bool = False,
    app_url: str | None = None,
    prometheus_url: str | None = None,
    prometheus_job: str = "cf-kanban",
) -> int:
    """Print the effective configuration, what the live checks saw and the problems found;
    0 when there are none.

    Every configured dependency is asked (PostgreSQL, Redis, the OTLP endpoint, the Sentry
    DSN's host), and with ``app_url`` / ``prometheus_url`` the app's metrics and health
    endpoints and Prometheus' scrape of ``prometheus_job``: a failed one is a problem. With
    ``production``, every failed item of the document's production checklist is one too.
    """
    problems: list[str] = []
    try:
        settings = _settings.load(env)
    except _settings.ConfigurationError as exc:
        problems.extend(str(p) for p in exc.problems)
        settings = _settings.load({k: v for k, v in env.items() if k != "CFK_OTEL_STRICT"})
    else:
        problems.extend(str(p) for p in settings.problems)

    _print_configuration(env, settings)

    if settings.sdk_disabled:
        print("telemetry is disabled (OTEL_SDK_DISABLED=true)")
    if settings.sentry_dsn is None:
        print("Sentry: SENTRY_DSN is not set; errors are not sent to Sentry")

    live: list[_live.Result] = []
    try:
        live = _live.run(settings, env, timeout, app_url, prometheus_url, prometheus_job)
    except Exception as exc:  # as below: a report, not a traceback
        problems.append(f"the live checks could not be run ({type(exc).__name__})")
    print(f"\nlive checks (timeout {timeout:g}s each):")
    if not live:
        print(
            "  nothing to check: no DATABASE_URL, REDIS_URL, OTLP exporter, SENTRY_DSN,"
            " --app-url or --prometheus-url"
        )
    for result in live:
        print(f"  {_terminal(str(result))}")
        if not result.ok:
            problems.append(f"{result.name}: {result.detail}")

    try:
        problems.extend(_checklist.report(settings, env, strict=production, live=live))
    except Exception as exc:  # a bug here must still end in a report, not a traceback
        problems.append(f"the production checklist could not be run ({type(exc).__name__})")
    if problems:
        print(f"\n{len(problems)} problem(s):")
        for problem in problems:
            print(f"  - {_terminal(problem.removeprefix('cfk_otel: '))}")
        return 1
    print("\nno problems found")
    return 0


def _doctor_guarded(env: Mapping[str, str], args: argparse.Namespace) -> int:
    try:
        return doctor(
            env, args.timeout, args.production, args.app_url, args.prometheus_url, args.prometheus_job
        )
    except Exception as exc:  # never a traceback: say what failed, exit non-zero
        print(
            f"cfk-otel doctor: could not finish ({type(exc).__name__}); please report this", file=sys.stderr
        )
        return 2


def deploy_files(directory: str, force: bool = False) -> int:
    """Write the bundle into ``directory``; 1 with the reason (never a traceback) when it cannot."""
    target = Path(directory)
    try:
        result = _deploy_files.write(target, force)
    except (_deploy_files.BundleError, OSError) as exc:
        reason = (
            str(exc) if isinstance(exc, _deploy_files.BundleError) else (exc.strerror or type(exc).__name__)
        )
        print(f"cfk-otel deploy-files: {_terminal(reason)}", file=sys.stderr)
        return 1
    for relative in result.written:
        print(f"  wrote {_terminal(relative)}")
    shown = _terminal(str(target))
    print(f"{len(result.written)} file(s) written to {shown}, {len(result.unchanged)} already up to date")
    print(_deploy_files.NEXT_STEPS.format(dir=shown))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cfk-otel", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser(
        "doctor", help="check the configuration and ask the live system (databases, OTLP, Sentry, app)"
    )
    check.add_argument("--timeout", type=float, default=2.0, help="seconds each connection may take")
    check.add_argument(
        "--app-url", help="the running app (e.g. http://127.0.0.1:3000): ask its metrics and health"
    )
    check.add_argument("--prometheus-url", help="a Prometheus (e.g. http://prometheus:9090): is the job up?")
    check.add_argument(
        "--prometheus-job", default="cf-kanban", help="the app's scrape job (default: cf-kanban)"
    )
    check.add_argument(
        "--production", action="store_true", help="fail on every unmet item of the production checklist"
    )
    commands.add_parser("env", help="print the table of environment variables (Markdown)")
    bundle = commands.add_parser(
        "deploy-files",
        help="write the operations bundle (alert rules and their tests, Alertmanager, dashboards, "
        "Kubernetes manifests, collector configs) into DIR",
    )
    bundle.add_argument("dir", metavar="DIR", help="where to write (created if missing)")
    bundle.add_argument("--force", action="store_true", help="overwrite files that differ")
    args = parser.parse_args(argv)
    if args.command == "deploy-files":
        return deploy_files(args.dir, args.force)
    if args.command == "env":
        print(_settings.markdown_table())
        return 0
    import os  # noqa: PLC0415

    return _doctor_guarded(os.environ, args)


if __name__ == "__main__":
    sys.exit(main())
