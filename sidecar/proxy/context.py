"""What the gateway (sidecar/proxy/gateway.py) uses of the running sidecar — and nothing else. The runtime
(sidecar/runtime.py) satisfies it; the proxy never imports the runtime."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from sidecar.authn.base import Identity
    from sidecar.events import Events
    from sidecar.ops.audit import AuditLog
    from sidecar.ops.metrics import Metrics
    from sidecar.proxy.rate_limit import RateLimiter
    from sidecar.proxy.route_plans import Policy
    from sidecar.proxy.verdict_cache import VerdictCache
    from sidecar.proxy.websocket import Tunnels


class Subscriptions(Protocol):
    def targets(self, event: str) -> Sequence[object]:
        """Who would receive this event (nobody: it need not be built)."""


class GatewayContext(Protocol):
    @property
    def policy(self) -> Policy:
        """The compiled policy in force; a request takes it once and keeps it to the end."""

    @property
    def cache(self) -> VerdictCache: ...

    @property
    def audit(self) -> AuditLog: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def events(self) -> Events: ...

    @property
    def webhooks(self) -> Subscriptions: ...

    @property
    def tunnels(self) -> Tunnels:
        """The open WebSocket tunnels of this worker."""

    @property
    def rate_limits(self) -> RateLimiter:
        """Routes' `rate_limit:` counters (Redis when configured)."""

    def identity_token(self, identity: Identity) -> str | None:
        """The signed identity token for the upstream, when `identity.signed_token` is on."""
