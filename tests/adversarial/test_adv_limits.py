"""Size and slowness: oversized header sections are refused without a crash and without buffering without bound,
a trickled body or hundreds of idle connections do not stop other clients being served (SECURITY.md promise 8).

Bounded for a small machine: at most a few hundred sockets and a few seconds of trickling."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from adversarial_support import (  # noqa: F401  (fixtures)
    StrictUpstream,
    address,
    attacked,
    get,
    replies,
    send_raw,
    strict_upstream,
    strict_upstream_server,
)

from sidecar.testing import RunningSidecar


def still_serving(base_url: str) -> None:
    reply = get(base_url, "/public/still-here")
    assert reply.status == 200


@pytest.mark.parametrize(("name", "headers"), [
    ("one 1 MB header", b"X-Big: " + b"a" * (1024 * 1024) + b"\r\n"),
    ("1 MB over 10 000 headers", b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 90) for i in range(10_000))),
    ("129 small headers", b"".join(b"X-H%d: v\r\n" % i for i in range(128))),
    ("65 KiB in two headers", b"X-A: " + b"a" * (33 * 1024) + b"\r\nX-B: " + b"b" * (33 * 1024) + b"\r\n"),
])
def test_oversized_header_sections_are_431_and_the_sidecar_lives_on(
    attacked: RunningSidecar, strict_upstream: StrictUpstream, name: str, headers: bytes,  # noqa: F811
) -> None:
    """Above 128 fields or 64 KiB of headers: 431 (or the parser's 400), nothing forwarded, the next request served."""
    data = b"GET /public/x HTTP/1.1\r\nHost: x\r\n" + headers + b"Connection: close\r\n\r\n"
    answers = send_raw(attacked.url, data, timeout=10)
    assert [a.status for a in answers] in ([431], [400]), name
    assert strict_upstream.received == []
    still_serving(attacked.url)


def test_headers_at_the_limit_are_accepted(attacked: RunningSidecar, strict_upstream: StrictUpstream) -> None:  # noqa: F811
    """120 header fields and ~60 KiB pass: the limits are not tighter than documented."""
    headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 480) for i in range(120))
    answers = send_raw(attacked.url, b"GET /public/x HTTP/1.1\r\nHost: x\r\n" + headers + b"Connection: close\r\n\r\n")
    assert [a.status for a in answers] == [200]
    assert len(strict_upstream.received) == 1


def test_an_endless_header_section_is_cut_off_near_the_limit(
    attacked: RunningSidecar, strict_upstream: StrictUpstream,  # noqa: F811
) -> None:
    """Headers that never end (16 MB sent) are refused once past the limit — a 431/400 or the connection closed
    under the sender — not buffered for as long as the client keeps sending."""
    chunk = b"".join(b"X-Pad: %s\r\n" % (b"v" * 1000) for _ in range(64))  # ~64 KiB, never a blank line
    received = b""
    closed_under_us = False
    with socket.create_connection(address(attacked.url), timeout=2) as sock:
        try:
            sock.sendall(b"GET /public/x HTTP/1.1\r\nHost: x\r\n")
            for _ in range(256):
                sock.sendall(chunk)
        except OSError:
            closed_under_us = True  # reset by the sidecar before everything was sent
        with contextlib.suppress(OSError):
            while data := sock.recv(65536):
                received += data
    statuses = [a.status for a in replies(received)]
    assert statuses in ([431], [400]) or (closed_under_us and statuses == []), statuses
    assert strict_upstream.received == []
    still_serving(attacked.url)


def test_a_trickled_body_does_not_stop_other_clients(
    attacked: RunningSidecar, strict_upstream: StrictUpstream,  # noqa: F811
) -> None:
    """A body sent a byte at a time for 2 s: other clients are served meanwhile, and the body arrives whole."""
    body = b"0123456789abcdefghij"
    done = threading.Event()
    latencies: list[float] = []

    def others() -> None:
        while not done.is_set():
            started = time.monotonic()
            still_serving(attacked.url)
            latencies.append(time.monotonic() - started)
            time.sleep(0.05)

    thread = threading.Thread(target=others)
    with socket.create_connection(address(attacked.url), timeout=5) as sock:
        thread.start()
        try:
            sock.sendall(b"POST /public/slow HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                         % len(body))
            for byte in body:
                sock.sendall(bytes([byte]))
                time.sleep(0.1)
            reply = b""
            while data := sock.recv(65536):
                reply += data
        finally:
            done.set()
            thread.join(10)
    assert [a.status for a in replies(reply)] == [200]
    assert len(latencies) >= 10 and max(latencies) < 1.0
    slow = [s for s in strict_upstream.received if s.path == "/public/slow"]
    assert [s.body for s in slow] == [body]


def test_hundreds_of_idle_connections_do_not_stop_other_clients(
    attacked: RunningSidecar, strict_upstream: StrictUpstream,  # noqa: F811
) -> None:
    """300 silent connections and 100 stuck half-way through their headers: 20 normal requests are still served."""
    sockets: list[socket.socket] = []
    try:
        for i in range(400):
            sock = socket.create_connection(address(attacked.url), timeout=5)
            sockets.append(sock)
            if i % 4 == 0:
                sock.sendall(b"GET /public/x HTTP/1.1\r\nHost: x\r\nX-Partial: ")
        started = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(lambda i: get(attacked.url, f"/public/n{i}").status, range(20)))
        elapsed = time.monotonic() - started
    finally:
        for sock in sockets:
            sock.close()
    assert statuses == [200] * 20
    assert elapsed < 5
    assert sorted(s.path for s in strict_upstream.received) == sorted(f"/public/n{i}" for i in range(20))
