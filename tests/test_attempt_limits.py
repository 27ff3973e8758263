"""Attempt limits (SPEC §14, issue 17): failed secret checks on the token endpoint, the key endpoint (JSON and
SOAP) and the admin API lock the guessing address out (429 too_many_attempts + Retry-After) while the real
client keeps working; the per-client lock spares the client's known addresses; the lock is shared through Redis.

Different source addresses are real: the whole of 127.0.0.0/8 is loopback on Linux, so a client binds
127.0.0.2, 127.0.0.3, ... as its source address."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import config_text, error_body, make_config, route, wait_for
from redis_support import redis_url  # noqa: F401  (fixture)

from sidecar.testing import KeyPair, RecordingUpstream, RunningSidecar, SidecarProcess, running_sidecar

ADMIN = "test-admin-token-0123456789abcdef"
SECRET = "totvs-secret-0123456789"
KEYS_SECRET = "k" * 48
SOAP = (b'<?xml version="1.0"?><soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/" '
        b'xmlns:ws="http://ws.totvs.com/"><soap:Body><ws:generateMapToken><arg0>'
        b'<entry key="user" value="maria"/><entry key="expiry_minutes" value="5"/>'
        b'</arg0></ws:generateMapToken></soap:Body></soap:Envelope>')


def sha256(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def limits_config(upstream: str, signing: KeyPair, *, per_address: int = 5, per_client: int = 100,
                  lockout: str = "30s", redis: str | None = None) -> str:
    return config_text(make_config(
        upstream, {"own": {"type": "jwt", "self_issued": True, "issuer": "https://sidecar.test"}},
        [route("api", "/api/**", ["own"])],
        admin={"token": ADMIN}, keys={"secret": KEYS_SECRET},
        issuer={"issuer": "https://sidecar.test", "signing_key": signing.private_pem},
        clients=[{"id": "totvs", "secret": sha256(SECRET), "scopes": ["/btb"]}],
        limits={"attempts": {"per_address": per_address, "per_client": per_client, "lockout": lockout}},
        **({"redis": redis} if redis else {}),
    ))


@pytest.fixture(scope="module")
def signing() -> KeyPair:
    return KeyPair()


@contextlib.contextmanager
def client_from(address: str) -> Iterator[httpx.Client]:
    """An HTTP client whose connections come from this loopback source address."""
    with httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=10.0, trust_env=False) as c:
        yield c


def token(client: httpx.Client, base: str, secret: str, client_id: str = "totvs") -> httpx.Response:
    return client.post(base + "/_sidecar/oauth2/token", data={"grant_type": "client_credentials"},
                       auth=(client_id, secret))


@contextlib.contextmanager
def captured_audit(sc: RunningSidecar) -> Iterator[io.StringIO]:
    audit = sc.services.audit
    buffer = io.StringIO()
    original, audit._stream = audit._stream, buffer
    try:
        yield buffer
    finally:
        audit._stream = original


def audit_lines(buffer: io.StringIO, **match: Any) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]
    return [line for line in lines if all(line.get(k) == v for k, v in match.items())]


def assert_locked(response: httpx.Response) -> int:
    """A 429 too_many_attempts with a Retry-After in whole seconds; returns it."""
    error_body(response, 429, "too_many_attempts")
    retry_after = int(response.headers["retry-after"])
    assert retry_after >= 1
    return retry_after


def test_guessing_a_client_secret_locks_that_address_out_and_not_the_client(
        shared_upstream: RecordingUpstream, signing: KeyPair) -> None:
    """Guessing at full speed from one address: 401 up to the threshold, then 429 with Retry-After even for the
    right secret from there; the real client from another address still gets tokens; one audit line says so."""
    with running_sidecar(limits_config(shared_upstream.url, signing)) as sc, captured_audit(sc) as audit, \
            client_from("127.0.0.2") as attacker, client_from("127.0.0.1") as partner:
        guesses = [token(attacker, sc.url, f"guess-{i}") for i in range(5)]
        assert [r.status_code for r in guesses] == [401] * 5
        locked = token(attacker, sc.url, "guess-5")
        retry_after = assert_locked(locked)
        assert 1 <= retry_after <= 30
        assert locked.headers["cache-control"] == "no-store"
        # Locked means the secret is not even checked: the right one is refused from there too.
        assert_locked(token(attacker, sc.url, SECRET))
        assert token(partner, sc.url, SECRET).status_code == 200
        lockouts = wait_for(lambda: audit_lines(audit, kind="lockout"))
        assert lockouts == [{**lockouts[0], "endpoint": "token", "scope": "address", "peer": "127.0.0.2",
                             "client": None, "failures": 5}]
        assert SECRET not in audit.getvalue() and "guess-" not in audit.getvalue()
        metrics = httpx.get(sc.admin_url + "/metrics").text
        assert 'sidecar_secret_attempts_total{endpoint="token",outcome="locked"} 2.0' in metrics
        assert 'sidecar_secret_attempts_total{endpoint="token",outcome="failed"} 5.0' in metrics
        assert 'sidecar_lockouts_total{endpoint="token",scope="address"} 1.0' in metrics


def test_lockout_doubles_with_each_failure_past_the_threshold(
        shared_upstream: RecordingUpstream, signing: KeyPair) -> None:
    """With a 1 s lock-out: after it ends, the next failure locks for 2 s, then 4 s (exponential)."""
    with running_sidecar(limits_config(shared_upstream.url, signing, per_address=2, lockout="1s")) as sc, \
            client_from("127.0.0.2") as attacker:
        assert [token(attacker, sc.url, "bad").status_code for _ in range(2)] == [401, 401]
        assert assert_locked(token(attacker, sc.url, "bad")) == 1
        time.sleep(1.1)
        assert token(attacker, sc.url, "bad").status_code == 401  # the 3rd failure: locked 2 s
        assert assert_locked(token(attacker, sc.url, "bad")) == 2
        time.sleep(2.1)
        assert token(attacker, sc.url, "bad").status_code == 401  # the 4th: 4 s
        assert assert_locked(token(attacker, sc.url, "bad")) == 4


def test_many_addresses_lock_the_client_id_only_for_addresses_it_never_used(
        shared_upstream: RecordingUpstream, signing: KeyPair) -> None:
    """A spread-out guess (2 addresses x 3 failures, per_client 6) locks the id for new addresses; the partner's
    address that had succeeded before keeps getting tokens, even with a typo in between."""
    config = limits_config(shared_upstream.url, signing, per_address=3, per_client=6)
    with running_sidecar(config) as sc, client_from("127.0.0.1") as partner:
        assert token(partner, sc.url, SECRET).status_code == 200  # a known address from now on
        for n in (2, 3):
            with client_from(f"127.0.0.{n}") as attacker:
                assert [token(attacker, sc.url, "bad").status_code for _ in range(3)] == [401] * 3
        with client_from("127.0.0.9") as newcomer:
            assert_locked(token(newcomer, sc.url, SECRET))  # the right secret, from an address never seen
            # Another client id from that address is not concerned by this client's lock.
            assert token(newcomer, sc.url, "x", client_id="someone-else").status_code == 401
        assert token(partner, sc.url, "typo").status_code == 401
        assert token(partner, sc.url, SECRET).status_code == 200


def test_key_endpoint_json_and_soap_are_limited(shared_upstream: RecordingUpstream, signing: KeyPair) -> None:
    """The key endpoint counts wrong Basic secrets and unknown client tokens; locked, JSON gets 429 too_many_attempts
    and the SOAP face a Fault, both with Retry-After; the token endpoint shares the count (the same secret)."""
    with running_sidecar(limits_config(shared_upstream.url, signing, per_address=4)) as sc, \
            client_from("127.0.0.2") as attacker, client_from("127.0.0.1") as partner:
        keys = sc.url + "/_sidecar/keys"
        bad_basic = attacker.post(keys, json={"user": "maria", "expiry_minutes": 5}, auth=("totvs", "bad"))
        assert bad_basic.status_code == 401
        assert attacker.post(keys, json={"user": "maria", "expiry_minutes": 5},
                             headers={"X-Client-Token": "sct_unknown"}).status_code == 401
        assert token(attacker, sc.url, "bad").status_code == 401
        soap = attacker.post(keys, content=SOAP, auth=("totvs", "bad"), headers={"Content-Type": "text/xml"})
        assert soap.status_code == 401 and b"Fault" in soap.content
        assert_locked(attacker.post(keys, json={"user": "maria", "expiry_minutes": 5}, auth=("totvs", SECRET)))
        locked_soap = attacker.post(keys, content=SOAP, auth=("totvs", SECRET), headers={"Content-Type": "text/xml"})
        assert locked_soap.status_code == 429 and b"Fault" in locked_soap.content
        assert int(locked_soap.headers["retry-after"]) >= 1
        ok = partner.post(keys, content=SOAP, auth=("totvs", SECRET), headers={"Content-Type": "text/xml"})
        assert ok.status_code == 200 and b"generateMapTokenResponse" in ok.content


def test_admin_token_guessing_is_limited(shared_upstream: RecordingUpstream, signing: KeyPair) -> None:
    """Wrong admin tokens lock the address out of the admin API (429 + Retry-After, even with the right token);
    the operator from another address still gets in; /healthz and /metrics are never limited."""
    with running_sidecar(limits_config(shared_upstream.url, signing, per_address=3)) as sc, \
            client_from("127.0.0.2") as attacker, client_from("127.0.0.1") as operator:
        clients = sc.admin_url + "/admin/clients"
        assert [attacker.get(clients, headers={"Authorization": f"Bearer wrong{i}"}).status_code
                for i in range(3)] == [401] * 3
        assert_locked(attacker.get(clients, headers={"Authorization": f"Bearer {ADMIN}"}))
        assert attacker.get(sc.admin_url + "/healthz").status_code == 200
        assert operator.get(clients, headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200


def test_lockout_is_shared_by_two_processes_on_one_redis(tmp_path: Path, shared_upstream: RecordingUpstream,
                                                         signing: KeyPair, redis_url: str) -> None:  # noqa: F811
    """Two sidecar processes on one Redis: the address locked out through one is locked out of the other."""
    path = tmp_path / "sidecar.yaml"
    path.write_text(limits_config(shared_upstream.url, signing, per_address=4, redis=redis_url))
    with SidecarProcess(path) as first, SidecarProcess(path) as second, client_from("127.0.0.2") as attacker, \
            client_from("127.0.0.1") as partner:
        assert [token(attacker, first.url, "bad").status_code for _ in range(2)] == [401, 401]
        assert [token(attacker, second.url, "bad").status_code for _ in range(2)] == [401, 401]
        assert_locked(token(attacker, first.url, SECRET))
        assert_locked(token(attacker, second.url, SECRET))
        assert token(partner, second.url, SECRET).status_code == 200
