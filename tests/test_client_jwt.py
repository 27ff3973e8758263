"""`client_jwt` (seed 004): JWTs the client signs with its own key, verified with the public key registered for
that client only; public-key registration through the admin API (SPEC §3, §7)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
from conftest import b64url, b64url_json, config_text, error_body, make_config, raw_request, route, sign_raw
from redis_support import redis_url  # noqa: F401  (fixture)

from sidecar.testing import KeyPair, RecordingUpstream, RunningSidecar, SidecarProcess, running_sidecar

ADMIN = "test-admin-token-0123456789abcdef"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}
SUPPORT = "/uzera/login/chamar-suporte"
PERSON = {"email": "wagnerteste@ixcsoft.com.br", "nome": "Wagner"}


@pytest.fixture(scope="module")
def erp_keys() -> KeyPair:
    """The ERP's key pair, as the seed makes it: RSA 4096."""
    return KeyPair("RSA", 4096)


@pytest.fixture(scope="module")
def other_keys() -> KeyPair:
    """Another client's key pair."""
    return KeyPair()


def seed_public_key(keys: KeyPair) -> str:
    """The public key as the seed sends it: base64 of a PKCS#1 PEM (`btoa(publicKey)`)."""
    return base64.b64encode(keys.public_pem_pkcs1.encode()).decode()


def signed(keys: KeyPair, claims: dict[str, Any] | None = None, *, alg: str | None = None) -> str:
    """A token as the ERP signs it: `{email, nome, iat}` and no exp."""
    payload = {**PERSON, "iat": int(time.time()), **(claims or {})}
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, keys.private_key, algorithm=alg or keys.alg)


def sidecar_config(upstream: str, erp_keys: KeyPair, other_keys: KeyPair, redis: str | None = None) -> str:
    authenticators = {
        "erp_signed": {"type": "client_jwt", "id_from": "body.id", "token_from": "body.token", "max_age": "300s"},
        "erp_header": {"type": "client_jwt", "id_from": "header:X-Client-Id", "token_from": "header:X-Client-Jwt"},
        "erp_iss": {"type": "client_jwt", "id_from": "claim:iss", "token_from": "form.token"},
        "erp_once": {"type": "client_jwt", "replay": "deny"},
        "partner_jwt": {"type": "jwt", "keys": [other_keys.public_pem]},
    }
    routes = [
        route("chat", "/chat/**", ["partner_jwt", "erp_signed"]),
        route("support", SUPPORT, ["erp_signed"], max_body=4096),
        route("by_header", "/by-header/**", ["erp_header"]),
        route("by_iss", "/by-iss/**", ["erp_iss"]),
        route("once", "/once/**", ["erp_once"]),
    ]
    clients = [
        {"id": "3", "name": "ERP", "public_key": seed_public_key(erp_keys), "scopes": ["support"]},
        {"id": "4", "name": "Other ERP", "public_key": other_keys.public_pem},
        {"id": "5", "name": "No key yet"},
    ]
    return config_text(make_config(upstream, authenticators, routes, clients=clients, redis=redis,
                                   admin={"token": ADMIN}))


@pytest.fixture
def sidecar(upstream: RecordingUpstream, erp_keys: KeyPair, other_keys: KeyPair) -> Iterator[RunningSidecar]:
    with running_sidecar(sidecar_config(upstream.url, erp_keys, other_keys)) as sc:
        yield sc


def post_support(sc: RunningSidecar, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(sc.url + SUPPORT, json=body)


def register(sc: RunningSidecar, client: str, public_key: str, method: str = "PATCH") -> httpx.Response:
    return httpx.request(method, f"{sc.admin_url}/admin/clients/{client}/public-key", headers=ADMIN_HEADERS,
                         json={"publicKey": public_key})


def test_seed_request_is_accepted_and_the_token_never_forwarded(
    sidecar: RunningSidecar, upstream: RecordingUpstream, erp_keys: KeyPair,
) -> None:
    """The seed's `{id, notRedirect, token}` passes; the upstream gets the rest of the body, the client and subject."""
    token = signed(erp_keys)
    response = post_support(sidecar, {"id": "3", "notRedirect": True, "token": token})

    assert response.status_code == 200
    [got] = upstream.received
    assert (got.method, got.path) == ("POST", SUPPORT)
    assert json.loads(got.body) == {"id": "3", "notRedirect": True}
    assert got.header("content-length") == str(len(got.body))
    assert got.header("x-auth-client") == "3"
    assert got.header("x-auth-subject") == "wagnerteste@ixcsoft.com.br"
    assert got.header("x-auth-method") == "erp_signed"
    assert got.header("x-auth-scopes") == "support"
    assert token not in json.dumps(got.headers) + got.query + got.body.decode()


def test_form_body_is_accepted_and_forwarded_without_the_token(
    sidecar: RunningSidecar, upstream: RecordingUpstream, erp_keys: KeyPair,
) -> None:
    """The auto-submitted HTML form of the seed's second step: the same fields form-encoded."""
    token = signed(erp_keys)
    response = httpx.post(sidecar.url + SUPPORT, data={"id": "3", "token": token, "lang": "pt"})

    assert response.status_code == 200
    [got] = upstream.received
    assert got.body == b"id=3&lang=pt"
    assert got.header("x-auth-client") == "3"


def test_numeric_id_is_read_as_text(sidecar: RunningSidecar, upstream: RecordingUpstream, erp_keys: KeyPair) -> None:
    """`"id": 3` (a JSON number) names client "3" as well."""
    response = post_support(sidecar, {"id": 3, "token": signed(erp_keys)})

    assert response.status_code == 200
    assert upstream.last.header("x-auth-client") == "3"


def test_id_from_header_and_token_from_header(
    sidecar: RunningSidecar, upstream: RecordingUpstream, erp_keys: KeyPair,
) -> None:
    """`id_from: header:X-Client-Id`: the token header is stripped, the id header passes."""
    token = signed(erp_keys)
    response = httpx.get(sidecar.url + "/by-header/x", headers={"X-Client-Id": "3", "X-Client-Jwt": token})

    assert response.status_code == 200
    [got] = upstream.received
    assert got.header("x-auth-client") == "3"
    assert got.header("x-client-id") == "3"
    assert "x-client-jwt" not in got.header_names()


def test_id_from_claim_iss(sidecar: RunningSidecar, upstream: RecordingUpstream, erp_keys: KeyPair,
                           other_keys: KeyPair) -> None:
    """`id_from: claim:iss`: the issuer claim names the client whose key must verify the token."""
    ok = httpx.post(sidecar.url + "/by-iss/x", data={"token": signed(erp_keys, {"iss": "3"})})
    forged = httpx.post(sidecar.url + "/by-iss/x", data={"token": signed(other_keys, {"iss": "3"})})

    assert ok.status_code == 200
    assert upstream.received[0].header("x-auth-client") == "3"
    error_body(forged, 401, "invalid_token")
    assert len(upstream.received) == 1


def _hs256_with_public_pem(keys: KeyPair) -> str:
    """Algorithm confusion: HS256 keyed with the client's public PEM bytes (PyJWT refuses to build it)."""
    signing_input = f"{b64url_json({'alg': 'HS256', 'typ': 'JWT'})}.{b64url_json({**PERSON, 'iat': int(time.time())})}"
    key = base64.b64decode(seed_public_key(keys))
    return f"{signing_input}.{b64url(hmac.new(key, signing_input.encode(), hashlib.sha256).digest())}"


def _alg_none(keys: KeyPair) -> str:
    return f"{b64url_json({'alg': 'none', 'typ': 'JWT'})}.{b64url_json({**PERSON, 'iat': int(time.time())})}."


def _raw(keys: KeyPair, header: dict[str, Any], **claims: Any) -> str:
    return sign_raw(keys, header, {**PERSON, "iat": int(time.time()), **claims})


REFUSED = {
    "another client's key": lambda erp, other: {"id": "3", "token": signed(other)},
    "own token under another client's id": lambda erp, other: {"id": "4", "token": signed(erp)},
    "unknown client": lambda erp, other: {"id": "99", "token": signed(erp)},
    "client without a key": lambda erp, other: {"id": "5", "token": signed(erp)},
    "missing id": lambda erp, other: {"token": signed(erp)},
    "empty id": lambda erp, other: {"id": "", "token": signed(erp)},
    "iat older than max_age": lambda erp, other: {"id": "3", "token": signed(erp, {"iat": int(time.time()) - 400})},
    "iat in the future": lambda erp, other: {"id": "3", "token": signed(erp, {"iat": int(time.time()) + 400})},
    "neither iat nor exp": lambda erp, other: {"id": "3", "token": signed(erp, {"iat": None})},
    "expired": lambda erp, other: {"id": "3", "token": signed(erp, {"exp": int(time.time()) - 60})},
    "HS256 signed with the public key": lambda erp, other: {"id": "3", "token": _hs256_with_public_pem(erp)},
    "alg none": lambda erp, other: {"id": "3", "token": _alg_none(erp)},
    "RS512 (not accepted)": lambda erp, other: {"id": "3", "token": signed(erp, alg="RS512")},
    "garbage token": lambda erp, other: {"id": "3", "token": "not.a.jwt"},
    # RFC 7515 §4.1.11: no critical extension is understood, not even b64 (which PyJWT accepts when true).
    "crit b64 true": lambda erp, other: {"id": "3", "token": _raw(erp, {"b64": True, "crit": ["b64"]})},
    "crit unknown": lambda erp, other: {"id": "3", "token": _raw(erp, {"crit": ["urn:x"], "urn:x": 1})},
    # A present timestamp must be a number (PyJWT reads "123" and true as numbers).
    "exp null": lambda erp, other: {"id": "3", "token": _raw(erp, {}, exp=None)},
    "nbf numeric string": lambda erp, other: {"id": "3", "token": _raw(erp, {}, nbf=str(int(time.time())))},
    "nbf true": lambda erp, other: {"id": "3", "token": _raw(erp, {}, nbf=True)},
    "iat infinity": lambda erp, other: {"id": "3", "token": _raw(erp, {}, iat=float("inf"))},
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_and_upstream_untouched(sidecar: RunningSidecar, upstream: RecordingUpstream, erp_keys: KeyPair,
                                        other_keys: KeyPair, case: str) -> None:
    """Each bad client-signed request is refused with 401 and reaches nothing; the token is never echoed."""
    body = REFUSED[case](erp_keys, other_keys)
    response = post_support(sidecar, body)

    error_body(response, 401, "invalid_token")
    assert "www-authenticate" not in response.headers
    assert body["token"] not in response.text
    assert upstream.received == []


def test_blank_bearer_beside_the_body_token_passes_to_client_jwt(
    sidecar: RunningSidecar, upstream: RecordingUpstream, erp_keys: KeyPair,
) -> None:
    """Seed 004's PHP client sends `Authorization: Bearer ` beside `{id, token}`: on a route with auth
    [jwt, client_jwt] the blank Bearer is no jwt credential, so client_jwt reads the body and accepts (SPEC §3)."""
    body = json.dumps({"id": "3", "notRedirect": True, "token": signed(erp_keys)}).encode()
    headers = {"Authorization": "Bearer ", "Content-Type": "application/json"}
    response = raw_request(sidecar.url, "/chat/contato", headers, method="POST", body=body)

    assert response.status_code == 200, response.text
    [got] = upstream.received
    assert (got.header("x-auth-method"), got.header("x-auth-client")) == ("erp_signed", "3")
    assert json.loads(got.body) == {"id": "3", "notRedirect": True}
    assert "authorization" not in got.header_names()


def test_missing_token_is_missing_credentials(sidecar: RunningSidecar, upstream: RecordingUpstream) -> None:
    """No token field at all: 401 missing_credentials."""
    error_body(post_support(sidecar, {"id": "3", "notRedirect": True}), 401, "missing_credentials")
    assert upstream.received == []


def test_duplicated_token_field_is_refused(sidecar: RunningSidecar, upstream: RecordingUpstream,
                                          erp_keys: KeyPair) -> None:
    """Two `token` form fields: 400 (backends disagree on which copy wins)."""
    token = signed(erp_keys)
    body = f"id=3&token={token}&token={token}"
    response = httpx.post(sidecar.url + SUPPORT, content=body,
                          headers={"Content-Type": "application/x-www-form-urlencoded"})

    error_body(response, 400, "invalid_request")
    assert upstream.received == []


def test_oversized_body_is_413(sidecar: RunningSidecar, upstream: RecordingUpstream, erp_keys: KeyPair) -> None:
    """The body is read to find the token, bounded by the route's max_body (4096 here): 413 above it."""
    response = post_support(sidecar, {"id": "3", "token": signed(erp_keys), "padding": "x" * 5000})

    error_body(response, 413, "payload_too_large")
    assert upstream.received == []


def test_replay_deny_refuses_a_second_use_and_a_token_without_jti(
    sidecar: RunningSidecar, upstream: RecordingUpstream, erp_keys: KeyPair,
) -> None:
    """`replay: deny`: a jti is accepted once; the same token again, or a token without jti, is refused."""
    token = signed(erp_keys, {"jti": uuid.uuid4().hex})
    first = post_support_to(sidecar, "/once/a", {"id": "3", "token": token})
    second = post_support_to(sidecar, "/once/a", {"id": "3", "token": token})
    no_jti = post_support_to(sidecar, "/once/a", {"id": "3", "token": signed(erp_keys)})

    assert first.status_code == 200
    error_body(second, 401, "invalid_token")
    error_body(no_jti, 401, "invalid_token")
    assert len(upstream.received) == 1


def post_support_to(sc: RunningSidecar, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(sc.url + path, json=body)


def test_registering_a_key_makes_the_next_request_pass(
    sidecar: RunningSidecar, upstream: RecordingUpstream, erp_keys: KeyPair,
) -> None:
    """Client 5 has no key: refused; its key registered as the seed does (PATCH, base64 PKCS#1): the same passes."""
    events: list[tuple[str, dict[str, Any]]] = []

    async def sink(event: str, data: dict[str, Any]) -> None:
        events.append((event, data))

    sidecar.services.events.add_sink(sink)
    body = {"id": "5", "token": signed(erp_keys)}
    error_body(post_support(sidecar, body), 401, "invalid_token")

    registered = register(sidecar, "5", seed_public_key(erp_keys))

    assert registered.status_code == 200
    assert registered.json() == {"client": "5", "kid": erp_keys.kid, "updated": registered.json()["updated"]}
    assert post_support(sidecar, body).status_code == 200
    assert upstream.last.header("x-auth-client") == "5"
    assert events == [("client.public_key.updated", registered.json())]


def test_registered_key_overrides_the_yaml_key(
    sidecar: RunningSidecar, upstream: RecordingUpstream, erp_keys: KeyPair, other_keys: KeyPair,
) -> None:
    """PUT a new key for client 3 (SPKI PEM): tokens of the YAML key are refused, tokens of the new key pass."""
    assert post_support(sidecar, {"id": "3", "token": signed(erp_keys)}).status_code == 200

    assert register(sidecar, "3", other_keys.public_pem, method="PUT").status_code == 200

    error_body(post_support(sidecar, {"id": "3", "token": signed(erp_keys)}), 401, "invalid_token")
    assert post_support(sidecar, {"id": "3", "token": signed(other_keys)}).status_code == 200


@pytest.mark.parametrize(("public_key", "message"), [
    ("garbage", "publicKey: not a PEM public key nor base64 of one; paste the -----BEGIN PUBLIC KEY----- block"),
    ("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
     "publicKey: not a valid PEM public key; paste the whole -----BEGIN PUBLIC KEY----- block (or RSA PUBLIC KEY)"),
    ("weak RSA", "publicKey: RSA key of 1024 bits is too weak; use 2048 bits or more"),
    ("P-384", "publicKey: EC keys must be on P-256 (ES256); this one is on secp384r1"),
])
def test_invalid_key_is_400_with_a_clear_message(sidecar: RunningSidecar, public_key: str, message: str) -> None:
    """A key that cannot verify client_jwt tokens is refused with 400 saying why; nothing is registered."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    weak: dict[str, Any] = {
        "weak RSA": rsa.generate_private_key(public_exponent=65537, key_size=1024),
        "P-384": ec.generate_private_key(ec.SECP384R1()),
    }
    if public_key in weak:
        public_key = weak[public_key].public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    response = register(sidecar, "5", public_key)

    body = error_body(response, 400, "invalid_request")
    assert body["error_description"] == message


@pytest.mark.parametrize("body", [{}, {"publicKey": ""}, {"publicKey": 3}, ["x"]])
def test_register_without_a_public_key_is_400(sidecar: RunningSidecar, body: Any) -> None:
    """The body must be `{"publicKey": "..."}`."""
    response = httpx.patch(f"{sidecar.admin_url}/admin/clients/5/public-key", headers=ADMIN_HEADERS, json=body)

    assert error_body(response, 400, "invalid_request")["error_description"] == (
        'send {"publicKey": "<PEM public key, or base64 of the PEM>"}')


def test_register_for_unknown_client_is_404_and_needs_the_admin_token(sidecar: RunningSidecar,
                                                                    erp_keys: KeyPair) -> None:
    """Unknown client: 404; without the admin token: 401."""
    assert register(sidecar, "nobody", seed_public_key(erp_keys)).status_code == 404
    response = httpx.patch(f"{sidecar.admin_url}/admin/clients/5/public-key", json={"publicKey": erp_keys.public_pem})
    assert response.status_code == 401


def test_registration_reaches_another_process_and_replays_are_shared(
    upstream: RecordingUpstream, erp_keys: KeyPair, other_keys: KeyPair, redis_url: str, tmp_path,  # noqa: F811
) -> None:
    """Two processes on one Redis: a key registered on one verifies on the other at once; a jti spent on one is
    refused on the other."""
    path = tmp_path / "sidecar.yaml"
    path.write_text(sidecar_config(upstream.url, erp_keys, other_keys, redis_url))
    with SidecarProcess(path) as first, SidecarProcess(path) as second:
        body = {"id": "5", "token": signed(erp_keys)}
        error_body(httpx.post(second.url + SUPPORT, json=body), 401, "invalid_token")
        response = httpx.patch(f"{first.admin_url}/admin/clients/5/public-key", headers=ADMIN_HEADERS,
                               json={"publicKey": seed_public_key(erp_keys)})
        assert response.status_code == 200
        assert httpx.post(second.url + SUPPORT, json=body).status_code == 200

        once = {"id": "3", "token": signed(erp_keys, {"jti": uuid.uuid4().hex})}
        assert httpx.post(first.url + "/once/x", json=once).status_code == 200
        error_body(httpx.post(second.url + "/once/x", json=once), 401, "invalid_token")


def test_registered_key_survives_a_restart(upstream: RecordingUpstream, erp_keys: KeyPair, other_keys: KeyPair,
                                           redis_url: str) -> None:  # noqa: F811
    """A key registered through the admin API lives in Redis: a restarted sidecar still verifies with it."""
    text = sidecar_config(upstream.url, erp_keys, other_keys, redis_url)
    with running_sidecar(text) as sc:
        assert register(sc, "5", seed_public_key(erp_keys)).status_code == 200
    with running_sidecar(text) as sc:
        assert post_support(sc, {"id": "5", "token": signed(erp_keys)}).status_code == 200


def test_audit_lines_never_hold_the_token(upstream: RecordingUpstream, erp_keys: KeyPair, other_keys: KeyPair,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Accepted and refused client-signed requests are audited with client and reason, never with the token."""
    good, bad = signed(erp_keys), signed(other_keys)
    with running_sidecar(sidecar_config(upstream.url, erp_keys, other_keys)) as sc:
        assert post_support(sc, {"id": "3", "token": good}).status_code == 200
        error_body(post_support(sc, {"id": "3", "token": bad}), 401, "invalid_token")
    out = capsys.readouterr().out
    lines = [json.loads(line) for line in out.splitlines() if '"route":"support"' in line]

    assert [(x["decision"], x.get("client"), x["reason"], x["status"]) for x in lines] == [
        ("allow", "3", "ok", 200), ("deny", None, "invalid_token", 401)]
    assert good not in out and bad not in out
