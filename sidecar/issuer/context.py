"""What the issuer endpoints (token, keys, JWKS) use of the running sidecar — and nothing else. The runtime
(sidecar/runtime.py) satisfies it; the issuer never imports the runtime."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Mapping

    from sidecar.config.clients import ClientConfig
    from sidecar.config.model import Config
    from sidecar.events import Events
    from sidecar.issuer.signing_keys import SigningKeys
    from sidecar.ops.audit import AuditLog
    from sidecar.outbound.guard import ServiceClient
    from sidecar.state.attempt_limits import AttemptLimits
    from sidecar.state.client_token_store import ClientTokens
    from sidecar.state.store import MemoryStore, RedisStore


class IssuerContext(Protocol):
    @property
    def config(self) -> Config:
        """The configuration in force (`issuer:`, `keys:`); a reload replaces it."""

    @property
    def clients(self) -> Mapping[str, ClientConfig]:
        """The configured clients by id, as in force."""

    @property
    def signing(self) -> SigningKeys: ...

    @property
    def client_tokens(self) -> ClientTokens: ...

    @property
    def store(self) -> MemoryStore | RedisStore: ...

    @property
    def http(self) -> ServiceClient:
        """For the issuer's `credentials` webservice (the password grant)."""

    @property
    def events(self) -> Events: ...

    @property
    def audit(self) -> AuditLog: ...

    @property
    def attempts(self) -> AttemptLimits:
        """Failed secret checks per address and client id, and their lock-outs."""
