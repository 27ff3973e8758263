"""Bodies stream both ways through a real sidecar (SPEC §4), and the forwarding errors are JSON (SPEC §5)."""

from __future__ import annotations

import asyncio
import hashlib
import random
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import config_text, error_body, make_config, route

from sidecar.testing import RecordingUpstream, RunningSidecar, free_port, running_sidecar, serve_in_thread

SIZE = 3 * 1024 * 1024
CHUNK = 64 * 1024
PAYLOAD = random.Random(20240501).randbytes(SIZE)


class StreamingUpstream:
    """Replies to GET /download with PAYLOAD in 64 KiB chunks; once the first chunk is out it waits for
    `release` before sending the rest (a buffering proxy would then never deliver the first one). Records
    uploads to POST /upload chunk by chunk and sets `first_upload_chunk` when the first arrives."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.released_in_time: bool | None = None
        self.first_upload_chunk = threading.Event()
        self.upload = bytearray()
        self.upload_headers: dict[str, str] = {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/download":
            await self._download(send)
        else:
            await self._upload(scope, receive, send)

    async def _download(self, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/octet-stream"), (b"content-length", str(SIZE).encode())]})
        for offset in range(0, SIZE, CHUNK):
            await send({"type": "http.response.body", "body": PAYLOAD[offset:offset + CHUNK], "more_body": True})
            if offset == 0:
                # False when the client never saw the first chunk: the proxy held it back.
                self.released_in_time = await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 5)
        await send({"type": "http.response.body", "body": b""})

    async def _upload(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.upload_headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        while True:
            message = await receive()
            if message.get("body"):
                self.upload += message["body"]
                self.first_upload_chunk.set()
            if not message.get("more_body"):
                break
        reply = hashlib.sha256(self.upload).hexdigest().encode()
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/plain"), (b"content-length", str(len(reply)).encode())]})
        await send({"type": "http.response.body", "body": reply})


def _open_config(upstream_url: str) -> str:
    """Everything open, to an upstream of the test's own."""
    return config_text(make_config(upstream_url, {"public": {"type": "anonymous"}}, [route("all", "/**", ["public"])]))


@pytest.fixture(scope="module")
def sidecar(shared_upstream: RecordingUpstream) -> Iterator[RunningSidecar]:
    config = make_config(shared_upstream.url, {"public": {"type": "anonymous"}},
                         [route("files", "/files/**", ["public"])])
    with running_sidecar(config_text(config)) as sc:
        yield sc


def _chunks(data: bytes, size: int = CHUNK) -> Iterator[bytes]:
    for offset in range(0, len(data), size):
        yield data[offset:offset + size]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_large_upload_reaches_the_upstream_intact(
    sidecar: RunningSidecar, upstream: RecordingUpstream, http: httpx.Client, framing: str,
) -> None:
    """A 3 MiB POST body (with Content-Length, or chunked) reaches the upstream byte for byte."""
    content = PAYLOAD if framing == "content-length" else _chunks(PAYLOAD)
    response = http.post(sidecar.url + "/files/big?name=a.bin", content=content,
                         headers={"Content-Type": "application/octet-stream"})

    assert response.status_code == 200
    [got] = upstream.received
    assert (got.method, got.path, got.query) == ("POST", "/files/big", "name=a.bin")
    assert len(got.body) == SIZE
    assert hashlib.sha256(got.body).digest() == hashlib.sha256(PAYLOAD).digest()
    assert got.header("content-type") == "application/octet-stream"
    if framing == "content-length":
        assert got.header("content-length") == str(SIZE)


def test_upload_is_streamed_not_buffered(http: httpx.Client) -> None:
    """The upstream gets the first chunk of an upload before the client has sent the rest."""
    app = StreamingUpstream()
    seen_early: list[bool] = []

    def body() -> Iterator[bytes]:
        yield PAYLOAD[:CHUNK]
        seen_early.append(app.first_upload_chunk.wait(10))  # a buffering proxy would hold the chunk back
        yield from _chunks(PAYLOAD[CHUNK:])

    with serve_in_thread(app) as url, running_sidecar(_open_config(url)) as sc:
        response = http.post(sc.url + "/upload", content=body())

    assert seen_early == [True]
    assert response.status_code == 200
    assert response.text == hashlib.sha256(PAYLOAD).hexdigest()
    assert bytes(app.upload) == PAYLOAD


def test_large_download_passes_intact_and_streams(http: httpx.Client) -> None:
    """A 3 MiB reply reaches the client byte for byte; its first chunk arrives before the upstream sends the rest."""
    app = StreamingUpstream()
    with serve_in_thread(app) as url, running_sidecar(_open_config(url)) as sc:
        try:
            with http.stream("GET", sc.url + "/download") as response:
                chunks = response.iter_raw()
                first = next(chunks)  # the upstream is holding the rest back until `release`
                app.release.set()
                received = first + b"".join(chunks)
                status, headers = response.status_code, response.headers
        finally:
            app.release.set()

    assert app.released_in_time is True
    assert status == 200
    assert headers["content-type"] == "application/octet-stream"
    assert headers["content-length"] == str(SIZE)
    assert len(received) == SIZE
    assert hashlib.sha256(received).digest() == hashlib.sha256(PAYLOAD).digest()


def test_upstream_down_gives_502(http: httpx.Client) -> None:
    """With nothing listening at the upstream address the client gets 502 upstream_unavailable as JSON."""
    upstream_url = f"http://127.0.0.1:{free_port()}"
    with running_sidecar(_open_config(upstream_url)) as sc:
        response = http.get(sc.url + "/anything?x=1")
        post = http.post(sc.url + "/anything", content=b"payload")

    error_body(response, 502, "upstream_unavailable")
    error_body(post, 502, "upstream_unavailable")
    assert "www-authenticate" not in response.headers


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/nothing/here"),
    ("GET", "/"),
    ("POST", "/files-but-not-quite"),
    ("GET", "/FILES/x"),
])
def test_no_route_gives_404(
    sidecar: RunningSidecar, upstream: RecordingUpstream, http: httpx.Client, method: str, path: str,
) -> None:
    """A request no route matches gets 404 no_route, and the upstream is not called."""
    response = http.request(method, sidecar.url + path, content=b"x" if method == "POST" else None)

    error_body(response, 404, "no_route")
    assert "www-authenticate" not in response.headers
    assert upstream.received == []


def test_method_not_in_route_gives_404(
    shared_upstream: RecordingUpstream, http: httpx.Client,
) -> None:
    """A route limited to GET does not match a DELETE: 404 no_route, upstream untouched."""
    shared_upstream.received.clear()
    config = make_config(shared_upstream.url, {"public": {"type": "anonymous"}},
                         [route("read", "/r/**", ["public"], match={"path": "/r/**", "methods": ["GET"]})])
    with running_sidecar(config_text(config)) as sc:
        deleted = http.delete(sc.url + "/r/x")
        got = http.get(sc.url + "/r/x")

    error_body(deleted, 404, "no_route")
    assert got.status_code == 200
    assert [(r.method, r.path) for r in shared_upstream.received] == [("GET", "/r/x")]
