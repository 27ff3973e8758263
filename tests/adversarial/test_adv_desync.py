"""Upstream desync through the connection pool (CWE-444, issue 12 item 1): a caller with no credential makes a
keep-alive upstream answer before the request body has been forwarded, then sends a request whose body is a
request of its own (`GET /admin/secret` with `X-Auth-Subject: admin`). A pool that put the first connection back
after cutting its body short would hand the upstream the second request's head as the rest of the first body, and
its body as a fresh request that never passed authentication. The upstream here is strict (h11) and correct: it
reads each body to the length its head declares before parsing the next request, as real servers do.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from adversarial_support import Reply, address, attacked_config, replies
from pool_support import Plan, ScriptedUpstream, reply_body, scripted_upstream_in_thread

from sidecar.testing import KeyPair, RunningSidecar, running_sidecar

SMUGGLED = b"GET /admin/secret HTTP/1.1\r\nHost: x\r\nX-Auth-Subject: admin\r\nContent-Length: 0\r\n\r\n"


@pytest.fixture
def scripted() -> Iterator[ScriptedUpstream]:
    with scripted_upstream_in_thread() as upstream:
        yield upstream


@pytest.fixture
def sidecar(scripted: ScriptedUpstream, idp_keys: KeyPair) -> Iterator[RunningSidecar]:
    with running_sidecar(attacked_config(scripted.url, idp_keys)) as sc:
        yield sc


def victim_request() -> bytes:
    """An unauthenticated POST to a public route whose body is the smuggled request."""
    return (b"POST /public/victim HTTP/1.1\r\nHost: x\r\nX-Request-Id: desync-probe-1\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % len(SMUGGLED)) + SMUGGLED


def exchange_in_two_parts(sc: RunningSidecar, first: bytes, pause: float, rest: bytes) -> list[Reply]:
    with socket.create_connection(address(sc.url), timeout=5) as sock:
        sock.sendall(first)
        time.sleep(pause)  # the upstream answers now, before the rest of the body reaches the sidecar
        sock.sendall(rest)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return replies(b"".join(chunks))


def exchange(sc: RunningSidecar, data: bytes) -> list[Reply]:
    return exchange_in_two_parts(sc, data, 0, b"")


def test_early_answer_cannot_smuggle_a_request_to_the_upstream(
    sidecar: RunningSidecar, scripted: ScriptedUpstream,
) -> None:
    """An early-answering upstream and a body carrying `GET /admin/secret` with `X-Auth-Subject: admin`: the
    upstream never parses that request nor that identity, and each caller gets the reply to its own request."""
    # The attacker calibrates the early request's length on a copy of the deployment: the size of the head the
    # sidecar forwards for the victim request (the same request, sent once whole).
    [probe] = exchange(sidecar, victim_request())
    assert probe.status == 200 and probe.body == reply_body("/public/victim")
    forwarded_head = scripted.parsed[-1].head_size()
    anonymous = scripted.parsed[-1].header(b"x-auth-subject")

    early = Plan(when="early").under("/public", "attacker")
    prefix = b"0123456789"
    head = (b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
            % (early.encode(), len(prefix) + forwarded_head))
    [answered] = exchange_in_two_parts(sidecar, head + prefix, 0.3, b"z" * forwarded_head)
    assert answered.status == 200 and answered.body == reply_body(early)

    [victim] = exchange(sidecar, victim_request())
    time.sleep(0.2)  # anything still travelling upstream has arrived

    assert victim.status == 200 and victim.body == reply_body("/public/victim")
    assert scripted.requests() == [("POST", "/public/victim"), ("POST", early), ("POST", "/public/victim")]
    assert all(not p.target.startswith("/admin") for p in scripted.parsed)
    assert {p.header(b"x-auth-subject") for p in scripted.parsed} == {anonymous}
    assert scripted.parsed[-1].complete and scripted.parsed[-1].body == SMUGGLED
    assert scripted.garbage == []
