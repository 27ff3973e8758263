"""Verdict-cache confusion (SPEC §10): a cached verdict never opens a stricter route, never crosses to another
authenticator, and a revoked client token stops working within its 1 s window even while hammered."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from adversarial_support import (  # noqa: F401  (fixtures)
    ADMIN_HEADERS,
    StrictUpstream,
    assert_error,
    attacked,
    attacked_config,
    get,
    self_issued_token,
    staff_token,
    strict_upstream,
    strict_upstream_server,
)
from redis_support import redis_url  # noqa: F401  (fixture)

from sidecar.testing import KeyPair, RunningSidecar, running_sidecar


def bearer(token: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token}")]


def test_verdict_cached_on_a_lenient_route_does_not_open_a_strict_one(
    attacked: RunningSidecar, strict_upstream: StrictUpstream, idp_keys: KeyPair,  # noqa: F811
) -> None:
    """One JWT: 200 on the lenient route (now cached), 403 insufficient_scope on the strict one, every time."""
    token = staff_token(idp_keys, scope="read")
    for _ in range(3):
        assert get(attacked.url, "/lenient/x", bearer(token)).status == 200
        assert_error(get(attacked.url, "/strict/x", bearer(token)), 403, "insufficient_scope")
    admin = staff_token(idp_keys, scope="read admin")
    assert get(attacked.url, "/strict/x", bearer(admin)).status == 200
    assert strict_upstream.requests() == [("GET", "/lenient/x")] * 3 + [("GET", "/strict/x")]
    assert strict_upstream.received[-1].header("x-auth-scopes") == "admin read"


def test_a_refusal_cached_for_one_route_is_not_an_acceptance_elsewhere(
    attacked: RunningSidecar, strict_upstream: StrictUpstream, idp_keys: KeyPair,  # noqa: F811
) -> None:
    """The strict route's 403 is not cached as a refusal of the token: the lenient route still accepts it."""
    token = staff_token(idp_keys, scope="read")
    assert_error(get(attacked.url, "/strict/x", bearer(token)), 403, "insufficient_scope")
    assert get(attacked.url, "/lenient/x", bearer(token)).status == 200
    assert strict_upstream.requests() == [("GET", "/lenient/x")]


@pytest.fixture(scope="module")
def own_token(attacked: RunningSidecar) -> str:  # noqa: F811
    return self_issued_token(attacked)


@pytest.mark.parametrize("kind", ["staff", "own", "partner"])
def test_a_credential_accepted_by_one_authenticator_is_refused_by_the_others(
    attacked: RunningSidecar, strict_upstream: StrictUpstream, idp_keys: KeyPair, own_token: str, kind: str,  # noqa: F811
) -> None:
    """IdP JWT, self-issued JWT, client token: each accepted on its own route (and cached), 401 on the others."""
    from adversarial_support import PARTNER_TOKEN

    tokens = {"staff": staff_token(idp_keys), "own": own_token, "partner": PARTNER_TOKEN}
    home = {"staff": "/admin/x", "own": "/own/x", "partner": "/partner/x"}
    method = {"staff": "staff_jwt", "own": "own_jwt", "partner": "partner"}
    token = tokens[kind]
    for _ in range(2):
        assert get(attacked.url, home[kind], bearer(token)).status == 200
    for other, path in home.items():
        if other != kind:
            for _ in range(2):
                assert_error(get(attacked.url, path, bearer(token)), 401, "invalid_token")
    assert strict_upstream.requests() == [("GET", home[kind])] * 2
    assert {s.header("x-auth-method") for s in strict_upstream.received} == {method[kind]}


@pytest.fixture
def redis_sidecar(strict_upstream_server: StrictUpstream, idp_keys: KeyPair,  # noqa: F811
                  redis_url: str) -> Iterator[RunningSidecar]:  # noqa: F811
    with running_sidecar(attacked_config(strict_upstream_server.url, idp_keys, redis=redis_url)) as sc:
        yield sc


def test_revoked_token_racing_its_cache_entry_is_refused_within_a_second(
    redis_sidecar: RunningSidecar, strict_upstream: StrictUpstream,  # noqa: F811
) -> None:
    """Revoke a minted token while 6 clients hammer with it: no 200 later than 1 s after the revocation returned."""
    sc = redis_sidecar
    minted = httpx.post(f"{sc.admin_url}/admin/clients/partner-1/tokens", headers=ADMIN_HEADERS).json()
    headers = {"X-Client-Token": minted["token"]}
    assert httpx.get(sc.url + "/partner/warm", headers=headers).status_code == 200
    stop = threading.Event()
    results: list[tuple[float, int]] = []

    def hammer() -> None:
        with httpx.Client(timeout=5) as client:
            while not stop.is_set():
                status = client.get(sc.url + "/partner/race", headers=headers).status_code
                results.append((time.monotonic(), status))

    threads = [threading.Thread(target=hammer) for _ in range(6)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.3)
        response = httpx.delete(f"{sc.admin_url}/admin/clients/partner-1/tokens/{minted['id']}",
                                headers=ADMIN_HEADERS)
        revoked = time.monotonic()
        time.sleep(1.8)
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert response.status_code == 204
    assert {status for _, status in results} <= {200, 401}
    assert any(status == 200 for at, status in results if at < revoked)
    late = [(round(at - revoked, 3), status) for at, status in results if at > revoked + 1.0]
    assert late and all(status == 401 for _, status in late), late[:5]
    assert [round(s.at - revoked, 3) for s in strict_upstream.received if s.at > revoked + 1.0] == []
