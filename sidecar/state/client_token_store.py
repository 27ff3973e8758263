"""Client access tokens (seed 000): per-client secrets looked up by SHA-256 hash, never compared as strings.
Tokens come from the YAML (`clients[].tokens`, hashes only) or are minted through the admin API (kept in the
store). Revocation is one atomic store write plus a message on the revocation channel, on which every process
evicts what it cached for that token.

Keys. A client's token records and revocations share the hash tag `{client:<id>}` (one Redis Cluster slot), so
revoking is one atomic step whatever the deployment:

    sidecar:{client:<id>}:tokens    hash  token id -> record (id, hash, created, last 4)   live minted tokens
    sidecar:{client:<id>}:revoked   hash  token id -> token hash                           revoked, any source
    sidecar:token:{<hash>}          JSON {client, id}: which client a presented token belongs to (written once)

A minted token is live while its record is in the client's hash: losing that slot's data refuses the token.
Tokens minted before this layout (record under `sidecar:token:{<hash>}` with its `last4`, id under
`sidecar:token-id:<id>`, listed in `sidecar:client-tokens:<id>`) keep working until revoked, which is recorded
in the client's `revoked` hash; YAML tokens revoked under the old layout (`sidecar:revoked:{<hash>}`) stay revoked.

Revoking announces before answering. A retry of a revocation that was cut short (announcement not sent) finds
the token already revoked, announces again and answers 204 — never 404."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sidecar.errors import DependencyUnavailable
from sidecar.ops import tracing
from sidecar.state.store import PREFIX, REVOCATIONS

if TYPE_CHECKING:
    from sidecar.config.clients import ClientConfig
    from sidecar.state.store import MemoryStore, RedisStore

TOKEN_PREFIX = "sct_"
LAST_USED_TTL = 90 * 24 * 3600.0  # a token unused for 90 days shows as never used; no key lives forever


def new_token() -> str:
    """A recognisable prefix (so secret scanners can find leaked ones) and 32 random bytes."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def config_token_id(hex_hash: str) -> str:
    """A stable id for a YAML token that reveals nothing of its hash."""
    return "cfg_" + hashlib.sha256(b"token-id:" + hex_hash.encode()).hexdigest()[:12]


def _index_key(hex_hash: str) -> str:
    return f"{PREFIX}token:{{{hex_hash}}}"


def _tokens_key(client_id: str) -> str:
    return f"{PREFIX}{{client:{client_id}}}:tokens"


def _revoked_key(client_id: str) -> str:
    return f"{PREFIX}{{client:{client_id}}}:revoked"


# The layout before `{client}` hash tags: read, never written.
def _old_revoked_key(hex_hash: str) -> str:
    return f"{PREFIX}revoked:{{{hex_hash}}}"


def _old_id_key(token_id: str) -> str:
    return f"{PREFIX}token-id:{token_id}"


def _old_client_key(client_id: str) -> str:
    return f"{PREFIX}client-tokens:{client_id}"


class ClientTokens:
    def __init__(self, store: MemoryStore | RedisStore, clients: list[ClientConfig],
                 on_revoked: Callable[[str], None] = lambda hex_hash: None) -> None:
        self.store = store
        self._on_revoked = on_revoked
        self._unannounced: set[str] = set()
        self._used: dict[str, str] = {}
        self.configure(clients)

    def configure(self, clients: list[ClientConfig]) -> None:
        self._config: dict[str, tuple[str, str]] = {}
        for client in clients:
            for entry in client.tokens:
                hex_hash = entry.removeprefix("sha256:")
                self._config[hex_hash] = (client.id, config_token_id(hex_hash))

    async def lookup(self, hex_hash: str) -> tuple[str, str] | None:
        """(client id, token id) of a live token, or None. One store round trip for a YAML token, two for a
        minted one (which client it belongs to, then the client's record)."""
        if self.store.shared and not self.store.connected:
            raise DependencyUnavailable("revocations cannot be checked right now")
        with tracing.span("client_token.lookup", **{"db.system": "redis" if self.store.shared else "memory"}):
            return await self._lookup(hex_hash)

    async def _lookup(self, hex_hash: str) -> tuple[str, str] | None:
        if hex_hash in self._config:
            client_id, token_id = self._config[hex_hash]
            revoked, old_revoked = await asyncio.gather(self.store.hget(_revoked_key(client_id), token_id),
                                                        self.store.get(_old_revoked_key(hex_hash)))
            return None if revoked or old_revoked else (client_id, token_id)
        raw = await self.store.get(_index_key(hex_hash))
        if raw is None:
            return None
        index = json.loads(raw)
        client_id, token_id = index["client"], index["id"]
        if "last4" in index:  # minted under the old layout: live unless revoked since
            revoked = await self.store.hget(_revoked_key(client_id), token_id)
            return None if revoked else (client_id, token_id)
        record = await self.store.hget(_tokens_key(client_id), token_id)
        return (client_id, token_id) if record and json.loads(record)["hash"] == hex_hash else None

    async def mint(self, client_id: str) -> dict[str, Any]:
        token = new_token()
        hex_hash = token_hash(token)
        token_id = "tok_" + secrets.token_hex(6)
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        record = {"id": token_id, "hash": hex_hash, "created": created, "last4": token[-4:]}
        # The record first: a token whose index could not be written is listed (and revocable), never orphaned.
        await self.store.hset(_tokens_key(client_id), token_id, json.dumps(record))
        await self.store.set(_index_key(hex_hash), json.dumps({"client": client_id, "id": token_id}))
        return {"id": token_id, "client": client_id, "token": token, "created": created}

    async def revoke(self, client_id: str, token_id: str) -> str | None:
        """Revoke a token of this client and announce it; the hash revoked, or None when the client never had
        such a token. Idempotent: revoking a revoked token announces it again."""
        hex_hash = await self._hash_of(client_id, token_id)
        if hex_hash is None:
            return None
        await self.store.atomically([("HSET", _revoked_key(client_id), token_id, hex_hash),
                                     ("HDEL", _tokens_key(client_id), token_id)])
        self._on_revoked(hex_hash)  # this process at once, whatever happens to the announcement
        try:
            await self.store.publish(REVOCATIONS, {"type": "token_revoked", "token_hash": hex_hash})
        except DependencyUnavailable:
            self._unannounced.add(hex_hash)  # announced again in the background until it goes through
            raise
        # Tidying keys in other slots: the revocation above is what refuses the token, so a failure here is harmless.
        with contextlib.suppress(DependencyUnavailable):
            if hex_hash not in self._config:
                await self.store.delete(_index_key(hex_hash), _old_id_key(token_id))
                await self.store.srem(_old_client_key(client_id), token_id)
        return hex_hash

    async def _hash_of(self, client_id: str, token_id: str) -> str | None:
        for config_hash, (owner, config_id) in self._config.items():
            if config_id == token_id and owner == client_id:
                return config_hash
        record = await self.store.hget(_tokens_key(client_id), token_id)
        if record is not None:
            return str(json.loads(record)["hash"])
        revoked = await self.store.hget(_revoked_key(client_id), token_id)
        if revoked is not None:
            return revoked
        old = await self.store.get(_old_id_key(token_id))
        if old is not None and json.loads(old)["client"] == client_id:
            return str(json.loads(old)["hash"])
        return None

    async def listing(self, client_id: str) -> list[dict[str, Any]]:
        """The client's tokens without secrets or hashes: id, last four characters (minted ones), created."""
        revoked = await self.store.hgetall(_revoked_key(client_id))
        tokens: list[dict[str, Any]] = []
        for hex_hash, (owner, token_id) in self._config.items():
            if owner == client_id:
                old_revoked = await self.store.get(_old_revoked_key(hex_hash))
                tokens.append({"id": token_id, "source": "config", "last4": None, "created": None,
                               "last_used": await self.store.get(f"{PREFIX}last-used:{token_id}"),
                               "revoked": token_id in revoked or bool(old_revoked)})
        records = await self.store.hgetall(_tokens_key(client_id))
        minted = {token_id: json.loads(raw) for token_id, raw in records.items()}
        for token_id in await self.store.smembers(_old_client_key(client_id)):
            raw = await self.store.get(_old_id_key(token_id))
            if raw is not None and token_id not in revoked:
                minted.setdefault(token_id, json.loads(raw))
        for token_id in sorted(minted):
            data = minted[token_id]
            tokens.append({"id": token_id, "source": "admin", "last4": data["last4"], "created": data["created"],
                           "last_used": await self.store.get(f"{PREFIX}last-used:{token_id}"), "revoked": False})
        return tokens

    async def announce_pending(self) -> None:
        """Announce the revocations whose announcement failed (the caller got a 503 and may never retry)."""
        for hex_hash in list(self._unannounced):
            await self.store.publish(REVOCATIONS, {"type": "token_revoked", "token_hash": hex_hash})
            self._unannounced.discard(hex_hash)

    def touch(self, token_id: str) -> None:
        """Note a use; written to the store by `flush_last_used` (off the request path)."""
        self._used[token_id] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    async def flush_last_used(self) -> None:
        used, self._used = self._used, {}
        for token_id, when in used.items():
            await self.store.set(f"{PREFIX}last-used:{token_id}", when, ttl=LAST_USED_TTL)
