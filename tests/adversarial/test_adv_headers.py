"""Header tricks: duplicated or oddly spelled credentials, identity headers forged in every spelling, `Connection`
naming the sidecar's own headers, and Host / X-Forwarded-Host confusion (SPEC §4, CVE-2025-64484)."""

from __future__ import annotations

import pytest
from adversarial_support import (  # noqa: F401  (fixtures)
    PARTNER_TOKEN,
    StrictUpstream,
    assert_error,
    attacked,
    get,
    send_raw,
    staff_token,
    strict_upstream,
    strict_upstream_server,
)

from sidecar.testing import KeyPair, RunningSidecar


def test_duplicated_authorization_is_refused(
    attacked: RunningSidecar, strict_upstream: StrictUpstream, idp_keys: KeyPair,  # noqa: F811
) -> None:
    """Two Authorization headers (backends disagree on which wins): 400, nothing forwarded."""
    good = staff_token(idp_keys)
    for second in (good, "Bearer garbage", f"Bearer {staff_token(idp_keys, sub='someone-else')}"):
        value = second if second.startswith("Bearer") else f"Bearer {second}"
        reply = get(attacked.url, "/admin/x", [("Authorization", f"Bearer {good}"), ("Authorization", value)])
        assert_error(reply, 400, "invalid_request")
    assert strict_upstream.received == []


def test_duplicated_client_token_is_refused(attacked: RunningSidecar, strict_upstream: StrictUpstream) -> None:  # noqa: F811
    """Two X-Client-Token headers, or one plus a Bearer of the same kind in another header: never a guess."""
    reply = get(attacked.url, "/partner/x", [("X-Client-Token", PARTNER_TOKEN), ("X-Client-Token", "sct_other")])
    assert_error(reply, 400, "invalid_request")
    assert strict_upstream.received == []


@pytest.mark.parametrize("template", [
    "Bearer {t}", "bearer {t}", "BEARER {t}", "BeArEr {t}", "Bearer  {t}", "Bearer {t}   ", "   Bearer {t}",
])
def test_authorization_spacing_and_scheme_case_are_tolerated(
    attacked: RunningSidecar, strict_upstream: StrictUpstream, idp_keys: KeyPair, template: str,  # noqa: F811
) -> None:
    """The Bearer scheme is case-insensitive (RFC 6750 §2.1) and surrounding spaces are trimmed; never forwarded."""
    token = staff_token(idp_keys)
    reply = get(attacked.url, "/admin/x", [("Authorization", template.format(t=token))])
    assert reply.status == 200
    [seen] = strict_upstream.received
    assert seen.header("x-auth-subject") == "user-1"
    assert seen.headers_named("authorization") == []
    assert token not in repr(seen.headers)


@pytest.mark.parametrize("value", ["Bearer\t{t}", "Basic {t}", "Token {t}", "Bearer", "Bearer ", "{t}", "Bearer {t} x"])
def test_other_authorization_shapes_never_authenticate(
    attacked: RunningSidecar, strict_upstream: StrictUpstream, idp_keys: KeyPair, value: str,  # noqa: F811
) -> None:
    """Another scheme, a missing token, or trailing junk: 401, nothing forwarded."""
    reply = get(attacked.url, "/admin/x", [("Authorization", value.format(t=staff_token(idp_keys)))])
    assert reply.status == 401
    assert strict_upstream.received == []


FORGED = [
    "X-Auth-Subject", "x-auth-subject", "X-AUTH-SUBJECT", "X_Auth_Subject", "x_auth_subject", "x.auth.subject",
    "X.Auth.Subject", "X-Auth_Subject", "X_Auth-Client", "X-Auth-Client", "X-Auth-Method", "X-Auth-Scopes",
    "X-Auth-Token", "X-Auth-Admin", "x-auth-", "X-Real-IP", "X_Real_IP", "Forwarded", "X_Forwarded_For",
    "x.forwarded.for", "X_Forwarded_Host", "X-Forwarded-Proto", "X_Request_Id",
]


def normalised(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def test_forged_identity_headers_never_reach_the_upstream(
    attacked: RunningSidecar, strict_upstream: StrictUpstream,  # noqa: F811
) -> None:
    """Every spelling of an identity or forwarding header is removed; the upstream sees only the sidecar's values."""
    reply = get(attacked.url, "/public/x", [(name, "admin") for name in FORGED])
    assert reply.status == 200
    [seen] = strict_upstream.received
    auth_headers = [(k, v) for k, v in seen.headers if normalised(k).startswith("x-auth-")]
    assert sorted(auth_headers) == [("x-auth-method", "public"), ("x-auth-scopes", ""), ("x-auth-subject", "anonymous")]
    assert "admin" not in [v for _, v in seen.headers]
    for name in ("x-real-ip", "forwarded"):
        assert seen.headers_named(name) == []
    assert seen.headers_named("x-forwarded-for") == ["127.0.0.1"]
    assert seen.headers_named("x-forwarded-host") == ["sidecar.test"]
    assert seen.headers_named("x-forwarded-proto") == ["http"]
    assert [k for k, _ in seen.headers if normalised(k) in {"x-forwarded-for", "x-request-id"} and "-" not in k] == []


def test_connection_cannot_remove_the_sidecars_identity_headers(
    attacked: RunningSidecar, strict_upstream: StrictUpstream,  # noqa: F811
) -> None:
    """`Connection: X-Auth-Subject, X-Auth-Client, ...` drops the client's copies, never the sidecar's own."""
    named = "close, X-Auth-Subject, X-Auth-Client, X-Auth-Method, x-auth-scopes, X-Request-Id, X-Forwarded-For, Host"
    reply = get(attacked.url, "/partner/x", [("X-Client-Token", PARTNER_TOKEN), ("Connection", named),
                                             ("X-Auth-Subject", "admin")], close=False)
    assert reply.status == 200
    [seen] = strict_upstream.received
    assert seen.headers_named("x-auth-subject") == ["partner-1"]
    assert seen.headers_named("x-auth-client") == ["partner-1"]
    assert seen.headers_named("x-auth-method") == ["partner"]
    assert seen.headers_named("x-auth-scopes") == ["read"]
    assert seen.headers_named("x-forwarded-for") == ["127.0.0.1"]
    assert len(seen.headers_named("x-request-id")) == 1
    assert seen.headers_named("x-client-token") == []
    assert seen.headers_named("connection") == []


def test_connection_naming_the_credential_does_not_hide_it_from_authentication(
    attacked: RunningSidecar, strict_upstream: StrictUpstream, idp_keys: KeyPair,  # noqa: F811
) -> None:
    """`Connection: Authorization` with a bad token is still a bad token (401), not an anonymous request."""
    reply = get(attacked.url, "/admin/x", [("Authorization", "Bearer garbage"), ("Connection", "Authorization")])
    assert_error(reply, 401, "invalid_token")
    assert strict_upstream.received == []


def test_host_matched_route_ignores_x_forwarded_host(
    attacked: RunningSidecar, strict_upstream: StrictUpstream,  # noqa: F811
) -> None:
    """`match.host` is matched on Host only: X-Forwarded-Host from an untrusted peer neither opens nor names it."""
    assert_error(get(attacked.url, "/hosted/x", [("X-Forwarded-Host", "api.example.com")]), 404, "no_route")
    assert_error(get(attacked.url, "/hosted/x", [("X-Forwarded-Host", "api.example.com")], host="evil.example"),
                 404, "no_route")
    assert strict_upstream.received == []
    for host in ("api.example.com", "API.Example.COM", "api.example.com:8443"):
        reply = get(attacked.url, "/hosted/x", [("X-Forwarded-Host", "evil.example")], host=host)
        assert reply.status == 200
    assert [s.headers_named("x-forwarded-host") for s in strict_upstream.received] == [
        ["api.example.com"], ["API.Example.COM"], ["api.example.com:8443"]]


@pytest.mark.parametrize("host", ["api.example.com.", "api.example.com.evil", "evil.api.example.com",
                                  "api.example.com@evil", "api.example.com:x"])
def test_host_lookalikes_do_not_match_a_host_route(
    attacked: RunningSidecar, strict_upstream: StrictUpstream, host: str,  # noqa: F811
) -> None:
    """Hosts that merely contain the route's host are not it: 404 (or 400 from the parser), nothing forwarded."""
    answers = send_raw(attacked.url, f"GET /hosted/x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    assert [a.status for a in answers] in ([404], [400])
    assert strict_upstream.received == []


@pytest.mark.parametrize("hosts", [("api.example.com", "api.example.com"), ("evil.example", "api.example.com"),
                                   ("api.example.com", "evil.example")])
def test_duplicate_host_is_refused(
    attacked: RunningSidecar, strict_upstream: StrictUpstream, hosts: tuple[str, str],  # noqa: F811
) -> None:
    """Two Host headers, equal or not: 400, nothing forwarded."""
    data = f"GET /hosted/x HTTP/1.1\r\nHost: {hosts[0]}\r\nHost: {hosts[1]}\r\nConnection: close\r\n\r\n".encode()
    answers = send_raw(attacked.url, data)
    assert [a.status for a in answers] == [400]
    assert strict_upstream.received == []
