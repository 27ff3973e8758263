"""Per-route rate limits (SPEC §14, issue 17): `rate_limit: {per: client|ip, rps, burst, fail}` — GCRA in
process or shared through Redis; 429 `rate_limited` with Retry-After, nothing forwarded; per client, each
client has its own budget; when Redis cannot be asked, `fail: open` lets requests through and `fail: closed`
answers 503."""

from __future__ import annotations

import time
from typing import Any

import httpx
from conftest import bearer, config_text, error_body, jwt_authenticator, make_config, mint, route
from redis_support import redis_url  # noqa: F401  (fixture)

from sidecar.testing import KeyPair, RecordingUpstream, free_port, running_sidecar


def limited(upstream_url: str, limit: dict[str, Any], auth: dict[str, Any] | None = None,
            redis: str | None = None) -> str:
    return config_text(make_config(
        upstream_url, {"a": auth or {"type": "anonymous"}},
        [route("limited", "/api/**", ["a"], rate_limit=limit), route("free", "/free/**", ["a"])],
        **({"redis": redis} if redis else {})))


def test_burst_then_429_with_retry_after_then_refill(upstream: RecordingUpstream) -> None:
    """Per address, 2 rps with a burst of 3: three requests pass at once, the fourth is 429 rate_limited with
    Retry-After and is not forwarded; another route is not limited; half a second later one more passes."""
    with running_sidecar(limited(upstream.url, {"per": "ip", "rps": 2, "burst": 3})) as sc, \
            httpx.Client(timeout=10) as client:
        assert [client.get(sc.url + "/api/x").status_code for _ in range(3)] == [200, 200, 200]
        refused = client.get(sc.url + "/api/x")
        error_body(refused, 429, "rate_limited")
        assert refused.headers["retry-after"] == "1"
        assert [client.get(sc.url + "/free/x").status_code for _ in range(5)] == [200] * 5
        assert [r.path for r in upstream.received].count("/api/x") == 3
        time.sleep(0.55)
        assert client.get(sc.url + "/api/x").status_code == 200


def test_per_client_budgets_are_shared_by_two_sidecars_through_redis(upstream: RecordingUpstream,
                                                                     idp_keys: KeyPair, redis_url: str) -> None:  # noqa: F811
    """Per client through Redis, burst 4 at 0.5 rps: two sidecars share one budget per client (2 + 2, then 429 on
    either); another client still has its own."""
    config = limited(upstream.url, {"per": "client", "rps": 0.5, "burst": 4}, jwt_authenticator(idp_keys),
                     redis_url)
    alice, bob = mint(idp_keys, sub="alice", client_id="alice-app"), mint(idp_keys, sub="bob", client_id="bob-app")
    with running_sidecar(config) as first, running_sidecar(config) as second, httpx.Client(timeout=10) as client:
        statuses = [client.get(sc.url + "/api/x", headers=bearer(alice)).status_code
                    for sc in (first, second, first, second, first, second)]
        assert statuses == [200, 200, 200, 200, 429, 429]
        assert client.get(second.url + "/api/x", headers=bearer(bob)).status_code == 200


def test_redis_unreachable_fails_open_or_closed_as_the_route_says(upstream: RecordingUpstream) -> None:
    """With Redis unreachable, `fail: open` forwards the request and `fail: closed` answers 503."""
    dead = f"redis://127.0.0.1:{free_port()}/0"
    for fail, status in (("open", 200), ("closed", 503)):
        config = limited(upstream.url, {"per": "ip", "rps": 1, "burst": 1, "fail": fail}, redis=dead)
        with running_sidecar(config) as sc:
            response = httpx.get(sc.url + "/api/x", timeout=10)
            assert response.status_code == status, (fail, response.text)
            if status == 503:
                error_body(response, 503, "dependency_unavailable")
