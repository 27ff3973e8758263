"""`cookie` authenticators (seed 001 "Cookie Session", SPEC §3): revalidated by the portal's service, signed by the
portal (HMAC, expiry inside), or accepted on existence only (warned by `sidecar check`)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
import time

import httpx
import pytest
from conftest import error_body
from validator_support import Call, validator

from sidecar.testing import running_sidecar

SECRET = "portal-cookie-secret-0123456789abcdef"
OLD_SECRET = "portal-cookie-secret-previous-0123456789"


def answer(call: Call):
    return 200, {"good-session": "1", "stale": "0"}.get(call.query.get("token", ""), "0")


def config(upstream: str, service: str) -> dict:
    return {
        "version": 1,
        "upstream": upstream,
        "authenticators": {
            "portal": {"type": "cookie", "name": "PORTAL",
                       "revalidate": {"url": service + "/valida_token?token={value}", "response": "boolean",
                                      "allow_private": True, "cache_ttl": "60s"}},
            "portal_signed": {"type": "cookie", "name": "SESS", "signed": {"secret": [SECRET, OLD_SECRET]}},
            "legacy": {"type": "cookie", "name": "LEGACY", "existence_only": True},
        },
        "routes": [
            {"id": "portal", "match": {"path": "/portal/**"}, "auth": ["portal"]},
            {"id": "signed", "match": {"path": "/signed/**"}, "auth": ["portal_signed"]},
            {"id": "legacy", "match": {"path": "/legacy/**"}, "auth": ["legacy"]},
        ],
    }


@pytest.fixture
def service():
    with validator(answer) as (app, url):
        yield app, url


@pytest.fixture
def sidecar(upstream, service):
    with running_sidecar(json.dumps(config(upstream.url, service[1]))) as sc:
        yield sc


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def portal_sign(secret: str, claims: dict) -> str:
    """What the portal does (the format in the README, "Portal cookies"), written independently of the sidecar."""
    payload = b64url(json.dumps(claims).encode())
    mac = hmac.new(secret.encode(), f"v1.{payload}".encode(), hashlib.sha256).digest()
    return f"v1.{payload}.{b64url(mac)}"


def test_revalidated_cookie_passes_and_only_it_is_removed(sidecar, upstream, service):
    """A cookie the portal's service vouches for: 200; the other cookies reach the upstream, PORTAL does not."""
    app, _ = service
    cookies = "theme=dark; PORTAL=good-session; lang=pt"
    response = httpx.get(f"{sidecar.url}/portal/edicao/1", headers={"Cookie": cookies})
    assert response.status_code == 200
    got = upstream.last
    assert got.header("cookie") == "theme=dark; lang=pt"
    assert got.header("x-auth-method") == "portal"
    assert got.header("x-auth-subject") == "token:" + hashlib.sha256(b"good-session").hexdigest()[:8]
    assert [c.query for c in app.calls] == [{"token": "good-session"}]


def test_stale_cookie_is_401(sidecar, upstream):
    """A cookie the portal no longer vouches for: 401."""
    response = httpx.get(f"{sidecar.url}/portal/edicao/1", headers={"Cookie": "theme=dark; PORTAL=stale"})
    assert error_body(response, 401, "invalid_token")["error_description"] == "the session is no longer valid"
    assert "www-authenticate" not in response.headers  # a cookie is not a bearer credential
    assert upstream.received == []


def test_oversized_cookie_is_401_without_a_bearer_challenge(sidecar, upstream, service):
    """A cookie longer than 4096 characters: 401 before the service is called, with no Bearer challenge."""
    app, _ = service
    response = httpx.get(f"{sidecar.url}/portal/edicao/1", headers={"Cookie": "PORTAL=" + "x" * 5000})
    assert error_body(response, 401, "invalid_token")["error_description"] == "the session cookie is too large"
    assert "www-authenticate" not in response.headers  # a cookie is not a bearer credential
    assert app.calls == []
    assert upstream.received == []


def test_no_cookie_is_401(sidecar, upstream, service):
    """Without the named cookie (other cookies do not count): 401 missing_credentials, the service not called."""
    app, _ = service
    response = httpx.get(f"{sidecar.url}/portal/edicao/1", headers={"Cookie": "theme=dark"})
    error_body(response, 401, "missing_credentials")
    assert app.calls == []
    assert upstream.received == []


@pytest.mark.parametrize("secret", [SECRET, OLD_SECRET])
def test_signed_cookie_good(sidecar, upstream, secret):
    """A cookie signed by the portal with either configured secret (rotation): 200, the subject from `sub`."""
    value = portal_sign(secret, {"sub": "maria", "exp": int(time.time()) + 60, "plano": "anual"})
    response = httpx.get(f"{sidecar.url}/signed/a", headers={"Cookie": f"SESS={value}; theme=dark"})
    assert response.status_code == 200
    assert upstream.last.header("x-auth-subject") == "maria"
    assert upstream.last.header("cookie") == "theme=dark"


def in_a_minute() -> int:
    return int(time.time()) + 60


@pytest.mark.parametrize(("make", "description"), [
    (lambda: portal_sign(SECRET, {"sub": "maria", "exp": int(time.time()) - 1}), "the session cookie has expired"),
    (lambda: portal_sign(SECRET, {"sub": "maria", "exp": in_a_minute()})[:-2] + "AA",
     "the session cookie is not validly signed"),
    (lambda: portal_sign(SECRET, {"sub": "maria", "exp": in_a_minute()}).replace("v1.", "v1.e", 1),
     "the session cookie is not validly signed"),
    (lambda: portal_sign("another-secret-0123456789abcdef-xyz", {"sub": "maria", "exp": in_a_minute()}),
     "the session cookie is not validly signed"),
    (lambda: portal_sign(SECRET, {"sub": "maria"}), "the session cookie is not validly signed"),
    (lambda: portal_sign(SECRET, {"exp": in_a_minute()}), "the session cookie names no user"),
    (lambda: "maria", "the session cookie is not validly signed"),
], ids=["expired", "bad-signature", "changed-payload", "other-secret", "no-exp", "no-sub", "unsigned"])
def test_signed_cookie_expired_or_tampered_is_401(sidecar, upstream, make, description):
    """Expired, tampered, signed with another secret, without expiry or user, or not signed at all: 401."""
    response = httpx.get(f"{sidecar.url}/signed/a", headers={"Cookie": f"SESS={make()}"})
    assert error_body(response, 401, "invalid_token")["error_description"] == description
    assert upstream.received == []


def test_existence_only_cookie_accepts_any_value(sidecar, upstream):
    """`existence_only`: any non-empty value passes (and is removed); an empty one is no credential (SPEC §3)."""
    assert httpx.get(f"{sidecar.url}/legacy/a", headers={"Cookie": "LEGACY=anything; a=1"}).status_code == 200
    assert upstream.last.header("cookie") == "a=1"
    error_body(httpx.get(f"{sidecar.url}/legacy/a", headers={"Cookie": "LEGACY="}), 401, "missing_credentials")


def test_check_warns_on_existence_only(tmp_path):
    """`sidecar check` passes but warns that an existence-only cookie authenticates nobody."""
    path = tmp_path / "sidecar.yaml"
    path.write_text(json.dumps(config("http://127.0.0.1:9", "http://127.0.0.1:9")))
    result = subprocess.run([sys.executable, "-m", "sidecar", "check", "--config", str(path)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert warnings[0].endswith("authenticators.legacy: cookie 'LEGACY' is accepted on existence only: anyone can "
                                "set a cookie, so this authenticates nobody; prefer revalidate: or signed:")
