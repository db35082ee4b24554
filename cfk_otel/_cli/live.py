"""``cfk-otel doctor``'s live checks: each dependency the production checklist names is
asked, with a short timeout, whether it answers.

- PostgreSQL and Redis (``DATABASE_URL``, ``REDIS_URL``): the readiness probe's own check
  (a connection and ``SELECT 1`` / ``PING``) when the driver is installed; else a socket-level
  check that says so (a TCP connection; for Redis a raw ``PING``).
- The OTLP endpoint: an empty export request per exporting signal, as the SDK would send it.
- The Sentry DSN's host: a TCP connection and, for ``https``, a TLS handshake. No event is sent.
- With ``app_url``: the app's metrics and health endpoints.
- With ``prometheus_url``: whether Prometheus has the ``cf-kanban`` job's targets up.

Every check runs in a daemon thread and is abandoned after its timeout (a host name that
does not resolve cannot hold the command). Nothing printed contains a secret: URLs go
through :func:`cfk_otel._settings.shown`, failures through the health checks' summary.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Final
from urllib.parse import unquote, urlencode, urlsplit

from cfk_otel import _redact, _settings
from cfk_otel._health import registry as _health

SIGNALS: Final = ("traces", "metrics", "logs")
_GRPC_METHODS: Final = {
    "traces": "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
    "metrics": "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
    "logs": "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
}
# The checklist item each kind of check stands for (None: no item of its own).
HEALTH_ITEM: Final = "Health endpoints working"
METRICS_ITEM: Final = "Metrics endpoint accessible"
SENTRY_ITEM: Final = "Sentry DSN configured"
PROMETHEUS_ITEM: Final = "Prometheus scraping metrics"


class CheckFailed(Exception):
    """A check's failure, with a message that is safe to print."""


@dataclass(frozen=True, slots=True)
class Result:
    """One live check: what was tried, and what came of it."""

    name: str
    ok: bool
    detail: str
    item: str | None = None

    def __str__(self) -> str:
        return ("[ok]" if self.ok else "[fail]").ljust(9) + f"{self.name}: {self.detail}"


def _reason(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, CheckFailed):
        return str(exc)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not accepted ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({exc.reason or type(exc).__name__})"
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException):
        return _reason(exc.reason, timeout)
    for cause in _health._causes(exc):
        if type(cause).__name__ == "TimeoutError" or (isinstance(cause, OSError) and cause.strerror):
            return _health._summarise(cause, timeout)
    # A library's own text may quote the URL it was given (and so its password): its name only.
    return type(exc).__name__


def _address(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "localhost", parts.port or default_port


def _elapsed(start: float) -> str:
    return f"{(time.monotonic() - start) * 1000:.0f} ms"


def _socket_only(url: str, default_port: int, timeout: float) -> str:
    host, port = _address(url, default_port)
    with socket.create_connection((host, port), timeout=timeout):
        return f"{host}:{port} accepts TCP connections"


# --- PostgreSQL and Redis ---------------------------------------------------------------------


def _dependency(kind: type[_health._Dependency], url: str, timeout: float) -> str:
    async def probe() -> _health.HealthCheckResult:
        check = kind(url, timeout)
        try:
            return await asyncio.wait_for(check(), timeout)
        finally:
            await check.aclose()

    result = asyncio.run(probe())
    if result.status != "healthy":
        raise CheckFailed(result.message)
    return result.message


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def postgres(url: str, timeout: float) -> str:
    start = time.monotonic()
    if not _installed("asyncpg"):
        where = _socket_only(url, 5432, timeout)
        return f"{where} (socket only: asyncpg is not installed, so no login or query was tried)"
    _dependency(_health._Postgres, url, timeout)
    return f"connected with asyncpg and ran SELECT 1 in {_elapsed(start)}"


def _resp(*words: str) -> bytes:
    """A Redis command in RESP, the protocol's own framing (no quoting to get wrong)."""
    parts = [f"*{len(words)}\r\n".encode()]
    for word in words:
        data = word.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def redis(url: str, timeout: float) -> str:
    start = time.monotonic()
    if _installed("redis"):
        _dependency(_health._Redis, url, timeout)
        return f"connected with redis-py and PING answered in {_elapsed(start)}"
    parts = urlsplit(url)
    if parts.scheme != "redis":
        where = _socket_only(url, 6379, timeout)
        return f"{where} (socket only: redis is not installed, and {parts.scheme}: is not spoken here)"
    host, port = _address(url, 6379)
    with socket.create_connection((host, port), timeout=timeout) as conn:
        if parts.password is not None:
            user = [unquote(parts.username)] if parts.username else []
            conn.sendall(_resp("AUTH", *user, unquote(parts.password)))
            if not conn.recv(256).startswith(b"+OK"):
                raise CheckFailed(f"{host}:{port} refused the password (AUTH)")
        conn.sendall(_resp("PING"))
        answer = conn.recv(256)
    if answer.startswith(b"+PONG"):
        return f"{host}:{port} answered PING (raw socket: redis is not installed) in {_elapsed(start)}"
    if answer.startswith(b"-NOAUTH"):
        raise CheckFailed(f"{host}:{port} wants a password and REDIS_URL has none")
    raise CheckFailed(f"{host}:{port} did not answer PING as Redis does")


# --- OTLP -------------------------------------------------------------------------------------


def _headers(raw: str) -> dict[str, str]:
    """``OTEL_EXPORTER_OTLP_HEADERS`` as the SDK reads it (percent-decoded key=value pairs)."""
    pairs = (item.split("=", 1) for item in raw.split(",") if "=" in item)
    return {unquote(k).strip().lower(): unquote(v).strip() for k, v in pairs if k.strip()}


@dataclass(frozen=True, slots=True)
class OtlpTarget:
    signal: str
    protocol: str
    url: str
    headers: Mapping[str, str]


def otlp_targets(settings: _settings.Settings, env: Mapping[str, str]) -> list[OtlpTarget]:
    """Where each exporting signal's OTLP requests go, as the SDK resolves it (a signal's own
    ``OTEL_EXPORTER_OTLP_<SIGNAL>_ENDPOINT`` is used as it is; the shared one gets ``/v1/<signal>``
    over HTTP)."""
    if settings.sdk_disabled:
        return []
    exporters = {
        "traces": settings.traces_exporters,
        "metrics": settings.metrics_exporters,
        "logs": settings.logs_exporters,
    }
    targets = []
    shared_headers = _headers(env.get("OTEL_EXPORTER_OTLP_HEADERS", ""))
    for signal in SIGNALS:
        if "otlp" not in exporters[signal]:
            continue
        upper = signal.upper()
        protocol = env.get(f"OTEL_EXPORTER_OTLP_{upper}_PROTOCOL", "").strip() or settings.otlp_protocol
        own = env.get(f"OTEL_EXPORTER_OTLP_{upper}_ENDPOINT", "").strip()
        if own:
            try:
                if _settings._split(own).scheme not in ("http", "https"):
                    raise ValueError(own)
                url = own
            except ValueError:
                raise CheckFailed(
                    f"OTEL_EXPORTER_OTLP_{upper}_ENDPOINT={_settings.shown(own, secret=False)!r} is not a URL"
                ) from None
        else:
            base = settings.otlp_endpoint or (
                "http://localhost:4317" if protocol == "grpc" else "http://localhost:4318"
            )
            url = base if protocol == "grpc" else f"{base.rstrip('/')}/v1/{signal}"
        headers = {**shared_headers, **_headers(env.get(f"OTEL_EXPORTER_OTLP_{upper}_HEADERS", ""))}
        targets.append(OtlpTarget(signal, protocol, url, headers))
    return targets


def otlp_export(target: OtlpTarget, timeout: float) -> str:
    """An empty export request (a valid, empty protobuf message): the receiver answers it
    as it answers the SDK, without any data being stored."""
    start = time.monotonic()
    if target.protocol == "grpc":
        import grpc  # noqa: PLC0415  (only when asked: it starts threads)

        host, port = _address(target.url, 4317)
        if urlsplit(target.url).scheme == "https":
            channel = grpc.secure_channel(f"{host}:{port}", grpc.ssl_channel_credentials())
        else:
            channel = grpc.insecure_channel(f"{host}:{port}")
        try:
            export = channel.unary_unary(_GRPC_METHODS[target.signal])
            try:
                export(b"", timeout=timeout, metadata=tuple(target.headers.items()))
            except grpc.RpcError as exc:
                code = exc.code() if callable(getattr(exc, "code", None)) else None
                name = getattr(code, "name", "UNKNOWN")
                if name in ("DEADLINE_EXCEEDED", "UNAVAILABLE"):
                    reason = f"timed out after {timeout}s" if name == "DEADLINE_EXCEEDED" else "unavailable"
                    raise CheckFailed(f"does not answer ({reason}); telemetry would be dropped") from None
                raise CheckFailed(f"refused the export (gRPC {name})") from None
        finally:
            channel.close()
        return f"accepted an empty {target.signal} export (gRPC) in {_elapsed(start)}"
    request = urllib.request.Request(  # noqa: S310 (http(s) only: otlp_targets)
        target.url,
        data=b"",
        method="POST",
        headers={**target.headers, "Content-Type": "application/x-protobuf"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (http(s) only)
            status = response.status
    except urllib.error.HTTPError as exc:
        raise CheckFailed(f"refused the export (HTTP {exc.code})") from None
    except OSError as exc:
        raise CheckFailed(f"does not answer ({_reason(exc, timeout)}); telemetry would be dropped") from None
    return f"accepted an empty {target.signal} export (HTTP {status}) in {_elapsed(start)}"


# --- Sentry ----------------------------------------------------------------------------------


def sentry_host(dsn: str, timeout: float) -> str:
    """A TCP connection to the DSN's host and, for https, a verified TLS handshake."""
    parts = urlsplit(dsn)
    host, port = _address(dsn, 443 if parts.scheme == "https" else 80)
    start = time.monotonic()
    with socket.create_connection((host, port), timeout=timeout) as conn:
        if parts.scheme != "https":
            return f"{host}:{port} accepts TCP connections (http: no TLS); no event sent"
        context = ssl.create_default_context()
        with context.wrap_socket(conn, server_hostname=host) as tls:
            version = tls.version()
    return f"{host}:{port} completed a TLS handshake ({version}) in {_elapsed(start)}; no event sent"


# --- the app and Prometheus ------------------------------------------------------------------


def _get(url: str, timeout: float, headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
    if urlsplit(url).scheme not in ("http", "https"):
        raise CheckFailed("not an http(s) URL")
    request = urllib.request.Request(url, headers=dict(headers or {}))  # noqa: S310 (checked above)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (http(s) only)
            return int(response.status), response.read(1 << 22)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(1 << 16)


def app_metrics(url: str, token: str | None, timeout: float) -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    status, body = _get(url, timeout, headers)
    if status == 401 and not token:
        raise CheckFailed("HTTP 401: the endpoint wants METRICS_BEARER_TOKEN, which is not set here")
    if status != 200:
        raise CheckFailed(f"HTTP {status}")
    families = body.count(b"\n# TYPE ")
    if not body.startswith(b"# ") and not families:
        raise CheckFailed("HTTP 200 but the body is not in the Prometheus text format")
    return f"HTTP 200, {families + body.startswith(b'# TYPE ')} metric families"


def app_health(url: str, timeout: float) -> str:
    status, body = _get(url, timeout)
    try:
        overall = json.loads(body).get("status")
    except (ValueError, AttributeError):
        overall = None
    said = f", status {overall!r}" if isinstance(overall, str) else ""
    if status != 200:
        raise CheckFailed(f"HTTP {status}{said}" + _failing(body))
    return f"HTTP 200{said}"


def _failing(body: bytes) -> str:
    """The checks a health response names as unhealthy (its ``checks`` list), if any."""
    try:
        checks = json.loads(body).get("checks", [])
    except (ValueError, AttributeError):
        return ""
    if not isinstance(checks, list):
        return ""
    failing = [
        f"{c.get('name', '?')}: {c.get('message', '')}"[:160]
        for c in checks
        if isinstance(c, dict) and c.get("status") == "unhealthy"
    ]
    return f" ({'; '.join(failing[:5])})" if failing else ""


def prometheus_job(base: str, job: str, timeout: float) -> str:
    url = f"{base.rstrip('/')}/api/v1/targets?{urlencode({'state': 'active'})}"
    status, body = _get(url, timeout)
    if status != 200:
        raise CheckFailed(f"HTTP {status} from its targets API")
    try:
        targets = json.loads(body)["data"]["activeTargets"]
    except (ValueError, KeyError, TypeError):
        raise CheckFailed("its targets API did not answer as Prometheus does") from None
    mine = [t for t in targets if isinstance(t, dict) and t.get("labels", {}).get("job") == job]
    if not mine:
        raise CheckFailed(f"no target of job {job!r} (is deploy/prometheus/prometheus.yml loaded?)")
    down = [t for t in mine if t.get("health") != "up"]
    if down:
        first = down[0]
        error = str(first.get("lastError") or first.get("health"))[:200]
        raise CheckFailed(
            f"{len(down)} of {len(mine)} target(s) of job {job!r} not up; "
            f"{first.get('labels', {}).get('instance', '?')}: {error}"
        )
    return f"{len(mine)} target(s) of job {job!r} up"


# --- running them ----------------------------------------------------------------------------


def run(
    settings: _settings.Settings,
    env: Mapping[str, str],
    timeout: float = 2.0,
    app_url: str | None = None,
    prometheus_url: str | None = None,
    job: str = "cf-kanban",
) -> list[Result]:
    """Every live check that applies, in parallel; the results in a stable order."""
    plan: _Plan = []
    if settings.database_url:
        url = settings.database_url
        plan.append(("PostgreSQL", HEALTH_ITEM, url, partial(postgres, url, timeout)))
    if settings.redis_url:
        r_url = settings.redis_url
        plan.append(("Redis", HEALTH_ITEM, r_url, partial(redis, r_url, timeout)))
    try:
        targets = otlp_targets(settings, env)
    except CheckFailed as exc:
        targets = []
        plan.append(("OTLP endpoint", None, "", partial(_raise, exc)))
    for target in targets:
        plan.append((f"OTLP {target.signal}", None, target.url, partial(otlp_export, target, timeout)))
    if settings.sentry_dsn:
        dsn = settings.sentry_dsn
        plan.append(("Sentry", SENTRY_ITEM, dsn, partial(sentry_host, dsn, timeout)))
    if app_url:
        base = app_url.rstrip("/")
        metrics = base + settings.metrics_path
        token = settings.metrics_bearer_token
        plan.append(("app metrics", METRICS_ITEM, metrics, partial(app_metrics, metrics, token, timeout)))
        for path in dict.fromkeys(
            (settings.health_path, settings.health_live_path, settings.health_ready_path)
        ):
            plan.append(("app health", HEALTH_ITEM, base + path, partial(app_health, base + path, timeout)))
    if prometheus_url:
        prom = prometheus_url
        plan.append(("Prometheus", PROMETHEUS_ITEM, prom, partial(prometheus_job, prom, job, timeout)))

    outcomes = _execute(plan, timeout)
    bound = _bound(plan, timeout)
    # Belt and braces: whatever a check said goes through the secrets policy, with the
    # configured secrets (and each OTLP target's header values) as known values.
    secrets = [*settings.secret_values(), settings.otlp_endpoint]
    secrets += [v for t in targets for v in t.headers.values()]
    known = _redact.Known(secrets)

    def scrub(text: str) -> str:
        return _redact.scrub_text(text, known)

    results = []
    for (name, item, shown_at, _), outcome in zip(plan, outcomes, strict=True):
        ok, detail = outcome or (False, f"no answer within {bound:g}s")
        where = _settings.shown(shown_at, secret=False) if shown_at else ""
        results.append(Result(name, ok, f"{where}: {scrub(detail)}" if where else scrub(detail), item))
    return _merge_otlp(results)


_Plan = list[tuple[str, str | None, str, Callable[[], str]]]  # name, item, shown target, check


def _groups(plan: _Plan) -> list[list[int]]:
    groups: dict[str, list[int]] = {}
    for i, (name, _, shown_at, _) in enumerate(plan):
        key = f"otlp {urlsplit(shown_at).netloc}" if name.startswith("OTLP ") and shown_at else str(i)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _bound(plan: _Plan, timeout: float) -> float:
    return (timeout * 2 + 1) * max((len(g) for g in _groups(plan)), default=1)


def _execute(plan: _Plan, timeout: float) -> list[tuple[bool, str] | None]:
    """Each check's (ok, what it said); None for one still running at the deadline."""
    outcomes: list[tuple[bool, str] | None] = [None] * len(plan)

    def chain(indexes: list[int]) -> None:
        unreachable: tuple[bool, str] | None = None
        for i in indexes:
            if unreachable is not None:  # the same host and port: no need to wait for it again
                outcomes[i] = unreachable
                continue
            try:
                outcomes[i] = (True, plan[i][3]())
            except BaseException as exc:  # reported, never raised: the command must finish
                failed = (False, _reason(exc, timeout))
                outcomes[i] = failed
                if "does not answer" in failed[1]:
                    unreachable = failed

    # One daemon thread per host the OTLP signals go to (one after the other: a host that
    # does not answer one signal is not asked again) and per other check, abandoned at the
    # deadline: connect, then answer, each within ``timeout`` (a name lookup has no timeout
    # of its own).
    threads = [
        threading.Thread(target=chain, args=(g,), name="cfk-otel-doctor", daemon=True) for g in _groups(plan)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + _bound(plan, timeout)
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return outcomes


def _raise(exc: BaseException) -> str:
    raise exc


def _merge_otlp(results: list[Result]) -> list[Result]:
    """The signals that failed alike at one host are one problem, not three."""
    merged: list[Result] = []
    for result in results:
        if result.name.startswith("OTLP ") and not result.ok:
            signal = result.name.removeprefix("OTLP ")
            target, _, reason = result.detail.partition(": ")
            host = urlsplit(target).netloc
            for i, earlier in enumerate(merged):
                if earlier.name.startswith("OTLP ") and not earlier.ok:
                    e_target, _, e_reason = earlier.detail.partition(": ")
                    if urlsplit(e_target).netloc == host and e_reason == reason:
                        merged[i] = Result(f"{earlier.name}, {signal}", False, earlier.detail, None)
                        break
            else:
                merged.append(result)
            continue
        merged.append(result)
    return merged
