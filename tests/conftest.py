"""Shared fixtures: a recording upstream, IdP key pairs, token minting, config building and a raw HTTP client.

Everything runs through real parts: a real sidecar under uvicorn on loopback (`sidecar.testing.running_sidecar`),
a real upstream that records what reached it, real RSA keys. The upstream is shared by the whole session; the
`upstream` fixture empties its record first, so a test only ever sees the requests it made itself."""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
import pytest

from sidecar.testing import KeyPair, RecordingUpstream, recording_upstream

ISSUER = "https://idp.test"
AUDIENCE = "sidecar-tests"


@pytest.fixture(scope="session")
def shared_upstream() -> Iterator[RecordingUpstream]:
    with recording_upstream() as upstream:
        yield upstream


@pytest.fixture
def upstream(shared_upstream: RecordingUpstream) -> RecordingUpstream:
    """The session's recording upstream, its record emptied: assertions see only this test's requests."""
    shared_upstream.received.clear()
    return shared_upstream


@pytest.fixture(scope="session")
def idp_keys() -> KeyPair:
    """The key pair of the identity provider the sidecar trusts."""
    return KeyPair()


@pytest.fixture(scope="session")
def stranger_keys() -> KeyPair:
    """A key pair nobody trusts."""
    return KeyPair()


@pytest.fixture(scope="session")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10.0, trust_env=False) as client:
        yield client


def jwt_authenticator(keys: KeyPair, **overrides: Any) -> dict[str, Any]:
    """A `jwt` authenticator trusting `keys`, with this suite's issuer and audience."""
    return {"type": "jwt", "keys": [keys.public_pem], "issuer": ISSUER, "audience": AUDIENCE, **overrides}


def route(route_id: str, path: str, auth: list[str], **extra: Any) -> dict[str, Any]:
    return {"id": route_id, "match": {"path": path}, "auth": auth, **extra}


def make_config(upstream_url: str, authenticators: dict[str, Any], routes: list[dict[str, Any]],
                **top: Any) -> dict[str, Any]:
    """A `version: 1` configuration as a dict (the sidecar reads it as JSON, which is YAML)."""
    return {"version": 1, "upstream": upstream_url, "authenticators": authenticators, "routes": routes, **top}


def config_text(config: dict[str, Any]) -> str:
    return json.dumps(config, indent=1)


def mint(keys: KeyPair, **claims: Any) -> str:
    """A token from `keys` with this suite's issuer and audience; claims override (None removes one)."""
    return keys.token({"iss": ISSUER, "aud": AUDIENCE, "scope": "read", **claims})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_json(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def sign_raw(keys: KeyPair, header: dict[str, Any] | str, payload: dict[str, Any] | str) -> str:
    """A compact JWS signed by `keys` over exactly this header and payload, given as dicts or as JSON text.
    PyJWT's encoder refuses odd headers (a non-string kid); `json.dumps` writes NaN and Infinity as such."""
    header_text = header if isinstance(header, str) else json.dumps({"alg": keys.alg, **header})
    payload_text = payload if isinstance(payload, str) else json.dumps(payload)
    signing_input = f"{b64url(header_text.encode())}.{b64url(payload_text.encode())}"
    signature = jwt.get_algorithm_by_name(keys.alg).sign(signing_input.encode(), keys.private_key)
    return f"{signing_input}.{b64url(signature)}"


def error_body(response: httpx.Response | RawResponse, status: int, error: str) -> dict[str, Any]:
    """Assert a JSON refusal (SPEC §5) and return its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = json.loads(response.content)
    assert set(body) == {"error", "error_description"}
    assert body["error"] == error
    assert isinstance(body["error_description"], str) and body["error_description"]
    return body


@dataclass
class RawResponse:
    status_code: int
    headers: dict[str, str]  # lower-cased names; the last of duplicates
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("latin-1")


def raw_request(base_url: str, target: str, headers: dict[str, str] | None = None, method: str = "GET",
                body: bytes | None = None) -> RawResponse:
    """Send one request exactly as given (no client library to normalise the target or the header values) and read
    the reply. A `body` is sent with its Content-Length."""
    parts = urlsplit(base_url)
    lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.hostname}:{parts.port}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    reply = b"".join(chunks)
    head, _, body = reply.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    if parsed.get("transfer-encoding") == "chunked":
        body = _dechunk(body)
    return RawResponse(int(status_line.split()[1]), parsed, body)


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2:]
    return out


def wait_for(predicate: Any, timeout: float = 5.0) -> Any:
    """Poll until `predicate()` is truthy (work another thread finishes after the reply was sent)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.01)
