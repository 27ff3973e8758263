"""sidecar/proxy/upstream_request.py in process: what the upstream receives — credentials stripped from
headers, query, cookies and body, hop-by-hop and client-sent identity headers dropped, the forwarding headers
and the sidecar's identity headers set (end to end: tests/test_upstream_hygiene.py)."""

from __future__ import annotations

import json

import pytest

from sidecar.authn.base import Identity
from sidecar.config.types import parse_source
from sidecar.proxy.request_view import Headers, RequestView
from sidecar.proxy.upstream_request import (
    IdentityHeaders,
    StripPlan,
    build_headers,
    strip_body,
    strip_cookies,
    strip_query,
    target,
)

PLAN = StripPlan.from_sources(parse_source(s) for s in ("header:Authorization", "query:access_token",
                                                        "cookie:session", "body.token"))
NAMES = IdentityHeaders("X-Auth-")
ALICE = Identity(subject="alice", authenticator="jwt", client="app-1", scopes=frozenset({"write", "read"}))


def view(headers: Headers, peer: str = "10.0.0.9") -> RequestView:
    return RequestView("GET", "/api/x", b"", [(b"host", b"app.example"), *headers], "app.example", "https", peer,
                       peer, "req-1")


def forwarded(headers: Headers, identity: Identity | None = ALICE, *, trusted: bool = False,
              body_length: int | None = None, signed_token: str | None = None) -> Headers:
    return build_headers(view(headers), identity, PLAN, NAMES, trusted_peer=trusted, body_length=body_length,
                         signed_token=signed_token)


def names(headers: Headers) -> list[bytes]:
    return [name for name, _ in headers]


def value(headers: Headers, name: bytes) -> bytes | None:
    found = [v for n, v in headers if n == name]
    assert len(found) <= 1, f"{name!r} sent {len(found)} times"
    return found[0] if found else None


@pytest.mark.parametrize("name", [
    b"authorization",                                      # the credential the route's authenticator read
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"proxy-authorization", b"proxy-authenticate", b"expect", b"http2-settings",
    b"x-auth-subject", b"X-Auth-Subject".lower(), b"x_auth_subject", b"x.auth.scopes",  # identity lookalikes
    b"x-request-id",
    b"x_forwarded_for", b"x-forwarded_host",               # forwarding lookalikes: never a proxy's spelling
])
def test_header_never_forwarded(name: bytes) -> None:
    """Credentials, hop-by-hop fields and client-sent identity or lookalike headers do not reach the upstream."""
    sent = forwarded([(name, b"client-value")])
    assert b"client-value" not in [v for _, v in sent]


def test_other_headers_pass_in_order() -> None:
    """The client's own headers pass unchanged and in order."""
    sent = forwarded([(b"accept", b"*/*"), (b"x-custom", b"1"), (b"x-custom", b"2")])
    assert [(n, v) for n, v in sent if n in (b"accept", b"x-custom")] == [
        (b"accept", b"*/*"), (b"x-custom", b"1"), (b"x-custom", b"2")]


def test_connection_names_only_the_clients_own_headers() -> None:
    """`Connection: X-Other, X-Forwarded-For, Host` drops X-Other, not the forwarding chain nor Host."""
    sent = forwarded([(b"connection", b"X-Other, X-Forwarded-For, Host"), (b"x-other", b"1"),
                      (b"x-forwarded-for", b"1.2.3.4")], trusted=True)
    assert b"x-other" not in names(sent)
    assert value(sent, b"x-forwarded-for") == b"1.2.3.4, 10.0.0.9"
    assert value(sent, b"host") == b"app.example"


@pytest.mark.parametrize(("trusted", "expected"), [
    (True, {b"x-forwarded-for": b"1.2.3.4, 10.0.0.9", b"x-forwarded-proto": b"http",
            b"x-forwarded-host": b"public.example", b"x-forwarded-prefix": b"/p"}),
    (False, {b"x-forwarded-for": b"10.0.0.9", b"x-forwarded-proto": b"https", b"x-forwarded-host": b"app.example",
             b"x-forwarded-prefix": None}),
])
def test_forwarding_headers_come_only_from_a_trusted_peer(trusted: bool, expected: dict[bytes, bytes | None]) -> None:
    """From a trusted proxy its forwarding headers pass (X-Forwarded-For appended to); otherwise the sidecar's own."""
    sent = forwarded([(b"x-forwarded-for", b"1.2.3.4"), (b"x-forwarded-proto", b"http"),
                      (b"x-forwarded-host", b"public.example"), (b"x-forwarded-prefix", b"/p")], trusted=trusted)
    assert {name: value(sent, name) for name in expected} == expected
    assert value(sent, b"x-request-id") == b"req-1"


def test_identity_headers_are_set() -> None:
    """The identity's subject, client, authenticator and sorted scopes are sent under the prefix."""
    sent = forwarded([], signed_token="signed.jwt")
    assert {n: v for n, v in sent if n.startswith(b"X-Auth-")} == {
        b"X-Auth-Subject": b"alice", b"X-Auth-Client": b"app-1", b"X-Auth-Method": b"jwt",
        b"X-Auth-Scopes": b"read write", b"X-Auth-Token": b"signed.jwt"}


@pytest.mark.parametrize(("subject", "sent"), [
    ("plain", b"plain"),
    ("evil\r\nX-Injected: 1", b"evil%0D%0AX-Injected: 1"),
    ("Jos\u00e9", b"Jos%C3%A9"),
    ("100%", b"100%"),                        # printable ASCII passes as it is
    ("Jos\u00e9 100%", b"Jos%C3%A9 100%25"),  # once encoded, `%` is encoded too, so the value decodes back
])
def test_identity_values_cannot_split_headers(subject: str, sent: bytes) -> None:
    """An identity value with anything outside printable ASCII is percent-encoded (then `%` too)."""
    headers = forwarded([], Identity(subject=subject, authenticator="jwt"))
    assert value(headers, b"X-Auth-Subject") == sent


def test_anonymous_request_sends_no_identity() -> None:
    """Without an identity no X-Auth- header is sent, and a client's copy is still dropped."""
    sent = forwarded([(b"x-auth-subject", b"admin")], identity=None)
    assert not [n for n in names(sent) if n.lower().startswith(b"x-auth-")]


def test_body_length_replaces_content_length() -> None:
    """When the body was rewritten the sidecar's Content-Length replaces the client's."""
    sent = forwarded([(b"content-length", b"99")], body_length=12)
    assert value(sent, b"content-length") == b"12"


@pytest.mark.parametrize(("header", "expected"), [
    (b"session=abc; theme=dark", b"theme=dark"),
    (b"theme=dark;session=abc;lang=pt", b"theme=dark; lang=pt"),
    (b"session=abc", b""),
    (b"sessionx=1; session=2", b"sessionx=1"),
])
def test_strip_cookies(header: bytes, expected: bytes) -> None:
    """Only the credential cookie is removed; others keep their values."""
    assert strip_cookies(header, PLAN.cookies) == expected


def test_cookie_header_with_only_the_credential_is_dropped() -> None:
    """A Cookie header holding only the credential cookie is not forwarded at all."""
    assert b"cookie" not in names(forwarded([(b"cookie", b"session=abc")]))


@pytest.mark.parametrize(("query", "expected"), [
    (b"", b""),
    (b"a=1&b=2", b"a=1&b=2"),
    (b"access_token=x&a=1", b"a=1"),
    (b"a=1&access_token=x&access_token=y", b"a=1"),
    (b"access%5Ftoken=x&a=%20", b"a=%20"),       # an encoded name is the same name; other bytes pass untouched
    (b"access_token", b""),
    (b"a=1&&b", b"a=1&&b"),
])
def test_strip_query(query: bytes, expected: bytes) -> None:
    """Every copy of a credential parameter is removed, in any spelling; the rest passes byte for byte."""
    assert strip_query(query, PLAN.query) == expected


@pytest.mark.parametrize(("body", "content_type", "expected"), [
    (b"token=x&a=1", "application/x-www-form-urlencoded", b"a=1"),
    (b'{"token": "x", "a": 1}', "application/json", {"a": 1}),
    (b'{"token": "x"}', "application/vnd.api+json", {}),
    (b'{"a": 1}', "application/json", b'{"a": 1}'),           # nothing to strip: the bytes as sent
    (b"[1, 2]", "application/json", b"[1, 2]"),
    (b"not json", "application/json", b"not json"),
    (b"token=x", "text/plain", b"token=x"),
    (b"", "application/json", b""),
])
def test_strip_body(body: bytes, content_type: str, expected: bytes | dict[str, int]) -> None:
    """Credential fields leave form and JSON bodies; other bodies, and bodies without them, pass intact."""
    stripped = strip_body(body, content_type, PLAN.body_fields)
    assert (json.loads(stripped) if isinstance(expected, dict) else stripped) == expected


@pytest.mark.parametrize(("base", "path", "query", "expected"), [
    ("", "/api/x", b"", b"/api/x"),
    ("/base", "/api/x", b"a=1", b"/base/api/x?a=1"),
    ("", "//evil.example/x", b"", b"//evil.example/x"),   # a path, never joined as a URL
])
def test_target(base: str, path: str, query: bytes, expected: bytes) -> None:
    """The upstream target is the base path, the normalised path and the stripped query."""
    assert target(base, path, query) == expected
