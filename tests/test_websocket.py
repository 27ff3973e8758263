"""WebSocket pass-through (SPEC §12): the handshake authenticated like any request (refusals are plain HTTP, no
upgrade), credentials stripped and identity set, then both sockets spliced until either side closes, an idle
timeout passes or the client's token is revoked."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis_support import redis_url  # noqa: F401  (fixture)
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK, InvalidStatus

from sidecar.state.client_token_store import new_token, token_hash
from sidecar.testing import RunningSidecar, SidecarProcess, free_port, running_sidecar

ADMIN = "test-admin-token-0123456789abcdef"
TOKEN = new_token()


class WebSocketUpstream:
    """A real WebSocket server (the `websockets` library) that echoes, records each handshake it accepted and
    each connection that ended; `/ws/bye` says "bye" and closes."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.handshakes: list[tuple[str, list[tuple[str, str]]]] = []
        self.ended: list[str] = []

    async def handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        path = ws.request.path
        self.handshakes.append((path, [(k.lower(), v) for k, v in ws.request.headers.raw_items()]))
        try:
            if path.startswith("/ws/bye"):
                await ws.send("bye")
                await ws.close(1000, "done")
                return
            async for message in ws:
                await ws.send(message)
        finally:
            self.ended.append(path)


@contextmanager
def websocket_upstream() -> Iterator[WebSocketUpstream]:
    port = free_port()
    upstream = WebSocketUpstream(port)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop: asyncio.Future[None] = loop.create_future()

    async def main() -> None:
        async with serve(upstream.handle, "127.0.0.1", port, max_size=None, ping_interval=None):
            ready.set()
            await stop

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield upstream
    finally:
        loop.call_soon_threadsafe(stop.set_result, None)
        thread.join(10)
        loop.close()


def _config(upstream: str, redis: str) -> dict[str, Any]:
    return {
        "version": 1, "upstream": upstream, "redis": redis, "admin": {"token": ADMIN},
        "authenticators": {"client_token": {"type": "client_token",
                                            "from": ["header:X-Client-Token", "query:access_token"]}},
        "clients": [{"id": "partner", "tokens": [f"sha256:{token_hash(TOKEN)}"]}],
        "routes": [
            {"id": "idle", "match": {"path": "/ws/idle/**"}, "auth": ["client_token"],
             "websocket": {"idle_timeout": "500ms"}},
            {"id": "nows", "match": {"path": "/ws/none/**"}, "auth": ["client_token"], "websocket": False},
            {"id": "portal", "match": {"path": "/ws/portal/**"}, "auth": ["client_token"],
             "cors": {"allow_origins": ["https://portal.example"]}},
            {"id": "ws", "match": {"path": "/ws/**"}, "auth": ["client_token"]},
        ],
    }


@pytest.fixture(scope="module")
def ws_upstream() -> Iterator[WebSocketUpstream]:
    with websocket_upstream() as upstream:
        yield upstream


@pytest.fixture
def sidecar(ws_upstream: WebSocketUpstream, redis_url: str) -> Iterator[RunningSidecar]:  # noqa: F811
    ws_upstream.handshakes.clear()
    ws_upstream.ended.clear()
    with running_sidecar(_config(ws_upstream.url, redis_url)) as sc:
        yield sc


def _ws(sidecar: RunningSidecar, path: str) -> str:
    return sidecar.url.replace("http://", "ws://") + path


def _open(url: str, **kwargs: Any) -> Any:
    return connect(url, max_size=None, ping_interval=None, open_timeout=5, **kwargs)


def test_token_in_the_query_is_accepted_and_never_forwarded(
    sidecar: RunningSidecar, ws_upstream: WebSocketUpstream,
) -> None:
    """`?access_token=` opens the tunnel; the upstream's handshake has the identity, not the token."""
    async def run() -> str:
        async with _open(_ws(sidecar, f"/ws/echo?room=7&access_token={TOKEN}")) as ws:
            await ws.send("hello")
            return str(await ws.recv())

    assert asyncio.run(run()) == "hello"
    [(path, headers)] = ws_upstream.handshakes
    assert path == "/ws/echo?room=7"
    assert ("x-auth-client", "partner") in headers
    assert TOKEN not in json.dumps(headers)


def test_no_or_bad_token_is_an_http_401_without_upgrade(
    sidecar: RunningSidecar, ws_upstream: WebSocketUpstream,
) -> None:
    """No token, or an unknown one: the handshake gets a JSON 401, and the upstream sees nothing."""
    async def status(path: str) -> tuple[int, bytes]:
        try:
            async with _open(_ws(sidecar, path)):
                pass
        except InvalidStatus as refused:
            return refused.response.status_code, refused.response.body or b""
        raise AssertionError("the handshake was accepted")

    for path in ("/ws/echo", f"/ws/echo?access_token={new_token()}"):
        code, body = asyncio.run(status(path))
        assert code == 401
        assert json.loads(body)["error"] in ("missing_credentials", "invalid_token")
    assert ws_upstream.handshakes == []


def test_refused_handshake_on_a_raw_socket_closes_the_connection(sidecar: RunningSidecar) -> None:
    """A refused handshake is a complete HTTP answer with `connection: close`, then the socket closes."""
    port = int(sidecar.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /ws/echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 ")
    assert b"connection: close" in head.lower()
    assert json.loads(body)["error"] == "missing_credentials"


def test_route_with_websocket_false_refuses_the_upgrade(
    sidecar: RunningSidecar, ws_upstream: WebSocketUpstream,
) -> None:
    """`websocket: false`: an authenticated handshake gets 403 websocket_refused."""
    async def run() -> int:
        try:
            async with _open(_ws(sidecar, "/ws/none/x"), additional_headers={"X-Client-Token": TOKEN}):
                pass
        except InvalidStatus as refused:
            return refused.response.status_code
        raise AssertionError("the handshake was accepted")

    assert asyncio.run(run()) == 403
    assert ws_upstream.handshakes == []


def test_route_with_cors_accepts_handshakes_from_its_origins_only(
    sidecar: RunningSidecar, ws_upstream: WebSocketUpstream,
) -> None:
    """On a route with `cors`, a handshake from an origin not listed is 403 origin_not_allowed (cross-site
    WebSocket hijacking); a listed origin, or no Origin (not a browser), opens the tunnel."""
    async def status(origin: str | None) -> int:
        try:
            async with _open(_ws(sidecar, "/ws/portal/x"), origin=origin,  # type: ignore[arg-type]
                             additional_headers={"X-Client-Token": TOKEN}) as ws:
                await ws.send("x")
                await ws.recv()
                return 101
        except InvalidStatus as refused:
            return refused.response.status_code

    assert asyncio.run(status("https://evil.test")) == 403
    assert ws_upstream.handshakes == []
    assert asyncio.run(status("https://portal.example")) == 101
    assert asyncio.run(status(None)) == 101


def test_messages_echo_both_ways_including_10_mib(sidecar: RunningSidecar) -> None:
    """Text and binary frames pass both ways, a 10 MiB message whole."""
    big = bytes(range(256)) * (40 * 1024)

    async def run() -> list[Any]:
        async with _open(_ws(sidecar, "/ws/echo"), additional_headers={"X-Client-Token": TOKEN}) as ws:
            got = []
            for message in ("one", b"\x00two", big):
                await ws.send(message)
                got.append(await asyncio.wait_for(ws.recv(), 20))
            return got

    assert asyncio.run(run()) == ["one", b"\x00two", big]


def test_upstream_closing_closes_the_client(sidecar: RunningSidecar) -> None:
    """The upstream's close frame reaches the client (code and reason) and the tunnel ends."""
    async def run() -> tuple[str, int | None, str | None]:
        async with _open(_ws(sidecar, "/ws/bye"), additional_headers={"X-Client-Token": TOKEN}) as ws:
            first = str(await ws.recv())
            with pytest.raises(ConnectionClosedOK):
                await asyncio.wait_for(ws.recv(), 5)
            return first, ws.close_code, ws.close_reason

    assert asyncio.run(run()) == ("bye", 1000, "done")


def test_client_closing_closes_the_upstream(sidecar: RunningSidecar, ws_upstream: WebSocketUpstream) -> None:
    """The client's close reaches the upstream, whose connection ends."""
    async def run() -> None:
        ws: ClientConnection = await _open(_ws(sidecar, "/ws/leaving"), additional_headers={"X-Client-Token": TOKEN})
        await ws.send("x")
        await ws.recv()
        await ws.close()

    asyncio.run(run())
    deadline = time.monotonic() + 5
    while "/ws/leaving" not in ws_upstream.ended and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ws_upstream.ended == ["/ws/leaving"]


def test_idle_timeout_closes_the_tunnel(sidecar: RunningSidecar) -> None:
    """With `idle_timeout: 500ms`, a tunnel with no traffic is closed within about a second."""
    async def run() -> float:
        async with _open(_ws(sidecar, "/ws/idle/x"), additional_headers={"X-Client-Token": TOKEN}) as ws:
            await ws.send("x")
            await ws.recv()
            started = time.monotonic()
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
            return time.monotonic() - started

    assert 0.4 < asyncio.run(run()) < 1.5


def test_revocation_closes_an_open_tunnel_within_a_second(sidecar: RunningSidecar) -> None:
    """Revoking the client's token (admin API) closes the tunnel opened with it within 1 s."""
    admin = {"Authorization": f"Bearer {ADMIN}"}
    minted = httpx.post(f"{sidecar.admin_url}/admin/clients/partner/tokens", headers=admin).json()

    async def run() -> float:
        async with _open(_ws(sidecar, "/ws/echo"), additional_headers={"X-Client-Token": minted["token"]}) as ws:
            await ws.send("x")
            assert await ws.recv() == "x"
            async with httpx.AsyncClient() as client:
                response = await client.delete(
                    f"{sidecar.admin_url}/admin/clients/partner/tokens/{minted['id']}", headers=admin)
            assert response.status_code == 204
            started = time.monotonic()
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 3)
            return time.monotonic() - started

    assert asyncio.run(run()) < 1.0


def test_metrics_count_tunnels_and_bytes(sidecar: RunningSidecar) -> None:
    """sidecar_websocket_tunnels is the open count; sidecar_websocket_bytes_total counts each direction."""
    def metric(text: str, name: str) -> float:
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))

    async def run() -> str:
        async with _open(_ws(sidecar, "/ws/echo"), additional_headers={"X-Client-Token": TOKEN}) as ws:
            await ws.send(os.urandom(1000))  # random: permessage-deflate cannot shrink it
            await ws.recv()
            await asyncio.sleep(1.2)  # the counters are folded in once a second
            return httpx.get(sidecar.admin_url + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text

    text = asyncio.run(run())
    assert metric(text, "sidecar_websocket_tunnels ") == 1
    assert metric(text, 'sidecar_websocket_bytes_total{direction="to_upstream"}') > 1000
    assert metric(text, 'sidecar_websocket_bytes_total{direction="to_client"}') > 1000


def test_200_concurrent_tunnels_with_two_workers(
    ws_upstream: WebSocketUpstream, redis_url: str, tmp_path: Path,  # noqa: F811
) -> None:
    """`sidecar run --workers 2` holds 200 tunnels open at once, each echoing its own messages."""
    path = tmp_path / "sidecar.yaml"
    path.write_text(json.dumps(_config(ws_upstream.url, redis_url)))

    async def one(url: str, i: int, all_open: asyncio.Event, opened: list[int]) -> str:
        async with _open(url + f"/ws/many/{i}", additional_headers={"X-Client-Token": TOKEN}) as ws:
            opened.append(i)
            if len(opened) == 200:
                all_open.set()
            await asyncio.wait_for(all_open.wait(), 30)
            await ws.send(f"message {i}")
            return str(await asyncio.wait_for(ws.recv(), 10))

    async def run(url: str) -> list[str]:
        all_open, opened = asyncio.Event(), []  # type: ignore[var-annotated]
        return await asyncio.gather(*(one(url, i, all_open, opened) for i in range(200)))

    with SidecarProcess(path, workers=2, grace=2) as process:
        replies = asyncio.run(run(process.url.replace("http://", "ws://")))
    assert replies == [f"message {i}" for i in range(200)]
