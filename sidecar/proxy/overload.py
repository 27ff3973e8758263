"""Overload protection (SPEC §14, README "Limits and overload"): a bound on the requests one worker serves at
once on the main port (`limits.max_in_flight`). Beyond it a request is answered at once — 503 `overloaded` with
`Retry-After`, counted in `sidecar_overloaded_total` and audited — instead of queueing behind the others, so
latency stays bounded and the load balancer can send it elsewhere. The admin port (health, readiness, metrics,
admin API) is another server and is never limited."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from sidecar.errors import Overloaded

if TYPE_CHECKING:
    from sidecar.ops.audit import AuditLog
    from sidecar.ops.metrics import Metrics


async def answer_overloaded(retry_after: float, method: str, send: Any, audit: AuditLog, metrics: Metrics) -> None:
    """Send the 503 without reading the request any further, and account for it."""
    refusal = Overloaded(max(1, math.ceil(retry_after)))
    body = refusal.body()
    await send({"type": "http.response.start", "status": refusal.status,
                "headers": [*refusal.headers(body), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
    metrics.overload()
    audit.write(kind="request", method=method, decision=refusal.decision, reason=refusal.reason,
                status=refusal.status)
