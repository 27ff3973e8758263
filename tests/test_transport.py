"""The forward path's transports against a real misbehaving upstream: streaming, chunked bodies, 100-continue,
idle connections closed by the upstream, timeouts, malformed and oversized replies. Every case runs under the
default httptools pool and under httpx."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from email.utils import parsedate_to_datetime

import httpx
import pytest

from sidecar.testing import free_port, running_sidecar

BODY = b'{"ok": true}'
UPSTREAM_DATE = "Mon, 01 Jan 2001 00:00:00 GMT"


class MisbehavingUpstream:
    """A raw HTTP/1.1 server whose behaviour is chosen by the request path."""

    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[tuple[str, bytes]] = []
        self.connections = 0
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self._started.wait(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", self.port))
        self._started.set()
        self.loop.run_forever()

    def stop(self) -> None:
        async def close() -> None:
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.sleep(0.05)  # let the closed transports finish closing

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                pairs = (line.partition(":") for line in lines[1:] if line)
                headers = {k.strip().lower(): v.strip() for k, _, v in pairs}
                body = b""
                if "content-length" in headers:
                    body = await reader.readexactly(int(headers["content-length"]))
                elif headers.get("transfer-encoding", "").lower() == "chunked":
                    while True:
                        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                        chunk = await reader.readexactly(size + 2)
                        if size == 0:
                            break
                        body += chunk[:-2]
                self.requests.append((path, body))
                keep = await self._answer(method, path, body, writer)
                if not keep:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _answer(self, method: str, path: str, body: bytes, writer: asyncio.StreamWriter) -> bool:
        def reply(payload: bytes, status: str = "200 OK", extra: str = "") -> None:
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                         f"{extra}\r\n".encode() + (payload if method != "HEAD" else b""))

        if path == "/dated":
            reply(BODY, extra=f"Date: {UPSTREAM_DATE}\r\nServer: backend/1.0\r\n")
        elif path == "/echo-body":
            reply(json.dumps({"size": len(body), "head": body[:20].decode("latin-1")}).encode())
        elif path == "/chunked":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for part in (b"alpha-", b"beta-", b"gamma"):
                writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                await writer.drain()
                await asyncio.sleep(0.01)
            writer.write(b"0\r\n\r\n")
        elif path == "/close-when-idle":
            reply(BODY)
            await writer.drain()
            await asyncio.sleep(0.05)
            return False  # the upstream closes its kept-alive connection while the sidecar holds it idle
        elif path == "/no-length":
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"x" * 5000)
            return False
        elif path == "/malformed":
            writer.write(b"HTTP/1.1 abc nonsense\r\n\r\n")
            return False
        elif path == "/oversized-headers":
            writer.write(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 200_000 + b"\r\nContent-Length: 0\r\n\r\n")
            return False
        elif path == "/silent":
            await asyncio.sleep(5)
            return False
        elif path == "/hang-up":
            return False
        elif path == "/truncated":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly-part")
            await writer.drain()
            return False
        else:
            reply(BODY)
        await writer.drain()
        return True


@pytest.fixture(scope="module")
def upstream() -> Iterator[MisbehavingUpstream]:
    server = MisbehavingUpstream()
    yield server
    server.stop()


@pytest.fixture(params=["httptools", "httpx"])
def sidecar(request, upstream, monkeypatch):
    monkeypatch.setenv("SIDECAR_FORWARD_TRANSPORT", request.param)
    config = {
        "version": 1, "upstream": f"http://127.0.0.1:{upstream.port}", "timeouts": {"connect": "1s", "read": "500ms"},
        "authenticators": {"public": {"type": "anonymous"}},
        "routes": [{"id": "all", "match": {"path": "/**"}, "auth": ["public"]}],
    }
    with running_sidecar(json.dumps(config)) as sc:
        yield sc


def test_plain_request_and_keep_alive(sidecar, upstream):
    """Requests go through and the pool reuses its upstream connection."""
    before = upstream.connections
    with httpx.Client() as client:
        for _ in range(5):
            assert client.get(sidecar.url + "/ok").json() == {"ok": True}
    assert upstream.connections - before <= 2


def test_chunked_reply_streams_through(sidecar):
    """A chunked upstream reply reaches the client whole."""
    assert httpx.get(sidecar.url + "/chunked").content == b"alpha-beta-gamma"


def test_reply_without_length_is_read_to_the_end(sidecar):
    """A reply delimited by the connection closing arrives whole."""
    assert httpx.get(sidecar.url + "/no-length").content == b"x" * 5000


def test_chunked_upload_reaches_the_upstream(sidecar, upstream):
    """A chunked request body is forwarded intact."""
    def parts():
        yield b"first-"
        yield b"second"
    response = httpx.post(sidecar.url + "/echo-body", content=parts())
    assert response.json() == {"size": 12, "head": "first-second"}


def test_expect_100_continue(sidecar):
    """A client sending `Expect: 100-continue` gets 100 Continue, then the upstream's answer to the full body."""
    with socket.create_connection(("127.0.0.1", int(sidecar.url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(b"POST /echo-body HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        sock.settimeout(5)
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(b"hello")
        answer = b""
        while b'"head"' not in answer:
            answer += sock.recv(4096)
        assert b'"size": 5' in answer and b"200 OK" in answer


def test_idle_connection_closed_by_the_upstream_is_retried(sidecar):
    """When the upstream closes a kept-alive connection, the next request still succeeds (retried on a new one)."""
    with httpx.Client() as client:
        for _ in range(4):
            assert client.get(sidecar.url + "/close-when-idle").status_code == 200
            time.sleep(0.1)
            assert client.get(sidecar.url + "/ok").status_code == 200


@pytest.mark.parametrize(("path", "status", "error"), [
    ("/malformed", 502, "upstream_unavailable"),
    ("/oversized-headers", 502, "upstream_unavailable"),
    ("/hang-up", 502, "upstream_unavailable"),
    ("/silent", 504, "upstream_timeout"),
])
def test_misbehaving_upstream_maps_to_5xx(sidecar, path, status, error):
    """Malformed or oversized replies and hang-ups are 502, silence is 504 — never a hang or a 500."""
    started = time.monotonic()
    response = httpx.get(sidecar.url + path, timeout=10)
    assert (response.status_code, response.json()["error"]) == (status, error)
    assert time.monotonic() - started < 3


def test_truncated_reply_breaks_the_connection_not_the_sidecar(sidecar):
    """A reply cut short after its headers cannot be completed: the client sees a broken body, the sidecar lives."""
    with pytest.raises(httpx.HTTPError):
        httpx.get(sidecar.url + "/truncated", timeout=5)
    assert httpx.get(sidecar.url + "/ok").status_code == 200


def test_head_request(sidecar):
    """HEAD gets the headers and no body, and the next request on the pool still works."""
    response = httpx.head(sidecar.url + "/ok")
    assert response.status_code == 200 and response.content == b""
    assert httpx.get(sidecar.url + "/ok").json() == {"ok": True}


def test_upstream_date_is_forwarded_alone(sidecar):
    """The upstream's Date reaches the client as the only Date, and its Server header is its own (RFC 9110 §6.6.1)."""
    response = httpx.get(sidecar.url + "/dated")
    assert response.status_code == 200
    assert response.headers.get_list("date") == [UPSTREAM_DATE]
    assert response.headers.get_list("server") == ["backend/1.0"]


def test_reply_without_date_gets_one(sidecar):
    """An upstream reply without Date gets exactly one, the sidecar's; the sidecar adds no Server header."""
    response = httpx.get(sidecar.url + "/ok")
    [date] = response.headers.get_list("date")
    assert abs(parsedate_to_datetime(date).timestamp() - time.time()) < 5
    assert "server" not in response.headers


def test_many_concurrent_requests(sidecar):
    """Fifty concurrent requests are all answered correctly."""
    async def run() -> list[int]:
        async with httpx.AsyncClient() as client:
            responses = await asyncio.gather(*(client.get(sidecar.url + f"/ok?i={i}") for i in range(50)))
        return [r.status_code for r in responses]
    assert asyncio.run(run()) == [200] * 50
