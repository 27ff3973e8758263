"""What the admin port (sidecar/ops/admin_api.py) uses of the running sidecar — and nothing else. The runtime
(sidecar/runtime.py) satisfies it; the admin API never imports the runtime."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from sidecar.config.model import Config
    from sidecar.events import Events
    from sidecar.ops.audit import AuditLog
    from sidecar.ops.metrics import Metrics
    from sidecar.proxy.route_plans import Policy
    from sidecar.state.attempt_limits import AttemptLimits
    from sidecar.state.client_public_keys import ClientKeys
    from sidecar.state.client_token_store import ClientTokens
    from sidecar.state.store import MemoryStore, RedisStore


class ReloadOutcome(Protocol):
    """What a reload answers: applied or not, why not, and the keys that need a restart instead."""

    @property
    def applied(self) -> bool: ...

    @property
    def errors(self) -> list[str]: ...

    @property
    def restart(self) -> list[str]: ...


class AdminContext(Protocol):

    @property
    def policy(self) -> Policy:
        """The compiled policy in force (clients, routes, authenticators); a reload replaces it."""

    @property
    def config(self) -> Config: ...

    @property
    def audit(self) -> AuditLog: ...

    @property
    def attempts(self) -> AttemptLimits:
        """Failed secret checks per address and client id, and their lock-outs."""

    @property
    def metrics(self) -> Metrics: ...

    @property
    def events(self) -> Events: ...

    @property
    def store(self) -> MemoryStore | RedisStore: ...

    @property
    def client_tokens(self) -> ClientTokens: ...

    @property
    def client_keys(self) -> ClientKeys: ...

    async def reload_from_file(self, reason: str) -> ReloadOutcome: ...
