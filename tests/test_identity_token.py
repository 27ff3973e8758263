"""`identity.signed_token` (SPEC §4): the upstream gets `X-Auth-Token`, a short JWT signed by the issuer key that
the backend verifies against the JWKS — and never a client-sent one."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
from conftest import config_text, make_config, route

from sidecar.state.client_token_store import new_token, token_hash
from sidecar.testing import KeyPair, RecordingUpstream, RunningSidecar, running_sidecar

ISSUER = "https://sidecar.test"
PARTNER_TOKEN = new_token()


def identity_config(upstream: str, signing: KeyPair, signed_token: bool) -> str:
    return config_text(make_config(
        upstream,
        {"client_token": {"type": "client_token"}},
        [route("transactions", "/api/**", ["client_token"])],
        identity={"signed_token": signed_token},
        issuer={"issuer": ISSUER, "signing_key": signing.private_pem},
        clients=[{"id": "01400-2", "tokens": [f"sha256:{token_hash(PARTNER_TOKEN)}"], "scopes": ["/btb", "pay"]}],
    ))


@pytest.fixture(scope="module")
def signing_keys() -> KeyPair:
    return KeyPair()


@pytest.fixture(scope="module")
def sidecar(shared_upstream: RecordingUpstream, signing_keys: KeyPair) -> Iterator[RunningSidecar]:
    with running_sidecar(identity_config(shared_upstream.url, signing_keys, True)) as sc:
        yield sc


def verify_with_jwks(sc: RunningSidecar, token: str) -> dict[str, Any]:
    """What the backend does: fetch the JWKS, pick the key by kid, verify signature, issuer and expiry."""
    jwks = jwt.PyJWKSet.from_dict(httpx.get(sc.url + "/_sidecar/.well-known/jwks.json").json())
    kid = jwt.get_unverified_header(token)["kid"]
    [key] = [k for k in jwks.keys if k.key_id == kid]
    return jwt.decode(token, key.key, algorithms=[key.algorithm_name], issuer=ISSUER,
                      options={"require": ["exp", "iat", "sub"]})


def test_upstream_gets_a_signed_identity_that_verifies_against_the_jwks(
    sidecar: RunningSidecar, upstream: RecordingUpstream,
) -> None:
    """X-Auth-Token verifies against the JWKS, names subject, client, scopes and method, and expires within 60 s."""
    response = httpx.get(sidecar.url + "/api/x", headers={"X-Client-Token": PARTNER_TOKEN})

    assert response.status_code == 200
    token = upstream.last.header("x-auth-token")
    assert token is not None
    claims = verify_with_jwks(sidecar, token)
    assert set(claims) == {"iss", "sub", "client_id", "scope", "auth_method", "iat", "exp", "jti"}
    assert (claims["sub"], claims["client_id"], claims["scope"], claims["auth_method"]) == (
        "01400-2", "01400-2", "/btb pay", "client_token")
    assert claims["exp"] - claims["iat"] <= 60
    assert claims["exp"] - time.time() <= 60


def test_client_sent_x_auth_token_never_reaches_the_upstream(
    sidecar: RunningSidecar, upstream: RecordingUpstream, signing_keys: KeyPair,
) -> None:
    """A forged X-Auth-Token (or X_Auth_Token) from the client is removed; only the sidecar's own is forwarded."""
    forged = signing_keys.token({"sub": "admin"}, kid=None)
    response = httpx.get(sidecar.url + "/api/x", headers=[
        ("X-Client-Token", PARTNER_TOKEN), ("X-Auth-Token", forged), ("X_Auth_Token", forged)])

    assert response.status_code == 200
    values = [v for k, v in upstream.last.headers if k.replace("_", "-") == "x-auth-token"]
    assert len(values) == 1 and values[0] != forged
    assert verify_with_jwks(sidecar, values[0])["sub"] == "01400-2"


def test_no_x_auth_token_unless_configured(shared_upstream: RecordingUpstream, upstream: RecordingUpstream,
                                           signing_keys: KeyPair) -> None:
    """With `signed_token: false` (the default) the upstream gets no X-Auth-Token."""
    with running_sidecar(identity_config(shared_upstream.url, signing_keys, False)) as sc:
        response = httpx.get(sc.url + "/api/x", headers={"X-Client-Token": PARTNER_TOKEN})

    assert response.status_code == 200
    assert upstream.last.header("x-auth-token") is None


def test_identity_token_is_not_accepted_as_a_credential():
    """A leaked X-Auth-Token presented as a Bearer token on a self_issued route is refused (typ differs)."""
    import json as _json

    import httpx as _httpx

    from sidecar.testing import KeyPair, recording_upstream, running_sidecar

    keys = KeyPair()
    with recording_upstream() as upstream:
        config = {
            "version": 1, "upstream": upstream.url,
            "identity": {"signed_token": True},
            "issuer": {"issuer": "https://sidecar.test", "signing_key": keys.private_pem},
            "authenticators": {"public": {"type": "anonymous"}, "own": {"type": "jwt", "self_issued": True}},
            "routes": [{"id": "own", "match": {"path": "/own/**"}, "auth": ["own"]},
                       {"id": "open", "match": {"path": "/open/**"}, "auth": ["public"]}],
        }
        with running_sidecar(_json.dumps(config)) as sc:
            assert _httpx.get(sc.url + "/open/x").status_code == 200
            leaked = upstream.last.header("x-auth-token")
            assert leaked
            response = _httpx.get(sc.url + "/own/x", headers={"Authorization": f"Bearer {leaked}"})
            assert response.status_code == 401
            assert response.json()["error"] == "invalid_token"
