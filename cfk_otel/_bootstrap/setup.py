"""The process-wide telemetry state: set up once, shut down within a bound.

``opentelemetry-instrument`` reaches :func:`start` through our configurator;
``cfk_otel.configure()`` reaches it directly. Either way the SDK's own
``_OTelSDKConfigurator`` builds the providers (so ``OTEL_CONFIG_FILE`` and the rest of
the standard variables keep working) and this module keeps the handles.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

from opentelemetry import _logs, metrics, trace
from opentelemetry.environment_variables import (
    OTEL_LOGS_EXPORTER,
    OTEL_METRICS_EXPORTER,
    OTEL_TRACES_EXPORTER,
)
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk.environment_variables import OTEL_EXPORTER_OTLP_PROTOCOL
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry

from cfk_otel import _settings
from cfk_otel._core import propagation as _propagation
from cfk_otel._core import sampling as _sampling
from cfk_otel._core import seam as _core
from cfk_otel._errors import api as _errors
from cfk_otel._errors import uncaught as _uncaught
from cfk_otel._guard import guard
from cfk_otel._logs.handlers import configure_logging, notice
from cfk_otel._metrics import catalogue as _metrics
from cfk_otel._metrics import export as _metric_export
from cfk_otel._metrics.scrape import (
    Scrape,
    ScrapeReader,
    group_directory,
    join_process_group,
    reader_arguments,
)
from cfk_otel._state import State

from .resource import build_attributes

_log = logging.getLogger("cfk_otel")


STATE = State()  # written here only (see cfk_otel._state)


def selected(entry_point: Literal["distro", "configurator"]) -> None:
    """Note that ``opentelemetry-instrument`` (or ``configure()``) loaded our ``entry_point``."""
    if entry_point == "distro":
        STATE.distro_selected = True
    else:
        STATE.configurator_selected = True


def selection() -> tuple[bool, bool]:
    """Whether our distro and our configurator were loaded."""
    return STATE.distro_selected, STATE.configurator_selected


def scrape() -> Scrape | None:
    """``/api/metrics``' renderer, once the SDK runs in this process (after the fork)."""
    return STATE.scrape


def active() -> bool:
    """Whether set-up ran (or waits for the worker fork) in this process."""
    return STATE.started or STATE.deferred


def settings() -> _settings.Settings:
    """The settings of this process, parsed on first use (never raises)."""
    if STATE.settings is None:
        try:
            return prepare()
        except _settings.ConfigurationError as exc:
            return dataclasses.replace(_settings.load({}), problems=tuple(exc.problems))
    return STATE.settings


def prepare() -> _settings.Settings:
    """Parse the environment and leave it as the SDK must read it. Runs once.

    Each rejected variable gets one line on stderr and is removed, so that the
    OpenTelemetry SDK, which reads several of them itself, falls back to the same
    documented default, and workers that inherit the environment do not report it again.
    The exporter variables get our defaults (the SDK's own default is no exporter), and
    the OTLP protocol ours (http/protobuf, the specification's default; the SDK's is grpc).
    """
    if STATE.settings is not None:
        return STATE.settings
    current = _settings.load()  # raises ConfigurationError in strict mode
    STATE.settings = current
    for problem in current.problems:
        print(problem, file=sys.stderr, flush=True)
        os.environ.pop(problem.variable, None)
    join_process_group()
    for variable, names in (
        (OTEL_TRACES_EXPORTER, current.traces_exporters),
        (OTEL_METRICS_EXPORTER, current.metrics_exporters),
        (OTEL_LOGS_EXPORTER, current.logs_exporters),
    ):
        os.environ.setdefault(variable, ",".join(names) or "none")
    os.environ.setdefault(OTEL_EXPORTER_OTLP_PROTOCOL, current.otlp_protocol)
    return current


def _defer_to_fork(current: _settings.Settings) -> bool:
    """Whether to wait for the worker fork before starting exporters and their threads.

    gunicorn imports the app in forked workers: exporters and their threads (and gRPC
    channels, which do not survive a fork) must be created there, each worker with its
    own ``service.instance.id``.
    """
    if current.defer_init == "true":
        return True
    if current.defer_init == "false":
        return False
    return os.path.basename(sys.argv[0]).startswith("gunicorn") if sys.argv else False


Initialize = Callable[[dict[str, Any], dict[str, Any]], None]


def start(initialize: Initialize) -> None:
    """Run the SDK set-up once for this process.

    ``initialize`` receives the resource attributes and the extra keyword arguments for
    the SDK configurator, and builds the providers. Raises ``ConfigurationError`` in
    strict mode.
    """
    with STATE.lock:
        if STATE.started or STATE.deferred:
            _log.debug("cfk_otel is already configured; ignoring the second call")
            return
        current = prepare()
        if current.sdk_disabled:
            STATE.started = True
            apply_logging()  # JSON lines on stdout do not depend on the SDK
            return
        if _defer_to_fork(current):
            STATE.deferred = True
            apply_logging()
            os.register_at_fork(after_in_child=lambda: _start_in_child(initialize))
            return
        try:
            _initialize(initialize, current)
        except Exception as exc:
            # The SDK raising half-way through must not take the app's health endpoints,
            # metrics and JSON logs with it (opentelemetry-instrument would then load no
            # instrumentation at all): carry on without exporters, and say why.
            _report_failure(exc)
            if current.strict:
                raise _settings.ConfigurationError([]) from exc
            _started_without_exporters()


def _start_in_child(initialize: Initialize) -> None:
    # Runs in the forked worker, before any request: the fresh lock, a new instance id.
    STATE.lock = threading.Lock()
    STATE.deferred = False
    try:
        _initialize(initialize, settings())
    except Exception as exc:  # never take a worker down because telemetry failed
        _report_failure(exc)
        _started_without_exporters()


def _report_failure(exc: Exception) -> None:
    print(f"cfk_otel: the OpenTelemetry SDK set-up failed: {type(exc).__name__}: {exc}", file=sys.stderr)


def _started_without_exporters() -> None:
    print("cfk_otel: serving without exporters (health, /api/metrics and logs still work)", file=sys.stderr)
    STATE.started = True
    apply_logging()


def _initialize(initialize: Initialize, current: _settings.Settings) -> None:
    resource_attributes = build_attributes(current)
    _core.set_value_limits(current.span_value_limit, current.log_value_limit)
    # The SDK's providers, processors and exporters as they come: what the app records
    # through the OpenTelemetry API goes through them. Ours (our spans, logging's records)
    # go to the compiled core on the native path (_core), or through the same SDK.
    extra: dict[str, Any] = {}
    registry = None
    if current.metrics_enabled:
        registry = CollectorRegistry(auto_describe=True)
        extra["metric_exporter_names"] = ["cfk_prometheus"]
        extra["exporter_args_map"] = {ScrapeReader: reader_arguments(registry)}
    # Our metrics join the OTLP push through the SDK's exporter, wrapped (_metric_export).
    extra.setdefault("exporter_args_map", {})[_metric_export.OtlpMetricExporter] = {
        "preference": current.metrics_temporality,
        "resource": Resource.create(resource_attributes),
    }
    _metrics.STRICT = current.strict  # metric misuse raises rather than being logged once
    _errors.start(current)  # Sentry
    # The sampler the settings chose (OTEL_TRACES_SAMPLER, or the ratio of
    # SENTRY_TRACES_SAMPLE_RATE), given to the provider so the SDK parses nothing again;
    # with a ratio, failed and slow traces are kept whole (CFK_TRACES_KEEP_SLOWER_THAN).
    extra.update(_sampling.sdk_arguments(current))
    _propagation.install(current.propagators)  # W3C Trace Context as its specification reads it
    with _metric_export.in_place_of_otlp(extra):
        initialize(resource_attributes, extra)
    if registry is not None:
        STATE.scrape = Scrape(registry, group_directory())
    choice = _core.select(current)
    _core.activate(choice, trace.get_tracer_provider())
    if choice.native:
        metrics.get_meter("cfk_otel").create_observable_counter(
            "cfk_otel_telemetry_dropped",
            callbacks=[_core.observe_drops],
            description="Spans and log records the compiled core dropped, by signal and reason",
        )
    logs = _core.select_logs(current)
    logger_provider = _logs.get_logger_provider()
    if logs.native and isinstance(logger_provider, LoggerProvider):
        STATE.log_sink = _core.LogSink(logger_provider)
    STATE.started = True
    apply_logging()
    paths = f"{choice.describe()} for spans, {logs.describe()} for log records, {_metrics.path()} for metrics"
    notice(current, f"cfk_otel: request path: {paths}")
    # atexit runs last-registered first, so this bounded shutdown runs before the SDK's own
    # unbounded per-provider handlers, which then find nothing left to do.
    atexit.register(shutdown)


def apply_logging() -> None:
    """(Re)apply our logging set-up; OTLP only once the SDK runs in this process."""
    current = settings()
    exporting = STATE.started and not STATE.deferred and not current.sdk_disabled
    configure_logging(current, _logs.get_logger_provider() if exporting else None, STATE.log_sink)
    _uncaught.install()  # exceptions nobody caught: records too, not raw tracebacks


def flush(timeout: float | None = None) -> bool:
    """Write the request lines held for stdout, then export what every provider and the core
    have queued, all within ``timeout`` seconds (default from settings). True when everything
    finished in time."""
    _core.flush_lines()
    if STATE.shut_down or not STATE.started:
        return True
    budget = settings().shutdown_timeout if timeout is None else timeout
    deadline = time.monotonic() + budget
    millis = int(budget * 1000)

    def call(provider: object) -> Callable[[], None]:
        method = getattr(provider, "force_flush", None)
        return (lambda: method(millis)) if callable(method) else (lambda: None)

    return _within(
        deadline,
        [
            call(trace.get_tracer_provider()),
            call(metrics.get_meter_provider()),
            call(_logs.get_logger_provider()),
            lambda: _core.flush(max(0.0, deadline - time.monotonic())),
        ],
    )


def _within(deadline: float, jobs: Sequence[Callable[[], object]]) -> bool:
    """Runs ``jobs`` in parallel daemon threads, waiting for them until ``deadline`` at most:
    a collector that is down costs the budget once, not once per signal, and an exporter stuck
    in a retry cannot hold the caller past the deadline. Whether all finished in time."""
    threads = [threading.Thread(target=_guarded(job), name="cfk-otel-shutdown", daemon=True) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return not any(t.is_alive() for t in threads)


def shutdown(timeout: float | None = None) -> bool:
    """Flush and stop every provider, all within ``timeout`` seconds (default from settings).

    Returns True when everything finished in time. Safe to call more than once.
    """
    with STATE.lock:
        if STATE.shut_down or not STATE.started:
            return True
        STATE.shut_down = True
    budget = settings().shutdown_timeout if timeout is None else timeout
    deadline = time.monotonic() + budget
    millis = int(budget * 1000)

    def call(provider: object, *args: Any) -> Callable[[], None]:
        method = getattr(provider, "shutdown", None)
        return (lambda: method(*args)) if callable(method) else (lambda: None)

    if STATE.scrape is not None:
        STATE.scrape.stop()  # the last numbers of this worker, for the group's scrapes
    jobs = [
        call(trace.get_tracer_provider()),
        call(metrics.get_meter_provider(), millis),
        call(_logs.get_logger_provider()),
        lambda: _errors.close(budget),  # Sentry's queue, within the same bound
        lambda: _core.shutdown(max(0.0, deadline - time.monotonic())),  # the core's spans and logs
    ]
    finished = _within(deadline, jobs)  # providers in parallel, within the one budget
    _uncaught.uninstall()
    if not finished:
        _log.warning("cfk_otel: telemetry shutdown exceeded %.1fs; unsent data was dropped", budget)
    return finished


def _guarded(job: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        with guard("shutting down a provider"):
            job()

    return run
