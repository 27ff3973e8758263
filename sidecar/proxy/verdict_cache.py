"""The verdict cache (SPEC §10): what an authenticator decided about a credential, kept so that the same
credential is not verified again. Keys are hashes of the authenticator's configuration and the credential,
never the credential. A verdict never outlives the token's `exp`; refusals are kept for `negative_ttl`;
concurrent misses for one credential make one check. A cached identity still goes through the route's
`require` checks on every hit (the gateway does that after `resolve`).

Layers: a bounded in-process LRU, over an optional shared layer (Redis) with the same small interface.

A reload never lets a verdict outlive what it was based on: the key's fingerprint covers the authenticator's
configuration and, for authenticators that map a credential to a configured client, the `clients` section
(`proxy/route_plans.py`); so a removed token or client, or a changed one, is verified afresh in both layers. A reload
that changes `cache:` applies at once (`configure`): the local layer is emptied, and a shared entry older than
the new TTL is a miss.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

from sidecar import errors
from sidecar.authn.base import Identity
from sidecar.errors import DependencyUnavailable, Refusal, Unauthenticated
from sidecar.state.store import PREFIX
from sidecar.timestamps import timestamp

if TYPE_CHECKING:
    from sidecar.authn.base import Authenticator, Credential
    from sidecar.proxy.request_view import RequestView


_REFUSALS = {name: cls for name, cls in vars(errors).items() if isinstance(cls, type) and issubclass(cls, Refusal)}


def cache_key(fingerprint: bytes, credential: Credential) -> bytes:
    """sha256(fingerprint, NUL, [client id, NUL,] value): the client id sent beside a token (client_jwt) is part of
    the key, so the same token under another client id is verified afresh."""
    text = credential.value if credential.client_id is None else f"{credential.client_id}\x00{credential.value}"
    return hashlib.sha256(fingerprint + b"\x00" + text.encode("utf-8", "surrogateescape")).digest()


class Refused:
    """A cached refusal: enough to raise the same refusal again, nothing of the credential."""

    __slots__ = ("description", "detail", "kind", "reason")

    def __init__(self, refusal: Refusal) -> None:
        self.kind = type(refusal)
        self.reason = refusal.reason
        self.description = refusal.description
        self.detail = refusal.detail

    def raise_again(self, cached: bool = True) -> None:
        detail = f"{self.detail} (cached)" if cached else self.detail
        raise self.kind(self.description, reason=self.reason, detail=detail)


Verdict = Identity | Refused


class SharedVerdicts(Protocol):
    """A cache shared by every process (Redis): get gives the verdict, the seconds it has left and its age, or
    None."""

    async def get(self, key: bytes) -> tuple[Verdict, float, float] | None: ...

    async def put(self, key: bytes, verdict: Verdict, ttl: float) -> None: ...


class StoreVerdicts:
    """Verdicts in the shared store, as JSON under `sidecar:verdict:<key hash>`. Only authenticators whose
    check is an outside call opt in (`shared_cache`): for them a Redis round trip is cheaper than the call, and
    every replica then asks the validator once. A store failure is a miss, never a refusal: the validator, not
    the cache, is the authority."""

    def __init__(self, store: Any) -> None:
        self._store = store

    async def get(self, key: bytes) -> tuple[Verdict, float, float] | None:
        try:
            raw = await self._store.get(f"{PREFIX}verdict:{key.hex()}")
        except DependencyUnavailable:
            return None
        if raw is None:
            return None
        data = json.loads(raw)
        now = time.time()
        until = timestamp(data.get("until"))
        if until is None or until <= now:
            return None  # expired, or not a deadline we wrote: a miss
        left = until - now
        written = timestamp(data.get("at"))
        age = max(0.0, now - (written if written is not None else now))
        if "refused" in data:
            refused = data["refused"]
            kind = _REFUSALS.get(refused["kind"], Unauthenticated)
            verdict: Verdict = Refused(kind(refused["description"], reason=refused["reason"], detail=refused["detail"]))
            return verdict, left, age
        i = data["identity"]
        expires_at = timestamp(i["expires_at"])
        if expires_at is None and i["expires_at"] is not None:
            return None
        # The stored field keeps its first name, "method", so that replicas of older versions read it alike.
        return Identity(subject=i["subject"], authenticator=i["method"], client=i["client"],
                        scopes=frozenset(i["scopes"]), claims=i["claims"], expires_at=expires_at), left, age

    async def put(self, key: bytes, verdict: Verdict, ttl: float) -> None:
        if isinstance(verdict, Refused):
            data: dict[str, Any] = {"refused": {"kind": verdict.kind.__name__, "reason": verdict.reason,
                                                "description": verdict.description, "detail": verdict.detail}}
        else:
            data = {"identity": {"subject": verdict.subject, "method": verdict.authenticator, "client": verdict.client,
                                 "scopes": sorted(verdict.scopes), "claims": dict(verdict.claims),
                                 "expires_at": verdict.expires_at}}
        data["at"] = time.time()
        data["until"] = data["at"] + ttl
        try:
            await self._store.set(f"{PREFIX}verdict:{key.hex()}", json.dumps(data, default=str), ttl=ttl)
        except DependencyUnavailable:
            pass


# How the verdict of the request running in this context was found (hit, miss, coalesced, shared_hit): for its
# audit line and its span (the gateway reads it after authenticating).
CACHE_RESULT: contextvars.ContextVar[str | None] = contextvars.ContextVar("sidecar_cache_result", default=None)


# What an entry costs beyond its strings, measured with tracemalloc (tests/unit/test_verdict_cache.py checks the
# estimate against the real cost): the key, the OrderedDict node, the (verdict, deadline, size) tuple
# (ENTRY_OVERHEAD); a packed identity's tuple and its scopes tuple (PACKED); a str object's header (_STR).
ENTRY_OVERHEAD = 300
PACKED = 170
_STR = 50


def entry_size(verdict: Verdict | Packed) -> int:
    """A cheap estimate of the bytes one cached verdict holds, as the local layer keeps it (`_pack`): fixed
    overheads plus the lengths of its strings. Shared scope sets are not counted."""
    if isinstance(verdict, Refused):
        return ENTRY_OVERHEAD + len(verdict.description) + len(verdict.detail)
    packed = verdict if isinstance(verdict, tuple) else _pack(verdict)
    subject, _, client, scopes, claims, _ = packed
    return (ENTRY_OVERHEAD + PACKED + 3 * _STR + len(subject) + len(client or "") + len(claims)
            + 8 * len(scopes))


# An identity as the local cache holds it: subject, authenticator, client, sorted scopes, claims as JSON text ("" for
# none), expiry. Only strings, numbers and a tuple of strings: the cycle collector does not track it.
Packed = tuple[str, str, "str | None", tuple[str, ...], str, "float | None"]
_NO_CLAIMS: Mapping[str, Any] = MappingProxyType({})


def _pack(identity: Identity) -> Packed:
    claims = json.dumps(identity.claims, separators=(",", ":"), default=str) if identity.claims else ""
    return (identity.subject, identity.authenticator, identity.client, tuple(sorted(identity.scopes)), claims,
            identity.expires_at)


class _LazyClaims(Mapping[str, Any]):
    """A cached identity's claims, parsed from their JSON only when something reads them (most requests don't)."""

    __slots__ = ("_data", "_text")

    def __init__(self, text: str) -> None:
        self._text = text
        self._data: dict[str, Any] | None = None

    def _claims(self) -> dict[str, Any]:
        if self._data is None:
            self._data = json.loads(self._text)
        return self._data

    def __getitem__(self, key: str) -> Any:
        return self._claims()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._claims())

    def __len__(self) -> int:
        return len(self._claims())


class LocalVerdicts:
    """A bounded LRU of verdicts with per-entry expiry (monotonic clock), bounded by entries and by bytes
    (`cache.max_bytes`: each entry's cost estimated at insert, `entry_size`). Past either bound the least recently
    used entries go. Identities with the same scopes share one frozenset (a few hundred bytes each otherwise).

    An identity is held packed, as a tuple of strings, numbers and other such tuples (`_pack`): CPython's cycle
    collector stops tracking such tuples, so a full cache costs a full collection nothing. Held as objects, 100,000
    verdicts made every full collection a ~80 ms pause on this machine — the never-seen-JWT p99 (issue 19). The
    identities of the last `HOT` distinct keys read are also kept unpacked, so a hot credential costs no unpacking;
    a handful of tracked objects, dropped with their entry."""

    HOT = 1024

    def __init__(self, max_entries: int = 100_000, max_bytes: int = 32 * 1024 * 1024) -> None:
        self._entries: OrderedDict[bytes, tuple[Packed | Refused, float, int]] = OrderedDict()
        self._max = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0  # the estimated size of every entry held
        self._scope_sets: dict[tuple[str, ...], frozenset[str]] = {}
        self._hot: dict[bytes, Verdict] = {}

    def get(self, key: bytes) -> Verdict | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[1] <= time.monotonic():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        verdict = self._hot.get(key)
        if verdict is None:
            if len(self._hot) >= self.HOT:
                self._hot.clear()
            verdict = self._hot[key] = self._unpack(entry[0])
        return verdict

    def put(self, key: bytes, verdict: Verdict, ttl: float) -> None:
        if ttl <= 0:
            return
        packed: Packed | Refused
        if isinstance(verdict, Refused):
            packed = verdict
            size = entry_size(packed)
        else:
            packed = identity = _pack(verdict)
            size = entry_size(identity)
            if verdict.scopes and identity[3] not in self._scope_sets:
                if len(self._scope_sets) < 4096:
                    self._scope_sets[identity[3]] = verdict.scopes
                else:  # too many distinct sets to share: each hit builds its own, and it is counted here
                    size += 220 + sum(_STR + len(scope) for scope in verdict.scopes)
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (packed, time.monotonic() + ttl, size)
        self.bytes += size
        self._shrink()

    def _unpack(self, packed: Packed | Refused) -> Verdict:
        if isinstance(packed, Refused):
            return packed
        subject, authenticator, client, scopes, claims, expires_at = packed
        return Identity(subject, authenticator, client, self._scope_sets.get(scopes) or frozenset(scopes),
                        _LazyClaims(claims) if claims else _NO_CLAIMS, expires_at)

    def _drop(self, key: bytes) -> None:
        self.bytes -= self._entries.pop(key)[2]
        self._hot.pop(key, None)

    def _shrink(self) -> None:
        while self._entries and (len(self._entries) > self._max or self.bytes > self.max_bytes):
            key, entry = self._entries.popitem(last=False)
            self.bytes -= entry[2]
            self._hot.pop(key, None)

    def resize(self, max_entries: int, max_bytes: int | None = None) -> None:
        self._max = max_entries
        if max_bytes is not None:
            self.max_bytes = max_bytes
        self._shrink()

    def evict_where(self, predicate: Any) -> int:
        doomed = [k for k, (v, _, _) in self._entries.items() if predicate(self._unpack(v))]
        for key in doomed:
            self._drop(key)
        return len(doomed)

    def clear(self) -> None:
        self._entries.clear()
        self._hot.clear()
        self.bytes = 0

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)


class VerdictCache:
    def __init__(
        self, ttl: float, negative_ttl: float, max_entries: int, shared: SharedVerdicts | None = None,
        on_result: Any = None, max_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.local = LocalVerdicts(max_entries, max_bytes)
        self.shared = shared
        self._inflight: dict[bytes, asyncio.Future[Verdict]] = {}
        self._report = on_result or (lambda result: None)

    def configure(self, ttl: float, negative_ttl: float, max_entries: int, max_bytes: int | None = None) -> None:
        """A reload's `cache:` settings. When the TTLs change, the local layer is emptied: no entry may outlive
        the new TTL (shared entries are checked against it by age, in `_lookup_or_verify`)."""
        if (ttl, negative_ttl) != (self.ttl, self.negative_ttl):
            self.local.clear()
        self.ttl, self.negative_ttl = ttl, negative_ttl
        self.local.resize(max_entries, max_bytes)

    def _on_result(self, result: str) -> None:
        self._report(result)
        CACHE_RESULT.set(result)

    async def resolve(self, auth: Authenticator, credential: Credential, request: RequestView) -> Identity:
        if not auth.cacheable:
            return await auth.verify(credential, request)
        key = cache_key(auth.fingerprint, credential)
        verdict = self.local.get(key)
        if verdict is not None:
            self._on_result("hit")
            return _unwrap(verdict)
        waiting = self._inflight.get(key)
        if waiting is not None:
            self._on_result("coalesced")
            return _unwrap(await asyncio.shield(waiting))
        future: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            verdict, fresh = await self._lookup_or_verify(auth, key, credential, request)
            future.set_result(verdict)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: nobody may be waiting
            raise
        finally:
            del self._inflight[key]
        return _unwrap(verdict, cached=not fresh)

    async def _lookup_or_verify(
        self, auth: Authenticator, key: bytes, credential: Credential, request: RequestView,
    ) -> tuple[Verdict, bool]:
        shared = self.shared if auth.shared_cache else None
        if shared is not None:
            found = await shared.get(key)
            if found is not None:
                verdict, left, age = found
                left = min(left, self._ttl_for(auth, verdict, age))  # the TTL in force now, not when written
                if left > 0:
                    self._on_result("shared_hit")
                    self.local.put(key, verdict, left)
                    return verdict, False
        self._on_result("miss")
        try:
            verdict = await auth.verify(credential, request)
        except Unauthenticated as refusal:
            verdict = Refused(refusal)
        ttl = self._ttl_for(auth, verdict)
        self.local.put(key, verdict, ttl)
        if shared is not None and ttl > 0:
            await shared.put(key, verdict, ttl)
        return verdict, True

    def _ttl_for(self, auth: Authenticator, verdict: Verdict, age: float = 0.0) -> float:
        """How much longer this verdict may be served, `age` seconds after it was decided."""
        if isinstance(verdict, Refused):
            negative = auth.negative_ttl
            return (self.negative_ttl if negative is None else negative) - age
        ttl = auth.cache_ttl
        ttl = (self.ttl if ttl is None else ttl) - age
        if verdict.expires_at is not None:
            expires_at = timestamp(verdict.expires_at)
            # An expiry that is no timestamp caches nothing (min() with NaN would keep the full ttl).
            ttl = 0.0 if expires_at is None else min(ttl, expires_at - time.time())
        return ttl


def _unwrap(verdict: Verdict, cached: bool = True) -> Identity:
    if isinstance(verdict, Refused):
        verdict.raise_again(cached)
    assert isinstance(verdict, Identity)
    return verdict
