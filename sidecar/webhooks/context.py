"""What the webhook worker (sidecar/webhooks/worker.py) uses of the running sidecar — and nothing else. The
runtime (sidecar/runtime.py) satisfies it; the webhooks never import the runtime."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from sidecar.config.model import Config
    from sidecar.ops.audit import AuditLog
    from sidecar.ops.metrics import Metrics
    from sidecar.state.store import MemoryStore, RedisStore


class WebhookContext(Protocol):
    @property
    def config(self) -> Config:
        """The configuration in force (`webhooks:`, `webhook_retry:`). A reload replaces the object: the worker
        tells a reload by its identity (subscriptions, and webhooks disabled by a 410, start afresh)."""

    @property
    def store(self) -> MemoryStore | RedisStore:
        """Its Redis connection, when there is one, carries the delivery queue."""

    @property
    def metrics(self) -> Metrics: ...

    @property
    def audit(self) -> AuditLog:
        """For the line that says events were lost (the spool is full)."""
