"""Webhook isolation (SPEC §14, README "Limits and overload"): one receiver's trouble delays only its own
deliveries. Per receiver and per process:

- at most `max_concurrent` attempts in flight (of the worker's `WORKERS` slots), so a stalled receiver holds a
  few slots, never all of them;
- a circuit breaker: after `breaker.failures` consecutive failed attempts it opens, and that receiver's
  deliveries wait (deferred, their attempts not counted) until `breaker.cooldown` has passed; then one probe
  goes (half-open): success closes the breaker, failure opens it for another cool-down.

A delivery that may not go now is deferred to the retry set rather than waiting in a slot."""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING, Any

from sidecar.webhooks.queue import iso8601

if TYPE_CHECKING:
    from sidecar.config.model import WebhookConfig

BUSY_DEFER = 0.25  # seconds (jittered) before a delivery deferred because its receiver is at max_concurrent retries


class ReceiverGuard:
    """One receiver's concurrency and breaker state in this process."""

    __slots__ = ("failures", "in_flight", "open_until", "probing", "state")

    def __init__(self) -> None:
        self.in_flight = 0
        self.failures = 0  # consecutive failed attempts
        self.state = "closed"  # closed | open | half_open
        self.open_until = 0.0
        self.probing = False

    def admit(self, webhook: WebhookConfig, now: float) -> tuple[float, str] | None:
        """None: attempt now (counted in flight; call `done`). Else (seconds to defer, why)."""
        if self.state == "open":
            if now < self.open_until:
                return self.open_until - now + random.uniform(0, 0.2), (
                    f"deferred: circuit breaker open after {self.failures} consecutive failures, until "
                    f"{iso8601(self.open_until)}")
            self.state = "half_open"
        if self.state == "half_open":
            if self.probing:
                return BUSY_DEFER + random.uniform(0, BUSY_DEFER), "deferred: circuit breaker half-open, probing"
            self.probing = True
        elif self.in_flight >= webhook.max_concurrent:
            return BUSY_DEFER + random.uniform(0, BUSY_DEFER), (
                f"deferred: {self.in_flight} deliveries in flight to this receiver (max_concurrent)")
        self.in_flight += 1
        return None

    def done(self, webhook: WebhookConfig, failed: bool, now: float) -> None:
        self.in_flight -= 1
        probe, self.probing = self.state == "half_open", False
        if not failed:
            self.failures, self.state = 0, "closed"
            return
        self.failures += 1
        if probe or self.failures >= webhook.breaker.failures:
            self.state, self.open_until = "open", now + webhook.breaker.cooldown

    def report(self) -> dict[str, Any]:
        state = self.state
        if state == "open" and time.time() >= self.open_until:
            state = "half_open"  # the next delivery is the probe
        report: dict[str, Any] = {"breaker": state, "consecutive_failures": self.failures, "in_flight": self.in_flight}
        if state == "open":
            report["open_until"] = iso8601(self.open_until)
        return report


class ReceiverGuards:
    def __init__(self) -> None:
        self._guards: dict[str, ReceiverGuard] = {}

    def guard(self, webhook_id: str) -> ReceiverGuard:
        guard = self._guards.get(webhook_id)
        if guard is None:
            guard = self._guards[webhook_id] = ReceiverGuard()
        return guard

    def report(self, webhook_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Every configured receiver's state in this process, for the admin deliveries listing."""
        return {webhook_id: self.guard(webhook_id).report() for webhook_id in webhook_ids}
