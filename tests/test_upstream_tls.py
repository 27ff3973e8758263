"""HTTPS and mTLS upstreams (SPEC §12, issue 15): a real TLS upstream that requires a client certificate, with a CA,
server and client certificates made for the test; both transports; rotation of the files on disk."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import ssl
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import config_text, error_body, make_config, route
from redis_support import Tls, make_tls

from sidecar.testing import RecordingUpstream, RunningSidecar, recording_upstream, running_sidecar

ANONYMOUS = {"open": {"type": "anonymous"}}


def server_context(tls: Tls) -> ssl.SSLContext:
    """An upstream's context: its certificate, and a client certificate required from `tls`'s CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls.cert, tls.key)
    context.load_verify_locations(tls.ca)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Tls]:
    """Two independent PKIs: `up` (the upstream's CA, server and client certificates) and `other`."""
    base = tmp_path_factory.mktemp("upstream-tls")
    return {"up": make_tls(base / "up", "up"), "other": make_tls(base / "other", "other")}


@pytest.fixture(scope="module")
def tls_upstream(certs: dict[str, Tls]) -> Iterator[RecordingUpstream]:
    with recording_upstream(tls=server_context(certs["up"])) as upstream:
        yield upstream


def upstream_tls(tls: Tls, **extra: Any) -> dict[str, Any]:
    return {"ca_file": str(tls.ca), "cert_file": str(tls.client_cert), "key_file": str(tls.client_key), **extra}


def tls_config(upstream_url: str, **tls: Any) -> str:
    return config_text(make_config(upstream_url, ANONYMOUS, [route("all", "/**", ["open"])], upstream_tls=tls))


@contextlib.contextmanager
def captured_audit(sc: RunningSidecar) -> Iterator[io.StringIO]:
    audit = sc.services.audit
    buffer, original = io.StringIO(), audit._stream
    audit._stream = buffer
    try:
        yield buffer
    finally:
        audit._stream = original


def audit_line(buffer: io.StringIO, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        for line in buffer.getvalue().splitlines():
            entry = json.loads(line)
            if entry.get("request_id") == request_id:
                return entry
        time.sleep(0.05)
    raise AssertionError(f"no audit line for {request_id}")


def refused(sc: RunningSidecar, http: httpx.Client, reason: str = "upstream_tls_failed") -> dict[str, Any]:
    """Send one request that should fail at the upstream's TLS; return its audit line after checking the 502."""
    request_id = f"tls-{uuid.uuid4().hex[:8]}"
    with captured_audit(sc) as buffer:
        response = http.get(sc.url + "/x", headers={"X-Request-Id": request_id})
        error_body(response, 502, reason)
        return audit_line(buffer, request_id)


@pytest.fixture(params=["httptools", "httpx"])
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("SIDECAR_FORWARD_TRANSPORT", request.param)
    return str(request.param)


def test_mtls_upstream_with_the_configured_pair_and_ca(tls_upstream: RecordingUpstream, certs: dict[str, Tls],
                                                       transport: str, http: httpx.Client) -> None:
    """An https upstream requiring a client certificate is reached with upstream_tls's CA and pair, on either
    transport; the fast one keeps the TLS connection alive across requests."""
    with running_sidecar(tls_config(tls_upstream.url, **upstream_tls(certs["up"]))) as sc:
        for n in range(3):
            response = http.get(f"{sc.url}/hello/{n}")
            assert response.status_code == 200, response.text
            assert response.json()["path"] == f"/hello/{n}"
        pool = next(iter(sc.services.transports.values()))
        assert type(pool).__name__ == {"httptools": "PoolTransport", "httpx": "HttpxTransport"}[transport]
        if transport == "httptools":
            assert len(pool._idle) == 1  # one connection, one handshake, three requests


def test_wrong_ca_is_a_502_with_the_verification_failure_audited(tls_upstream: RecordingUpstream,
                                                                 certs: dict[str, Tls], transport: str,
                                                                 http: httpx.Client) -> None:
    """An upstream certificate not signed by ca_file: 502 upstream_tls_failed, the audit says why."""
    settings = upstream_tls(certs["up"], ca_file=str(certs["other"].ca))
    with running_sidecar(tls_config(tls_upstream.url, **settings)) as sc:
        line = refused(sc, http)
    assert line["detail"].startswith("upstream TLS certificate verification failed:")


def test_wrong_hostname_is_a_502_with_the_mismatch_audited(tls_upstream: RecordingUpstream, certs: dict[str, Tls],
                                                           transport: str, http: httpx.Client) -> None:
    """A server_name the upstream's certificate does not cover: 502 upstream_tls_failed, 'Hostname mismatch'."""
    settings = upstream_tls(certs["up"], server_name="wrong.example")
    with running_sidecar(tls_config(tls_upstream.url, **settings)) as sc:
        line = refused(sc, http)
    assert line["detail"].startswith("upstream TLS certificate verification failed:")
    assert "Hostname mismatch" in line["detail"]


def test_no_client_certificate_is_a_502_not_a_500(tls_upstream: RecordingUpstream, certs: dict[str, Tls],
                                                  transport: str, http: httpx.Client) -> None:
    """Without a client certificate the upstream drops the connection (TLS 1.3 checks it after the handshake,
    and this server closes without an alert): 502, and the fast transport's audit line points at the pair."""
    with running_sidecar(tls_config(tls_upstream.url, ca_file=str(certs["up"].ca))) as sc:
        line = refused(sc, http, "upstream_unavailable")
    if transport == "httptools":
        assert "requires a client certificate" in line["detail"]


def test_files_rotated_on_disk_are_used_without_restart(tls_upstream: RecordingUpstream, certs: dict[str, Tls],
                                                        transport: str, http: httpx.Client, tmp_path: Path) -> None:
    """CA and client pair rewritten in place (as cert-manager does): the next connection uses the new files."""
    up, other = certs["up"], certs["other"]
    ca, cert, key = tmp_path / "ca.pem", tmp_path / "tls.crt", tmp_path / "tls.key"
    for source, target in ((other.ca, ca), (other.client_cert, cert), (other.client_key, key)):
        shutil.copy(source, target)
    with running_sidecar(tls_config(tls_upstream.url, ca_file=str(ca), cert_file=str(cert),
                                    key_file=str(key))) as sc:
        assert "verification failed" in refused(sc, http)["detail"]
        shutil.copy(up.ca, ca)  # the right CA, still a client certificate the upstream does not trust
        time.sleep(1.1)
        refused(sc, http, "upstream_unavailable")  # verified now; the upstream drops the untrusted client
        shutil.copy(up.client_cert, cert)
        shutil.copy(up.client_key, key)
        time.sleep(1.1)
        response = http.get(sc.url + "/rotated")
        assert response.status_code == 200, response.text


@pytest.mark.parametrize(("settings", "message"), [
    ({"ca_file": "/nonexistent/ca.pem"}, "/nonexistent/ca.pem does not exist"),
    ({"key_file": "/etc/hostname"}, "key_file needs cert_file"),
    ({"ca_file": "/etc/hostname"}, "do not load as PEM"),
])
def test_check_refuses_upstream_tls_files_that_do_not_load(settings: dict[str, str], message: str,
                                                           tmp_path: Path) -> None:
    """`upstream_tls` files are loaded at check time: a missing or non-PEM file is a config error naming it."""
    from sidecar.config.loader import load
    from sidecar.config.yaml_lines import ConfigError

    path = tmp_path / "sidecar.yaml"
    path.write_text(tls_config("https://127.0.0.1:1", **settings))
    with pytest.raises(ConfigError) as failure:
        load(str(path))
    assert any(message in str(error) and "upstream_tls" in str(error) for error in failure.value.errors), \
        failure.value.errors
