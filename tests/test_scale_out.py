"""Scale-out on a Redis Sentinel started by the test from `redis-server`: revocation reaches every process within
a second, and two processes share one webhook queue (each event delivered once)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis_support import start_sentinel

from sidecar.state.client_token_store import new_token, token_hash
from sidecar.testing import SidecarProcess, serve_in_thread

ADMIN = "scale-admin-token-0123456789abcdef"
HEADERS = {"Authorization": f"Bearer {ADMIN}"}
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
TOKEN = new_token()


@pytest.fixture(scope="module")
def sentinel_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A master and one Sentinel watching it, both our own processes on free ports."""
    sentinel = start_sentinel(tmp_path_factory.mktemp("sentinel"))
    try:
        yield sentinel.url
    finally:
        sentinel.stop()


class Receiver:
    def __init__(self) -> None:
        self.ids: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        self.ids.append(dict(scope["headers"]).get(b"webhook-id", b"").decode())
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


async def paid(scope: dict[str, Any], receive: Any, send: Any) -> None:
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"paid": true}'})


def write_config(path: Path, upstream: str, redis: str, receiver: str) -> Path:
    path.write_text(json.dumps({
        "version": 1, "upstream": upstream, "redis": redis, "admin": {"token": ADMIN},
        "authenticators": {"licence": {"type": "client_token"}},
        "clients": [{"id": "01400-2", "tokens": [f"sha256:{token_hash(TOKEN)}"]}],
        "routes": [{"id": "pay", "match": {"path": "/pay/**"}, "auth": ["licence"],
                    "emit": [{"event": "client-transaction"}]}],
        "webhooks": [{"id": "erp", "url": receiver, "events": ["client-transaction"], "secret": SECRET,
                      "allow_private": True, "retry": {"initial": "50ms", "max_delay": "200ms", "max_attempts": 5}}],
    }))
    return path


@pytest.fixture
def two_sidecars(sentinel_url: str, tmp_path: Path) -> Iterator[tuple[SidecarProcess, SidecarProcess, Receiver]]:
    receiver = Receiver()
    with serve_in_thread(paid) as upstream, serve_in_thread(receiver) as hooks:
        path = write_config(tmp_path / "sidecar.yaml", upstream, sentinel_url, hooks + "/hooks")
        with SidecarProcess(path) as first, SidecarProcess(path) as second:
            yield first, second, receiver


def test_revocation_through_sentinel_reaches_the_other_process(two_sidecars):
    """Through Sentinel: a token minted on one process works on the other, and its revocation is refused there
    within a second although that process had it cached."""
    first, second, _ = two_sidecars
    minted = httpx.post(f"{first.admin_url}/admin/clients/01400-2/tokens", headers=HEADERS).json()
    for _ in range(3):
        assert httpx.post(second.url + "/pay/1", headers={"X-Client-Token": minted["token"]}).status_code == 200
    revoked = httpx.delete(f"{first.admin_url}/admin/clients/01400-2/tokens/{minted['id']}", headers=HEADERS)
    assert revoked.status_code == 204
    started = time.monotonic()
    while httpx.post(second.url + "/pay/1", headers={"X-Client-Token": minted["token"]}).status_code == 200:
        assert time.monotonic() - started < 1.0, "the revoked token was still accepted after 1 s"
        time.sleep(0.02)


def test_two_processes_share_one_webhook_queue_through_sentinel(two_sidecars):
    """Through Sentinel: ten events raised on two processes give ten deliveries with ten distinct ids."""
    first, second, receiver = two_sidecars
    for i in range(10):
        sidecar = first if i % 2 else second
        assert httpx.post(f"{sidecar.url}/pay/{i}", headers={"X-Client-Token": TOKEN}).status_code == 200
    deadline = time.monotonic() + 15
    while len(receiver.ids) < 10 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # a duplicate would arrive now
    assert len(receiver.ids) == 10
    assert len(set(receiver.ids)) == 10
