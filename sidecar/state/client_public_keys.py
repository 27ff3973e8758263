"""Clients' own public keys, for `client_jwt` (seed 004): `clients[].public_key` in the YAML, or a key
registered through the admin API (kept in the store; a registered key overrides the YAML one).

Keys are parsed once and kept parsed in memory, per client (registered) or per PEM (YAML, so a reload that
changes the PEM is seen at once). A registration is announced on the revocation channel and every process
drops its copy; a copy is re-read after `REFRESH` seconds anyway (one GET, re-parsed only if the PEM
changed), and on every use while the channel is down, so a missed announcement cannot last."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sidecar.config.types import ClientPublicKey, load_client_public_key
from sidecar.errors import Unauthenticated
from sidecar.issuer.signing_keys import public_jwk
from sidecar.state.store import PREFIX, REVOCATIONS

if TYPE_CHECKING:
    from sidecar.config.clients import ClientConfig
    from sidecar.state.store import MemoryStore, RedisStore

log = logging.getLogger("sidecar.state.client_public_keys")

PUBLIC_KEY_UPDATED = "public_key_updated"  # message type on the revocation channel
REFRESH = 30.0





def thumbprint(key: ClientPublicKey) -> str:
    """The key's RFC 7638 JWK thumbprint: a stable name for it that reveals nothing secret."""
    return str(public_jwk(key)["kid"])


def _store_key(client_id: str) -> str:
    return f"{PREFIX}public-key:{hashlib.sha256(client_id.encode()).hexdigest()}"


@dataclass(frozen=True, slots=True)
class _Registered:
    digest: str | None  # sha256 of the stored record: re-parse only when it changes
    key: ClientPublicKey | None
    fetched: float  # time.monotonic()


class ClientKeys:
    def __init__(self, store: MemoryStore | RedisStore) -> None:
        self.store = store
        self._registered: dict[str, _Registered] = {}
        self._from_config: dict[str, ClientPublicKey] = {}

    async def key_for(self, client: ClientConfig) -> ClientPublicKey | None:
        """The key that verifies this (configured) client's tokens: registered, else from the YAML."""
        registered = await self._registered_key(client.id)
        if registered is not None:
            return registered
        if not client.public_key:
            return None
        key = self._from_config.get(client.public_key)
        if key is None:
            key = self._from_config[client.public_key] = load_client_public_key(client.public_key)
        return key

    async def _registered_key(self, client_id: str) -> ClientPublicKey | None:
        entry = self._registered.get(client_id)
        now = time.monotonic()
        listening = not self.store.shared or self.store.connected
        if entry is not None and listening and entry.fetched > now - REFRESH:
            return entry.key
        raw = await self.store.get(_store_key(client_id))
        digest = hashlib.sha256(raw.encode()).hexdigest() if raw else None
        if entry is not None and entry.digest == digest:
            key = entry.key
        else:
            key = self._parse_record(client_id, raw)
        self._registered[client_id] = _Registered(digest, key, now)
        return key

    @staticmethod
    def _parse_record(client_id: str, raw: str | None) -> ClientPublicKey | None:
        if not raw:
            return None
        try:
            return load_client_public_key(json.loads(raw)["pem"])
        except (ValueError, KeyError, TypeError):
            # Written only after validation, so this is damage: refuse rather than fall back to the YAML key.
            log.error("the registered public key of client %r is unreadable; register it again", client_id)
            raise Unauthenticated("the client's registered public key is unreadable", detail="damaged key") from None

    async def register(self, client_id: str, pem: Any) -> dict[str, str]:
        """Validate (ValueError with a message for the caller), store, and tell every process."""
        key = load_client_public_key(pem)
        updated = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        record = json.dumps({"pem": pem, "updated": updated})
        await self.store.set(_store_key(client_id), record)
        await self.store.publish(REVOCATIONS, {"type": PUBLIC_KEY_UPDATED, "client": client_id})
        self._registered[client_id] = _Registered(hashlib.sha256(record.encode()).hexdigest(), key, time.monotonic())
        return {"client": client_id, "kid": thumbprint(key), "updated": updated}

    def forget(self, client_id: str) -> None:
        self._registered.pop(client_id, None)
