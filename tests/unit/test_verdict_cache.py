"""sidecar/proxy/verdict_cache.py in process: how long a verdict is served, that it never outlives the token,
that refusals are kept for the negative TTL, that concurrent misses make one check, and the shared layer
(end to end: tests/test_jwt_routes.py, tests/test_remote.py, tests/adversarial/test_adv_cache.py)."""

from __future__ import annotations

import asyncio
import time

import pytest

from sidecar.authn.base import Credential, Identity
from sidecar.errors import DependencyUnavailable, Unauthenticated
from sidecar.proxy.request_view import RequestView
from sidecar.proxy.verdict_cache import StoreVerdicts, VerdictCache
from sidecar.state.store import MemoryStore

REQUEST = RequestView("GET", "/", b"", [], "h", "http", "127.0.0.1", "127.0.0.1", "r")


class Checker:
    """An authenticator whose verdict the test sets: an Identity to return, or an exception to raise; it counts
    its calls and can take a while to answer."""

    def __init__(self, verdict: Identity | Exception, *, cacheable: bool = True, cache_ttl: float | None = None,
                 negative_ttl: float | None = None, shared_cache: bool = False, delay: float = 0.0) -> None:
        self.name = "checker"
        self.fingerprint = b"checker-config"
        self.cacheable = cacheable
        self.cache_ttl = cache_ttl
        self.negative_ttl = negative_ttl
        self.shared_cache = shared_cache
        self.verdict = verdict
        self.delay = delay
        self.calls = 0

    async def verify(self, credential: Credential, request: RequestView) -> Identity:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if isinstance(self.verdict, Exception):
            raise self.verdict
        return self.verdict


def identity(expires_in: float | None = None, expires_at: float | None = None) -> Identity:
    if expires_in is not None:
        expires_at = time.time() + expires_in
    return Identity(subject="alice", authenticator="checker", expires_at=expires_at)


async def outcome(cache: VerdictCache, auth: Checker, credential: str = "cred") -> str:
    try:
        return (await cache.resolve(auth, Credential("token", credential), REQUEST)).subject  # type: ignore[arg-type]
    except Unauthenticated as refusal:
        return f"refused: {refusal.detail}"


async def calls_after(cache: VerdictCache, auth: Checker, pause: float) -> int:
    """Resolve, wait `pause`, resolve again: how many times the authenticator was asked."""
    await outcome(cache, auth)
    await asyncio.sleep(pause)
    await outcome(cache, auth)
    return auth.calls


@pytest.mark.parametrize(("ttl", "auth_ttl", "pause", "calls"), [
    (60.0, None, 0.0, 1),     # within the TTL: one check
    (0.05, None, 0.1, 2),     # past the TTL: checked again
    (0.0, None, 0.0, 2),      # TTL 0: nothing cached
    (60.0, 0.05, 0.1, 2),     # the authenticator's own cache_ttl wins
    (0.05, 60.0, 0.1, 1),
])
def test_identity_is_served_for_the_ttl(ttl: float, auth_ttl: float | None, pause: float, calls: int) -> None:
    """An identity is served from the cache for the cache TTL, or the authenticator's own when it sets one."""
    auth = Checker(identity(), cache_ttl=auth_ttl)
    assert asyncio.run(calls_after(VerdictCache(ttl, 5.0, 100), auth, pause)) == calls


@pytest.mark.parametrize(("expires_in", "expires_at", "pause", "calls"), [
    (60.0, None, 0.0, 1),
    (0.05, None, 0.1, 2),                # the token's exp ends the cached identity before the TTL
    (-1.0, None, 0.0, 2),                # already expired: not cached at all
    (None, float("nan"), 0.0, 2),        # an expiry that is not a timestamp caches nothing
    (None, float("inf"), 0.0, 2),
])
def test_identity_never_outlives_its_expiry(expires_in: float | None, expires_at: float | None, pause: float,
                                            calls: int) -> None:
    """A cached identity is never served past its `expires_at`, whatever the TTL."""
    auth = Checker(identity(expires_in, expires_at))
    assert asyncio.run(calls_after(VerdictCache(300.0, 5.0, 100), auth, pause)) == calls


@pytest.mark.parametrize(("negative_ttl", "auth_negative", "pause", "calls"), [
    (5.0, None, 0.0, 1),       # a refusal is kept for the negative TTL
    (0.05, None, 0.1, 2),
    (0.0, None, 0.0, 2),       # negative TTL 0: refusals are not kept
    (5.0, 0.0, 0.0, 2),        # the authenticator's own negative_ttl wins
    (0.0, 5.0, 0.0, 1),
])
def test_refusal_is_kept_for_the_negative_ttl(negative_ttl: float, auth_negative: float | None, pause: float,
                                              calls: int) -> None:
    """A refusal is served again (the same 401) for the negative TTL, or the authenticator's own."""
    auth = Checker(Unauthenticated("bad", detail="signature"), negative_ttl=auth_negative)
    assert asyncio.run(calls_after(VerdictCache(300.0, negative_ttl, 100), auth, pause)) == calls


def test_cached_refusal_says_so_in_the_audit_detail() -> None:
    """The first refusal carries the authenticator's detail; the cached one adds "(cached)"."""
    async def go() -> list[str]:
        cache, auth = VerdictCache(60.0, 60.0, 100), Checker(Unauthenticated("bad", detail="signature"))
        return [await outcome(cache, auth), await outcome(cache, auth)]

    assert asyncio.run(go()) == ["refused: signature", "refused: signature (cached)"]


def test_dependency_failure_is_never_cached() -> None:
    """A 503 from the authenticator (its service down) is not a verdict: the next request asks again."""
    async def go() -> int:
        cache, auth = VerdictCache(60.0, 60.0, 100), Checker(DependencyUnavailable("down"))
        for _ in range(2):
            with pytest.raises(DependencyUnavailable):
                await cache.resolve(auth, Credential("token", "cred"), REQUEST)  # type: ignore[arg-type]
        return auth.calls

    assert asyncio.run(go()) == 2


def test_uncacheable_authenticator_is_asked_every_time() -> None:
    """An authenticator that is not cacheable is asked on every request."""
    auth = Checker(identity(), cacheable=False)
    assert asyncio.run(calls_after(VerdictCache(60.0, 60.0, 100), auth, 0.0)) == 2


def test_different_credentials_are_different_entries() -> None:
    """The cache is keyed by credential: another credential is checked on its own."""
    async def go() -> int:
        cache, auth = VerdictCache(60.0, 60.0, 100), Checker(identity())
        await outcome(cache, auth, "one")
        await outcome(cache, auth, "two")
        await outcome(cache, auth, "one")
        return auth.calls

    assert asyncio.run(go()) == 2


@pytest.mark.parametrize("verdict", [identity(), Unauthenticated("bad", detail="signature")],
                         ids=["identity", "refusal"])
def test_concurrent_misses_make_one_check(verdict: Identity | Exception) -> None:
    """Ten requests with one uncached credential at once: the authenticator is asked once, all get its answer."""
    results: list[str] = []

    async def go() -> int:
        cache, auth = VerdictCache(60.0, 60.0, 100, on_result=results.append), Checker(verdict, delay=0.05)
        answers = await asyncio.gather(*(outcome(cache, auth) for _ in range(10)))
        assert len(set(answers)) <= 2  # the first as decided, the others maybe marked cached
        assert all(a.startswith("alice" if isinstance(verdict, Identity) else "refused") for a in answers)
        return auth.calls

    assert asyncio.run(go()) == 1
    assert results.count("miss") == 1 and results.count("coalesced") == 9


def test_reload_that_changes_the_ttl_empties_the_local_layer() -> None:
    """`configure` with another TTL drops what was cached under the old one; the same TTL keeps it."""
    async def go() -> list[int]:
        cache, auth = VerdictCache(60.0, 60.0, 100), Checker(identity())
        await outcome(cache, auth)
        cache.configure(60.0, 60.0, 100)
        await outcome(cache, auth)
        counts = [auth.calls]
        cache.configure(30.0, 60.0, 100)
        await outcome(cache, auth)
        return [*counts, auth.calls]

    assert asyncio.run(go()) == [1, 2]


def test_lru_keeps_at_most_max_entries() -> None:
    """Past `max_entries` the least recently used verdict is dropped."""
    async def go() -> int:
        cache, auth = VerdictCache(60.0, 60.0, 2), Checker(identity())
        for credential in ("a", "b", "a", "c", "a", "b"):  # c evicts b (a was used since); b is asked again
            await outcome(cache, auth, credential)
        return auth.calls

    assert asyncio.run(go()) == 4


def shared_pair() -> tuple[VerdictCache, VerdictCache]:
    """Two replicas' caches over one shared store (the process-local store stands in for Redis here)."""
    shared = StoreVerdicts(MemoryStore())
    return VerdictCache(60.0, 60.0, 100, shared=shared), VerdictCache(60.0, 60.0, 100, shared=shared)


@pytest.mark.parametrize(("shared_cache", "calls"), [(True, 1), (False, 2)])
def test_shared_layer_serves_other_replicas_only_for_authenticators_that_opt_in(shared_cache: bool,
                                                                                  calls: int) -> None:
    """A verdict decided by one replica is served to another through the shared layer, when the authenticator
    opts in (`shared_cache`)."""
    async def go() -> int:
        first, second = shared_pair()
        auth = Checker(identity(), shared_cache=shared_cache)
        await outcome(first, auth)
        await outcome(second, auth)
        return auth.calls

    assert asyncio.run(go()) == calls


def test_shared_verdict_older_than_the_new_ttl_is_a_miss() -> None:
    """After a reload shortens the TTL, a shared verdict older than it is checked afresh."""
    async def go() -> int:
        first, second = shared_pair()
        auth = Checker(identity(), shared_cache=True)
        await outcome(first, auth)
        await asyncio.sleep(0.1)
        second.configure(0.05, 60.0, 100)
        await outcome(second, auth)
        return auth.calls

    assert asyncio.run(go()) == 2


# -- the memory budget (cache.max_bytes, issue 17) ------------------------------------------------------------


def jwt_like_identity(i: int) -> Identity:
    """An identity as the jwt authenticator makes it: the token's claims decoded from JSON."""
    import json
    import os

    now = int(time.time())
    claims = json.loads(json.dumps({"iss": "https://idp.test", "aud": "sidecar-tests", "sub": f"user-{i}",
                                    "scope": "read write", "exp": now + 3600, "iat": now, "jti": os.urandom(8).hex(),
                                    "client_id": "app"}))
    return Identity(subject=claims["sub"], authenticator="idp", client="app", scopes=frozenset(claims["scope"].split()),
                    claims=claims, expires_at=float(claims["exp"]))


def test_byte_budget_keeps_the_estimate_under_max_bytes_and_evicts_the_oldest() -> None:
    """20,000 distinct verdicts into a 1 MiB budget: the accounted bytes never pass it, the oldest went first,
    the newest are kept, and the accounting is the sum of the kept entries' estimates."""
    from sidecar.proxy.verdict_cache import LocalVerdicts

    local = LocalVerdicts(max_entries=1_000_000, max_bytes=1024 * 1024)
    keys = [i.to_bytes(32, "big") for i in range(20_000)]
    for i, key in enumerate(keys):
        local.put(key, jwt_like_identity(i), 300)
        assert local.bytes <= local.max_bytes
    assert keys[0] not in local and keys[-1] in local
    kept = [key for key in keys if key in local]
    assert kept == keys[-len(kept):]  # exactly the newest survive
    assert 800 < len(kept) < 2000  # ~0.8 KB each, packed
    local.resize(1_000_000, 256 * 1024)  # a reload with a smaller budget shrinks at once
    assert local.bytes <= 256 * 1024 and keys[-1] in local
    local.evict_where(lambda verdict: True)
    assert (len(local), local.bytes) == (0, 0)


@pytest.mark.parametrize("kind", ["jwt", "client_token", "refused"])
def test_entry_size_estimate_is_close_to_the_real_cost(kind: str) -> None:
    """The cheap estimate (fixed overhead + lengths) is at least what tracemalloc measures, and not far above."""
    import hashlib
    import os
    import tracemalloc

    from sidecar.proxy.verdict_cache import LocalVerdicts, Refused

    def make(i: int) -> Identity | Refused:
        if kind == "jwt":
            return jwt_like_identity(i)
        if kind == "client_token":
            return Identity(subject=f"client-{i}", authenticator="tok", client="app", scopes=frozenset({"a"}),
                            claims={"token_hash": os.urandom(32).hex(), "token_id": "tok_" + os.urandom(6).hex()})
        return Refused(Unauthenticated("the token's signature does not verify", detail="signature"))

    n = 5000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        local = LocalVerdicts(max_entries=10**9, max_bytes=10**12)
        for i in range(n):
            local.put(hashlib.sha256(str(i).encode()).digest(), make(i), 300)
        real = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert real <= local.bytes <= 1.4 * real, (real / n, local.bytes / n)


def test_cached_identities_are_not_tracked_by_the_cycle_collector() -> None:
    """10,000 cached JWT identities leave (almost) nothing for a full collection to walk, and each comes back
    whole: subject, client, scopes, nested claims, expiry (issue 19: full collections over the cache were the tail)."""
    import gc

    from sidecar.proxy.verdict_cache import LocalVerdicts

    local = LocalVerdicts(max_entries=10**6, max_bytes=10**12)
    originals = {i.to_bytes(32, "big"): jwt_like_identity(i) for i in range(10_000)}
    gc.collect()
    before = len(gc.get_objects())
    for key, identity in originals.items():
        local.put(key, identity, 300)
    gc.collect()
    gc.collect()  # a tuple is untracked once a collection finds it holds only untracked values
    assert len(gc.get_objects()) - before < 1000  # held as objects: one or more per entry (10,000+)
    for key, identity in list(originals.items())[:50]:
        back = local.get(key)
        assert isinstance(back, Identity)
        assert (back.subject, back.authenticator, back.client, back.scopes, back.expires_at) == (
            identity.subject, identity.authenticator, identity.client, identity.scopes, identity.expires_at)
        assert dict(back.claims) == dict(identity.claims)
    assert local.get(next(iter(originals))) is local.get(next(iter(originals)))  # a hot key is not unpacked again
