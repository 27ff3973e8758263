"""Garbage in every credential position: 8-bit bytes, control characters, huge and truncated values are refused with
a 4xx — never a 500, never forwarded (SECURITY.md promise 2: every verifier failure is a 401)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from adversarial_support import (  # noqa: F401  (fixtures)
    KEYS_SECRET,
    StrictUpstream,
    exchange,
    replies,
    strict_upstream,
    strict_upstream_server,
)
from conftest import jwt_authenticator

from sidecar.testing import KeyPair, RunningSidecar, running_sidecar


@pytest.fixture(scope="module")
def credentials_sidecar(strict_upstream_server: StrictUpstream, idp_keys: KeyPair) -> Iterator[RunningSidecar]:  # noqa: F811
    config = json.dumps({
        "version": 1, "upstream": strict_upstream_server.url, "keys": {"secret": KEYS_SECRET},
        "authenticators": {
            "portal_key": {"type": "ip_key", "session_cookie": "sess", "logout_path": "/key/logout"},
            "portal_cookie": {"type": "cookie", "name": "PORTAL", "signed": {"secret": "s" * 40}},
            "staff_jwt": jwt_authenticator(idp_keys),
            "partner": {"type": "client_token"},
            "erp": {"type": "client_jwt", "id_from": "header:X-Client-Id", "token_from": "header:X-Client-Jwt"},
        },
        "clients": [{"id": "erp", "public_key": KeyPair().public_pem}],
        "routes": [
            {"id": "key", "match": {"path": "/key/**"}, "auth": ["portal_key"]},
            {"id": "cookie", "match": {"path": "/cookie/**"}, "auth": ["portal_cookie"]},
            {"id": "jwt", "match": {"path": "/jwt/**"}, "auth": ["staff_jwt"]},
            {"id": "partner", "match": {"path": "/partner/**"}, "auth": ["partner"]},
            {"id": "erp", "match": {"path": "/erp/**"}, "auth": ["erp"]},
        ],
    })
    with running_sidecar(config) as sc:
        yield sc


GARBAGE = [b"v1.\xe9.AAAA", b"v1.a\xff.AAAA", b"v1.\x01.AAAA", b"v1.e30.\xe9", b"\xe9\xe9", b"ab_\xe9", b"v1..",
           b"v1." + b"A" * 5000 + b".AAAA", b"eyJ\xe9.e30.AA", b"a.b.c.d", b"\x7f",
           b"v1.a.A", b"v1.e30.AAAAA"]
PLACES = [
    ("/key/x", b"Cookie: sess=%s"),
    ("/key/logout", b"Cookie: sess=%s"),
    ("/cookie/x", b"Cookie: PORTAL=%s"),
    ("/jwt/x", b"Authorization: Bearer %s"),
    ("/partner/x", b"X-Client-Token: %s"),
    ("/erp/x", b"X-Client-Id: erp\r\nX-Client-Jwt: %s"),
    ("/erp/x", b"X-Client-Id: \xe9rp\r\nX-Client-Jwt: %s"),
]


@pytest.mark.parametrize(("path", "template"), PLACES)
def test_garbage_credentials_are_refused_never_a_500(
    credentials_sidecar: RunningSidecar, strict_upstream: StrictUpstream, path: str, template: bytes,  # noqa: F811
) -> None:
    """Each garbage value in each credential position: 400/401 (303 for logout), never 500, nothing forwarded."""
    statuses = []
    for value in GARBAGE:
        data = (b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n" + template % value
                + b"\r\nConnection: close\r\n\r\n")
        statuses += [a.status for a in replies(exchange(credentials_sidecar.url, data))]
    allowed = {303, 400} if path.endswith("logout") else {400, 401}
    assert len(statuses) == len(GARBAGE)
    assert set(statuses) <= allowed, list(zip(GARBAGE, statuses, strict=True))
    assert strict_upstream.received == []


@pytest.mark.parametrize("key", ["ab_%C3%A9", "ab_%00", "ab_%FF%FE", "%E9", "ab_" + "A" * 5000, "ab_====", "ab_-_-_"])
def test_garbage_ip_keys_in_the_query_are_refused(
    credentials_sidecar: RunningSidecar, strict_upstream: StrictUpstream, key: str,  # noqa: F811
) -> None:
    """Percent-encoded junk as `?key=`: 401, never 500, nothing forwarded."""
    data = f"GET /key/x?key={key} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    assert [a.status for a in replies(exchange(credentials_sidecar.url, data))] == [401]
    assert strict_upstream.received == []
