"""The identifier map (seed 002's "De-Para"): a partner application's own id for a user → that user's login,
used by the `custom_sso` grant. Kept in the store. An identifier maps to one user only: a second mapping
of it is refused (409) and the whole request writes nothing.

An identifier is unique within its client application (`client_application_id`): two partners may each
have a user "42" of their own, and `custom_sso` looks identifiers up under the authenticated client."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sidecar.errors import BadRequest, Conflict
from sidecar.state.store import PREFIX

if TYPE_CHECKING:
    from sidecar.state.store import MemoryStore, RedisStore

MAX_MAPPINGS = 1000
MAX_LENGTH = 256
FIELDS = ("user_login", "client_application_id", "identifier")


@dataclass(frozen=True, slots=True)
class IdentifierMapping:
    user_login: str
    client_application_id: str
    identifier: str


def _store_key(client_id: str, identifier: str) -> str:
    digest = hashlib.sha256(f"{client_id}\x00{identifier}".encode()).hexdigest()
    return f"{PREFIX}identifier:{digest}"


def parse_mappings(body: Any, clients: Mapping[str, Any]) -> list[IdentifierMapping]:
    """The request body `[{user_login, client_application_id, identifier}]`, checked; BadRequest if not."""
    if not isinstance(body, list) or not body:
        raise BadRequest("send a non-empty JSON array of {user_login, client_application_id, identifier}")
    if len(body) > MAX_MAPPINGS:
        raise BadRequest(f"send at most {MAX_MAPPINGS} mappings per request")
    mappings = []
    for i, item in enumerate(body):
        if not isinstance(item, dict) or set(item) != set(FIELDS):
            raise BadRequest(f"item {i}: give exactly user_login, client_application_id and identifier")
        for name in FIELDS:
            value = item[name]
            if not isinstance(value, str) or not value.strip() or len(value) > MAX_LENGTH or not value.isprintable():
                raise BadRequest(f"item {i}: {name} must be a non-empty string of at most {MAX_LENGTH} "
                                 "printable characters")
        if item["client_application_id"] not in clients:
            raise BadRequest(f"item {i}: client_application_id is not a configured client")
        mappings.append(IdentifierMapping(**item))
    return mappings


class Identifiers:
    def __init__(self, store: MemoryStore | RedisStore) -> None:
        self.store = store

    async def add(self, mappings: list[IdentifierMapping]) -> None:
        """All or nothing: each key is written only if new (SET NX), and what this call wrote is removed again
        when one of them is taken. Two overlapping batches racing may both be refused; neither is half-written."""
        seen = set()
        for mapping in mappings:
            pair = (mapping.client_application_id, mapping.identifier)
            if pair in seen:
                raise Conflict(f"identifier {mapping.identifier!r} is listed twice; nothing was written")
            seen.add(pair)
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        written: list[str] = []
        try:
            for mapping in mappings:
                key = _store_key(mapping.client_application_id, mapping.identifier)
                record = json.dumps({"user_login": mapping.user_login, "created": created})
                if not await self.store.set(key, record, only_new=True):
                    raise Conflict(f"identifier {mapping.identifier!r} of client {mapping.client_application_id!r} "
                                   "is already mapped; nothing was written")
                written.append(key)
        except BaseException:
            if written:
                await self.store.delete(*written)
            raise

    async def user_for(self, client_id: str, identifier: str) -> str | None:
        raw = await self.store.get(_store_key(client_id, identifier))
        return str(json.loads(raw)["user_login"]) if raw else None
