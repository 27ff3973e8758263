"""`limits:` (SPEC §14, README "Limits and overload"): attempt limits on the endpoints that check a secret and
the per-worker bound on requests in flight."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from sidecar.config.types import Duration, Model


class AttemptsConfig(Model):
    """Failed secret checks (client secret, admin token, client token on the key endpoint) before a lock-out.

    `per_address` failures from one address lock that address out; `per_client` failures for one configured
    client id, counted only from addresses that never authenticated as that client, lock the id out for such
    addresses (its known addresses keep working). Failures are forgotten `window` after the last one. A lock-out
    lasts `lockout`, doubled for each failure past the threshold, at most `max_lockout`."""

    per_address: int = Field(default=10, ge=1)
    per_client: int = Field(default=100, ge=1)
    window: Duration = 900.0
    lockout: Duration = 1.0
    max_lockout: Duration = 900.0
    known_address_ttl: Duration = 30 * 86400.0


class LimitsConfig(Model):
    attempts: AttemptsConfig = AttemptsConfig()
    # Requests a worker serves at once on the main port; beyond it, 503 overloaded at once. 0: no bound.
    max_in_flight: int = Field(default=1000, ge=0)
    retry_after: Duration = 1.0  # the Retry-After of a 503 overloaded, in seconds


class BreakerConfig(Model):
    """A webhook receiver's circuit breaker: open after `failures` consecutive failed attempts (timeouts, 5xx,
    no connection); after `cooldown` one probe is let through (half-open) — it closes the breaker or opens it
    again."""

    failures: int = Field(default=5, ge=1)
    cooldown: Duration = 30.0


class SpoolConfig(Model):
    """`webhook_spool:` where events raised while Redis cannot take them wait (README "Limits and overload").
    `dir` unset: `sidecar-webhook-spool` in the temporary directory (the Helm chart's /tmp emptyDir)."""

    dir: str | None = None
    max_bytes: int = Field(default=32 * 1024 * 1024, ge=4096)


class RateLimitConfig(Model):
    """A route's `rate_limit:` — at most `rps` requests a second per client (the identity's client, else its
    subject) or per client address, with bursts of up to `burst` (GCRA, shared through Redis when configured).
    `fail`: what to do when Redis cannot be asked — `open` lets the request through, `closed` answers 503."""

    per: Literal["client", "ip"] = "client"
    rps: float = Field(gt=0)
    burst: int = Field(default=1, ge=1)
    fail: Literal["open", "closed"] = "open"
