"""TLS on the listener (SPEC §12, issue 15): HTTPS verified against a test CA, client certificates required per
route and passed on as identity, TLS 1.0/1.1 refused, the certificate pair reloaded without dropping connections."""

from __future__ import annotations

import hashlib
import shutil
import socket
import ssl
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import config_text, error_body, make_config, route
from redis_support import Tls, make_tls

from sidecar.testing import RecordingUpstream, RunningSidecar, SidecarProcess, running_sidecar

ANONYMOUS = {"open": {"type": "anonymous"}}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Tls]:
    base = tmp_path_factory.mktemp("listener-tls")
    return {"a": make_tls(base / "a", "a"), "b": make_tls(base / "b", "b")}


def listener_config(upstream_url: str, listen: dict[str, str], **top: Any) -> str:
    return config_text(make_config(upstream_url, ANONYMOUS, [
        route("mtls", "/mtls/**", ["open"], require={"client_cert": {"subjects": ["CN=sidecar"]}}),
        route("pinned", "/pinned/**", ["open"], require={"client_cert": {"fingerprints": ["00" * 32]}}),
        route("open", "/**", ["open"]),
    ], listen=listen, **top))


@pytest.fixture(scope="module")
def tls_sidecar(shared_upstream: RecordingUpstream, certs: dict[str, Tls]) -> Iterator[RunningSidecar]:
    a = certs["a"]
    listen = {"tls_cert": str(a.cert), "tls_key": str(a.key), "tls_client_ca": str(a.ca)}
    with running_sidecar(listener_config(shared_upstream.url, listen)) as sc:
        sc.url = sc.url.replace("http://", "https://")
        yield sc


def client(tls: Tls, with_cert: bool = False) -> httpx.Client:
    context = ssl.create_default_context(cafile=str(tls.ca))
    if with_cert:
        context.load_cert_chain(tls.client_cert, tls.client_key)
    return httpx.Client(verify=context, timeout=10.0, trust_env=False)


def test_https_listener_verified_against_the_test_ca(tls_sidecar: RunningSidecar, certs: dict[str, Tls],
                                                     upstream: RecordingUpstream) -> None:
    """The listener speaks HTTPS with the configured pair; the upstream is told the scheme was https, and no
    client-certificate header reaches it when the client sent none (client-sent copies are dropped)."""
    with client(certs["a"]) as http:
        response = http.get(tls_sidecar.url + "/hello", headers={"X-Auth-Client-Cert-Subject": "CN=forged",
                                                                 "X-Auth-Client-Cert-Sha256": "00" * 32})
    assert response.status_code == 200, response.text
    seen = upstream.last
    assert seen.header("x-forwarded-proto") == "https"
    assert seen.header("x-auth-client-cert-subject") is None and seen.header("x-auth-client-cert-sha256") is None


def test_route_requiring_a_client_cert_refuses_without_one(tls_sidecar: RunningSidecar,
                                                           certs: dict[str, Tls]) -> None:
    """A route with require.client_cert: 403 client_cert_required when the connection has no certificate."""
    with client(certs["a"]) as http:
        error_body(http.get(tls_sidecar.url + "/mtls/x"), 403, "client_cert_required")


def test_client_cert_accepted_and_passed_on_as_identity(tls_sidecar: RunningSidecar, certs: dict[str, Tls],
                                                        upstream: RecordingUpstream) -> None:
    """With a listed certificate the request passes; the upstream sees its subject and SHA-256 fingerprint, not
    the client's forged copies."""
    a = certs["a"]
    der = ssl.PEM_cert_to_DER_cert(a.client_cert.read_text())
    with client(a, with_cert=True) as http:
        response = http.get(tls_sidecar.url + "/mtls/x", headers={"X-Auth-Client-Cert-Subject": "CN=forged"})
    assert response.status_code == 200, response.text
    received = upstream.last
    assert [v for k, v in received.headers if k == "x-auth-client-cert-subject"] == ["CN=sidecar"]
    assert received.header("x-auth-client-cert-sha256") == hashlib.sha256(der).hexdigest()


def test_client_cert_not_listed_is_refused(tls_sidecar: RunningSidecar, certs: dict[str, Tls]) -> None:
    """A verified certificate whose fingerprint the route does not list: 403 client_cert_not_allowed."""
    with client(certs["a"], with_cert=True) as http:
        error_body(http.get(tls_sidecar.url + "/pinned/x"), 403, "client_cert_not_allowed")


def test_client_cert_from_another_ca_fails_the_handshake(tls_sidecar: RunningSidecar,
                                                         certs: dict[str, Tls]) -> None:
    """A client certificate the client CA did not sign is refused in the handshake (never reaches a route)."""
    context = ssl.create_default_context(cafile=str(certs["a"].ca))
    context.load_cert_chain(certs["b"].client_cert, certs["b"].client_key)
    with httpx.Client(verify=context, timeout=5.0, trust_env=False) as http, pytest.raises(httpx.HTTPError):
        http.get(tls_sidecar.url + "/hello")


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_tls_1_0_and_1_1_are_refused(tls_sidecar: RunningSidecar, certs: dict[str, Tls],
                                     version: ssl.TLSVersion) -> None:
    """A client that offers at most TLS 1.0 or 1.1 fails the handshake (RFC 8996)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(certs["a"].ca)
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this OpenSSL offer the old versions at all
    with warnings.catch_warnings():  # Python deprecates these versions, which is the point of the test
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = version
    port = int(tls_sidecar.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, pytest.raises(ssl.SSLError):
        context.wrap_socket(raw, server_hostname="localhost")
    context.maximum_version = ssl.TLSVersion.TLSv1_2  # the same client allowed TLS 1.2 gets through
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        assert tls.version() == "TLSv1.2"


def test_certificate_swapped_on_disk_is_served_without_dropping_connections(
        shared_upstream: RecordingUpstream, certs: dict[str, Tls], tmp_path: Path) -> None:
    """The pair rewritten in place: new handshakes get the new certificate, an open connection keeps working."""
    a, b = certs["a"], certs["b"]
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(a.cert, cert)
    shutil.copy(a.key, key)
    with running_sidecar(listener_config(shared_upstream.url, {"tls_cert": str(cert), "tls_key": str(key)})) as sc:
        url = sc.url.replace("http://", "https://")
        with client(a) as old:
            assert old.get(url + "/before").status_code == 200
            shutil.copy(b.key, key)
            shutil.copy(b.cert, cert)
            deadline = time.monotonic() + 5
            while True:  # the watcher looks every second
                try:
                    with client(b) as new:
                        assert new.get(url + "/after").status_code == 200
                    break
                except httpx.ConnectError:
                    assert time.monotonic() < deadline, "the new certificate was not served within 5 s"
                    time.sleep(0.2)
            assert old.get(url + "/still-open").status_code == 200  # the kept-alive connection was not dropped
        with client(a) as stale, pytest.raises(httpx.ConnectError):
            stale.get(url + "/old-ca")


def test_sidecar_run_tls_flags(shared_upstream: RecordingUpstream, certs: dict[str, Tls], tmp_path: Path) -> None:
    """`sidecar run --tls-cert --tls-key --tls-client-ca` serves HTTPS (over the config's plain `listen:`); the
    admin port stays plain HTTP on loopback."""
    a = certs["a"]
    path = tmp_path / "sidecar.yaml"
    path.write_text(listener_config(shared_upstream.url, {}))
    with SidecarProcess(path, args=("--tls-cert", str(a.cert), "--tls-key", str(a.key),
                                    "--tls-client-ca", str(a.ca))) as sc:
        assert sc.url.startswith("https://")
        with client(a, with_cert=True) as http:
            assert http.get(sc.url + "/mtls/x").status_code == 200
        with client(a) as http:
            error_body(http.get(sc.url + "/mtls/x"), 403, "client_cert_required")
        assert httpx.get(sc.admin_url + "/healthz", trust_env=False).status_code == 200
