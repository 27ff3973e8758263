"""Webhooks (SPEC §8, issue 6): signed deliveries of route `emit` and admin events, retried with backoff,
dead-lettered and retried by hand, durable in Redis across a killed process, shared by two processes, and
refused for private addresses. Real Redis, real receivers, real sidecars."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from redis_support import redis_url  # noqa: F401  (fixture)
from standardwebhooks import Webhook, WebhookVerificationError
from test_jwt_routes import captured_audit

from sidecar.echo import read_body
from sidecar.state.client_token_store import new_token, token_hash
from sidecar.testing import SidecarProcess, running_sidecar, serve_in_thread
from sidecar.webhooks.redis_queue import GROUP, STREAM

ADMIN = "test-admin-token-0123456789abcdef"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}
PARTNER_TOKEN = new_token()
SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
NEXT_SECRET = "whsec_" + base64.b64encode(b"n" * 32).decode()
SEED_REPLY = {"client-transaction": [{"idtransaction": 1, "idcliente": "01400-2", "valorpago": 10}]}
FAST_RETRY = {"initial": "50ms", "max_delay": "200ms", "max_attempts": 3}


@dataclass
class Hook:
    headers: dict[str, str]
    body: bytes

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]

    def verified(self, secret: str = SECRET) -> Any:
        return Webhook(secret).verify(self.body, self.headers)


class Receiver:
    """A webhook receiver that records every delivery; it can fail the first N, answer a fixed status, or
    stall (hold the request open) until told to stop."""

    def __init__(self) -> None:
        self.hooks: list[Hook] = []
        self.fail_first = 0
        self.status = 204
        self.stalled = threading.Event()
        self.url = ""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = await read_body(receive)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        self.hooks.append(Hook(headers, body))
        while self.stalled.is_set():
            await asyncio.sleep(0.02)
        status = 500 if len(self.hooks) <= self.fail_first else self.status
        extra = [(b"location", b"/elsewhere")] if 300 <= status < 400 else []
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-length", b"0"), *extra]})
        await send({"type": "http.response.body", "body": b""})


async def transactions_upstream(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The backend behind the emit route: answers a payment with the JSON of seed 000."""
    while (await receive()).get("more_body"):
        pass
    body = json.dumps(SEED_REPLY).encode()
    await send({"type": "http.response.start", "status": 201,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
def receiver():
    app = Receiver()
    with serve_in_thread(app) as url:
        app.url = url + "/hooks"
        yield app
        app.stalled.clear()


@pytest.fixture(scope="module")
def upstream_url():
    with serve_in_thread(transactions_upstream) as url:
        yield url


def config(upstream: str, redis: str | None, **webhook: Any) -> dict[str, Any]:
    hook = {"id": "erp", "url": webhook.pop("url"), "events": ["client-transaction", "client.token.created"],
            "secret": SECRET, "allow_private": True, "timeout": "1s", "retry": FAST_RETRY, **webhook}
    return {
        "version": 1, "upstream": upstream, "redis": redis, "admin": {"token": ADMIN},
        "authenticators": {"client_token": {"type": "client_token"}},
        "clients": [{"id": "01400-2", "name": "Parceiro X", "tokens": [f"sha256:{token_hash(PARTNER_TOKEN)}"]}],
        "routes": [{"id": "transactions", "match": {"path": "/api/v1/transactions/**"}, "auth": ["client_token"],
                    "emit": [{"event": "client-transaction", "when": "2xx"}]}],
        "webhooks": [hook],
    }


def pay(base_url: str) -> httpx.Response:
    response = httpx.post(base_url + "/api/v1/transactions/pay", json={"valor": 10},
                          headers={"X-Client-Token": PARTNER_TOKEN}, timeout=10)
    assert response.status_code == 201, response.text
    return response


def wait_for(predicate: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return value


def deliveries(admin_url: str, status: str | None = None) -> list[dict[str, Any]]:
    params = {"status": status} if status else {}
    response = httpx.get(admin_url + "/admin/webhooks/deliveries", params=params, headers=ADMIN_HEADERS)
    assert response.status_code == 200, response.text
    return response.json()["deliveries"]


def metric(admin_url: str, outcome: str) -> float:
    for line in httpx.get(admin_url + "/metrics").text.splitlines():
        if line.startswith(f'sidecar_webhook_deliveries_total{{outcome="{outcome}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_emit_route_delivers_one_signed_event_without_credentials(receiver, upstream_url, redis_url):  # noqa: F811
    """A POST on an emit route: one delivery, signed, with the upstream's JSON plus client and route, no credential."""
    with running_sidecar(config(upstream_url, redis_url, url=receiver.url)) as sc:
        pay(sc.url)
        assert wait_for(lambda: deliveries(sc.admin_url, "delivered"))
        time.sleep(0.3)  # room for a duplicate to show up
        assert len(receiver.hooks) == 1
        hook = receiver.hooks[0]
        payload = hook.verified()
        assert set(payload) == {"type", "timestamp", "data"}
        assert payload["type"] == "client-transaction"
        assert payload["data"] == {**SEED_REPLY, "client": "01400-2", "route": "transactions"}
        assert abs(time.time() - _epoch(payload["timestamp"])) < 10
        assert hook.headers["content-type"] == "application/json"
        assert hook.headers["webhook-signature"].startswith("v1,")
        assert " " not in hook.headers["webhook-signature"]
        assert "authorization" not in hook.headers and "x-client-token" not in hook.headers
        assert PARTNER_TOKEN not in hook.body.decode() + json.dumps(hook.headers)
        [listed] = deliveries(sc.admin_url)
        assert listed["id"] == hook.id
        assert {k: listed[k] for k in ("event", "webhook", "status", "attempts", "last_error", "next_attempt_at")} == {
            "event": "client-transaction", "webhook": "erp", "status": "delivered", "attempts": 1,
            "last_error": None, "next_attempt_at": None}
        assert metric(sc.admin_url, "delivered") == 1.0


def _epoch(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def test_receiver_failing_twice_gets_three_attempts_with_one_id(receiver, upstream_url, redis_url):  # noqa: F811
    """Two 500s then a 2xx: three attempts, the same webhook-id, each signature valid; then delivered."""
    receiver.fail_first = 2
    with running_sidecar(config(upstream_url, redis_url, url=receiver.url)) as sc:
        pay(sc.url)
        [listed] = wait_for(lambda: deliveries(sc.admin_url, "delivered"))
        assert len(receiver.hooks) == 3
        assert {hook.id for hook in receiver.hooks} == {listed["id"]}
        assert [hook.verified()["type"] for hook in receiver.hooks] == ["client-transaction"] * 3
        assert listed["attempts"] == 3
        assert (metric(sc.admin_url, "retry"), metric(sc.admin_url, "delivered")) == (2.0, 1.0)


def test_failed_delivery_is_listed_then_retried_by_hand(receiver, upstream_url, redis_url):  # noqa: F811
    """A receiver always failing: failed after max_attempts in the admin API; a manual retry delivers it."""
    receiver.status = 500
    with running_sidecar(config(upstream_url, redis_url, url=receiver.url)) as sc:
        pay(sc.url)
        [failed] = wait_for(lambda: deliveries(sc.admin_url, "failed"))
        assert (failed["status"], failed["attempts"], failed["last_error"], failed["next_attempt_at"]) == (
            "failed", 3, "HTTP 500 (gave up after 3 attempts)", None)
        assert deliveries(sc.admin_url, "pending") == []
        assert metric(sc.admin_url, "failed") == 1.0
        retry_url = f"{sc.admin_url}/admin/webhooks/deliveries/{failed['id']}/retry"
        assert httpx.post(retry_url).status_code == 401

        receiver.status = 204
        response = httpx.post(retry_url, headers=ADMIN_HEADERS)
        assert response.status_code == 202
        assert (response.json()["status"], response.json()["attempts"]) == ("pending", 0)
        [delivered] = wait_for(lambda: deliveries(sc.admin_url, "delivered"))
        assert (delivered["id"], delivered["attempts"], delivered["last_error"]) == (failed["id"], 1, None)
        assert len(receiver.hooks) == 4 and {h.id for h in receiver.hooks} == {failed["id"]}
        assert deliveries(sc.admin_url, "failed") == []

        again = httpx.post(retry_url, headers=ADMIN_HEADERS)
        assert (again.status_code, again.json()["error"]) == (409, "conflict")
        missing = httpx.post(f"{sc.admin_url}/admin/webhooks/deliveries/msg_nope/retry", headers=ADMIN_HEADERS)
        assert (missing.status_code, missing.json()["error"]) == (404, "not_found")
        bad = httpx.get(sc.admin_url + "/admin/webhooks/deliveries?status=lost", headers=ADMIN_HEADERS)
        assert (bad.status_code, bad.json()["error"]) == (400, "invalid_request")


def test_webhook_admin_calls_are_audited_as_admin_actions(receiver, upstream_url):
    """The deliveries' admin routes sit behind the admin token, each call an admin audit line naming its action."""
    with running_sidecar(config(upstream_url, None, url=receiver.url)) as sc, captured_audit(sc) as buffer:
        assert deliveries(sc.admin_url) == []
        retry = httpx.post(f"{sc.admin_url}/admin/webhooks/deliveries/msg_nope/retry")
        assert (retry.status_code, retry.json()["error"]) == (401, "invalid_token")

        def admin_lines() -> list[tuple[str, str, int]]:
            lines = [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]
            return [(line["action"], line["method"], line["status"]) for line in lines if line["kind"] == "admin"]

        assert wait_for(lambda: len(admin_lines()) == 2)
        assert admin_lines() == [("webhooks.deliveries", "GET", 200), ("webhooks.retry", "POST", 401)]


def test_slow_receiver_never_holds_up_the_proxy(receiver, upstream_url, redis_url):  # noqa: F811
    """With the receiver stalled (20 s timeout), emit-route replies still come straight back."""
    receiver.stalled.set()
    with running_sidecar(config(upstream_url, redis_url, url=receiver.url, timeout="20s")) as sc:
        pay(sc.url)
        assert wait_for(lambda: receiver.hooks)
        started = time.monotonic()
        for _ in range(20):
            pay(sc.url)
        assert time.monotonic() - started < 5.0  # waiting on the receiver even once would take 20 s
        assert [d["status"] for d in deliveries(sc.admin_url)] == ["pending"] * 21
        receiver.stalled.clear()


def test_secret_rotation_gives_one_signature_per_secret(receiver, upstream_url, redis_url):  # noqa: F811
    """Two secrets: two space-separated v1 signatures; each secret alone verifies, a stranger's does not."""
    with running_sidecar(config(upstream_url, redis_url, url=receiver.url, secret=[SECRET, NEXT_SECRET])) as sc:
        pay(sc.url)
        assert wait_for(lambda: deliveries(sc.admin_url, "delivered"))
    [hook] = receiver.hooks
    signatures = hook.headers["webhook-signature"].split(" ")
    assert [s[:3] for s in signatures] == ["v1,", "v1,"] and signatures[0] != signatures[1]
    assert hook.verified(SECRET) == hook.verified(NEXT_SECRET)
    for secret in (SECRET, NEXT_SECRET):
        alone = {**hook.headers, "webhook-signature": signatures[[SECRET, NEXT_SECRET].index(secret)]}
        assert Webhook(secret).verify(hook.body, alone)["type"] == "client-transaction"
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + base64.b64encode(b"x" * 32).decode()).verify(hook.body, hook.headers)


def test_410_gone_disables_the_webhook(receiver, upstream_url, redis_url):  # noqa: F811
    """A 410 answer: the delivery fails at once, the webhook gets nothing more, the metric says disabled."""
    receiver.status = 410
    with running_sidecar(config(upstream_url, redis_url, url=receiver.url)) as sc:
        pay(sc.url)
        [failed] = wait_for(lambda: deliveries(sc.admin_url, "failed"))
        assert failed["attempts"] == 1
        assert failed["last_error"].startswith("HTTP 410 Gone: the receiver ended the subscription")
        pay(sc.url)
        time.sleep(0.3)
        assert len(receiver.hooks) == 1
        assert len(deliveries(sc.admin_url)) == 1
        assert metric(sc.admin_url, "disabled") == 1.0


def test_redirect_is_not_followed(receiver, upstream_url, redis_url):  # noqa: F811
    """A 3xx answer is a failed attempt; the Location is never fetched."""
    receiver.status = 302
    hook = config(upstream_url, redis_url, url=receiver.url, retry={**FAST_RETRY, "max_attempts": 1})
    with running_sidecar(hook) as sc:
        pay(sc.url)
        [failed] = wait_for(lambda: deliveries(sc.admin_url, "failed"))
        assert failed["last_error"] == "HTTP 302 (redirects are not followed) (gave up after 1 attempts)"
        assert len(receiver.hooks) == 1


def test_token_minted_through_admin_api_is_announced(receiver, upstream_url, redis_url):  # noqa: F811
    """Minting a client token sends client.token.created, without the token itself."""
    with running_sidecar(config(upstream_url, redis_url, url=receiver.url)) as sc:
        minted = httpx.post(sc.admin_url + "/admin/clients/01400-2/tokens", headers=ADMIN_HEADERS)
        assert minted.status_code == 201
        assert wait_for(lambda: deliveries(sc.admin_url, "delivered"))
    [hook] = receiver.hooks
    payload = hook.verified()
    assert payload["type"] == "client.token.created"
    assert payload["data"]["client"] == "01400-2"
    assert payload["data"]["token_id"] == minted.json()["id"]
    assert minted.json()["token"] not in hook.body.decode()


def test_auth_refused_is_sent_only_when_subscribed(receiver, upstream_url, redis_url):  # noqa: F811
    """A refused request raises auth.refused for a webhook subscribed to it — without the presented token."""
    with running_sidecar(config(upstream_url, redis_url, url=receiver.url,
                                events=["auth.refused"])) as sc:
        response = httpx.get(sc.url + "/api/v1/transactions/1", headers={"X-Client-Token": "sct_forged-token"})
        assert response.status_code == 401
        assert wait_for(lambda: deliveries(sc.admin_url, "delivered"))
    [hook] = receiver.hooks
    payload = hook.verified()
    assert payload["type"] == "auth.refused"
    assert payload["data"]["route"] == "transactions"
    assert payload["data"]["reason"] == "invalid_token"
    assert payload["data"]["status"] == 401
    assert "sct_forged-token" not in hook.body.decode()


def test_auth_refused_is_not_sent_unless_subscribed(receiver, upstream_url, redis_url):  # noqa: F811
    """Without a subscription, refusals raise no delivery (auth.refused is opt-in)."""
    with running_sidecar(config(upstream_url, redis_url, url=receiver.url, events=["*"])) as sc:
        assert httpx.get(sc.url + "/api/v1/transactions/1").status_code == 401
        time.sleep(0.5)
        assert deliveries(sc.admin_url) == []
    assert receiver.hooks == []


def test_name_resolving_to_loopback_is_refused_without_allow_private(receiver, upstream_url, redis_url,  # noqa: F811
                                                                     monkeypatch):
    """A webhook host whose DNS answer is 127.0.0.1 gets nothing unless allow_private: true; then the
    connection goes to the checked address with the name in Host."""
    async def resolve(host: str, port: int) -> list[str]:
        assert host == "hooks.partner.test"
        return ["127.0.0.1"]

    monkeypatch.setattr("sidecar.outbound.guard._system_resolve", resolve)
    url = receiver.url.replace("127.0.0.1", "hooks.partner.test")
    with running_sidecar(config(upstream_url, redis_url, url=url, allow_private=False)) as sc:
        pay(sc.url)
        [failed] = wait_for(lambda: deliveries(sc.admin_url, "failed"))
    assert failed["attempts"] == 1
    assert failed["last_error"] == ("hooks.partner.test resolves to 127.0.0.1 (loopback); deliveries there are "
                                    "refused unless the webhook sets allow_private: true")
    assert receiver.hooks == []

    with running_sidecar(config(upstream_url, redis_url, url=url, allow_private=True)) as sc:
        pay(sc.url)
        assert wait_for(lambda: receiver.hooks)
    assert receiver.hooks[0].headers["host"] == url.split("/")[2]


def test_without_redis_the_in_process_queue_retries(receiver, upstream_url):
    """No Redis: the in-process queue retries a failure and lists the delivery."""
    receiver.fail_first = 1
    with running_sidecar(config(upstream_url, None, url=receiver.url)) as sc:
        pay(sc.url)
        [delivered] = wait_for(lambda: deliveries(sc.admin_url, "delivered"))
    assert delivered["attempts"] == 2
    assert [h.id for h in receiver.hooks] == [delivered["id"]] * 2


def _config_file(tmp_path: Path, upstream: str, redis: str, receiver_url: str, **webhook: Any) -> Path:
    path = tmp_path / "sidecar.yaml"
    path.write_text(json.dumps(config(upstream, redis, url=receiver_url, **webhook)))
    return path


def test_killed_process_leaves_its_delivery_to_the_next(receiver, upstream_url, redis_url, tmp_path):  # noqa: F811
    """SIGKILL a sidecar mid-delivery (receiver stalled): a new process takes the delivery over and sends it."""
    path = _config_file(tmp_path, upstream_url, redis_url, receiver.url, timeout="20s")
    receiver.stalled.set()
    first = SidecarProcess(path)
    try:
        pay(first.url)
        assert wait_for(lambda: receiver.hooks)
    finally:
        first.process.kill()
        first.stop()
    receiver.stalled.clear()
    with SidecarProcess(path) as second:
        assert wait_for(lambda: len(receiver.hooks) == 2, timeout=15)
        [delivered] = wait_for(lambda: deliveries(second.admin_url, "delivered"))
    assert [h.id for h in receiver.hooks] == [delivered["id"]] * 2
    assert receiver.hooks[1].verified()["data"]["route"] == "transactions"
    assert delivered["attempts"] == 2


def test_stopped_process_hands_its_delivery_back(receiver, upstream_url, redis_url, tmp_path):  # noqa: F811
    """SIGTERM mid-delivery: the unfinished delivery goes back to the queue at once (no lease to wait out)."""
    path = _config_file(tmp_path, upstream_url, redis_url, receiver.url, timeout="20s")
    receiver.stalled.set()
    with SidecarProcess(path) as first:
        pay(first.url)
        assert wait_for(lambda: receiver.hooks)
    stream = redis.Redis.from_url(redis_url, decode_responses=True)
    assert stream.xpending(STREAM, GROUP)["pending"] == 0  # nobody holds it: no lease to wait out
    assert [fields["d"] for _, fields in stream.xrange(STREAM)] == [receiver.hooks[0].id]
    stream.close()
    receiver.stalled.clear()
    with SidecarProcess(path) as second:
        assert wait_for(lambda: deliveries(second.admin_url, "delivered"))
    assert len(receiver.hooks) == 2 and receiver.hooks[0].id == receiver.hooks[1].id


def test_two_processes_share_one_queue(receiver, upstream_url, redis_url, tmp_path):  # noqa: F811
    """Two sidecars on one Redis, ten events: ten deliveries, ten distinct ids, no duplicates."""
    path = _config_file(tmp_path, upstream_url, redis_url, receiver.url)
    with SidecarProcess(path) as one, SidecarProcess(path) as two:
        for i in range(10):
            pay((one, two)[i % 2].url)
        assert wait_for(lambda: len(deliveries(one.admin_url, "delivered")) == 10)
        time.sleep(0.5)
        assert len(deliveries(two.admin_url, "delivered")) == 10
    assert len(receiver.hooks) == 10
    assert len({h.id for h in receiver.hooks}) == 10
    assert all(h.verified()["type"] == "client-transaction" for h in receiver.hooks)


def test_check_refuses_the_metadata_address(tmp_path):
    """`sidecar check` refuses a webhook at http://169.254.169.254/... with FILE:LINE and the fix."""
    text = f"""version: 1
upstream: http://127.0.0.1:9
routes: []
webhooks:
  - id: erp
    url: http://169.254.169.254/latest/meta-data
    events: [client-transaction]
    secret: {SECRET}
"""
    path = tmp_path / "sidecar.yaml"
    path.write_text(text)
    result = subprocess.run([sys.executable, "-m", "sidecar", "check", "--config", str(path)], capture_output=True,
                            text=True, env={**os.environ, "SIDECAR_CONFIG": ""})
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{path}:6: webhooks[0].url: the webhook URL points at 169.254.169.254 (link-local, where cloud metadata "
        "services live), where deliveries are refused; use a public URL, or set allow_private: true on this "
        "webhook if the receiver is meant to be internal"]
    path.write_text(text + "    allow_private: true\n")
    allowed = subprocess.run([sys.executable, "-m", "sidecar", "check", "--config", str(path)], capture_output=True,
                             text=True)
    assert allowed.returncode == 0, allowed.stderr


@pytest.mark.parametrize("url", ["http://127.1/hooks", "http://2130706433/", "http://0x7f000001/",
                                 "http://0177.0.0.1/", "http://[::ffff:127.0.0.1]/", "http://10.0.0.5/",
                                 "http://[fd00:ec2::254]/", "http://100.64.1.1/", "http://localhost:8080/"])
def test_check_refuses_literal_private_addresses(url):
    """Every spelling of a private or loopback address is refused at load, naming the fix."""
    from sidecar.config.loader import parse
    from sidecar.config.yaml_lines import ConfigError

    text = json.dumps({"version": 1, "upstream": "http://127.0.0.1:9", "webhooks": [
        {"id": "erp", "url": url, "events": ["x"], "secret": SECRET}]})
    with pytest.raises(ConfigError) as caught:
        parse(text, "f.yaml", {})
    [error] = caught.value.errors
    assert error.startswith("f.yaml:1: webhooks[0].url: the webhook URL points at ")
    assert error.endswith("set allow_private: true on this webhook if the receiver is meant to be internal")


@pytest.mark.parametrize(("secret", "ok"), [
    (SECRET, True), ([SECRET, NEXT_SECRET], True), ("k" * 44, False), ("whsec_not*base64", False),
    ("whsec_" + base64.b64encode(b"short").decode(), False), ([], False),
])
def test_secret_must_be_whsec_base64(secret, ok):
    """Secrets are whsec_ + base64 of 24-64 bytes; a bad one is refused without echoing it."""
    from sidecar.config.loader import parse
    from sidecar.config.yaml_lines import ConfigError

    text = json.dumps({"version": 1, "upstream": "http://127.0.0.1:9", "webhooks": [
        {"id": "erp", "url": "https://hooks.example/in", "events": ["x"], "secret": secret}]})
    if ok:
        assert "secret" not in repr(parse(text, "f.yaml", {}).config.webhooks[0])
        return
    with pytest.raises(ConfigError) as caught:
        parse(text, "f.yaml", {})
    [error] = caught.value.errors
    assert error.startswith("f.yaml:1: webhooks[0].secret: ")
    assert (secret if isinstance(secret, str) else "k" * 44) not in error


async def test_work_read_but_not_started_is_handed_back_whole(redis_url):  # noqa: F811
    """A process stopping with entries read but not yet attempted hands them back, payload and all."""
    from sidecar.state.store import connect
    from sidecar.webhooks.queue import Delivery
    from sidecar.webhooks.redis_queue import RedisQueue

    client = connect(redis_url)
    try:
        leaving, staying = RedisQueue(client), RedisQueue(client)
        await leaving.start()
        delivery = Delivery.new("client-transaction", "erp", '{"type":"client-transaction"}', time.time())
        await leaving.add([delivery])
        assert [t.delivery for t in await leaving.read(10, 0.1)] == [delivery.id]
        await leaving.release([])
        [ticket] = await staying.read(10, 0.1)
        begun = await staying.begin(ticket)
        assert (begun.id, begun.body, begun.attempts, begun.status) == (delivery.id, delivery.body, 1, "pending")
    finally:
        await client.aclose()


async def test_due_retries_are_moved_back_once_however_many_processes_look(redis_url):  # noqa: F811
    """Four processes promoting the same due retries at once: each goes back to the stream exactly once."""
    from sidecar.state.store import connect
    from sidecar.webhooks.redis_queue import DUE, STREAM, RedisQueue

    client = connect(redis_url)
    try:
        queues = [RedisQueue(client) for _ in range(4)]
        await queues[0].start()
        await client.zadd(DUE, {f"msg_{i}": 0 for i in range(200)})
        for _ in range(3):
            await asyncio.gather(*(q.promote() for q in queues))
        entries = await client.xrange(STREAM)
        assert sorted(fields["d"] for _, fields in entries) == sorted(f"msg_{i}" for i in range(200))
        assert await client.zcard(DUE) == 0
    finally:
        await client.aclose()
