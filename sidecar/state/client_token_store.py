"""Client access tokens (seed 000): per-client secrets looked up by SHA-256 hash, never compared as strings.
Tokens come from the YAML (`clients[].tokens`, hashes only) or are minted through the admin API (kept in the
store). Revocation is a store write plus a message on the revocation channel, on which every process evicts
what it cached for that token."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from typing import TYPE_CHECKING, Any

from sidecar.errors import DependencyUnavailable
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


def _record_key(hex_hash: str) -> str:
    return f"{PREFIX}token:{{{hex_hash}}}"


def _revoked_key(hex_hash: str) -> str:
    return f"{PREFIX}revoked:{{{hex_hash}}}"


def _id_key(token_id: str) -> str:
    return f"{PREFIX}token-id:{token_id}"


def _client_key(client_id: str) -> str:
    return f"{PREFIX}client-tokens:{client_id}"


class ClientTokens:
    def __init__(self, store: MemoryStore | RedisStore, clients: list[ClientConfig]) -> None:
        self.store = store
        self._used: dict[str, str] = {}
        self.configure(clients)

    def configure(self, clients: list[ClientConfig]) -> None:
        self._config: dict[str, tuple[str, str]] = {}
        for client in clients:
            for entry in client.tokens:
                hex_hash = entry.removeprefix("sha256:")
                self._config[hex_hash] = (client.id, config_token_id(hex_hash))

    async def lookup(self, hex_hash: str) -> tuple[str, str] | None:
        """(client id, token id) of a live token, or None. One store round trip."""
        if self.store.shared and not self.store.connected:
            raise DependencyUnavailable("revocations cannot be checked right now")
        record, revoked = await self.store.mget([_record_key(hex_hash), _revoked_key(hex_hash)])
        if revoked:
            return None
        if hex_hash in self._config:
            return self._config[hex_hash]
        if record:
            data = json.loads(record)
            return data["client"], data["id"]
        return None

    async def mint(self, client_id: str) -> dict[str, Any]:
        token = new_token()
        hex_hash = token_hash(token)
        token_id = "tok_" + secrets.token_hex(6)
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        record = {"id": token_id, "client": client_id, "created": created, "last4": token[-4:]}
        await self.store.set(_record_key(hex_hash), json.dumps(record))
        await self.store.set(_id_key(token_id), json.dumps({**record, "hash": hex_hash}))
        await self.store.sadd(_client_key(client_id), token_id)
        return {"id": token_id, "client": client_id, "token": token, "created": created}

    async def revoke(self, client_id: str, token_id: str) -> str | None:
        """Revoke a token of this client; the hash revoked, or None when the client has no such token."""
        hex_hash = None
        for config_hash, (owner, config_id) in self._config.items():
            if config_id == token_id and owner == client_id:
                hex_hash = config_hash
        if hex_hash is not None:
            await self.store.set(_revoked_key(hex_hash), "1")
        else:
            raw = await self.store.get(_id_key(token_id))
            if raw is None or json.loads(raw)["client"] != client_id:
                return None
            hex_hash = json.loads(raw)["hash"]
            await self.store.delete(_record_key(hex_hash), _id_key(token_id))
            await self.store.srem(_client_key(client_id), token_id)
        await self.store.publish(REVOCATIONS, {"type": "token_revoked", "token_hash": hex_hash})
        return hex_hash

    async def listing(self, client_id: str) -> list[dict[str, Any]]:
        """The client's tokens without secrets or hashes: id, last four characters (minted ones), created."""
        tokens: list[dict[str, Any]] = []
        for hex_hash, (owner, token_id) in self._config.items():
            if owner == client_id:
                revoked = await self.store.get(_revoked_key(hex_hash))
                tokens.append({"id": token_id, "source": "config", "last4": None, "created": None,
                               "last_used": await self.store.get(f"{PREFIX}last-used:{token_id}"),
                               "revoked": bool(revoked)})
        for token_id in sorted(await self.store.smembers(_client_key(client_id))):
            raw = await self.store.get(_id_key(token_id))
            if raw is None:
                continue
            data = json.loads(raw)
            tokens.append({"id": token_id, "source": "admin", "last4": data["last4"], "created": data["created"],
                           "last_used": await self.store.get(f"{PREFIX}last-used:{token_id}"), "revoked": False})
        return tokens

    def touch(self, token_id: str) -> None:
        """Note a use; written to the store by `flush_last_used` (off the request path)."""
        self._used[token_id] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    async def flush_last_used(self) -> None:
        used, self._used = self._used, {}
        for token_id, when in used.items():
            await self.store.set(f"{PREFIX}last-used:{token_id}", when, ttl=LAST_USED_TTL)
