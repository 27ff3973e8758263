"""What the upstream receives (SPEC §4): never a credential, never a client-sent identity header, no hop-by-hop
headers, and X-Forwarded-* from what the sidecar saw (appended to only from a trusted proxy)."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import bearer, config_text, jwt_authenticator, make_config, mint, raw_request, route

from sidecar.testing import KeyPair, Received, RecordingUpstream, RunningSidecar, running_sidecar


def _config(upstream_url: str, keys: KeyPair, **top: object) -> str:
    return config_text(make_config(
        upstream_url,
        {
            "partner_jwt": jwt_authenticator(keys),
            "cookie_jwt": jwt_authenticator(keys, **{"from": ["cookie:session"]}),
            "public": {"type": "anonymous"},
        },
        [
            route("api", "/api/**", ["partner_jwt"]),
            route("cookie", "/cookie/**", ["cookie_jwt"]),
            route("either", "/either/**", ["partner_jwt", "cookie_jwt"]),
            route("open", "/open/**", ["public"]),
            route("office", "/office/**", ["public"], require={"ips": ["200.10.0.0/16"]}),
        ],
        **top,
    ))


@pytest.fixture(scope="module")
def sidecar(shared_upstream: RecordingUpstream, idp_keys: KeyPair) -> Iterator[RunningSidecar]:
    """No trusted proxies: every peer is a client."""
    with running_sidecar(_config(shared_upstream.url, idp_keys)) as sc:
        yield sc


@pytest.fixture(scope="module")
def behind_proxy(shared_upstream: RecordingUpstream, idp_keys: KeyPair) -> Iterator[RunningSidecar]:
    """Loopback is a trusted proxy: its X-Forwarded-* are believed and appended to."""
    with running_sidecar(_config(shared_upstream.url, idp_keys, trusted_proxies=["127.0.0.0/8"])) as sc:
        yield sc


def _normalised(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _identity_headers(received: Received) -> list[tuple[str, str]]:
    return [(name, value) for name, value in received.headers if _normalised(name).startswith("x-auth-")]


@pytest.mark.parametrize("name", ["X-Auth-Subject", "X_Auth_Subject", "x.auth.subject", "X-AUTH-CLIENT",
                                  "x-auth-scopes", "X-Auth-Method", "x_auth_token", "X-Auth-Anything"])
@pytest.mark.parametrize(("path", "authenticated"), [("/api/x", True), ("/open/x", False)], ids=["jwt", "anonymous"])
def test_client_identity_headers_never_reach_the_upstream(
    sidecar: RunningSidecar, upstream: RecordingUpstream, idp_keys: KeyPair, http: httpx.Client,
    name: str, path: str, authenticated: bool,
) -> None:
    """A client-sent identity header, in any spelling, is dropped; only the sidecar's own values arrive."""
    headers = {name: "spoofed-admin", **(bearer(mint(idp_keys, sub="alice")) if authenticated else {})}
    response = http.get(sidecar.url + path, headers=headers)

    assert response.status_code == 200
    [got] = upstream.received
    expected = [("x-auth-subject", "alice"), ("x-auth-method", "partner_jwt"), ("x-auth-scopes", "read")]
    if not authenticated:
        expected = [("x-auth-subject", "anonymous"), ("x-auth-method", "public"), ("x-auth-scopes", "")]
    assert _identity_headers(got) == expected


def test_client_identity_header_with_a_custom_prefix_is_dropped(
    shared_upstream: RecordingUpstream, idp_keys: KeyPair, http: httpx.Client,
) -> None:
    """With `identity.header_prefix: X-User-`, client-sent X_User_Id is dropped and X-User-Subject is ours."""
    shared_upstream.received.clear()
    text = _config(shared_upstream.url, idp_keys, identity={"header_prefix": "X-User-"})
    with running_sidecar(text) as sc:
        response = http.get(sc.url + "/open/x", headers={"X_User_Id": "admin", "X-User-Subject": "admin"})

    assert response.status_code == 200
    [got] = shared_upstream.received
    assert [(n, v) for n, v in got.headers if _normalised(n).startswith("x-user-")] == [
        ("x-user-subject", "anonymous"), ("x-user-method", "public"), ("x-user-scopes", "")]


@pytest.mark.parametrize("named", ["X-Auth-Subject", "x-auth-subject, X-Auth-Method, X-Auth-Scopes", "X-Request-Id"])
def test_connection_header_cannot_remove_identity_headers(
    sidecar: RunningSidecar, upstream: RecordingUpstream, idp_keys: KeyPair, http: httpx.Client, named: str,
) -> None:
    """Naming the identity headers in Connection does not stop the sidecar from setting them."""
    response = http.get(sidecar.url + "/api/x", headers={**bearer(mint(idp_keys, sub="carol")), "Connection": named})

    assert response.status_code == 200
    [got] = upstream.received
    assert _identity_headers(got) == [
        ("x-auth-subject", "carol"), ("x-auth-method", "partner_jwt"), ("x-auth-scopes", "read")]
    assert got.header("x-request-id") == response.headers["x-request-id"]
    assert "connection" not in got.header_names()


def test_connection_header_removes_the_headers_it_names(
    sidecar: RunningSidecar, upstream: RecordingUpstream, http: httpx.Client,
) -> None:
    """A header named in Connection is hop-by-hop: dropped; other custom headers pass."""
    response = http.get(sidecar.url + "/open/x",
                        headers={"Connection": "X-Custom, x-other-hop", "X-Custom": "1", "X-Other-Hop": "2",
                                 "X-Kept": "3"})

    assert response.status_code == 200
    [got] = upstream.received
    assert got.header("x-kept") == "3"
    assert {"x-custom", "x-other-hop", "connection"}.isdisjoint(got.header_names())


@pytest.mark.parametrize(("name", "value"), [
    ("Keep-Alive", "timeout=5, max=100"),
    ("TE", "trailers"),
    ("Upgrade", "h2c"),
    ("Proxy-Authorization", "Basic dXNlcjpwYXNz"),
    ("Proxy-Connection", "keep-alive"),
    ("Trailer", "X-Checksum"),
])
def test_hop_by_hop_headers_are_not_forwarded(
    sidecar: RunningSidecar, upstream: RecordingUpstream, name: str, value: str,
) -> None:
    """RFC 9110 §7.6.1 hop-by-hop headers stop at the sidecar."""
    response = raw_request(sidecar.url, "/open/x", {name: value, "X-Kept": "yes"})

    assert response.status_code == 200
    [got] = upstream.received
    assert got.header("x-kept") == "yes"
    assert name.lower() not in got.header_names()


@pytest.mark.parametrize(("trusted", "sent", "expected"), [
    (False, None, "127.0.0.1"),
    (False, "1.2.3.4", "127.0.0.1"),
    (False, "1.2.3.4, 10.0.0.1", "127.0.0.1"),
    (True, None, "127.0.0.1"),
    (True, "1.2.3.4", "1.2.3.4, 127.0.0.1"),
    (True, "1.2.3.4, 10.0.0.1", "1.2.3.4, 10.0.0.1, 127.0.0.1"),
], ids=["untrusted-none", "untrusted-one", "untrusted-two", "trusted-none", "trusted-one", "trusted-two"])
def test_x_forwarded_for(
    sidecar: RunningSidecar, behind_proxy: RunningSidecar, upstream: RecordingUpstream, http: httpx.Client,
    trusted: bool, sent: str | None, expected: str,
) -> None:
    """X-Forwarded-For is replaced by the peer address, or appended to when the peer is a trusted proxy."""
    sc = behind_proxy if trusted else sidecar
    response = http.get(sc.url + "/open/x", headers={"X-Forwarded-For": sent} if sent else {})

    assert response.status_code == 200
    [got] = upstream.received
    assert [value for name, value in got.headers if name == "x-forwarded-for"] == [expected]


@pytest.mark.parametrize(("trusted", "expected_proto", "expected_host"), [
    (False, "http", "api.example.com"),
    (True, "https", "public.example.com"),
])
def test_x_forwarded_proto_and_host(
    sidecar: RunningSidecar, behind_proxy: RunningSidecar, upstream: RecordingUpstream, http: httpx.Client,
    trusted: bool, expected_proto: str, expected_host: str,
) -> None:
    """X-Forwarded-Proto/Host come from what the sidecar saw, unless a trusted proxy already set them; a trusted
    proxy's X-Real-IP and Forwarded pass as it sent them, a client's never."""
    sc = behind_proxy if trusted else sidecar
    headers = {"Host": "api.example.com", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "public.example.com",
               "X-Real-IP": "6.6.6.6", "Forwarded": "for=6.6.6.6"}
    response = http.get(sc.url + "/open/x", headers=headers)

    assert response.status_code == 200
    [got] = upstream.received
    assert [v for n, v in got.headers if n == "x-forwarded-proto"] == [expected_proto]
    assert [v for n, v in got.headers if n == "x-forwarded-host"] == [expected_host]
    assert [v for n, v in got.headers if _normalised(n) == "x-forwarded-for"] == ["127.0.0.1"]
    proxied = [("x-real-ip", "6.6.6.6"), ("forwarded", "for=6.6.6.6")] if trusted else []
    assert [(n, v) for n, v in got.headers if n in ("x-real-ip", "forwarded")] == proxied


# The forwarding family: what a proxy tells the backend about the client and the URL it used (SPEC §4).
FORWARDING = ["X-Forwarded-Prefix", "X-Forwarded-Port", "X-Forwarded-Uri", "X-Forwarded-Server", "X-Forwarded-Scheme",
              "X-Forwarded-Ssl", "X-Forwarded", "X-Real-IP", "Forwarded"]
FORWARDING_LOOKALIKES = ["X_Forwarded_Prefix", "x.forwarded.port", "X-Forwarded_Uri", "x_forwarded_server",
                         "X.Forwarded.Scheme", "X_Forwarded_Proto", "x.forwarded.host", "X_Real_IP", "x.real.ip",
                         "X_Forwarded"]


def _forwarding(received: Received) -> list[tuple[str, str]]:
    return [(n, v) for n, v in received.headers
            if _normalised(n).startswith("x-forwarded") or _normalised(n) in ("x-real-ip", "forwarded")]


@pytest.mark.parametrize("name", FORWARDING + FORWARDING_LOOKALIKES)
@pytest.mark.parametrize("trusted", [False, True], ids=["untrusted", "trusted"])
def test_forwarding_headers_pass_only_from_a_trusted_proxy(
    sidecar: RunningSidecar, behind_proxy: RunningSidecar, upstream: RecordingUpstream, name: str, trusted: bool,
) -> None:
    """A client's X-Forwarded-* / Forwarded / X-Real-IP, in any spelling, is removed; a trusted proxy's pass, but
    only in the spelling a proxy writes (a lookalike is its client's, passed on untouched)."""
    sc = behind_proxy if trusted else sidecar
    response = raw_request(sc.url, "/open/x", {name: "/spoofed"})

    assert response.status_code == 200
    [got] = upstream.received
    expected = [("x-forwarded-for", "127.0.0.1"), ("x-forwarded-proto", "http"),
                ("x-forwarded-host", urlsplit(sc.url).netloc)]
    if trusted and name in FORWARDING:
        expected.insert(0, (name.lower(), "/spoofed"))
    assert _forwarding(got) == expected


@pytest.mark.parametrize("named", [
    "X-Forwarded-For", "close, x-forwarded-for", "X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host",
    "X-Forwarded-Prefix, X-Real-IP, Forwarded", "Host", "X-Request-Id, X-Auth-Subject",
])
def test_connection_cannot_hide_what_a_trusted_proxy_forwarded(
    behind_proxy: RunningSidecar, upstream: RecordingUpstream, named: str,
) -> None:
    """`Connection: X-Forwarded-For` behind a trusted proxy (the pattern of Apache CVE-2022-31813) does not hide
    the client the sidecar authorised: the backend gets the same chain, and the proxy's other headers and Host."""
    proxied = {"X-Forwarded-For": "200.10.0.5", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "public.example",
               "X-Forwarded-Prefix": "/app", "X-Real-IP": "200.10.0.5", "Forwarded": "for=200.10.0.5"}
    response = raw_request(behind_proxy.url, "/office/x", {**proxied, "Connection": named})

    assert response.status_code == 200  # require.ips 200.10.0.0/16: the sidecar saw 200.10.0.5
    [got] = upstream.received
    assert _forwarding(got) == [
        ("x-forwarded-prefix", "/app"), ("x-real-ip", "200.10.0.5"), ("forwarded", "for=200.10.0.5"),
        ("x-forwarded-for", "200.10.0.5, 127.0.0.1"), ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "public.example")]
    assert got.header("host") == urlsplit(behind_proxy.url).netloc
    assert got.header("x-request-id") == response.headers["x-request-id"]
    assert got.header("x-auth-subject") == "anonymous"
    assert "connection" not in got.header_names()


def test_connection_cannot_hide_the_client_from_an_untrusted_peer(
    sidecar: RunningSidecar, upstream: RecordingUpstream,
) -> None:
    """From a peer that is not a trusted proxy, `Connection: X-Forwarded-For` still leaves the peer address."""
    response = raw_request(sidecar.url, "/open/x", {"X-Forwarded-For": "200.10.0.5", "Connection": "X-Forwarded-For"})

    assert response.status_code == 200
    [got] = upstream.received
    assert [v for n, v in got.headers if _normalised(n) == "x-forwarded-for"] == ["127.0.0.1"]


@pytest.mark.parametrize("variant", ["X_Forwarded_For", "x.forwarded.for"])
@pytest.mark.parametrize(("trusted", "expected"), [(False, "127.0.0.1"), (True, "1.2.3.4, 127.0.0.1")],
                         ids=["untrusted", "trusted"])
def test_x_forwarded_for_lookalikes_are_dropped(
    sidecar: RunningSidecar, behind_proxy: RunningSidecar, upstream: RecordingUpstream,
    variant: str, trusted: bool, expected: str,
) -> None:
    """Only the real X-Forwarded-For is believed: a client's X_Forwarded_For, which a proxy passes on untouched
    next to the X-Forwarded-For it set, is removed (its normalised name is one the sidecar sets, SPEC §4)."""
    sc = behind_proxy if trusted else sidecar
    response = raw_request(sc.url, "/open/x", {"X-Forwarded-For": "1.2.3.4", variant: "6.6.6.6"})

    assert response.status_code == 200
    [got] = upstream.received
    assert [(n, v) for n, v in got.headers if _normalised(n) == "x-forwarded-for"] == [("x-forwarded-for", expected)]


def test_only_the_credential_cookie_is_removed(
    sidecar: RunningSidecar, upstream: RecordingUpstream, idp_keys: KeyPair, http: httpx.Client,
) -> None:
    """An authenticator reading cookie:session removes that cookie only; the others pass untouched."""
    token = mint(idp_keys, sub="dave")
    response = raw_request(sidecar.url, "/cookie/x", {"Cookie": f"theme=dark; session={token}; lang=pt-BR"})

    assert response.status_code == 200
    [got] = upstream.received
    assert got.header("x-auth-subject") == "dave"
    assert got.header("x-auth-method") == "cookie_jwt"
    assert [v for n, v in got.headers if n == "cookie"] == ["theme=dark; lang=pt-BR"]


def test_credential_cookie_is_removed_even_when_another_authenticator_wins(
    sidecar: RunningSidecar, upstream: RecordingUpstream, idp_keys: KeyPair, http: httpx.Client,
) -> None:
    """On a route with header and cookie authenticators, the header token wins and the cookie is still removed."""
    cookie_token = mint(idp_keys, sub="cookie-user")
    response = raw_request(sidecar.url, "/either/x", {
        **bearer(mint(idp_keys, sub="header-user")), "Cookie": f"session={cookie_token}; a=1"})

    assert response.status_code == 200
    [got] = upstream.received
    assert got.header("x-auth-subject") == "header-user"
    assert [v for n, v in got.headers if n == "cookie"] == ["a=1"]
    assert "authorization" not in got.header_names()


def test_cookie_header_with_only_the_credential_is_dropped(
    sidecar: RunningSidecar, upstream: RecordingUpstream, idp_keys: KeyPair,
) -> None:
    """A Cookie header holding nothing but the credential does not reach the upstream at all."""
    response = raw_request(sidecar.url, "/cookie/x", {"Cookie": f"session={mint(idp_keys)}"})

    assert response.status_code == 200
    [got] = upstream.received
    assert "cookie" not in got.header_names()


def test_cookies_pass_untouched_on_a_route_that_reads_none(
    sidecar: RunningSidecar, upstream: RecordingUpstream, idp_keys: KeyPair,
) -> None:
    """A route whose authenticators read no cookie forwards the Cookie header as sent."""
    response = raw_request(sidecar.url, "/api/x", {**bearer(mint(idp_keys)), "Cookie": "session=abc; theme=dark"})

    assert response.status_code == 200
    [got] = upstream.received
    assert [v for n, v in got.headers if n == "cookie"] == ["session=abc; theme=dark"]

