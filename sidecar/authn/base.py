"""What every authenticator is: a small protocol, the identity it returns, and how credentials are read.

An authenticator has a three-way contract (as Starlette's `AuthenticationBackend`):
`credential(request)` is `None` when the request carries no credential of its kind (the next
authenticator is tried); `verify(credential, request)` returns an `Identity` when the credential is
good and raises a `Refusal` when it is not — a credential that was found always decides (SPEC §3).
Authenticators never touch the verdict cache, the audit log or the response: the gateway does. Everything
the gateway, the verdict cache and the runtime read of an authenticator is declared on `Authenticator`;
`AuthenticatorBase` gives the defaults. What an authenticator may use of the running sidecar is
`AuthnContext` (the runtime's `Services` is one).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from sidecar.config.types import Source
from sidecar.errors import BadRequest, Unauthenticated

if TYPE_CHECKING:
    from sidecar.authn.jwks import JwksKeys
    from sidecar.config.clients import ClientConfig
    from sidecar.config.types import ClientPublicKey
    from sidecar.outbound.guard import ServiceClient
    from sidecar.proxy.request_view import RequestView

# The longest credential read, unless an authenticator's configuration sets its own (`max_token_size`): a longer
# one is refused before any work is spent on it.
MAX_CREDENTIAL_LENGTH = 4096

# What a credential is; also the noun of its refusal messages ("the session cookie is too large").
CredentialKind = Literal["token", "client token", "credential", "session cookie", "key", "logout", "anonymous"]


@dataclass(frozen=True, slots=True)
class Credential:
    """A credential found in a request. The verdict cache keys on a hash of it (`proxy/verdict_cache.py`)."""

    kind: CredentialKind
    value: str
    source: Source | None = None  # where it was read; None when nothing was (anonymous, logout without a cookie)
    # client_jwt: the client id sent beside the token (`id_from`). Cached verdicts are for the pair: the same token
    # under another client id is verified afresh. None when the id is not sent beside the token.
    client_id: str | None = None


@dataclass(frozen=True, slots=True)
class Identity:
    subject: str
    authenticator: str  # the name of the authenticator that vouched for it (audit `authenticator`, X-Auth-Method)
    client: str | None = None
    scopes: frozenset[str] = frozenset()
    claims: Mapping[str, Any] = field(default_factory=dict)
    # Seconds since the epoch after which this identity must not be served from a cache (a token's exp).
    expires_at: float | None = None


class Authenticator(Protocol):
    name: str
    sources: tuple[Source, ...]  # every place it reads: all are stripped before forwarding
    needs_body: bool  # reads the request body (a form or JSON field): the gateway reads it first
    cacheable: bool  # may the gateway cache its verdicts for this credential?
    fingerprint: bytes  # a hash of its configuration: part of every verdict cache key
    bearer: bool  # refusals carry a `WWW-Authenticate: Bearer` challenge
    shared_cache: bool  # its verdicts also go to the shared cache (an outside call is dearer than a Redis trip)
    revocable: bool  # its cached verdicts are dropped when revocations may have been missed (runtime.py)
    client_bound: bool  # its identities are configured clients (proxy/route_plans.py, proxy/authorization.py)
    cache_ttl: float | None  # how long an accepted verdict is cached; None: the `cache:` section's ttl
    negative_ttl: float | None  # how long a refusal is cached; None: the `cache:` section's negative_ttl
    # Start-up work: the JWKS it verifies with, fetched at start and retried in the background until it has a key
    # (runtime.py), and watched by readiness (ops/admin_api.py). None: nothing to load.
    key_set: JwksKeys | None

    def credential(self, request: RequestView) -> Credential | None: ...

    async def verify(self, credential: Credential, request: RequestView) -> Identity: ...

    def response_headers(self, identity: Identity, request: RequestView) -> Sequence[tuple[bytes, bytes]]:
        """Headers added to the upstream's response after an accepted request (e.g. a session cookie)."""


_NO_HEADERS: tuple[tuple[bytes, bytes], ...] = ()


class AuthenticatorBase:
    """The defaults of `Authenticator`'s members: an authenticator overrides what differs."""

    __slots__ = ()
    needs_body: bool = False
    cacheable: bool = False
    bearer: bool = False
    shared_cache: bool = False
    revocable: bool = False
    client_bound: bool = False
    cache_ttl: float | None = None
    negative_ttl: float | None = None
    key_set: JwksKeys | None = None

    def response_headers(self, identity: Identity, request: RequestView) -> Sequence[tuple[bytes, bytes]]:
        return _NO_HEADERS


# --- what authenticators use of the running sidecar -------------------------------------------------------------


class _Store(Protocol):
    async def set(self, key: str, value: str, ttl: float | None = None, only_new: bool = False) -> bool: ...


class _ClientTokens(Protocol):
    async def lookup(self, hex_hash: str) -> tuple[str, str] | None: ...

    def touch(self, token_id: str) -> None: ...


class _ClientKeys(Protocol):
    async def key_for(self, client: ClientConfig) -> ClientPublicKey | None: ...


class _Clients(Protocol):
    @property
    def clients(self) -> Mapping[str, ClientConfig]: ...


class _Secrets(Protocol):
    def secrets(self) -> list[str]: ...


class _KeysSection(Protocol):
    @property
    def keys(self) -> _Secrets: ...


class AuthnContext(Protocol):
    """What authenticators use of the running sidecar (`runtime.Services` is one, `sidecar explain` has its own).
    Read at verification time, so a reload's new policy and keys apply at once."""

    @property
    def http(self) -> ServiceClient: ...  # outbound calls: remote checks, JWKS fetches (guarded twin inside)

    @property
    def store(self) -> _Store: ...  # single-use marks, seen `jti`s

    @property
    def client_tokens(self) -> _ClientTokens: ...

    @property
    def client_keys(self) -> _ClientKeys: ...

    @property
    def policy(self) -> _Clients: ...  # the policy in force: its configured clients

    @property
    def config(self) -> _KeysSection: ...  # the configuration in force: its `keys.secret` (ip_key)

    def issuer_public_keys(self) -> list[tuple[str, Any]]: ...  # this sidecar's own issuer keys (jwt self_issued)

    def jwks_for(self, url: str) -> JwksKeys: ...  # the JWKS cache for a URL, kept across reloads


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


def _twice(source: Source) -> BadRequest:
    return BadRequest(f"the credential appears more than once in {source}; send it once")


def read_first(
    request: RequestView, sources: Iterable[Source], kind: CredentialKind, *,
    max_length: int | None = MAX_CREDENTIAL_LENGTH, bearer_authorization: bool = True,
) -> Credential | None:
    """The credential from the first source that has one. Two copies in one place are refused: proxies and
    backends disagree on which copy wins (Starlette keeps the last, many backends the first). A blank value
    (`Authorization: Bearer `, `X-Client-Token:`, `?access_token=`) is no credential: the next source, then the
    next authenticator, is tried (SPEC §3). Seed 004's PHP client sends `Bearer ` beside its body token.
    One longer than `max_length` is refused (401) before anything else is done with it."""
    for source in sources:
        values = request.values(source)
        if not values:
            continue
        if len(values) > 1:
            raise _twice(source)
        value: str | None = values[0]
        if bearer_authorization and source.kind == "header" and source.name == "authorization":
            value = bearer_token(values[0])  # None: another scheme (e.g. Basic), not a credential of this kind
        if value is not None and value.strip():
            if max_length is not None and len(value) > max_length:
                raise Unauthenticated(f"the {kind} is too large", detail="oversized")
            return Credential(kind, value, source)
    return None


def read_value(request: RequestView, source: Source) -> str | None:
    """A value that travels beside a credential without being one (client_jwt's client id): blank is absent, two
    copies are refused as for a credential."""
    values = request.values(source)
    if not values:
        return None
    if len(values) > 1:
        raise _twice(source)
    return values[0] if values[0].strip() else None
