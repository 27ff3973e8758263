"""Header tricks: duplicated or oddly spelled credentials, identity headers forged in every spelling, `Connection`
naming the sidecar's own headers, Host / X-Forwarded-Host confusion and invalid Hosts (SPEC §4, CVE-2025-64484,
RFC 9112 §3.2), and the login redirect's return_to."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest
from adversarial_support import (  # noqa: F401  (fixtures)
    PARTNER_TOKEN,
    StrictUpstream,
    assert_error,
    attacked,
    exchange,
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


# RFC 9110 §7.2: Host is `uri-host [":" port]`; anything else is a 400 (RFC 9112 §3.2), never forwarded.
INVALID_HOSTS = ["good.example@evil.example", "evil.example/x", "evil.example:80:80", "", ":80", "evil.example:x",
                 "evil.example:123456", "evil%2eexample", "evil.example\\x", "evil.example?x", "evil.example#x",
                 "[::1", "[::1]x", "[zz::1]", "[::1]:80:80", "a,b", "evil.example;x"]
VALID_HOSTS = ["sidecar.test", "Sidecar.TEST", "sidecar.test:8443", "sidecar.test.", "127.0.0.1", "127.0.0.1:80",
               "[::1]", "[::1]:8080", "[2001:db8::1]", "sidecar.test:", "under_score.internal"]


@pytest.mark.parametrize("host", INVALID_HOSTS)
def test_invalid_host_is_refused(
    attacked: RunningSidecar, strict_upstream: StrictUpstream, host: str,  # noqa: F811
) -> None:
    """A Host that is not a host name or address with an optional port: 400 invalid_request, nothing forwarded."""
    answers = send_raw(attacked.url, f"GET /public/x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())

    assert [a.status for a in answers] == [400]
    assert_error(answers[0], 400, "invalid_request")
    assert strict_upstream.seen == []


@pytest.mark.parametrize("host", VALID_HOSTS)
def test_valid_host_is_forwarded_as_sent(
    attacked: RunningSidecar, strict_upstream: StrictUpstream, host: str,  # noqa: F811
) -> None:
    """A valid Host (name, IPv4 or [IPv6], optional port) passes byte for byte, as Host and X-Forwarded-Host."""
    reply = get(attacked.url, "/public/x", host=host)

    assert reply.status == 200
    [seen] = strict_upstream.received
    assert seen.headers_named("host") == [host]
    assert seen.headers_named("x-forwarded-host") == [host]


@pytest.mark.parametrize(("target", "host"), [
    ("http://other.example:8081/public/x", "other.example:8081"),
    ("http://other.example/public/x?a=1", "other.example"),
    ("HTTP://Other.Example/public/x", "Other.Example"),
])
def test_absolute_form_target_names_the_host(
    attacked: RunningSidecar, strict_upstream: StrictUpstream, target: str, host: str,  # noqa: F811
) -> None:
    """With `GET http://host/path` the target's authority is the Host and the Host header is ignored
    (RFC 9112 §3.2.2): the upstream sees one Host, the one the sidecar matched on."""
    reply = get(attacked.url, target, host="sidecar.test")

    assert reply.status == 200
    [seen] = strict_upstream.received
    assert seen.headers_named("host") == [host]
    assert seen.path == "/public/x"


@pytest.mark.parametrize("target", ["http://good.example@evil.example/public/x", "http://evil.example:80:80/public/x",
                                    "http://evil.example%2f/public/x"])
def test_absolute_form_target_with_an_invalid_authority_is_refused(
    attacked: RunningSidecar, strict_upstream: StrictUpstream, target: str,  # noqa: F811
) -> None:
    """An absolute-form target whose authority is not a valid Host is a 400 (the gateway's, or the HTTP parser's for
    a target it cannot parse), whatever the Host header says; nothing forwarded."""
    reply = get(attacked.url, target, host="sidecar.test")

    assert reply.status == 400
    assert strict_upstream.seen == []


def test_absolute_form_target_matches_host_routes_by_its_authority(
    attacked: RunningSidecar, strict_upstream: StrictUpstream,  # noqa: F811
) -> None:
    """A host-matched route is matched on the target's authority, not on a Host header naming it."""
    assert_error(get(attacked.url, "http://evil.example/hosted/x", host="api.example.com"), 404, "no_route")
    assert get(attacked.url, "http://api.example.com/hosted/x", host="evil.example").status == 200
    assert [s.headers_named("host") for s in strict_upstream.received] == [["api.example.com"]]


@pytest.mark.parametrize(("host", "back"), [
    ("sidecar.test", "http://sidecar.test/login/x?a=1"),
    ("sidecar.test:8443", "http://sidecar.test:8443/login/x?a=1"),
    ("[::1]:8443", "http://[::1]:8443/login/x?a=1"),
])
def test_login_redirect_returns_to_the_same_host_and_port(attacked: RunningSidecar, host: str, back: str) -> None:  # noqa: F811
    """A browser without a credential is sent to login_url with return_to naming this host and its port."""
    reply = get(attacked.url, "/login/x?a=1", [("Accept", "text/html")], host=host)

    assert reply.status == 302
    location = urlsplit(reply.headers["location"])
    assert (location.scheme, location.netloc, location.path) == ("https", "idp.test", "/login")
    assert parse_qs(location.query) == {"app": ["1"], "return_to": [back]}


@pytest.mark.parametrize("host", ["good.example@evil.example", "evil.example/x", "evil%2eexample"])
def test_login_redirect_never_points_off_site(attacked: RunningSidecar, host: str) -> None:  # noqa: F811
    """A Host that would make return_to name another site is refused (400) rather than redirected."""
    reply = get(attacked.url, "/login/x", [("Accept", "text/html")], host=host)

    assert_error(reply, 400, "invalid_request")
    assert "location" not in reply.headers


def test_login_redirect_without_host_answers_401(attacked: RunningSidecar) -> None:  # noqa: F811
    """An HTTP/1.0 request without Host has no host to return to: the JSON 401, no redirect."""
    [reply] = send_raw(attacked.url, b"GET /login/x HTTP/1.0\r\nAccept: text/html\r\n\r\n")

    assert_error(reply, 401, "missing_credentials")
    assert "location" not in reply.headers


@pytest.mark.parametrize("data", [
    b"GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /public/x HTTP/1.1\r\nHost: a@b\r\nConnection: close\r\n\r\n",
    b"GET /admin/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /login/x HTTP/1.1\r\nHost: x\r\nAccept: text/html\r\nConnection: close\r\n\r\n",
    b"GET /public/x HTTP/1.1\r\nHost x\r\nConnection: close\r\n\r\n",
], ids=["no-route", "bad-host", "no-credential", "login-redirect", "unparsable"])
def test_refusals_carry_one_date_and_no_server(attacked: RunningSidecar, data: bytes) -> None:  # noqa: F811
    """The sidecar's own answers carry exactly one Date and no Server header."""
    head = exchange(attacked.url, data).partition(b"\r\n\r\n")[0].decode("latin-1").lower().split("\r\n")

    assert head[0].split()[1] in ("302", "400", "401", "404")
    assert len([line for line in head if line.startswith("date:")]) == 1
    assert [line for line in head if line.startswith("server:")] == []
