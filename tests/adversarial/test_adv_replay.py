"""Replay: a single-use key or a `jti` under `replay: deny` wins exactly once however many copies race, and replay is
keyed on what identifies the token (client and jti), not on its exact string — an ECDSA signature is randomised, so
the same claims signed again are a different string carrying the same jti."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import jwt
import pytest
from adversarial_support import (  # noqa: F401  (fixtures)
    KEYS_SECRET,
    PARTNER_SECRET,
    PARTNER_TOKEN,
    StrictUpstream,
    strict_upstream,
    strict_upstream_server,
)
from redis_support import redis_url  # noqa: F401  (fixture)

from sidecar.state.client_token_store import token_hash
from sidecar.testing import KeyPair, RunningSidecar, running_sidecar

ERP_KEYS = KeyPair("EC")


def replay_config(upstream: str, redis: str | None) -> str:
    return json.dumps({
        "version": 1, "upstream": upstream, "redis": redis, "keys": {"secret": KEYS_SECRET},
        "authenticators": {
            "portal_key": {"type": "ip_key"},
            "erp_once": {"type": "client_jwt", "replay": "deny", "algorithms": ["ES256", "RS256"]},
        },
        "clients": [
            {"id": "partner-1", "tokens": [f"sha256:{token_hash(PARTNER_TOKEN)}"],
             "secret": "sha256:" + hashlib.sha256(PARTNER_SECRET.encode()).hexdigest()},
            {"id": "erp", "public_key": ERP_KEYS.public_pem},
        ],
        "routes": [
            {"id": "portal", "match": {"path": "/portal/**"}, "auth": ["portal_key"]},
            {"id": "once", "match": {"path": "/once/**", "methods": ["POST"]}, "auth": ["erp_once"]},
        ],
    })


@pytest.fixture(params=["memory", "redis"])
def replay_sidecar(request: pytest.FixtureRequest, strict_upstream: StrictUpstream) -> Iterator[RunningSidecar]:  # noqa: F811
    """The same sidecar with its state in-process, then in Redis (shared by replicas)."""
    redis = request.getfixturevalue("redis_url") if request.param == "redis" else None
    with running_sidecar(replay_config(strict_upstream.url, redis)) as sc:
        yield sc


def race(count: int, call: Any) -> list[int]:
    """`count` calls released together; their statuses."""
    barrier = threading.Barrier(count)

    def one(_: int) -> int:
        with httpx.Client(timeout=10) as client:
            barrier.wait()
            return int(call(client))

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def test_single_use_key_used_twenty_times_at_once_wins_once(
    replay_sidecar: RunningSidecar, strict_upstream: StrictUpstream,  # noqa: F811
) -> None:
    """Twenty parallel uses of one single-use ip_key key: exactly one 200, nineteen 401, one request upstream."""
    issued = httpx.post(replay_sidecar.url + "/_sidecar/keys", headers={"X-Client-Token": PARTNER_TOKEN},
                        json={"user": "joao", "ip": "127.0.0.1", "single_use": True})
    assert issued.status_code == 200, issued.text
    key = issued.json()["key"]
    statuses = race(20, lambda c: c.get(f"{replay_sidecar.url}/portal/home?key={key}").status_code)
    assert sorted(statuses) == [200] + [401] * 19
    assert [(s.method, s.path, s.query) for s in strict_upstream.received] == [("GET", "/portal/home", "")]


def test_single_use_key_in_another_spelling_is_still_used(
    replay_sidecar: RunningSidecar, strict_upstream: StrictUpstream,  # noqa: F811
) -> None:
    """The spent key re-spelled (padding, percent-encoding of its letters) is refused, never a fresh key."""
    key = httpx.post(replay_sidecar.url + "/_sidecar/keys", headers={"X-Client-Token": PARTNER_TOKEN},
                     json={"user": "joao", "expiry_minutes": 5, "single_use": True}).json()["key"]
    assert httpx.get(f"{replay_sidecar.url}/portal/a?key={key}").status_code == 200
    encoded = "".join(f"%{ord(c):02X}" for c in key)
    for spelling in (key, key + "=", key + "==", encoded, key.replace("ab_", "ab%5F", 1)):
        assert httpx.get(f"{replay_sidecar.url}/portal/a?key={spelling}").status_code == 401, spelling
    assert len(strict_upstream.received) == 1


def erp_token(claims: dict[str, Any], headers: dict[str, Any] | None = None) -> str:
    return jwt.encode({"iat": int(time.time()), "sub": "operator", **claims}, ERP_KEYS.private_key,
                      algorithm="ES256", headers=headers)


def post_once(client: httpx.Client, sc: RunningSidecar, token: str) -> int:
    return client.post(sc.url + "/once/x", json={"id": "erp", "token": token, "n": 1}).status_code


def test_one_jti_used_twenty_times_at_once_wins_once(
    replay_sidecar: RunningSidecar, strict_upstream: StrictUpstream,  # noqa: F811
) -> None:
    """Twenty parallel uses of one client_jwt under `replay: deny`: exactly one 200, one request upstream."""
    token = erp_token({"jti": uuid.uuid4().hex})
    statuses = race(20, lambda c: post_once(c, replay_sidecar, token))
    assert sorted(statuses) == [200] + [401] * 19
    [seen] = strict_upstream.received
    assert json.loads(seen.body) == {"id": "erp", "n": 1}


def test_twenty_ecdsa_re_signings_of_one_jti_win_once(
    replay_sidecar: RunningSidecar, strict_upstream: StrictUpstream,  # noqa: F811
) -> None:
    """Twenty different ES256 signatures over the same claims (ECDSA is randomised), raced: exactly one 200."""
    claims = {"jti": uuid.uuid4().hex, "iat": int(time.time())}
    tokens = [erp_token(claims) for _ in range(20)]
    assert len(set(tokens)) == 20
    statuses = race(20, lambda c: post_once(c, replay_sidecar, tokens.pop()))
    assert sorted(statuses) == [200] + [401] * 19
    assert len(strict_upstream.received) == 1


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_replay_is_keyed_on_the_jti_not_the_token_string(
    replay_sidecar: RunningSidecar, strict_upstream: StrictUpstream,  # noqa: F811
) -> None:
    """After one use, the same jti re-signed, re-headed, re-timed or re-padded is refused (401)."""
    jti = uuid.uuid4().hex
    first = erp_token({"jti": jti})
    with httpx.Client(timeout=10) as client:
        assert post_once(client, replay_sidecar, first) == 200
        head, payload, signature = first.split(".")
        variants = [
            erp_token({"jti": jti}),  # same claims, a new random ECDSA signature
            erp_token({"jti": jti}, headers={"kid": "another"}),  # another header
            erp_token({"jti": jti, "iat": int(time.time()) - 5}),  # other claims around the same jti
            erp_token({"jti": jti, "exp": int(time.time()) + 60}),
            f"{head}.{payload}.{signature}=",  # padding on the signature
            f"{head}==.{payload}.{signature}",
            f"{head}.{payload}=.{signature}",
        ]
        statuses = [post_once(client, replay_sidecar, token) for token in variants]
    assert statuses == [401] * len(variants)
    assert len(strict_upstream.received) == 1
