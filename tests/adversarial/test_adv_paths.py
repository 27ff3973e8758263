"""Path confusion: every spelling of a path is matched as its normalised form, the upstream receives that same form,
and no request target or Host header ever chooses where the request goes (SPEC §2, SECURITY.md promises 1 and 7).

The sidecar under attack lists a public route (`/public/**`, anonymous) before a protected one (`/admin/**`):
a trick that reads as public to the sidecar but as admin to the backend would be a bypass."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from adversarial_support import (  # noqa: F401  (fixtures)
    StrictUpstream,
    assert_error,
    attacked,
    get,
    send_raw,
    strict_upstream,
    strict_upstream_server,
)

from sidecar.testing import RunningSidecar, serve_in_thread


@pytest.mark.parametrize("target", [
    "/public/../admin/x",
    "/public/%2e%2e/admin/x",
    "/public/%2E%2E/admin/x",
    "/public/.%2e/admin/x",
    "/public/%2e./admin/x",
    "/public/.%2E/admin/x",
    "/public/%2e/../admin/x",
    "/public/./../admin/x",
    "/public//../admin/x",
    "/public;x=1/../admin/x",
    "/admin;x=1/secret",
    "/admin;/secret",
    "/admin;jsessionid=abc/x",
    "//admin/x",
    "///admin//x",
    "/./admin/x",
    "/%61dmin/x",
    "/%61%64%6d%69%6e/x",
])
def test_spellings_of_admin_are_matched_as_admin(
    attacked: RunningSidecar, strict_upstream: StrictUpstream, target: str,  # noqa: F811
) -> None:
    """Dot-segments in every encoding, `;params`, doubled slashes, encoded letters: /admin → 401, nothing forwarded."""
    reply = get(attacked.url, target)
    assert_error(reply, 401, "missing_credentials")
    assert strict_upstream.received == []


@pytest.mark.parametrize("target", [
    "/public/..%2fadmin/x",
    "/public/..%2Fadmin/x",
    "/public/..%5cadmin/x",
    "/public/..%5Cadmin/x",
    "/public/..\\admin/x",
    "/public/a%00b",
    "/public/%00/../admin/x",
    "/public/..;/admin/x",
    "/public/%2e%2e;x/admin/x",
    "/admin/..;/public/x",
    "/public/.;/x",
    "/%2e%2e/admin/x",
    "/public/../../admin/x",
    "/..",
    "/public/%zz",
    "/public/%2",
    "/public/%",
])
def test_structural_escapes_are_refused(
    attacked: RunningSidecar, strict_upstream: StrictUpstream, target: str,  # noqa: F811
) -> None:
    """Encoded `/` or `\\`, NUL, `..;`, climbing above the root, broken escapes: 400 invalid_request, not forwarded."""
    reply = get(attacked.url, target)
    assert_error(reply, 400, "invalid_request")
    assert strict_upstream.received == []


@pytest.mark.parametrize("target", [b"/public/a\x00/../../admin/x", b"public/x", b"/public/\x7f", b"/public/\xff"])
def test_raw_control_bytes_and_relative_targets_are_refused(
    attacked: RunningSidecar, strict_upstream: StrictUpstream, target: bytes,  # noqa: F811
) -> None:
    """A literal NUL, DEL or 8-bit byte, or a target without its leading `/`: 400 (parser or sidecar), not forwarded."""
    answers = send_raw(attacked.url, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert [a.status for a in answers] == [400]
    assert strict_upstream.received == []


@pytest.mark.parametrize(("target", "forwarded"), [
    ("/public/%7euser/./a", "/public/~user/a"),
    ("/public/a%2Db%5fc", "/public/a-b_c"),
    ("/public/x/../y", "/public/y"),
    ("/public//a///b", "/public/a/b"),
    ("/public/%e2%82%ac", "/public/%E2%82%AC"),
    ("/public/%252e%252e/admin/x", "/public/%252e%252e/admin/x"),
    ("/public;x=1/secret", "/public;x=1/secret"),
    ("/public/a\"b", "/public/a%22b"),
])
def test_upstream_receives_the_normalised_path(
    attacked: RunningSidecar, strict_upstream: StrictUpstream, target: str, forwarded: str,  # noqa: F811
) -> None:
    """The upstream receives the normalised form the route was matched on (SPEC §2)."""
    reply = get(attacked.url, target)
    assert reply.status == 200
    assert strict_upstream.requests() == [("GET", forwarded)]


@pytest.mark.parametrize("target", [
    "/public/%c0%ae%c0%ae/admin/x", "/public/%c0%ae./admin/x", "/public/%e0%80%ae%e0%80%ae/admin/x",
])
def test_overlong_utf8_dots_are_never_dots(
    attacked: RunningSidecar, strict_upstream: StrictUpstream, target: str,  # noqa: F811
) -> None:
    """Overlong UTF-8 for `.` is not a dot: refused, or forwarded still percent-encoded under /public — never /admin."""
    reply = get(attacked.url, target)
    if reply.status == 400:
        assert strict_upstream.received == []
    else:
        assert reply.status == 200
        [(_, path)] = strict_upstream.requests()
        assert path.startswith("/public/%C0%AE") or path.startswith("/public/%E0%80%AE")
        assert ".." not in path and "/admin" not in path.split("/public/", 1)[0]


def test_public_route_is_not_a_prefix_match(attacked: RunningSidecar, strict_upstream: StrictUpstream) -> None:  # noqa: F811
    """`/publicity` is not under `/public/**`, and the match is case-sensitive: both are 404 no_route."""
    for target in ("/publicity/x", "/PUBLIC/x", "/Admin/x"):
        assert_error(get(attacked.url, target), 404, "no_route")
    assert strict_upstream.received == []


@pytest.fixture
def elsewhere() -> Iterator[StrictUpstream]:
    """A server a client would like the sidecar to send its request to."""
    app = StrictUpstream()
    with serve_in_thread(app) as url:
        app.url = url
        yield app


def test_absolute_form_target_never_chooses_the_destination(
    attacked: RunningSidecar, strict_upstream: StrictUpstream, elsewhere: StrictUpstream,  # noqa: F811
) -> None:
    """`GET http://other/...`: matched on its path only and sent to the configured upstream, never to `other`."""
    host = elsewhere.url.removeprefix("http://")
    public = send_raw(attacked.url, f"GET {elsewhere.url}/public/x HTTP/1.1\r\nHost: {host}\r\n"
                                    "Connection: close\r\n\r\n".encode())
    admin = send_raw(attacked.url, f"GET {elsewhere.url}/admin/x HTTP/1.1\r\nHost: {host}\r\n"
                                   "Connection: close\r\n\r\n".encode())
    assert [a.status for a in public] == [200]
    assert [a.status for a in admin] == [401]
    assert strict_upstream.requests() == [("GET", "/public/x")]
    assert elsewhere.seen == []


@pytest.mark.parametrize("target", ["//{host}/public/x", "///{host}/public/x", "/\\\\{host}/public/x"])
def test_scheme_relative_paths_never_leave_for_another_host(
    attacked: RunningSidecar, strict_upstream: StrictUpstream, elsewhere: StrictUpstream, target: str,  # noqa: F811
) -> None:
    """A path starting `//host/` is a path, not an authority: 404 or 400, and `host` is never contacted."""
    reply = get(attacked.url, target.format(host=elsewhere.url.removeprefix("http://")))
    assert reply.status in (400, 404)
    assert strict_upstream.received == []
    assert elsewhere.seen == []


@pytest.mark.parametrize("data", [
    b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\nConnection: close\r\n\r\n",
])
def test_asterisk_and_authority_form_are_refused(
    attacked: RunningSidecar, strict_upstream: StrictUpstream, data: bytes,  # noqa: F811
) -> None:
    """`OPTIONS *` and `CONNECT host:port` are not proxied: 400, nothing forwarded."""
    assert [a.status for a in send_raw(attacked.url, data)] == [400]
    assert strict_upstream.received == []


def test_http11_request_without_host_is_refused(attacked: RunningSidecar, strict_upstream: StrictUpstream) -> None:  # noqa: F811
    """RFC 9112 §3.2: an HTTP/1.1 request without Host is answered 400 and not forwarded."""
    answers = send_raw(attacked.url, b"GET /public/x HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert [a.status for a in answers] == [400]
    assert strict_upstream.received == []
