"""Prometheus series (SPEC §9). Labels are bounded: route ids and fixed words, never paths or client input.

The request path only bumps plain Python counters (a dict increment and a bisect); they are folded into the
prometheus-client metrics at most every second and before every scrape. That keeps per-request metric cost
under a microsecond, also in multiprocess mode where every prometheus-client update writes a shared file."""

from __future__ import annotations

import bisect
import os
import platform
from collections.abc import Iterable
from typing import Any, Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics_core import Metric

from sidecar import __version__

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BOUNDS = (*LATENCY_BUCKETS, float("inf"))


GaugeMode = Literal["livemin", "livemax"]

# The status-class label of sidecar_requests_total, indexed by status // 100 (499 and 503 of abandoned requests
# are 4xx and 5xx like any other).
STATUS_CLASSES = ("-", "1xx", "2xx", "3xx", "4xx", "5xx")


class _Observations:
    """Histogram observations not yet folded in: a count per bucket and the sum."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * len(_BOUNDS)
        self.total = 0.0

    def add(self, value: float) -> None:
        self.counts[bisect.bisect_left(_BOUNDS, value)] += 1
        self.total += value


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("sidecar_requests", "Requests by route, decision, status class and mode",
                                ["route", "decision", "status_class", "mode"], registry=r)
        self.duration = Histogram("sidecar_request_duration_seconds", "Total time per request", ["route"],
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_duration = Histogram("sidecar_upstream_duration_seconds", "Upstream time per request",
                                           ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.auth_cache = Counter("sidecar_auth_cache", "Verdict cache lookups by result", ["result"], registry=r)
        self.webhooks = Counter("sidecar_webhook_deliveries", "Webhook delivery attempts by outcome", ["outcome"],
                                registry=r)
        self.would_deny = Counter("sidecar_would_deny", "Requests a report-only route forwarded but would refuse",
                                  ["route", "reason"], registry=r)
        self.upstream_errors = Counter("sidecar_upstream_errors", "Upstream failures", ["route", "reason"], registry=r)
        build = Gauge("sidecar_build_info", "Always 1; the labels say which sidecar and Python run",
                      ["version", "python"], registry=r, multiprocess_mode="max")
        build.labels(__version__, platform.python_version()).set(1)
        self.in_flight_gauge = Gauge("sidecar_in_flight_requests", "Requests being answered on the main port now",
                                     registry=r, multiprocess_mode="livesum")
        self.in_flight = 0  # bumped by the main app around each request, copied into the gauge on flush
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            ProcessCollector(registry=r)
        self.websocket_tunnels = Gauge("sidecar_websocket_tunnels", "Open WebSocket tunnels", registry=r,
                                       multiprocess_mode="livesum")
        self.websocket_bytes = Counter("sidecar_websocket_bytes", "Bytes through WebSocket tunnels by direction",
                                       ["direction"], registry=r)
        self.secret_attempts = Counter("sidecar_secret_attempts", "Secret checks on the token, key and admin "
                                       "endpoints by outcome (ok, failed, locked)", ["endpoint", "outcome"], registry=r)
        self.lockouts = Counter("sidecar_lockouts", "Lock-outs begun after failed secret checks, by scope",
                                ["endpoint", "scope"], registry=r)
        self.overloaded = Counter("sidecar_overloaded", "Requests answered 503 overloaded (limits.max_in_flight)",
                                  registry=r)
        self._overloaded = 0
        self.cache_bytes = Gauge("sidecar_verdict_cache_bytes", "Estimated bytes held by the local verdict cache "
                                 "(bounded by cache.max_bytes per worker)", registry=r, multiprocess_mode="livesum")
        self.cache_entries = Gauge("sidecar_verdict_cache_entries", "Verdicts held by the local verdict cache",
                                   registry=r, multiprocess_mode="livesum")
        self._redis: dict[str, Gauge] = {}
        self._requests: dict[tuple[str, str, str, str], int] = {}
        self._durations: dict[str, _Observations] = {}
        self._upstream: dict[str, _Observations] = {}
        self._cache: dict[str, int] = {}

    def request(self, route: str, decision: str, total: float, upstream: float | None, status: int = 0,
                mode: str = "proxy") -> None:
        key = (route, decision, STATUS_CLASSES[status // 100] if 0 < status < 600 else "-", mode)
        self._requests[key] = self._requests.get(key, 0) + 1
        observations = self._durations.get(route)
        if observations is None:
            observations = self._durations[route] = _Observations()
        observations.add(total)
        if upstream is not None:
            observations = self._upstream.get(route)
            if observations is None:
                observations = self._upstream[route] = _Observations()
            observations.add(upstream)

    def attempt(self, endpoint: str, outcome: str) -> None:
        self.secret_attempts.labels(endpoint, outcome).inc()

    def lockout(self, endpoint: str, scope: str) -> None:
        self.lockouts.labels(endpoint, scope).inc()

    def overload(self) -> None:
        self._overloaded += 1

    def cache_result(self, result: str) -> None:
        self._cache[result] = self._cache.get(result, 0) + 1

    def redis_health(self, health: Any) -> None:
        """Redis as this process sees it (set when it changes). Under `--workers N` the lowest worker's view wins
        for the 0/1 gauges: one worker that cannot listen for revocations is a worker failing closed."""
        values: dict[str, tuple[float, str, GaugeMode]] = {
                  "sidecar_redis_up": (float(bool(health.reachable)), "1 when every Redis node answers", "livemin"),
                  "sidecar_redis_revocations_listening": (float(health.listening),
                                                          "1 while the revocation channel is subscribed", "livemin"),
                  "sidecar_redis_state_since_seconds": (health.since, "Unix time of the last change of Redis state",
                                                        "livemax")}
        if health.mode == "cluster":
            values["sidecar_redis_cluster_ok"] = (float(health.cluster_state == "ok"),
                                                  "1 when every cluster master answers cluster_state:ok", "livemin")
        for name, (value, description, mode) in values.items():
            gauge = self._redis.get(name)
            if gauge is None:
                gauge = self._redis[name] = Gauge(name, description, registry=self.registry, multiprocess_mode=mode)
            gauge.set(value)

    def flush(self) -> None:
        requests, self._requests = self._requests, {}
        for (route, decision, status_class, mode), count in requests.items():
            self.requests.labels(route, decision, status_class, mode).inc(count)
        self.in_flight_gauge.set(self.in_flight)
        cache, self._cache = self._cache, {}
        if self._overloaded:
            overloaded, self._overloaded = self._overloaded, 0
            self.overloaded.inc(overloaded)
        for result, count in cache.items():
            self.auth_cache.labels(result).inc(count)
        for histogram, name in ((self.duration, "_durations"), (self.upstream_duration, "_upstream")):
            pending: dict[str, _Observations] = getattr(self, name)
            setattr(self, name, {})
            for route, observations in pending.items():
                _fold(histogram.labels(route), observations)

    def render(self) -> bytes:
        self.flush()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            registry.register(ProcessTreeCollector())
            return generate_latest(registry)
        return generate_latest(self.registry)


def _fold(child: Any, observations: _Observations) -> None:
    # prometheus-client's private histogram child internals, used here only (its version is capped in
    # pyproject.toml; tests/test_dependency_internals.py fails with a clear message if they change). It keeps one
    # (non-cumulative) value per bucket, `_buckets`, and a sum, `_sum`; adding our counts to them is what `observe`
    # would have done one value at a time. The public `observe`, once per request, costs a file write per call in
    # multiprocess mode, and there is no public bulk update.
    for i, count in enumerate(observations.counts):
        if count:
            child._buckets[i].inc(count)
    child._sum.inc(observations.total)


class ProcessTreeCollector:
    """The standard process_* series in multiprocess mode, for the whole sidecar: the supervisor and its workers.

    prometheus-client's multiprocess collector has none (each would describe only the process that happened to
    answer the scrape). CPU, memory and open files are summed over the tree; the start time is the supervisor's."""

    def collect(self) -> Iterable[Metric]:
        root = int(os.environ.get("SIDECAR_SUPERVISOR_PID") or os.getpid())
        pids = [root, *_children(root)]
        merged: dict[str, Metric] = {}
        for pid in pids:
            for metric in ProcessCollector(pid=lambda pid=pid: pid, registry=None).collect():  # type: ignore[misc]
                sample = metric.samples[0] if metric.samples else None
                if sample is None:
                    continue
                if metric.name not in merged:
                    merged[metric.name] = metric
                elif metric.name not in ("process_start_time_seconds", "process_max_fds"):
                    first = merged[metric.name]
                    first.samples[0] = first.samples[0]._replace(value=first.samples[0].value + sample.value)
        return list(merged.values())


def _children(pid: int) -> list[int]:
    children: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                children.extend(int(child) for child in handle.read().split())
    except OSError:
        pass
    return children
