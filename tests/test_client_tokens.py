"""Client access tokens (seed 000): lookup by hash, per-client routes, minting, rotation, revocation within
a second everywhere, Redis failing closed, the admin API."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from redis_support import redis_url  # noqa: F401  (fixture)

from sidecar.state.client_token_store import new_token, token_hash
from sidecar.testing import SidecarProcess, free_port, recording_upstream, running_sidecar

ADMIN = "test-admin-token-0123456789abcdef"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}
PARTNER_TOKEN = new_token()
OTHER_TOKEN = new_token()


def config(upstream: str, redis: str | None) -> str:
    return json.dumps({
        "version": 1,
        "upstream": upstream,
        "redis": redis,
        "admin": {"token": ADMIN},
        "authenticators": {"client_token": {"type": "client_token"}},
        "clients": [
            {"id": "01400-2", "name": "Parceiro X", "tokens": [f"sha256:{token_hash(PARTNER_TOKEN)}"],
             "routes": ["transactions"], "scopes": ["/btb"]},
            {"id": "77", "name": "Other", "tokens": [f"sha256:{token_hash(OTHER_TOKEN)}"]},
        ],
        "routes": [
            {"id": "transactions", "match": {"path": "/api/v1/transactions/**"}, "auth": ["client_token"]},
            {"id": "reports", "match": {"path": "/api/v1/reports/**"}, "auth": ["client_token"]},
        ],
    })


@pytest.fixture
def upstream():
    with recording_upstream() as up:
        yield up


@pytest.fixture
def sidecar(upstream, redis_url):  # noqa: F811
    with running_sidecar(config(upstream.url, redis_url)) as sc:
        yield sc


@pytest.mark.parametrize("headers", [
    {"X-Client-Token": PARTNER_TOKEN},
    {"Authorization": f"Bearer {PARTNER_TOKEN}"},
    {"Authorization": f"bearer {PARTNER_TOKEN}"},
    {"X-Client-Token": "", "Authorization": f"Bearer {PARTNER_TOKEN}"},
], ids=["header", "bearer", "bearer_lower_case", "blank_header_then_bearer"])
def test_token_accepted_and_never_forwarded(sidecar, upstream, headers):
    """Header and Bearer forms are accepted (a blank X-Client-Token is no token: the Bearer one is read); the
    upstream sees X-Auth-Client and never the token."""
    response = httpx.get(sidecar.url + "/api/v1/transactions/1?x=1", headers=headers)
    assert response.status_code == 200
    got = upstream.last
    assert got.header("x-auth-client") == "01400-2"
    assert got.header("x-auth-subject") == "01400-2"
    assert got.header("x-auth-method") == "client_token"
    assert got.header("x-auth-scopes") == "/btb"
    assert "x-client-token" not in got.header_names()
    assert "authorization" not in got.header_names()
    assert PARTNER_TOKEN not in json.dumps(got.headers) + got.query


def test_route_outside_client_routes_is_403(sidecar, upstream):
    """A client calling a route outside its `routes` gets 403 route_not_allowed; the upstream is untouched."""
    response = httpx.get(sidecar.url + "/api/v1/reports/1", headers={"X-Client-Token": PARTNER_TOKEN})
    assert response.status_code == 403
    assert response.json()["error"] == "route_not_allowed"
    assert upstream.received == []


@pytest.mark.parametrize(("token", "error"), [("sct_unknown", "invalid_token"), ("", "missing_credentials"),
                                            ("x" * 5000, "invalid_token")])
def test_unknown_empty_or_oversized_token_is_401(sidecar, upstream, token, error):
    """Unknown and oversized tokens are refused with 401 and never echoed; an empty one is no credential (SPEC §3)."""
    response = httpx.get(sidecar.url + "/api/v1/transactions/1", headers={"X-Client-Token": token})
    assert response.status_code == 401
    assert response.json()["error"] == error
    assert response.headers["www-authenticate"].startswith('Bearer realm="sidecar"')
    if token:
        assert token not in response.text
    assert upstream.received == []


def test_missing_token_is_401(sidecar, upstream):
    """No credential at all: 401 missing_credentials."""
    response = httpx.get(sidecar.url + "/api/v1/transactions/1")
    assert response.status_code == 401
    assert response.json()["error"] == "missing_credentials"
    assert upstream.received == []


def test_duplicated_token_header_is_refused(sidecar, upstream):
    """Two X-Client-Token headers: refused 400 (backends disagree on which copy wins)."""
    response = httpx.get(sidecar.url + "/api/v1/transactions/1",
                         headers=[("X-Client-Token", PARTNER_TOKEN), ("X-Client-Token", OTHER_TOKEN)])
    assert response.status_code == 400
    assert upstream.received == []


def mint(sc, client="01400-2") -> dict:
    response = httpx.post(f"{sc.admin_url}/admin/clients/{client}/tokens", headers=ADMIN_HEADERS)
    assert response.status_code == 201, response.text
    return response.json()


def wait_refused(url: str, token: str, within: float = 1.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < within + 2:
        status = httpx.get(url + "/api/v1/transactions/1", headers={"X-Client-Token": token}).status_code
        if status == 401:
            return time.monotonic() - started
        assert status == 200
        time.sleep(0.02)
    raise AssertionError("the revoked token was still accepted")


def test_mint_rotate_revoke(sidecar, upstream):
    """Mint a token, use it, keep the old one working during rotation, revoke: refused within 1 s."""
    minted = mint(sidecar)
    assert set(minted) == {"id", "client", "token", "created"}
    assert minted["client"] == "01400-2" and minted["token"].startswith("sct_")
    new = minted["token"]
    for token in (new, PARTNER_TOKEN):  # both work during rotation
        assert httpx.get(sidecar.url + "/api/v1/transactions/1", headers={"X-Client-Token": token}).status_code == 200
    response = httpx.delete(f"{sidecar.admin_url}/admin/clients/01400-2/tokens/{minted['id']}", headers=ADMIN_HEADERS)
    assert response.status_code == 204
    assert wait_refused(sidecar.url, new) < 1.0
    assert httpx.get(sidecar.url + "/api/v1/transactions/1",
                     headers={"X-Client-Token": PARTNER_TOKEN}).status_code == 200


def test_yaml_token_can_be_revoked(sidecar):
    """A token from the YAML can be revoked through the admin API too (by its listed id)."""
    listing = httpx.get(sidecar.admin_url + "/admin/clients", headers=ADMIN_HEADERS).json()
    partner = next(c for c in listing["clients"] if c["id"] == "01400-2")
    token_id = partner["tokens"][0]["id"]
    assert httpx.get(sidecar.url + "/api/v1/transactions/1",
                     headers={"X-Client-Token": PARTNER_TOKEN}).status_code == 200
    response = httpx.delete(f"{sidecar.admin_url}/admin/clients/01400-2/tokens/{token_id}", headers=ADMIN_HEADERS)
    assert response.status_code == 204
    assert wait_refused(sidecar.url, PARTNER_TOKEN) < 1.0


def test_revoking_another_clients_token_is_404(sidecar):
    """A token id of another client cannot be revoked through this client's path."""
    minted = mint(sidecar, "77")
    response = httpx.delete(f"{sidecar.admin_url}/admin/clients/01400-2/tokens/{minted['id']}", headers=ADMIN_HEADERS)
    assert response.status_code == 404


def test_revoking_twice_answers_204_both_times(sidecar):
    """A retried revocation (the first answer lost, say) answers 204 again, never 404, and the token stays refused."""
    minted = mint(sidecar)
    url = f"{sidecar.admin_url}/admin/clients/01400-2/tokens/{minted['id']}"
    assert [httpx.delete(url, headers=ADMIN_HEADERS).status_code for _ in range(2)] == [204, 204]
    assert wait_refused(sidecar.url, minted["token"]) < 1.0
    listing = httpx.get(sidecar.admin_url + "/admin/clients", headers=ADMIN_HEADERS).json()
    partner = next(c for c in listing["clients"] if c["id"] == "01400-2")
    assert minted["id"] not in [t["id"] for t in partner["tokens"]]


def test_tokens_of_the_old_key_layout_keep_working_and_can_be_revoked(upstream, redis_url):  # noqa: F811
    """A token minted under the key layout before `{client}` hash tags works, is listed, and its revocation answers
    204 and refuses it; a YAML token revoked under the old layout stays revoked."""
    import redis

    old_token = new_token()
    record = {"id": "tok_0123456789ab", "client": "01400-2", "created": "2024-01-02T03:04:05Z", "last4": old_token[-4:]}
    with redis.Redis.from_url(redis_url) as client:
        client.set(f"sidecar:token:{{{token_hash(old_token)}}}", json.dumps(record))
        client.set("sidecar:token-id:tok_0123456789ab", json.dumps({**record, "hash": token_hash(old_token)}))
        client.sadd("sidecar:client-tokens:01400-2", "tok_0123456789ab")
        client.set(f"sidecar:revoked:{{{token_hash(OTHER_TOKEN)}}}", "1")
    with running_sidecar(config(upstream.url, redis_url)) as sc:
        assert httpx.get(sc.url + "/api/v1/transactions/1", headers={"X-Client-Token": old_token}).status_code == 200
        assert httpx.get(sc.url + "/api/v1/reports/1", headers={"X-Client-Token": OTHER_TOKEN}).status_code == 401
        listing = httpx.get(sc.admin_url + "/admin/clients", headers=ADMIN_HEADERS).json()
        partner = next(c for c in listing["clients"] if c["id"] == "01400-2")
        assert {"id": "tok_0123456789ab", "source": "admin", "last4": old_token[-4:], "created": record["created"],
                "last_used": None, "revoked": False} in partner["tokens"]
        url = f"{sc.admin_url}/admin/clients/01400-2/tokens/tok_0123456789ab"
        assert httpx.delete(url, headers=ADMIN_HEADERS).status_code == 204
        assert wait_refused(sc.url, old_token) < 1.0
        assert httpx.delete(url, headers=ADMIN_HEADERS).status_code == 204


def test_a_revocation_whose_announcement_failed_is_announced_later(upstream, redis_url):  # noqa: F811
    """The announcement fails once after the revocation is stored (faked: Redis cannot be made to refuse PUBLISH
    alone): the caller gets 503, this process refuses the token at once, the other process within a few seconds
    (announced again in the background), and the retried revocation answers 204."""
    from sidecar.errors import DependencyUnavailable

    with running_sidecar(config(upstream.url, redis_url)) as first, \
            running_sidecar(config(upstream.url, redis_url)) as second:
        minted = mint(first)
        for sc in (first, second):
            assert httpx.get(sc.url + "/api/v1/transactions/1",
                             headers={"X-Client-Token": minted["token"]}).status_code == 200
        store = first.services.store
        publish = store.publish

        async def failing_once(channel, message):
            store.publish = publish
            raise DependencyUnavailable("the shared store (Redis) is unavailable")

        store.publish = failing_once
        url = f"{first.admin_url}/admin/clients/01400-2/tokens/{minted['id']}"
        assert httpx.delete(url, headers=ADMIN_HEADERS).status_code == 503
        assert httpx.get(first.url + "/api/v1/transactions/1",
                         headers={"X-Client-Token": minted["token"]}).status_code == 401
        assert wait_refused(second.url, minted["token"], within=2.0) < 2.0
        assert httpx.delete(url, headers=ADMIN_HEADERS).status_code == 204


def test_revocation_reaches_another_process_within_a_second(upstream, redis_url, tmp_path):  # noqa: F811
    """Revoke on one process while another holds an accepted verdict in its local cache: it refuses within 1 s."""
    path = tmp_path / "sidecar.yaml"
    path.write_text(config(upstream.url, redis_url))
    with SidecarProcess(path) as first, SidecarProcess(path) as second:
        minted = mint(first)
        for _ in range(3):  # warm the second process's local verdict cache
            assert httpx.get(second.url + "/api/v1/transactions/1",
                             headers={"X-Client-Token": minted["token"]}).status_code == 200
        response = httpx.delete(f"{first.admin_url}/admin/clients/01400-2/tokens/{minted['id']}",
                                headers=ADMIN_HEADERS)
        assert response.status_code == 204
        assert wait_refused(second.url, minted["token"]) < 1.0


def test_minted_token_survives_restart(upstream, redis_url):  # noqa: F811
    """A token minted before a restart still works after it (it lives in Redis)."""
    with running_sidecar(config(upstream.url, redis_url)) as sc:
        token = mint(sc)["token"]
    with running_sidecar(config(upstream.url, redis_url)) as sc:
        assert httpx.get(sc.url + "/api/v1/transactions/1", headers={"X-Client-Token": token}).status_code == 200


def test_redis_unreachable_fails_closed(upstream):
    """Redis configured but unreachable: 503 dependency_unavailable, never 200; /readyz stays 200 (Redis is shared
    by every replica) and its body says Redis is unreachable and what fails closed."""
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with running_sidecar(config(upstream.url, dead)) as sc:
        started = time.monotonic()
        response = httpx.get(sc.url + "/api/v1/transactions/1", headers={"X-Client-Token": PARTNER_TOKEN})
        assert response.status_code == 503
        assert time.monotonic() - started < 0.5
        assert response.json()["error"] == "dependency_unavailable"
        assert upstream.received == []
        ready = httpx.get(sc.admin_url + "/readyz")
        assert ready.status_code == 200
        redis = ready.json()["redis"]
        assert (redis["mode"], redis["reachable"], redis["revocations_channel"]) == ("standalone", False, "down")
        assert redis["error"] == "connection refused"
        assert "authenticator client_token: client tokens" in redis["failing_closed"]
        metrics = httpx.get(sc.admin_url + "/metrics").text
        assert "sidecar_redis_up 0.0" in metrics
        assert "sidecar_redis_revocations_listening 0.0" in metrics


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {ADMIN}"}])
def test_admin_api_requires_the_admin_token(sidecar, headers):
    """The admin API without, or with a wrong, admin token: 401."""
    assert httpx.get(sidecar.admin_url + "/admin/clients", headers=headers).status_code == 401
    assert httpx.post(sidecar.admin_url + "/admin/clients/77/tokens", headers=headers).status_code == 401


def test_listing_exposes_no_token_or_hash(sidecar):
    """The client listing shows ids, names, token ids and last four characters — never a token or its hash."""
    minted = mint(sidecar)
    httpx.get(sidecar.url + "/api/v1/transactions/1", headers={"X-Client-Token": minted["token"]})
    text = httpx.get(sidecar.admin_url + "/admin/clients", headers=ADMIN_HEADERS).text
    assert minted["token"] not in text
    for secret in (PARTNER_TOKEN, minted["token"]):
        assert token_hash(secret) not in text
        assert token_hash(secret)[:16] not in text
    partner = next(c for c in json.loads(text)["clients"] if c["id"] == "01400-2")
    assert partner["name"] == "Parceiro X"
    minted_entry = next(t for t in partner["tokens"] if t["id"] == minted["id"])
    assert minted_entry["last4"] == minted["token"][-4:]


def test_mint_for_unknown_client_is_404(sidecar):
    """Minting for a client that is not configured: 404."""
    assert httpx.post(sidecar.admin_url + "/admin/clients/nobody/tokens", headers=ADMIN_HEADERS).status_code == 404


def test_token_new_prints_the_hash_of_the_printed_token():
    """`sidecar token new`: the printed sha256 line is the hash of the printed token."""
    out = subprocess.run([sys.executable, "-m", "sidecar", "token", "new", "--client", "01400-2"],
                         capture_output=True, text=True, check=True).stdout
    token = re.search(r"(sct_[A-Za-z0-9_-]{43})", out).group(1)
    line = re.search(r"sha256:([0-9a-f]{64})", out).group(1)
    assert line == token_hash(token)


def test_config_token_hash_must_be_a_hash(tmp_path: Path):
    """A plaintext token in the YAML is a config error naming the fix."""
    path = tmp_path / "bad.yaml"
    path.write_text("version: 1\nupstream: http://127.0.0.1:1\nclients:\n  - id: a\n    tokens: [sct_plain]\n")
    result = subprocess.run([sys.executable, "-m", "sidecar", "check", "--config", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert f"{path}:5: clients[0].tokens" in result.stderr
    assert "sidecar token new" in result.stderr
