"""The verdict cache's memory budget (SPEC §14, issue 17): a flood of distinct valid tokens keeps the cache
within `cache.max_bytes` (its own accounting, shown in /metrics) and the process's RSS within a sane bound,
evicting the oldest verdicts first. A real `sidecar run` process; RSS read from /proc."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jwt
from conftest import config_text, make_config, route

from sidecar.testing import RecordingUpstream, SidecarProcess

SECRET = "flood-test-hs256-secret-0123456789abcdef"
MAX_BYTES = 4 * 1024 * 1024
PADDING = "p" * 4000  # a big claim: unbounded, 8,000 verdicts would hold ~40 MB


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert found, name
    return float(found.group(1))


def token(i: int) -> str:
    now = int(time.time())
    return jwt.encode({"sub": f"user-{i}", "iss": "https://idp.test", "aud": "flood", "exp": now + 600, "iat": now,
                       "scope": "read", "pad": PADDING}, SECRET, algorithm="HS256")


def test_a_flood_of_distinct_tokens_stays_within_max_bytes(tmp_path: Path,
                                                          shared_upstream: RecordingUpstream) -> None:
    """8,000 distinct valid tokens with a 4 KB claim into a 4 MiB budget: the cache's own accounting stays under
    max_bytes, RSS grows by less than max_bytes + 12 MiB (unbounded: ~40 MB of verdicts), the first token was
    evicted (verified again: a miss) and the last is still cached (a hit)."""
    path = tmp_path / "sidecar.yaml"
    path.write_text(config_text(make_config(
        shared_upstream.url,
        {"hs": {"type": "jwt", "secret": SECRET, "algorithms": ["HS256"], "issuer": "https://idp.test",
                "audience": "flood"}},
        [route("api", "/api/**", ["hs"])],
        cache={"ttl": "10m", "max_entries": 1_000_000, "max_bytes": MAX_BYTES})))
    tokens = [token(i) for i in range(8000)]
    with SidecarProcess(path) as sc, httpx.Client(timeout=10) as warm:
        for t in tokens[:300]:  # warm up: code paths, pools and allocator arenas in use
            assert warm.get(sc.url + "/api/x", headers={"Authorization": f"Bearer {t}"}).status_code == 200
        baseline = rss_bytes(sc.process.pid)

        def send(chunk: list[str]) -> list[int]:
            with httpx.Client(timeout=10) as client:
                return [client.get(sc.url + "/api/x", headers={"Authorization": f"Bearer {t}"}).status_code
                        for t in chunk]

        with ThreadPoolExecutor(4) as pool:
            statuses = [s for part in pool.map(send, [tokens[300:][i::4] for i in range(4)]) for s in part]
        assert set(statuses) == {200}
        grown = rss_bytes(sc.process.pid) - baseline
        time.sleep(1.2)  # the cache gauges are set every second
        before = httpx.get(sc.admin_url + "/metrics").text
        assert 0 < metric(before, "sidecar_verdict_cache_bytes") <= MAX_BYTES
        entries = metric(before, "sidecar_verdict_cache_entries")
        assert 200 < entries < 2000, entries
        assert grown < MAX_BYTES + 12 * 1024 * 1024, grown
        misses = metric(before, 'sidecar_auth_cache_total{result="miss"}')
        hits = metric(before, 'sidecar_auth_cache_total{result="hit"}') if 'result="hit"' in before else 0.0
        with httpx.Client(timeout=10) as client:
            assert client.get(sc.url + "/api/x", headers={"Authorization": f"Bearer {tokens[0]}"}).status_code == 200
            assert client.get(sc.url + "/api/x", headers={"Authorization": f"Bearer {tokens[-1]}"}).status_code == 200
        after = httpx.get(sc.admin_url + "/metrics").text
        assert metric(after, 'sidecar_auth_cache_total{result="miss"}') == misses + 1  # the oldest: evicted
        assert metric(after, 'sidecar_auth_cache_total{result="hit"}') == hits + 1  # the newest: kept
