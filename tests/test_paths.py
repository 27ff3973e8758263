"""Path normalisation (SPEC §2): matching is done on the normalised path, the upstream receives that same path,
and encoded slashes, backslashes, NULs and climbs above the root are refused with 400."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import bearer, config_text, error_body, jwt_authenticator, make_config, mint, raw_request, route

from sidecar.errors import BadRequest
from sidecar.proxy.routing import normalise_path
from sidecar.testing import KeyPair, RecordingUpstream, RunningSidecar, running_sidecar


@pytest.fixture(scope="module")
def sidecar(shared_upstream: RecordingUpstream, idp_keys: KeyPair) -> Iterator[RunningSidecar]:
    """A public route listed before a protected one: a path trick must never reach /admin anonymously."""
    config = make_config(
        shared_upstream.url,
        {"public": {"type": "anonymous"}, "staff_jwt": jwt_authenticator(idp_keys)},
        [route("public", "/public/**", ["public"]), route("admin", "/admin/**", ["staff_jwt"])],
    )
    with running_sidecar(config_text(config)) as sc:
        yield sc


@pytest.mark.parametrize(("target", "outcome"), [
    ("/public/../admin/x", 401),
    ("/public/%2e%2e/admin/x", 401),
    ("/public/%2E%2E/admin/x", 401),
    ("/public/.%2e/admin/x", 401),
    ("/public/./../admin/x", 401),
    ("/public//../admin/x", 401),
    ("/public/..%2fadmin/x", 400),
    ("/public/..%2Fadmin/x", 400),
    ("/public/..;/admin/x", 400),
    ("/public/%2e%2e;/admin/x", 400),
    ("/public/..%5cadmin/x", 400),
    ("/public/..\\admin/x", 400),
    ("/public/a%2fb", 400),
    ("/public/a%00b", 400),
    ("/public/%zz", 400),
    ("/%2e%2e/admin/x", 400),
    ("/public/../../admin/x", 400),
    ("/public/%2e%2e/%2e%2e/admin/x", 400),
])
def test_path_tricks_never_reach_admin_anonymously(
    sidecar: RunningSidecar, upstream: RecordingUpstream, target: str, outcome: int,
) -> None:
    """A public-route prefix with dot-segments or encoded separators is refused (400) or lands on /admin (401)."""
    response = raw_request(sidecar.url, target)

    if outcome == 400:
        error_body(response, 400, "invalid_request")
    else:
        error_body(response, 401, "missing_credentials")
        assert response.headers["www-authenticate"] == 'Bearer realm="sidecar"'
    assert upstream.received == []


@pytest.mark.parametrize(("target", "forwarded"), [
    ("/public/x", "/public/x"),
    ("/public/./x", "/public/x"),
    ("/public//x", "/public/x"),
    ("/public/a/../x", "/public/x"),
    ("/admin/../public/x", "/public/x"),
    ("/public/%7Euser/%41%62c", "/public/~user/Abc"),
    ("/public/a%2bb%3a", "/public/a%2Bb%3A"),
    ("/public/caf%C3%A9", "/public/caf%C3%A9"),
    ("/public/x/", "/public/x/"),
])
def test_public_paths_reach_the_upstream_normalised(
    sidecar: RunningSidecar, upstream: RecordingUpstream, target: str, forwarded: str,
) -> None:
    """What the sidecar matched is exactly what the upstream receives: the normalised path."""
    response = raw_request(sidecar.url, target + "?q=1")

    assert response.status_code == 200, response.text
    [got] = upstream.received
    assert (got.path, got.query) == (forwarded, "q=1")
    assert got.header("x-auth-subject") == "anonymous"


def test_admin_path_with_a_token_reaches_the_upstream_normalised(
    sidecar: RunningSidecar, upstream: RecordingUpstream, idp_keys: KeyPair,
) -> None:
    """The dot-segment form of an /admin path, with a valid token, is forwarded as the normalised /admin path."""
    response = raw_request(sidecar.url, "/public/%2e%2e/admin/x", bearer(mint(idp_keys, sub="staff")))

    assert response.status_code == 200, response.text
    [got] = upstream.received
    assert (got.path, got.header("x-auth-subject")) == ("/admin/x", "staff")


@pytest.mark.parametrize(("raw", "expected"), [
    (b"/", "/"),
    (b"/a/b", "/a/b"),
    (b"/a/./b", "/a/b"),
    (b"/a/../b", "/b"),
    (b"/a/b/..", "/a/"),
    (b"/a/b/.", "/a/b/"),
    (b"/a/b/", "/a/b/"),
    (b"//a///b", "/a/b"),
    (b"/a/%2e/b", "/a/b"),
    (b"/a/%2E%2E/b", "/b"),
    (b"/%7e%41%5a%30%2d%5f", "/~AZ0-_"),
    (b"/a%2bb", "/a%2Bb"),
    (b"/a%3ab%40c", "/a%3Ab%40c"),
    (b"/%c3%a9", "/%C3%A9"),
    (b"/a b", "/a%20b"),
    (b"/a;b=c", "/a;b=c"),
    (b"/x/..", "/"),
])
def test_normalise_path(raw: bytes, expected: str) -> None:
    """Unreserved escapes are decoded, others upper-cased, dot-segments removed, empty segments merged."""
    assert normalise_path(raw) == expected


@pytest.mark.parametrize("raw", [
    b"/..",
    b"/../a",
    b"/a/../../b",
    b"/%2e%2e/a",
    b"/a%2fb",
    b"/a%2Fb",
    b"/a%5cb",
    b"/a\\b",
    b"/a%00b",
    b"/a\x00b",
    b"/a/..;/b",
    b"/a/.;x/b",
    b"/a%",
    b"/a%4",
    b"/a%g0",
    b"a/b",
    b"",
])
def test_normalise_path_refuses(raw: bytes) -> None:
    """Encoded separators, NUL, malformed escapes, relative targets and climbs above the root are BadRequest."""
    with pytest.raises(BadRequest):
        normalise_path(raw)
