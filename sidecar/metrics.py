"""Prometheus series (SPEC §9). Labels are bounded: route ids and fixed words, never paths or client input."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("sidecar_requests", "Requests by route and decision", ["route", "decision"], registry=r)
        self.duration = Histogram("sidecar_request_duration_seconds", "Total time per request", ["route"],
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_duration = Histogram("sidecar_upstream_duration_seconds", "Upstream time per request",
                                           ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.auth_cache = Counter("sidecar_auth_cache", "Verdict cache lookups by result", ["result"], registry=r)
        self.webhooks = Counter("sidecar_webhook_deliveries", "Webhook delivery attempts by outcome", ["outcome"],
                                registry=r)
        self.upstream_errors = Counter("sidecar_upstream_errors", "Upstream failures", ["route", "reason"], registry=r)
        self._children: dict[tuple[str, str], object] = {}

    def request(self, route: str, decision: str, total: float, upstream: float | None) -> None:
        key = (route, decision)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = (
                self.requests.labels(route, decision), self.duration.labels(route), self.upstream_duration.labels(route)
            )
        counter, duration, upstream_duration = child  # type: ignore[misc]
        counter.inc()
        duration.observe(total)
        if upstream is not None:
            upstream_duration.observe(upstream)

    def cache_result(self, result: str) -> None:
        self.auth_cache.labels(result).inc()

    def render(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
