"""What every authenticator is: a small protocol, the identity it returns, and how credentials are read.

An authenticator has a three-way contract (as Starlette's `AuthenticationBackend`):
`credential(request)` is `None` when the request carries no credential of its kind (the next
authenticator is tried); `verify(credential, request)` returns an `Identity` when the credential is
good and raises a `Refusal` when it is not — a credential that was found always decides (SPEC §3).
Authenticators never touch the verdict cache, the audit log or the response: the gateway does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from sidecar.config.types import Source
from sidecar.errors import BadRequest

if TYPE_CHECKING:
    from sidecar.proxy.request_view import RequestView


@dataclass(frozen=True, slots=True)
class Identity:
    subject: str
    method: str
    client: str | None = None
    scopes: frozenset[str] = frozenset()
    claims: Mapping[str, Any] = field(default_factory=dict)
    # Seconds since the epoch after which this identity must not be served from a cache (a token's exp).
    expires_at: float | None = None


class Authenticator(Protocol):
    name: str
    sources: tuple[Source, ...]  # every place it reads: all are stripped before forwarding
    needs_body: bool
    cacheable: bool  # may the gateway cache its verdicts for this credential?
    fingerprint: bytes  # a hash of its configuration: part of every verdict cache key
    bearer: bool  # refusals carry a `WWW-Authenticate: Bearer` challenge

    def credential(self, request: RequestView) -> str | None: ...

    async def verify(self, credential: str, request: RequestView) -> Identity: ...


def fingerprint(name: str, config: Any) -> bytes:
    dump = config.model_dump(mode="json") if hasattr(config, "model_dump") else config
    return hashlib.sha256(json.dumps([name, dump], sort_keys=True, default=str).encode()).digest()


def bearer_token(value: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive, RFC 6750 §2.1)."""
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or ""


def read_first(request: RequestView, sources: Iterable[Source], *, bearer_authorization: bool = True) -> str | None:
    """The credential from the first source that has one. Two copies in one place are refused: proxies and
    backends disagree on which copy wins (Starlette keeps the last, many backends the first). A blank value
    (`Authorization: Bearer `, `X-Client-Token:`, `?access_token=`) is no credential: the next source, then the
    next authenticator, is tried (SPEC §3). Seed 004's PHP client sends `Bearer ` beside its body token."""
    for source in sources:
        values = request.values(source)
        if not values:
            continue
        if len(values) > 1:
            raise BadRequest(f"the credential appears more than once in {source}; send it once")
        value: str | None = values[0]
        if bearer_authorization and source.kind == "header" and source.name == "authorization":
            value = bearer_token(values[0])  # None: another scheme (e.g. Basic), not a credential of this kind
        if value is not None and value.strip():
            return value
    return None
