"""The client certificate of a TLS listener's connection, as routes and upstreams see it (SPEC §12).

The server reads it once per connection, after the handshake, and hands it to each request of the connection in
the ASGI TLS extension (`scope["extensions"]["tls"]`). With a client CA configured the listener asks for a
certificate without requiring one (CERT_OPTIONAL): a certificate that does not verify fails the handshake, so one
that is here was verified; routes decide whether one is needed (`require: {client_cert: ...}`)."""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass
from typing import Any

from cryptography import x509

CLIENT_CERT = "sidecar.client_cert"  # our key in the ASGI TLS extension
_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


@dataclass(frozen=True, slots=True)
class ClientCert:
    subject: str  # RFC 4514, most specific first, as `openssl x509 -noout -subject -nameopt RFC2253` prints it
    sha256: str  # of the DER certificate, lower-case hex without colons


def tls_extension(ssl_object: ssl.SSLObject) -> dict[str, Any]:
    """The ASGI TLS extension for one connection (its standard keys, and the verified client certificate)."""
    der = ssl_object.getpeercert(binary_form=True)
    cert = None
    if der:
        subject = x509.load_der_x509_certificate(der).subject.rfc4514_string()
        cert = ClientCert(subject, hashlib.sha256(der).hexdigest())
    return {"tls": {
        "server_cert": None,
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
        "client_cert_name": cert.subject if cert else None,
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": None,
        CLIENT_CERT: cert,
    }}


def client_cert(scope: dict[str, Any]) -> ClientCert | None:
    """The verified client certificate of the connection this request came on, if any."""
    extensions = scope.get("extensions")
    if extensions is None:
        return None
    tls = extensions.get("tls")
    return tls.get(CLIENT_CERT) if tls else None
