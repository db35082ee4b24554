"""The compiled core honours the OTLP exporter's TLS variables as the SDK's exporter does.

``OTEL_EXPORTER_OTLP_CERTIFICATE`` (the roots to trust instead of the bundled ones) and
``OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE`` / ``_CLIENT_KEY`` (mutual TLS), per signal or shared.
A receiver that requires a client certificate from a private CA gets the same spans and log
records from both paths; files that cannot be used keep the signal on the SDK, with the reason.
"""

from __future__ import annotations

import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from cfk_otel import _settings
from cfk_otel._core import seam as _core
from cfk_otel.testing import OtlpReceiver
from tests.conftest import free_port, launch, uvicorn_command


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: Path
    server_key: Path
    client: Path
    client_key: Path
    client_bundle: Path  # the client certificate and its key in one file


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _issue(directory: Path, name: str, subject: str, extensions: str) -> None:
    """A P-256 key and a certificate for it, signed by the CA in ``directory``."""
    (directory / f"{name}.ext").write_text(extensions)
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject,
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext",
        cwd=directory,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A private CA, a server certificate for 127.0.0.1 and a client certificate."""
    directory = tmp_path_factory.mktemp("pki")
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=cfk-otel test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    _issue(
        directory,
        "server",
        "/CN=127.0.0.1",
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    _issue(
        directory,
        "client",
        "/CN=cf-kanban",
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n",
    )
    bundle = directory / "client-bundle.pem"
    bundle.write_bytes((directory / "client.pem").read_bytes() + (directory / "client.key").read_bytes())
    return Pki(
        directory / "ca.pem",
        directory / "server.pem",
        directory / "server.key",
        directory / "client.pem",
        directory / "client.key",
        bundle,
    )


def _mutual_tls(pki: Pki) -> ssl.SSLContext:
    """A server context that wants a client certificate from the private CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server, pki.server_key)
    context.load_verify_locations(pki.ca)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def test_the_tls_files_are_read_once_and_passed_to_the_core(pki: Pki) -> None:
    env = {
        "OTEL_EXPORTER_OTLP_CERTIFICATE": str(pki.ca),
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": str(pki.client),
        "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY": str(pki.client_key),  # a signal's own wins
        "OTEL_EXPORTER_OTLP_CLIENT_KEY": "/no/such/key.pem",
    }
    target = _core.otlp_target("traces", env)
    assert isinstance(target, _core.Target)
    assert target.certificate == pki.ca.read_bytes()
    assert target.client_certificate == pki.client.read_bytes()
    assert target.client_key == pki.client_key.read_bytes()
    assert _core.select(_settings.load(env), env) == _core.Choice(True, "")
    # The shared key does not exist: the logs signal cannot use it, and says which variable.
    assert _core.otlp_target("logs", env) == (
        "OTEL_EXPORTER_OTLP_CLIENT_KEY: cannot read the file (No such file or directory)"
    )
    # As in the SDK: a key without a certificate is not used, and one file may hold both.
    assert _core.otlp_target("traces", {"OTEL_EXPORTER_OTLP_CLIENT_KEY": "/no/such/key.pem"}) == (
        _core.Target("http://localhost:4318/v1/traces", (), False, 10.0)
    )
    bundle = _core.otlp_target("traces", {"OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": str(pki.client_bundle)})
    assert isinstance(bundle, _core.Target)
    assert bundle.client_key is None
    # Without an OTLP certificate, the roots requests would use: an app that trusts its
    # collector that way keeps doing so on the core.
    roots = {"REQUESTS_CA_BUNDLE": "", "CURL_CA_BUNDLE": str(pki.ca)}
    target = _core.otlp_target("traces", roots)
    assert isinstance(target, _core.Target)
    assert target.certificate == pki.ca.read_bytes()
    assert _core.otlp_target(
        "traces", {**roots, "OTEL_EXPORTER_OTLP_CERTIFICATE": str(pki.client_bundle)}
    ) == (
        _core.Target(
            "http://localhost:4318/v1/traces", (), False, 10.0, certificate=pki.client_bundle.read_bytes()
        )
    )
    assert _core.otlp_target("traces", {"REQUESTS_CA_BUNDLE": "/no/such/roots.pem"}) == (
        "REQUESTS_CA_BUNDLE: cannot read the file (No such file or directory)"
    )


@pytest.mark.parametrize(
    ("files", "reason"),
    [
        ({"CERTIFICATE": b"not a certificate"}, "certificate: no PEM certificate in the file"),
        (
            {"CERTIFICATE": b"-----BEGIN CERTIFICATE-----\n%%%%\n-----END CERTIFICATE-----\n"},
            "certificate: the file is not valid PEM",
        ),
        (
            {"CLIENT_CERTIFICATE": "client"},
            "client certificate: no private key in the file, and no client key given",
        ),
        ({"CLIENT_CERTIFICATE": "client", "CLIENT_KEY": "ca"}, "client key: no PEM private key in the file"),
    ],
)
def test_unusable_tls_files_keep_the_signal_on_the_sdk(
    tmp_path: Path, pki: Pki, files: dict[str, bytes | str], reason: str
) -> None:
    env = {}
    for name, content in files.items():
        path = tmp_path / f"{name}.pem"
        path.write_bytes(content if isinstance(content, bytes) else getattr(pki, content).read_bytes())
        env[f"OTEL_EXPORTER_OTLP_{name}"] = str(path)
    choice = _core.select(_settings.load(env), env)
    assert choice == _core.Choice(False, f"OTEL_EXPORTER_OTLP_* TLS files for traces: {reason}")
    assert str(tmp_path) not in choice.reason  # what the files hold, or where, is not said


def _export(tmp_path: Path, receiver: OtlpReceiver, env: dict[str, str], native: str) -> str:
    """Requests through an app on one path; its output."""
    port = free_port()
    env = {
        # requests lets these win over the certificate the SDK's exporter names: this
        # machine sets them to the system's roots, which do not hold the private CA.
        "REQUESTS_CA_BUNDLE": "",
        "CURL_CA_BUNDLE": "",
        **env,
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint,
        "SERVICE_NAME": "cf-kanban-tls",
        "CFK_OTEL_NATIVE": native,
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        "OTEL_BLRP_SCHEDULE_DELAY": "200",
    }
    app = launch(tmp_path, uvicorn_command("core_app:app", port), env, port)
    try:
        assert app.get("/teapot")[0] == 418
    finally:
        app.terminate()  # a graceful stop flushes what is queued
    return app.output()


@pytest.mark.parametrize("native", ["true", "false"])
@pytest.mark.parametrize("one_file", [False, True], ids=["key-file", "bundle"])
def test_mutual_tls_export_on_both_paths(tmp_path: Path, pki: Pki, native: str, one_file: bool) -> None:
    env = {"OTEL_EXPORTER_OTLP_CERTIFICATE": str(pki.ca)}
    if one_file:
        env["OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"] = str(pki.client_bundle)
    else:
        env["OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"] = str(pki.client)
        env["OTEL_EXPORTER_OTLP_CLIENT_KEY"] = str(pki.client_key)
    with OtlpReceiver(tls=_mutual_tls(pki)) as receiver:
        assert receiver.http_endpoint.startswith("https://")
        output = _export(tmp_path, receiver, env, native)
        assert receiver.wait_for(
            lambda: (
                any(s.name == "GET /teapot" for s in receiver.spans)
                and any(log.scope == "cfk_otel.requests" for log in receiver.logs)
            ),
            timeout=10.0,
        ), output
    path = "native core" if native == "true" else "OpenTelemetry SDK (CFK_OTEL_NATIVE=false)"
    assert f"request path: {path} for spans, {path} for log records" in output


def test_without_the_client_certificate_nothing_is_accepted(tmp_path: Path, pki: Pki) -> None:
    """The receiver above really asks for the client certificate, and the core really sends it:
    with the roots only, the core's handshakes fail and nothing arrives (the app still serves)."""
    with OtlpReceiver(tls=_mutual_tls(pki)) as receiver:
        output = _export(tmp_path, receiver, {"OTEL_EXPORTER_OTLP_CERTIFICATE": str(pki.ca)}, "true")
        assert "request path: native core for spans" in output
        assert not receiver.wait_for(lambda: bool(receiver.spans or receiver.logs), timeout=2.0)
