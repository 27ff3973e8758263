"""Shared parts of the adversarial suite: raw-socket HTTP, a strict recording upstream, and the sidecar under attack.

Why raw sockets: httpx (and every client library) normalises exactly what these tests attack — it merges
duplicate headers, refuses CL+TE, resolves dot-segments, re-encodes the path and never sends bare LF. So the
attack bytes are written by hand and the reply is read back from the socket.

Why not a `conftest.py` here: tests/ has no `__init__.py`, so pytest imports every conftest as the module
`conftest`; a second one would replace `tests/conftest.py` in `sys.modules` and break the suites that do
`from conftest import ...`. This module has a unique name instead, and its fixtures are imported by name.

Why a recording upstream of our own: `sidecar.echo.EchoApp` records a request whose client went away mid-body
(ASGI `http.disconnect`) as if it were complete. An attack that aborts a body must not count as "the backend
processed a request", so `StrictUpstream` records whether each body really ended.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import AUDIENCE, ISSUER, jwt_authenticator

from sidecar.state.client_token_store import new_token, token_hash
from sidecar.testing import KeyPair, RunningSidecar, running_sidecar, serve_in_thread

ADMIN_TOKEN = "adversarial-admin-token-0123456789abcdef"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
KEYS_SECRET = "adversarial-keys-secret-0123456789abcdef-xyz"
PARTNER_TOKEN = new_token()
PARTNER_SECRET = "adversarial-partner-secret-0123456789"
SIGNING_KEYS = KeyPair()
SELF_ISSUER = "https://sidecar.adversarial.test"


# --- the strict recording upstream -------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    complete: bool  # the body ended normally (False: the sidecar's connection went away mid-body)
    at: float = field(default_factory=time.monotonic)

    def header(self, name: str) -> str | None:
        values = self.headers_named(name)
        return values[0] if values else None

    def headers_named(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name.lower()]


class StrictUpstream:
    """An ASGI upstream that answers 200 with a small JSON body and records every request it saw."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.url = ""
        self._lock = threading.Lock()

    @property
    def received(self) -> list[Seen]:
        """Only the requests whose body ended: what a backend would actually have processed."""
        return [s for s in self.seen if s.complete]

    def requests(self) -> list[tuple[str, str]]:
        return [(s.method, s.path) for s in self.received]

    def clear(self) -> None:
        with self._lock:
            self.seen.clear()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        chunks, complete = [], False
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                complete = True
                break
        record = Seen(scope["method"], scope["raw_path"].decode("latin-1"), scope["query_string"].decode("latin-1"),
                      [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]], b"".join(chunks),
                      complete)
        with self._lock:
            self.seen.append(record)
        if not complete:
            return
        reply = json.dumps({"ok": True, "path": record.path}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(reply)).encode())]})
        await send({"type": "http.response.body", "body": reply})


@pytest.fixture(scope="session")
def strict_upstream_server() -> Iterator[StrictUpstream]:
    app = StrictUpstream()
    with serve_in_thread(app) as url:
        app.url = url
        yield app


@pytest.fixture
def strict_upstream(strict_upstream_server: StrictUpstream) -> StrictUpstream:
    """The session's strict upstream, emptied: a test sees only its own requests."""
    strict_upstream_server.clear()
    return strict_upstream_server


# --- raw HTTP -----------------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-cased names, the last of duplicates
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def address(base_url: str) -> tuple[str, int]:
    parts = urlsplit(base_url)
    assert parts.hostname and parts.port
    return parts.hostname, parts.port


def exchange(base_url: str, data: bytes, timeout: float = 5.0, half_close: bool = False) -> bytes:
    """Write `data` as is (then half-close if asked: the server sees EOF) and read until the server closes, or
    until `timeout` passes without a byte."""
    with socket.create_connection(address(base_url), timeout=timeout) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, TimeoutError):
            pass
    return b"".join(chunks)


def replies(raw: bytes) -> list[Reply]:
    """Every HTTP/1.1 reply in a byte stream (Content-Length or chunked framed)."""
    out = []
    while raw.startswith(b"HTTP/1."):
        head, sep, rest = raw.partition(b"\r\n\r\n")
        if not sep:
            break
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    rest = rest.partition(b"\r\n")[2]
                    break
                body += rest[:size]
                rest = rest[size + 2:]
        else:
            length = int(headers.get("content-length", "0"))
            body, rest = rest[:length], rest[length:]
        out.append(Reply(int(status_line.split()[1]), headers, body))
        raw = rest
    return out


def send_raw(base_url: str, data: bytes, timeout: float = 5.0, half_close: bool = False) -> list[Reply]:
    return replies(exchange(base_url, data, timeout, half_close))


def request_bytes(method: str, target: str, headers: list[tuple[str, str]] | None = None, body: bytes = b"",
                  *, host: str = "sidecar.test", close: bool = True) -> bytes:
    """One request, byte for byte as given (names, order and duplicates kept)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers or []]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def get(base_url: str, target: str, headers: list[tuple[str, str]] | None = None, **kw: Any) -> Reply:
    [reply] = send_raw(base_url, request_bytes("GET", target, headers, **kw))
    return reply


def assert_error(reply: Reply, status: int, error: str) -> None:
    """A JSON refusal of SPEC §5."""
    assert reply.status == status, (reply.status, reply.body)
    assert reply.headers["content-type"] == "application/json"
    body = reply.json()
    assert set(body) == {"error", "error_description"}
    assert body["error"] == error


# --- the sidecar under attack -------------------------------------------------------------------------------


def attacked_config(upstream_url: str, idp: KeyPair, redis: str | None = None) -> str:
    """Routes chosen to be confused with each other: a public prefix next to protected ones, a lenient and a strict
    route sharing one authenticator, a host-matched route, and one route per credential kind."""
    authenticators = {
        "public": {"type": "anonymous"},
        "staff_jwt": jwt_authenticator(idp),
        "own_jwt": {"type": "jwt", "self_issued": True, "issuer": SELF_ISSUER},
        "partner": {"type": "client_token"},
    }

    def route(route_id: str, path: str, auth: list[str], **extra: Any) -> dict[str, Any]:
        return {"id": route_id, "match": {"path": path}, "auth": auth, **extra}

    routes = [
        route("public", "/public/**", ["public"]),
        route("admin", "/admin/**", ["staff_jwt"]),
        route("lenient", "/lenient/**", ["staff_jwt"]),
        route("strict", "/strict/**", ["staff_jwt"], require={"scopes": ["admin"]}),
        route("own", "/own/**", ["own_jwt"]),
        route("partner", "/partner/**", ["partner"]),
        route("login", "/login/**", ["staff_jwt"], login_url="https://idp.test/login?app=1"),
        {"id": "hosted", "match": {"path": "/hosted/**", "host": "api.example.com"}, "auth": ["public"]},
    ]
    return json.dumps({
        "version": 1, "upstream": upstream_url, "redis": redis,
        "admin": {"token": ADMIN_TOKEN}, "keys": {"secret": KEYS_SECRET},
        "issuer": {"issuer": SELF_ISSUER, "signing_key": SIGNING_KEYS.private_pem},
        "authenticators": authenticators,
        "clients": [{"id": "partner-1", "name": "Partner", "tokens": [f"sha256:{token_hash(PARTNER_TOKEN)}"],
                     "secret": "sha256:" + hashlib.sha256(PARTNER_SECRET.encode()).hexdigest(), "scopes": ["read"]}],
        "routes": routes,
    })


@pytest.fixture(scope="module")
def attacked(strict_upstream_server: StrictUpstream, idp_keys: KeyPair) -> Iterator[RunningSidecar]:
    """One sidecar per test module, in front of the strict upstream."""
    with running_sidecar(attacked_config(strict_upstream_server.url, idp_keys)) as sc:
        yield sc


def staff_token(idp: KeyPair, **claims: Any) -> str:
    return idp.token({"iss": ISSUER, "aud": AUDIENCE, "scope": "read", **claims})


def self_issued_token(sc: RunningSidecar) -> str:
    """A token from this sidecar's own token endpoint (client_credentials for partner-1)."""
    import httpx

    response = httpx.post(f"{sc.url}/_sidecar/oauth2/token", data={"grant_type": "client_credentials"},
                          auth=("partner-1", PARTNER_SECRET))
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])
