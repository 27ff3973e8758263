"""Webhook address safety (SPEC §8): every spelling of a loopback, private, link-local or metadata address is
recognised; the delivery client refuses them after resolving, and connects to the address it checked while
keeping the name for Host, SNI and the certificate check."""

from __future__ import annotations

import contextlib
import datetime
import re
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sidecar.outbound.guard import UnsafeDestination, delivery_client, forbidden_reason, literal_address, url_refusal
from sidecar.server.runner import SignalFreeServer
from sidecar.testing import free_port, serve_in_thread

LOOPBACK = "loopback"
LINK_LOCAL = "link-local, where cloud metadata services live"
MAPPED = ", as {} inside an IPv6 address"


@pytest.mark.parametrize(("host", "address", "reason"), [
    ("127.0.0.1", "127.0.0.1", LOOPBACK),
    ("2130706433", "127.0.0.1", LOOPBACK),
    ("0x7f000001", "127.0.0.1", LOOPBACK),
    ("0177.0.0.1", "127.0.0.1", LOOPBACK),
    ("127.1", "127.0.0.1", LOOPBACK),
    ("127.0.0.1.", "127.0.0.1", LOOPBACK),
    ("[::ffff:127.0.0.1]", "::ffff:7f00:1", LOOPBACK + MAPPED.format("127.0.0.1")),
    ("::ffff:7f00:1", "::ffff:7f00:1", LOOPBACK + MAPPED.format("127.0.0.1")),
    ("::7f00:1", "::7f00:1", LOOPBACK + MAPPED.format("127.0.0.1")),
    ("64:ff9b::7f00:1", "64:ff9b::7f00:1", LOOPBACK + MAPPED.format("127.0.0.1")),
    ("2002:7f00:1::", "2002:7f00:1::", LOOPBACK + MAPPED.format("127.0.0.1")),
    ("[::1]", "::1", LOOPBACK),
    ("10.1.2.3", "10.1.2.3", "private (RFC 1918)"),
    ("172.16.0.1", "172.16.0.1", "private (RFC 1918)"),
    ("192.168.1.1", "192.168.1.1", "private (RFC 1918)"),
    ("::ffff:192.168.1.1", "::ffff:c0a8:101", "private (RFC 1918)" + MAPPED.format("192.168.1.1")),
    ("100.64.0.1", "100.64.0.1", "carrier-grade NAT (RFC 6598)"),
    ("169.254.169.254", "169.254.169.254", LINK_LOCAL),
    ("169.254.43518", "169.254.169.254", LINK_LOCAL),
    ("0251.0376.0251.0376", "169.254.169.254", LINK_LOCAL),
    ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254", LINK_LOCAL),
    ("::ffff:169.254.169.254", "::ffff:a9fe:a9fe", LINK_LOCAL + MAPPED.format("169.254.169.254")),
    ("fe80::1", "fe80::1", "link-local"),
    ("fc00::1", "fc00::1", "unique-local (RFC 4193)"),
    ("fd00:ec2::254", "fd00:ec2::254", "unique-local (RFC 4193)"),
    ("0.0.0.0", "0.0.0.0", "unspecified ('this network')"),
    ("0", "0.0.0.0", "unspecified ('this network')"),
    ("::", "::", "unspecified"),
    ("224.0.0.1", "224.0.0.1", "multicast"),
    ("ff02::1", "ff02::1", "multicast"),
    ("240.0.0.1", "240.0.0.1", "reserved"),
    ("255.255.255.255", "255.255.255.255", "reserved"),
    ("192.0.2.10", "192.0.2.10", "documentation (TEST-NET-1)"),
    ("2001:db8::1", "2001:db8::1", "documentation"),
])
def test_every_spelling_of_an_internal_address_is_refused(host, address, reason):
    """Literal spellings resolvers accept are read as the address they mean, and refused with the reason."""
    ip = literal_address(host)
    assert str(ip) == address
    assert forbidden_reason(ip) == reason


@pytest.mark.parametrize("host", ["93.184.215.14", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8",
                                  "0x08080808"])
def test_public_addresses_are_allowed(host):
    """Global unicast addresses, in any spelling, are allowed."""
    assert forbidden_reason(literal_address(host)) is None


@pytest.mark.parametrize("host", ["example.com", "hooks.partner.test", "1.2.3.4.5", "08.1.1.1", "256.1.1.1",
                                  "1.16777216", "127.0.0.1.nip.io", "0x1g"])
def test_names_are_not_addresses(host):
    """Anything that is not an address spelling is a name, left to DNS and checked at delivery."""
    assert literal_address(host) is None


@pytest.mark.parametrize(("url", "refused"), [
    ("http://169.254.169.254/latest/meta-data", True),
    ("http://[::ffff:169.254.169.254]/", True),
    ("http://2130706433:8080/hooks", True),
    ("http://localhost:8080/hooks", True),
    ("http://api.localhost/hooks", True),
    ("https://hooks.example.com/in", False),
    ("https://8.8.8.8/in", False),
])
def test_check_refuses_only_literal_internal_addresses(url, refused):
    """`sidecar check` refuses literal internal addresses and localhost; names wait for delivery time."""
    assert (url_refusal(url) is not None) == refused
    assert url_refusal(url, allow_private=True) is None


def test_check_refuses_what_is_not_a_url():
    """A webhook URL must be http or https with a host."""
    assert url_refusal("ftp://hooks.example/") == "'ftp://hooks.example/' is not a webhook URL; write https://host[:port]/path"


class Recorder:
    def __init__(self) -> None:
        self.hosts: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.hosts.append(dict(scope["headers"]).get(b"host", b"").decode())
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@pytest.fixture
def recorder() -> Iterator[tuple[Recorder, int]]:
    app = Recorder()
    with serve_in_thread(app) as url:
        yield app, int(url.rsplit(":", 1)[1])


def fake_dns(answers: dict[str, list[str]], asked: list[str]) -> Any:
    async def resolve(host: str, port: int) -> list[str]:
        asked.append(host)
        return answers[host]

    return resolve


@pytest.mark.parametrize("host", ["localhost", "127.1", "2130706433", "[::ffff:127.0.0.1]"])
async def test_client_refuses_loopback_before_connecting(recorder, host):
    """Real resolution (or a literal) to loopback: refused, and the listening server sees nothing."""
    app, port = recorder
    async with delivery_client(allow_private=False) as client:
        with pytest.raises(UnsafeDestination, match=r"\(loopback.*allow_private: true"):
            await client.post(f"http://{host}:{port}/hooks", content=b"{}")
    assert app.hosts == []


async def test_one_internal_answer_refuses_the_name(recorder):
    """A name answering both a public and an internal address is refused as a whole."""
    asked: list[str] = []
    async with delivery_client(False, resolve=fake_dns({"mixed.test": ["8.8.8.8", "10.0.0.7"]}, asked)) as client:
        with pytest.raises(UnsafeDestination) as caught:
            await client.post("http://mixed.test/hooks", content=b"{}")
    assert str(caught.value) == ("mixed.test resolves to 10.0.0.7 (private (RFC 1918)); deliveries there are refused "
                                 "unless the webhook sets allow_private: true")
    assert asked == ["mixed.test"]


async def test_connection_is_pinned_to_the_checked_address_with_the_name_in_host(recorder):
    """The name is resolved once per connection; the request goes to that address with Host naming the name."""
    app, port = recorder
    asked: list[str] = []
    async with delivery_client(True, resolve=fake_dns({"hooks.partner.test": ["127.0.0.1"]}, asked)) as client:
        response = await client.post(f"http://hooks.partner.test:{port}/hooks", content=b"{}")
    assert response.status_code == 204
    assert asked == ["hooks.partner.test"]
    assert app.hosts == [f"hooks.partner.test:{port}"]


def _certificate(tmp_path: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@contextlib.contextmanager
def tls_server(app: Any, cert: Path, key: Path) -> Iterator[int]:
    port = free_port()
    server = SignalFreeServer(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="critical",
                                          ssl_certfile=str(cert), ssl_keyfile=str(key)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


async def test_tls_checks_the_certificate_against_the_name(tmp_path):
    """Over https the pinned connection still sends the name as SNI and checks the certificate against it."""
    cert, key = _certificate(tmp_path, "hooks.partner.test")
    trust = ssl.create_default_context(cafile=str(cert))
    app = Recorder()
    dns = {"hooks.partner.test": ["127.0.0.1"], "other.partner.test": ["127.0.0.1"]}
    with tls_server(app, cert, key) as port:
        async with delivery_client(True, resolve=fake_dns(dns, []), verify=trust) as client:
            response = await client.post(f"https://hooks.partner.test:{port}/hooks", content=b"{}")
            assert response.status_code == 204
            mismatch = re.escape("Hostname mismatch, certificate is not valid for 'other.partner.test'")
            with pytest.raises(httpx.ConnectError, match=mismatch):
                await client.post(f"https://other.partner.test:{port}/hooks", content=b"{}")
    assert app.hosts == [f"hooks.partner.test:{port}"]

