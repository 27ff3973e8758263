"""Request smuggling (CWE-444): framing the sidecar and a backend could read differently is refused by the sidecar's
own parser, or re-framed so the backend sees exactly the requests that passed authentication.

The parser is chosen deliberately: the sidecar ships uvicorn with httptools (llhttp, Node's parser), and every
test here runs under it through `running_sidecar`. llhttp is strict where h11 and many backends are lenient:
it refuses Content-Length together with Transfer-Encoding, duplicate Content-Length (even equal ones), a
Transfer-Encoding whose last coding is not `chunked`, bare LF line endings and obs-fold continuation lines
(RFC 9112 §2.2, §5.2, §6.1, §6.3). The sidecar never forwards the client's framing: it drops Transfer-Encoding
and re-frames every body it forwards (Content-Length or its own chunking), so a lenient backend behind it is
never handed an ambiguous message.
"""

from __future__ import annotations

import time

import pytest
from adversarial_support import (  # noqa: F401  (fixtures)
    StrictUpstream,
    attacked,
    get,
    send_raw,
    strict_upstream,
    strict_upstream_server,
)

from sidecar.testing import RunningSidecar

HIDDEN = b"GET /public/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"


def settle() -> None:
    time.sleep(0.2)  # anything the sidecar would still forward has reached the upstream by now


@pytest.mark.parametrize("framing", [
    pytest.param(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", id="CL+TE"),
    pytest.param(b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", id="TE+CL"),
    pytest.param(b"Content-Length: 5\r\nContent-Length: 5\r\n", id="two-equal-CL"),
    pytest.param(b"Content-Length: 5\r\nContent-Length: 48\r\n", id="two-different-CL"),
    pytest.param(b"Content-Length: 5, 5\r\n", id="CL-list"),
    pytest.param(b"Content-Length: +5\r\n", id="CL-plus-sign"),
    pytest.param(b"Content-Length: 0x5\r\n", id="CL-hex"),
    pytest.param(b"Transfer-Encoding: chunked, identity\r\n", id="TE-chunked-identity"),
    pytest.param(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n", id="TE-twice"),
    pytest.param(b"Transfer-Encoding: identity\r\nContent-Length: 5\r\n", id="TE-identity+CL"),
    pytest.param(b"Transfer-Encoding : chunked\r\n", id="TE-space-before-colon"),
])
def test_ambiguous_framing_is_refused_and_nothing_reaches_the_upstream(
    attacked: RunningSidecar, strict_upstream: StrictUpstream, framing: bytes,  # noqa: F811
) -> None:
    """Two ways to read a body's length: 400 and the connection closed; no request reaches the upstream."""
    data = b"POST /public/a HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n0\r\n\r\n" + HIDDEN
    answers = send_raw(attacked.url, data)
    settle()
    assert [a.status for a in answers] == [400]
    assert strict_upstream.received == []
    assert get(attacked.url, "/public/after").status == 200


@pytest.mark.parametrize("coding", [b"xchunked", b"chunkedx", b"identity", b"gzip", b"chunked;q=1"])
def test_transfer_encoding_not_ending_in_chunked_is_refused(
    attacked: RunningSidecar, strict_upstream: StrictUpstream, coding: bytes,  # noqa: F811
) -> None:
    """RFC 9112 §6.3: a request whose last coding is not chunked is 400; the upstream never processes it."""
    data = b"POST /public/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: " + coding + b"\r\n\r\n0\r\n\r\n" + HIDDEN
    answers = send_raw(attacked.url, data)
    settle()
    assert [a.status for a in answers] == [400]
    assert strict_upstream.received == []


@pytest.mark.parametrize("spelling", [b" chunked", b"\tchunked", b"chunked ", b"CHUNKED", b"Chunked"])
def test_transfer_encoding_with_legal_whitespace_or_case_is_one_chunked_body(
    attacked: RunningSidecar, strict_upstream: StrictUpstream, spelling: bytes,  # noqa: F811
) -> None:
    """Optional whitespace and case are legal (RFC 9110 §5.6.3): one request, its body de-chunked and re-framed."""
    data = (b"POST /public/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:" + spelling + b"\r\nConnection: close\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n")
    answers = send_raw(attacked.url, data)
    settle()
    assert [a.status for a in answers] == [200]
    [seen] = strict_upstream.received
    assert (seen.method, seen.path, seen.body) == ("POST", "/public/a", b"abc")
    assert seen.headers_named("transfer-encoding") in ([], ["chunked"])
    assert len(seen.headers_named("content-length")) + len(seen.headers_named("transfer-encoding")) == 1


@pytest.mark.parametrize("data", [
    pytest.param(b"GET /public/a HTTP/1.1\nHost: x\nConnection: close\n\n", id="bare-LF-everywhere"),
    pytest.param(b"GET /public/a HTTP/1.1\r\nHost: x\nX-Pad: 1\r\nConnection: close\r\n\r\n", id="bare-LF-one-line"),
    pytest.param(b"GET /public/a HTTP/1.1\r\nHost: x\r\nX-Pad: a\r\n b\r\nConnection: close\r\n\r\n", id="obs-fold"),
    pytest.param(b"GET /public/a HTTP/1.1\r\nHost: x\r\nX-Pad: a\r\n\tb\r\nConnection: close\r\n\r\n",
                 id="obs-fold-tab"),
    pytest.param(b"GET /public/a HTTP/1.1\r\nHost: x\r\nX Pad: a\r\nConnection: close\r\n\r\n", id="space-in-name"),
    pytest.param(b"GET /public/a HTTP/1.1\r\nHost: x\r\nX-Pad: a\rb\r\nConnection: close\r\n\r\n", id="bare-CR"),
    pytest.param(b"GET /public/a HTTP/1.1 \r\nHost: x\r\nConnection: close\r\n\r\n", id="trailing-space-version"),
])
def test_malformed_line_endings_and_folding_are_refused(
    attacked: RunningSidecar, strict_upstream: StrictUpstream, data: bytes,  # noqa: F811
) -> None:
    """Bare LF, bare CR, obs-fold and malformed request lines: 400, nothing forwarded."""
    answers = send_raw(attacked.url, data)
    settle()
    assert [a.status for a in answers] == [400]
    assert strict_upstream.received == []


def test_chunk_lines_with_bare_lf_are_refused(attacked: RunningSidecar, strict_upstream: StrictUpstream) -> None:  # noqa: F811
    """A chunked body framed with bare LF is refused; the upstream never processes a complete request."""
    data = (b"POST /public/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            b"3\nabc\n0\n\n")
    answers = send_raw(attacked.url, data)
    settle()
    assert [a.status for a in answers] == [400]
    assert strict_upstream.received == []


def test_request_hidden_in_a_body_stays_body(attacked: RunningSidecar, strict_upstream: StrictUpstream) -> None:  # noqa: F811
    """A request inside a Content-Length body is body: the upstream sees one POST carrying those bytes, nothing else."""
    hidden = b"GET /admin/x HTTP/1.1\r\nHost: x\r\n\r\n"
    data = (b"POST /public/a HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(hidden)
            + hidden)
    answers = send_raw(attacked.url, data)
    settle()
    assert [a.status for a in answers] == [200]
    assert strict_upstream.requests() == [("POST", "/public/a")]
    assert strict_upstream.received[0].body == hidden
    assert strict_upstream.received[0].header("content-length") == str(len(hidden))


def test_request_hidden_in_a_chunked_body_stays_body(attacked: RunningSidecar, strict_upstream: StrictUpstream) -> None:  # noqa: F811
    """A `0` chunk line inside a chunk's data does not end the body early."""
    inner = b"0\r\n\r\nGET /admin/x HTTP/1.1\r\nHost: x\r\n\r\n"
    data = (b"POST /public/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            + b"%x\r\n" % len(inner) + inner + b"\r\n0\r\n\r\n")
    answers = send_raw(attacked.url, data)
    settle()
    assert [a.status for a in answers] == [200]
    assert strict_upstream.requests() == [("POST", "/public/a")]
    assert strict_upstream.received[0].body == inner


def test_pipelined_requests_are_each_authenticated(attacked: RunningSidecar, strict_upstream: StrictUpstream) -> None:  # noqa: F811
    """Three pipelined requests: each is matched and authenticated on its own; only the public ones are forwarded."""
    data = (b"GET /public/one HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /admin/secret HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /public/two HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answers = send_raw(attacked.url, data)
    settle()
    assert [a.status for a in answers] == [200, 401, 200]
    assert strict_upstream.requests() == [("GET", "/public/one"), ("GET", "/public/two")]


def test_body_shorter_than_its_content_length_never_completes_upstream(
    attacked: RunningSidecar, strict_upstream: StrictUpstream,  # noqa: F811
) -> None:
    """A client that closes before its declared body ends: the upstream never processes a complete request."""
    data = b"POST /public/a HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly-a-little"
    answers = send_raw(attacked.url, data, timeout=3, half_close=True)
    settle()
    assert [a.status for a in answers] in ([], [400])
    assert strict_upstream.received == []
