"""Overload protection (SPEC §14, issue 17): past `limits.max_in_flight` requests in flight in a worker, the
next ones get an immediate 503 `overloaded` with Retry-After (not queued); the admin port keeps answering."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from conftest import config_text, error_body, make_config, route

from sidecar.testing import running_sidecar, serve_in_thread

SLOW = 1.5


async def slow_upstream(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An upstream that takes SLOW seconds to answer every request."""
    await asyncio.sleep(SLOW)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"slow ok"})


@pytest.fixture(scope="module")
def slow_url() -> Iterator[str]:
    with serve_in_thread(slow_upstream) as url:
        yield url


def test_excess_requests_get_an_immediate_503_while_healthz_answers(slow_url: str) -> None:
    """max_in_flight 2 and a slow upstream: of 6 concurrent requests 2 are served, 4 get 503 overloaded at once
    with Retry-After; /healthz and /metrics answer meanwhile; once they finish, requests are served again."""
    config = config_text(make_config(slow_url, {"anon": {"type": "anonymous"}}, [route("all", "/**", ["anon"])],
                                     limits={"max_in_flight": 2, "retry_after": "2s"}))
    with running_sidecar(config) as sc, ThreadPoolExecutor(8) as pool:
        def get(_: int) -> tuple[httpx.Response, float]:
            started = time.monotonic()
            response = httpx.get(sc.url + "/x", timeout=10)
            return response, time.monotonic() - started

        slow = [pool.submit(get, i) for i in range(2)]
        time.sleep(0.3)  # both are in flight at the upstream
        excess = [pool.submit(get, i) for i in range(4)]
        health_started = time.monotonic()
        health = httpx.get(sc.admin_url + "/healthz", timeout=5)
        health_seconds = time.monotonic() - health_started
        refused = [f.result() for f in excess]
        served = [f.result() for f in slow]
        assert health.status_code == 200 and health_seconds < 0.5
        for response, seconds in refused:
            error_body(response, 503, "overloaded")
            assert response.headers["retry-after"] == "2"
            assert seconds < 0.5, seconds  # answered at once, not after the slow ones
        assert [(r.status_code, r.text) for r, _ in served] == [(200, "slow ok")] * 2
        assert httpx.get(sc.url + "/x", timeout=10).status_code == 200  # the bound is released
        metrics = httpx.get(sc.admin_url + "/metrics").text
        assert "sidecar_overloaded_total 4.0" in metrics
