"""The token endpoint (SPEC §6, RFC 6749): client_credentials (seed 003), password and custom_sso with the
identifier map (seed 002); tokens verified against the JWKS and used on `self_issued` routes."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl

import httpx
import jwt
import pytest
from conftest import config_text, error_body, make_config, route

from sidecar.authn.ip_key_sealing import keyring_for
from sidecar.echo import read_body
from sidecar.testing import KeyPair, RecordingUpstream, RunningSidecar, running_sidecar, serve_in_thread

ADMIN = "test-admin-token-0123456789abcdef"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}
ISSUER = "https://sidecar.test"
TOTVS_SECRET = "totvs-secret-0123456789"
ENGAGE_SECRET = "engage-secret-0123456789"
CUSTOMER_TOKEN = "sct_engage-customer-token-0123456789"
KEYS_SECRET = "k" * 48


def sha256(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


async def credentials_service(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A customer's json_status login service (seed 001): password "right" is the only good one."""
    body = await read_body(receive)
    form = dict(parse_qsl(body.decode()))
    if form.get("password") == "right":
        reply = {"status": "OK", "userData": {"login": form["username"], "name": "Maria"}}
    else:
        reply = {"status": "ERROR", "message": "Usuário ou senha inválidos"}
    data = json.dumps(reply).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": data})


@pytest.fixture(scope="module")
def signing_keys() -> KeyPair:
    return KeyPair()


@pytest.fixture(scope="module")
def login_service() -> Iterator[str]:
    with serve_in_thread(credentials_service) as url:
        yield url


def token_config(upstream: str, signing: KeyPair | None, login_url: str, audience: str | None = None) -> str:
    issuer: dict[str, Any] = {
        "issuer": ISSUER, "access_token_ttl": "120s",
        "credentials": {"url": login_url + "/login", "allow_private": True, "subject_claim": "login"},
    }
    if signing is not None:
        issuer["signing_key"] = signing.private_pem
    if audience:
        issuer["audience"] = audience
    self_issued = {"type": "jwt", "self_issued": True, "issuer": ISSUER, **({"audience": audience} if audience else {})}
    return config_text(make_config(
        upstream,
        {"own": self_issued, "sso_key": {"type": "ip_key"}},
        [route("btb", "/api/btb/**", ["own"], require={"scopes": ["/btb"]}),
         route("admin", "/api/admin/**", ["own"], require={"scopes": ["admin"]}),
         route("sso", "/sso/**", ["sso_key"])],
        admin={"token": ADMIN},
        keys={"secret": KEYS_SECRET},
        issuer=issuer,
        clients=[
            {"id": "totvs", "secret": sha256(TOTVS_SECRET), "scopes": ["/btb", "/fin"]},
            {"id": "engage", "secret": sha256(ENGAGE_SECRET), "scopes": ["sso"],
             "tokens": [sha256(CUSTOMER_TOKEN)]},
            {"id": "nosecret", "scopes": ["/btb"]},
        ],
    ))


@pytest.fixture(scope="module")
def sidecar(shared_upstream: RecordingUpstream, signing_keys: KeyPair, login_service: str) -> Iterator[RunningSidecar]:
    with running_sidecar(token_config(shared_upstream.url, signing_keys, login_service)) as sc:
        yield sc


def token_request(sc: RunningSidecar, data: dict[str, str] | None = None, *, auth: tuple[str, str] | None = None,
                  query: str = "") -> httpx.Response:
    return httpx.post(f"{sc.url}/_sidecar/oauth2/token{query}", data=data, auth=auth)


def client_credentials(sc: RunningSidecar, **data: str) -> httpx.Response:
    return token_request(sc, {"grant_type": "client_credentials", **data}, auth=("totvs", TOTVS_SECRET))


def verify_with_jwks(sc: RunningSidecar, token: str, audience: str | None = None) -> dict[str, Any]:
    """Verify a token as a backend would: the JWKS fetched over HTTP, the key picked by kid."""
    jwks = jwt.PyJWKSet.from_dict(httpx.get(sc.url + "/_sidecar/.well-known/jwks.json").json())
    kid = jwt.get_unverified_header(token)["kid"]
    [key] = [k for k in jwks.keys if k.key_id == kid]
    return jwt.decode(token, key.key, algorithms=[key.algorithm_name], issuer=ISSUER, audience=audience,
                      options={"verify_aud": audience is not None})


def assert_no_store(response: httpx.Response) -> None:
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["pragma"] == "no-cache"


def test_client_credentials_with_basic(sidecar: RunningSidecar) -> None:
    """Basic client credentials: an RFC 6749 §5.1 reply whose JWT verifies against the JWKS and lives 120 s."""
    response = client_credentials(sidecar)

    assert response.status_code == 200
    assert_no_store(response)
    body = response.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "scope"}
    assert (body["token_type"], body["expires_in"], body["scope"]) == ("Bearer", 120, "/btb /fin")
    claims = verify_with_jwks(sidecar, body["access_token"])
    assert set(claims) == {"iss", "sub", "client_id", "scope", "iat", "exp", "jti"}
    assert (claims["iss"], claims["sub"], claims["client_id"], claims["scope"]) == (ISSUER, "totvs", "totvs",
                                                                                    "/btb /fin")
    assert claims["exp"] - claims["iat"] == 120


def test_grant_type_in_the_query_string_as_totvs_sends_it(sidecar: RunningSidecar) -> None:
    """`POST /oauth2/token?grant_type=client_credentials` with Basic and no body (seed 003)."""
    response = token_request(sidecar, auth=("totvs", TOTVS_SECRET), query="?grant_type=client_credentials")

    assert response.status_code == 200
    assert verify_with_jwks(sidecar, response.json()["access_token"])["sub"] == "totvs"


def test_grant_type_in_the_query_and_the_same_in_the_body(sidecar: RunningSidecar) -> None:
    """Seed 003's URL used by a standard OAuth2 client, which also puts grant_type in the form body: accepted."""
    response = token_request(sidecar, {"grant_type": "client_credentials", "scope": "/btb"},
                             auth=("totvs", TOTVS_SECRET), query="?grant_type=client_credentials")

    assert response.status_code == 200, response.text
    assert response.json()["scope"] == "/btb"
    assert verify_with_jwks(sidecar, response.json()["access_token"])["sub"] == "totvs"


def test_client_credentials_in_the_form(sidecar: RunningSidecar) -> None:
    """RFC 6749 §2.3.1: client_id and client_secret in the form body are accepted too."""
    response = token_request(sidecar, {"grant_type": "client_credentials", "client_id": "totvs",
                                       "client_secret": TOTVS_SECRET})

    assert response.status_code == 200
    assert verify_with_jwks(sidecar, response.json()["access_token"])["client_id"] == "totvs"


def test_basic_and_form_credentials_together_are_invalid_request(sidecar: RunningSidecar) -> None:
    """RFC 6749 §2.3: one client authentication method per request."""
    response = token_request(sidecar, {"grant_type": "client_credentials", "client_id": "totvs",
                                       "client_secret": TOTVS_SECRET}, auth=("totvs", TOTVS_SECRET))

    error_body(response, 400, "invalid_request")
    assert_no_store(response)


@pytest.mark.parametrize(("data", "auth"), [
    ({"grant_type": "client_credentials"}, ("totvs", "wrong")),
    ({"grant_type": "client_credentials"}, ("nobody", TOTVS_SECRET)),
    ({"grant_type": "client_credentials"}, ("nosecret", "")),
    ({"grant_type": "client_credentials"}, None),
    ({"grant_type": "client_credentials", "client_id": "totvs", "client_secret": "wrong"}, None),
])
def test_bad_client_credentials_are_invalid_client(sidecar: RunningSidecar, data: dict[str, str],
                                                   auth: tuple[str, str] | None) -> None:
    """Wrong secret, unknown client, client without a secret, no credentials: 401 invalid_client, Basic challenge."""
    response = token_request(sidecar, data, auth=auth)

    body = error_body(response, 401, "invalid_client")
    assert response.headers["www-authenticate"] == 'Basic realm="sidecar"'
    assert_no_store(response)
    assert "wrong" not in body["error_description"] and TOTVS_SECRET not in response.text


@pytest.mark.parametrize(("data", "error"), [
    ({"grant_type": "implicit"}, "unsupported_grant_type"),
    ({"grant_type": "authorization_code", "code": "x"}, "unsupported_grant_type"),
    ({}, "invalid_request"),
])
def test_unsupported_or_missing_grant_type(sidecar: RunningSidecar, data: dict[str, str], error: str) -> None:
    """`implicit` (not a token-endpoint grant) and other grants: 400 unsupported_grant_type; none: invalid_request."""
    response = token_request(sidecar, data, auth=("totvs", TOTVS_SECRET))

    error_body(response, 400, error)
    assert_no_store(response)


def test_scope_outside_the_clients_is_invalid_scope(sidecar: RunningSidecar) -> None:
    """A scope the client does not hold: 400 invalid_scope."""
    error_body(client_credentials(sidecar, scope="/btb admin"), 400, "invalid_scope")


def test_requested_scope_subset_is_granted(sidecar: RunningSidecar) -> None:
    """A subset of the client's scopes is granted as asked."""
    response = client_credentials(sidecar, scope="/btb")

    assert response.json()["scope"] == "/btb"
    assert verify_with_jwks(sidecar, response.json()["access_token"])["scope"] == "/btb"


@pytest.mark.parametrize(("query", "content", "content_type"), [
    ("?client_secret=x", b"grant_type=client_credentials", "application/x-www-form-urlencoded"),
    ("", b'{"grant_type": "client_credentials"}', "application/json"),
    ("?grant_type=client_credentials", b"grant_type=password", "application/x-www-form-urlencoded"),
    ("", b"grant_type=client_credentials&grant_type=client_credentials", "application/x-www-form-urlencoded"),
    ("?grant_type=client_credentials&grant_type=client_credentials", b"", "application/x-www-form-urlencoded"),
    ("", b"grant_type=client_credentials&scope=/btb&scope=/btb", "application/x-www-form-urlencoded"),
], ids=["secret_in_query", "json_body", "query_and_body_disagree", "repeated_in_body", "repeated_in_query",
        "scope_repeated_in_body"])
def test_malformed_requests_are_invalid_request(sidecar: RunningSidecar, query: str, content: bytes,
                                                content_type: str) -> None:
    """A secret in the URL, a JSON body, a parameter repeated in the body or with two values: 400 invalid_request."""
    response = httpx.post(f"{sidecar.url}/_sidecar/oauth2/token{query}", content=content,
                          headers={"Content-Type": content_type}, auth=("totvs", TOTVS_SECRET))

    error_body(response, 400, "invalid_request")


def test_token_opens_a_self_issued_route_with_the_right_scope_only(
    sidecar: RunningSidecar, upstream: RecordingUpstream,
) -> None:
    """The access token opens a `self_issued` jwt route requiring /btb, and gets 403 where `admin` is required."""
    token = client_credentials(sidecar).json()["access_token"]
    headers = {"Authorization": f"Bearer {token}"}

    ok = httpx.get(sidecar.url + "/api/btb/v1/properties/general", headers=headers)
    forbidden = httpx.get(sidecar.url + "/api/admin/x", headers=headers)

    assert ok.status_code == 200
    [got] = upstream.received
    assert (got.header("x-auth-subject"), got.header("x-auth-client"), got.header("x-auth-scopes")) == (
        "totvs", "totvs", "/btb /fin")
    assert "authorization" not in got.header_names()
    error_body(forbidden, 403, "insufficient_scope")


def test_audience_is_set_only_when_configured(shared_upstream: RecordingUpstream, signing_keys: KeyPair,
                                              login_service: str) -> None:
    """With issuer.audience the token carries `aud`, and a self_issued route checking that audience accepts it."""
    with running_sidecar(token_config(shared_upstream.url, signing_keys, login_service, "jwt.io.apache.externo")) as sc:
        token = client_credentials(sc).json()["access_token"]
        claims = verify_with_jwks(sc, token, audience="jwt.io.apache.externo")
        response = httpx.get(sc.url + "/api/btb/x", headers={"Authorization": f"Bearer {token}"})

    assert claims["aud"] == "jwt.io.apache.externo"
    assert response.status_code == 200


def test_no_signing_key_means_no_token_endpoint(shared_upstream: RecordingUpstream, login_service: str) -> None:
    """Without issuer.signing_key the token endpoint answers 404 (SPEC: absent, no token endpoint)."""
    with running_sidecar(token_config(shared_upstream.url, None, login_service)) as sc:
        response = client_credentials(sc)

    error_body(response, 404, "not_found")
    assert_no_store(response)


def password(sc: RunningSidecar, user: str, secret: str) -> httpx.Response:
    return token_request(sc, {"grant_type": "password", "username": user, "password": secret,
                              "client_id": "engage", "client_secret": ENGAGE_SECRET, "customer_id": "c1"})


def test_password_grant_accepted_by_the_credentials_service(sidecar: RunningSidecar) -> None:
    """`password`: the json_status service says OK; the token's subject is the user, client_id the client."""
    response = password(sidecar, "maria", "right")

    assert response.status_code == 200
    assert_no_store(response)
    claims = verify_with_jwks(sidecar, response.json()["access_token"])
    assert (claims["sub"], claims["client_id"], claims["scope"]) == ("maria", "engage", "sso")


def test_password_grant_refused_by_the_credentials_service(sidecar: RunningSidecar) -> None:
    """The service answers ERROR: 400 invalid_grant, and the password is not echoed."""
    response = password(sidecar, "maria", "wrong-password")

    body = error_body(response, 400, "invalid_grant")
    assert "wrong-password" not in response.text
    assert body["error_description"] == "the username or password is not accepted"


def test_password_grant_with_the_service_down_is_503(shared_upstream: RecordingUpstream, signing_keys: KeyPair,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The credentials service unreachable: 503 temporarily_unavailable, never a token; audited as an error."""
    with running_sidecar(token_config(shared_upstream.url, signing_keys, "http://127.0.0.1:9")) as sc:
        response = password(sc, "maria", "right")
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"kind":"token"' in line]

    error_body(response, 503, "temporarily_unavailable")
    assert [(x["decision"], x["reason"], x["status"]) for x in lines] == [("error", "temporarily_unavailable", 503)]


def map_identifiers(sc: RunningSidecar, mappings: list[dict[str, str]]) -> httpx.Response:
    return httpx.post(sc.admin_url + "/admin/identifiers", headers=ADMIN_HEADERS, json=mappings)


def custom_sso(sc: RunningSidecar, identifier: str, customer_token: str = CUSTOMER_TOKEN) -> httpx.Response:
    return token_request(sc, {"grant_type": "custom_sso", "customer_id": "c1", "customer_token": customer_token,
                              "client_id": "engage", "client_secret": ENGAGE_SECRET, "user_identifier": identifier})


def test_custom_sso_with_a_mapped_identifier_gives_a_token_and_a_key(sidecar: RunningSidecar,
                                                                     upstream: RecordingUpstream) -> None:
    """A mapped identifier gives a token for its user and a single-use 5-minute key that opens an ip_key route once."""
    identifier = str(uuid.uuid4())
    mapped = map_identifiers(sidecar, [{"user_login": "joana", "client_application_id": "engage",
                                        "identifier": identifier}])
    assert (mapped.status_code, mapped.json()) == (201, {"created": 1})

    response = custom_sso(sidecar, identifier)

    assert response.status_code == 200
    assert_no_store(response)
    body = response.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "scope", "key"}
    claims = verify_with_jwks(sidecar, body["access_token"])
    assert (claims["sub"], claims["client_id"]) == ("joana", "engage")
    key = keyring_for(sidecar.services.config).open(body["key"])
    assert (key.user, key.client, key.single_use, key.ip) == ("joana", "engage", True, None)
    assert key.expires_at - key.issued_at == 300
    first = httpx.get(sidecar.url + "/sso/login", params={"key": body["key"]})
    again = httpx.get(sidecar.url + "/sso/login", params={"key": body["key"]})
    assert first.status_code == 200
    [got] = upstream.received
    assert (got.header("x-auth-subject"), got.header("x-auth-client"), got.query) == ("joana", "engage", "")
    error_body(again, 401, "invalid_token")


@pytest.mark.parametrize(("identifier", "customer_token"), [
    ("never-mapped", CUSTOMER_TOKEN),
    ("mapped-for-token-test", "sct_not-a-token-of-anyone"),
])
def test_custom_sso_unmapped_identifier_or_bad_customer_token_is_invalid_grant(
    sidecar: RunningSidecar, identifier: str, customer_token: str,
) -> None:
    """An identifier nobody mapped, or a customer_token that is not the client's: 400 invalid_grant, no key."""
    map_identifiers(sidecar, [{"user_login": "ana", "client_application_id": "engage",
                               "identifier": "mapped-for-token-test"}])
    response = custom_sso(sidecar, identifier, customer_token)

    error_body(response, 400, "invalid_grant")
    assert "key" not in response.json()


def test_duplicate_identifier_is_409_and_nothing_is_written(sidecar: RunningSidecar) -> None:
    """Mapping an identifier already mapped: 409, and the other mappings of that request are not written."""
    taken, fresh = str(uuid.uuid4()), str(uuid.uuid4())
    assert map_identifiers(sidecar, [{"user_login": "a", "client_application_id": "engage",
                                      "identifier": taken}]).status_code == 201

    response = map_identifiers(sidecar, [
        {"user_login": "b", "client_application_id": "engage", "identifier": fresh},
        {"user_login": "b", "client_application_id": "engage", "identifier": taken},
    ])

    error_body(response, 409, "conflict")
    error_body(custom_sso(sidecar, fresh), 400, "invalid_grant")
    assert verify_with_jwks(sidecar, custom_sso(sidecar, taken).json()["access_token"])["sub"] == "a"


@pytest.mark.parametrize("body", [
    [],
    {"user_login": "a"},
    [{"user_login": "a", "client_application_id": "engage"}],
    [{"user_login": "a", "client_application_id": "nobody", "identifier": "x"}],
    [{"user_login": "", "client_application_id": "engage", "identifier": "x"}],
])
def test_malformed_identifier_mappings_are_400(sidecar: RunningSidecar, body: Any) -> None:
    """Not a list of complete mappings for a configured client: 400 invalid_request."""
    error_body(map_identifiers(sidecar, body), 400, "invalid_request")


def test_audit_lines_name_the_grant_and_never_a_secret(shared_upstream: RecordingUpstream, signing_keys: KeyPair,
                                                       login_service: str, capsys: pytest.CaptureFixture[str]) -> None:
    """One audit line per token request, with grant, client and outcome — no secret, password or token."""
    with running_sidecar(token_config(shared_upstream.url, signing_keys, login_service)) as sc:
        issued = client_credentials(sc).json()["access_token"]
        error_body(password(sc, "maria", "wrong-password"), 400, "invalid_grant")
        error_body(token_request(sc, {"grant_type": "client_credentials"}, auth=("totvs", "bad-secret")), 401,
                   "invalid_client")
    out = capsys.readouterr().out
    lines = [json.loads(line) for line in out.splitlines() if '"kind":"token"' in line]

    assert [(x["grant"], x["client"], x["decision"], x["reason"], x["status"]) for x in lines] == [
        ("client_credentials", "totvs", "allow", "ok", 200),
        ("password", "engage", "deny", "invalid_grant", 400),
        ("client_credentials", "totvs", "deny", "invalid_client", 401),
    ]
    for secret in (TOTVS_SECRET, ENGAGE_SECRET, "wrong-password", "bad-secret", issued):
        assert secret not in out
