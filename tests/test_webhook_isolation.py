"""Webhook isolation (SPEC §14, issue 17): a stalled receiver holds at most `max_concurrent` of a process's
delivery slots and its circuit breaker opens, so a healthy receiver's deliveries still arrive on time; the
admin deliveries listing shows each receiver's breaker. Real receivers, real Redis, a real sidecar."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from redis_support import redis_url  # noqa: F401  (fixture)
from test_webhooks import ADMIN_HEADERS, SECRET, Receiver, config, pay, upstream_url, wait_for  # noqa: F401

from sidecar.testing import running_sidecar, serve_in_thread


@pytest.fixture
def stalled() -> Iterator[Receiver]:
    app = Receiver()
    app.stalled.set()
    with serve_in_thread(app) as url:
        app.url = url + "/hooks"
        yield app
        app.stalled.clear()


@pytest.fixture
def healthy() -> Iterator[Receiver]:
    app = Receiver()
    with serve_in_thread(app) as url:
        app.url = url + "/hooks"
        yield app


def receivers(admin_url: str) -> dict[str, dict[str, object]]:
    response = httpx.get(admin_url + "/admin/webhooks/deliveries", headers=ADMIN_HEADERS)
    assert response.status_code == 200, response.text
    return response.json()["receivers"]


def test_a_stalled_receiver_does_not_delay_a_healthy_one(stalled: Receiver, healthy: Receiver, upstream_url: str,  # noqa: F811
                                                         redis_url: str) -> None:  # noqa: F811
    """20 events for a stalled receiver (5 s timeout) and a healthy one: the healthy one gets all 20 within 2 s
    (without isolation the stalled deliveries would fill all 16 slots for 5 s); the stalled one never has more
    than max_concurrent (4) attempts open; its breaker opens after 3 failures, shown in the admin listing."""
    cfg = config(upstream_url, redis_url, url=healthy.url)
    slow = {**cfg["webhooks"][0], "id": "slow", "url": stalled.url, "timeout": "5s", "max_concurrent": 4,
            "breaker": {"failures": 3, "cooldown": "30s"}, "retry": {"initial": "50ms", "max_delay": "100ms",
                                                                      "max_attempts": 50}}
    cfg["webhooks"] = [slow, cfg["webhooks"][0]]  # the stalled receiver's deliveries come first in the queue
    with running_sidecar(cfg) as sc:
        started = time.monotonic()
        for _ in range(20):
            pay(sc.url)
        raised = time.monotonic()
        assert wait_for(lambda: len(healthy.hooks) >= 20, timeout=10)
        arrived = time.monotonic()
        assert arrived - raised < 2.0, (arrived - raised, raised - started)
        assert len({hook.id for hook in healthy.hooks}) == 20
        assert all(hook.verified(SECRET) for hook in healthy.hooks)
        time.sleep(0.5)
        assert len(stalled.hooks) == 4  # max_concurrent open at the stalled receiver, the rest deferred
        assert receivers(sc.admin_url)["erp"]["breaker"] == "closed"
        state = wait_for(lambda: (r := receivers(sc.admin_url)["slow"])["breaker"] == "open" and r, timeout=10)
        assert state and state["consecutive_failures"] >= 3 and "open_until" in state
        pending = httpx.get(sc.admin_url + "/admin/webhooks/deliveries", params={"status": "pending"},
                            headers=ADMIN_HEADERS).json()["deliveries"]
        slow_pending = [d for d in pending if d["webhook"] == "slow"]
        assert len(slow_pending) == 20
        # A deferral is not an attempt: only those that reached the receiver count (4, then a few more freed
        # slots let through before the breaker opened).
        # An attempt is counted when it starts, so one may be on its way to the receiver as this is read.
        attempts = sum(d["attempts"] for d in slow_pending)
        assert len(stalled.hooks) <= attempts <= len(stalled.hooks) + 1 and attempts < 10
        assert any("circuit breaker open" in (d["last_error"] or "") for d in slow_pending)
