"""No lost events (SPEC §14, issue 17): events raised while Redis is down wait in the local spool and are queued
when it returns, with the delivery ids they were given; a full spool loses events with an audit line. A
redis-server of the test's own, stopped and started again by PID; a real receiver; a real sidecar."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis_support import redis_server, stop, wait_for_ping
from test_jwt_routes import captured_audit
from test_webhooks import SECRET, Receiver, transactions_upstream, wait_for

from sidecar.testing import free_port, running_sidecar, serve_in_thread


def start_redis(port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen([redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_ping(port)
    return process


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    app = Receiver()
    with serve_in_thread(app) as url:
        app.url = url + "/hooks"
        yield app


@pytest.fixture(scope="module")
def upstream_url() -> Iterator[str]:
    with serve_in_thread(transactions_upstream) as url:
        yield url


def spool_config(upstream: str, redis: str, receiver_url: str, spool: Path, max_bytes: int) -> dict[str, Any]:
    return {
        "version": 1, "upstream": upstream, "redis": redis,
        "authenticators": {"anon": {"type": "anonymous"}},
        "routes": [{"id": "pay", "match": {"path": "/pay/**"}, "auth": ["anon"],
                    "emit": [{"event": "client-transaction", "when": "2xx"}]}],
        "webhooks": [{"id": "erp", "url": receiver_url, "events": ["client-transaction"], "secret": SECRET,
                      "allow_private": True, "timeout": "2s"}],
        "webhook_spool": {"dir": str(spool), "max_bytes": max_bytes},
    }


def spooled_ids(spool: Path) -> set[str]:
    return {json.loads(line)["id"] for path in spool.glob("*.jsonl") for line in path.read_text().splitlines()}


def test_events_raised_while_redis_is_down_are_delivered_when_it_returns(tmp_path: Path, receiver: Receiver,
                                                                        upstream_url: str) -> None:
    """Redis stopped while 50 events are raised: the requests are answered, the 50 deliveries wait in the spool;
    Redis started again: all 50 reach the receiver, signed, with the ids they were spooled with."""
    port = free_port()
    redis = start_redis(port)
    spool = tmp_path / "spool"
    try:
        with running_sidecar(spool_config(upstream_url, f"redis://127.0.0.1:{port}/0", receiver.url, spool,
                                          1024 * 1024)) as sc, httpx.Client(timeout=10) as client:
            assert client.post(sc.url + "/pay/first").status_code == 201
            assert wait_for(lambda: len(receiver.hooks) == 1, timeout=10)
            stop(redis)
            for i in range(50):
                assert client.post(sc.url + f"/pay/{i}").status_code == 201
            waiting = wait_for(lambda: len(spooled_ids(spool)) == 50 and spooled_ids(spool), timeout=10)
            assert waiting and len(receiver.hooks) == 1
            redis = start_redis(port)
            assert wait_for(lambda: len(receiver.hooks) >= 51, timeout=30), len(receiver.hooks)
            delivered = {hook.id for hook in receiver.hooks[1:]}
            assert delivered == waiting  # the same ids: receivers can de-duplicate
            assert all(hook.verified() for hook in receiver.hooks)
            assert wait_for(lambda: not list(spool.iterdir()), timeout=5)
    finally:
        stop(redis)


def test_a_full_spool_loses_events_with_an_audit_line(tmp_path: Path, receiver: Receiver, upstream_url: str) -> None:
    """A spool with room for a few events: once it is full, each further event is one audit line saying it is
    lost (with its delivery id), and the request is still answered."""
    port = free_port()
    redis = start_redis(port)
    spool = tmp_path / "spool"
    try:
        with running_sidecar(spool_config(upstream_url, f"redis://127.0.0.1:{port}/0", receiver.url, spool,
                                          4096)) as sc, captured_audit(sc) as audit, httpx.Client(timeout=10) as client:
            stop(redis)
            for i in range(20):
                assert client.post(sc.url + f"/pay/{i}").status_code == 201
            def lost_lines() -> list[dict[str, Any]]:
                return [json.loads(line) for line in audit.getvalue().splitlines() if '"spool_full"' in line]

            # audit lines are flushed in batches: wait until every event is either spooled or said to be lost
            wait_for(lambda: len({i for line in lost_lines() for i in line["ids"]}) + len(spooled_ids(spool)) >= 20)
            lost, kept = lost_lines(), spooled_ids(spool)
            assert lost and 0 < len(kept) < 20
            assert all(line["kind"] == "webhook" and line["decision"] == "lost" for line in lost)
            lost_ids = {i for line in lost for i in line["ids"]}
            assert len(lost_ids) + len(kept) == 20 and not lost_ids & kept
            assert sum(path.stat().st_size for path in spool.iterdir()) <= 4096
            time.sleep(0.1)
    finally:
        stop(redis)
