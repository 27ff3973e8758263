"""bench/memory.py without a sidecar: the soak's RSS-drift arithmetic and slice planning (fake wrk), the opt-in
memory cases' flags and configurations (they validate as `sidecar check` would), and the keep-alive timeout the
idle-connections case must measure well before."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from bench import memory
from bench.__main__ import build_plan, parse_args
from bench.configs import ADMIN_TOKEN, CASES, DEFAULT_CASES, SOAK_MAX_ENTRIES, Creds, sidecar_config
from bench.report import CaseResult, table
from bench.wrk import WrkResult
from sidecar.config.loader import parse
from sidecar.testing import KeyPair


def test_drift_and_flatness() -> None:
    assert memory.drift_pct(200.0, 210.0) == pytest.approx(5.0)
    assert memory.drift_pct(200.0, 180.0) == pytest.approx(-10.0)
    assert memory.flat(200.0, 219.0, 219.0)
    assert memory.flat(200.0, 181.0, 200.0)
    assert not memory.flat(200.0, 221.0, 221.0)  # ended 10.5 % higher
    assert not memory.flat(200.0, 178.0, 200.0)  # ended 11 % lower
    assert not memory.flat(200.0, 205.0, 230.0)  # back down at the end, but peaked 15 % higher
    with pytest.raises(ValueError):
        memory.drift_pct(0.0, 1.0)


def _fake_wrk(rate: int, calls: list[int]) -> Callable[[int], WrkResult]:
    def run_slice(seconds: int) -> WrkResult:
        calls.append(seconds)
        n = rate * seconds
        return WrkResult(n, float(seconds), float(rate), {}, {"status": 0}, 0, 0)

    return run_slice


def test_soak_plans_slices_to_the_target_and_reads_rss_after_the_warm_up() -> None:
    calls: list[int] = []
    rss = iter(range(100_000_000, 10**10, 1_000_000))  # +1 MB at every read
    summary, runs, warnings = memory.soak(
        _fake_wrk(10_000, calls), lambda: next(rss), 1_000_000, time.time() + 3600, settle_s=0
    )
    assert warnings == []
    assert calls[0] == memory.SOAK_CALIBRATION_S
    assert max(calls) <= memory.SOAK_SLICE_S
    assert abs(summary["requests"] - 1_000_000) <= 5_000  # within half a second of wrk at 10,000 req/s
    assert summary["warmup_requests"] == 50_000  # 5 %
    assert len(runs) == len(calls) == summary["wrk_slices"]
    points = summary["after_each_slice"]
    start = next(p for p in points if p["requests"] == 50_000)["rss_mb"]
    assert summary["rss_start_mb"] == start
    assert summary["rss_end_mb"] == points[-1]["rss_mb"]
    assert summary["rss_max_mb"] >= summary["rss_end_mb"] > start
    assert summary["drift_pct"] == pytest.approx((summary["rss_end_mb"] - start) / start * 100)


def test_soak_does_not_outlive_its_tokens() -> None:
    calls: list[int] = []
    with pytest.raises(RuntimeError, match="expire"):
        memory.soak(_fake_wrk(10_000, calls), lambda: 1, 1_000_000, time.time() + memory.TOKEN_MARGIN_S - 5, settle_s=0)
    assert calls == []


def test_memory_cases_are_opt_in() -> None:
    assert "idle_conns" not in DEFAULT_CASES and "rss_soak" not in DEFAULT_CASES
    assert not {c.name for c in build_plan(parse_args([]))} & {"idle_conns", "rss_soak"}
    args = parse_args(["--cases", "idle_conns,rss_soak", "--soak-requests", "300000"])
    assert [c.name for c in build_plan(args)] == ["idle_conns", "rss_soak"]
    with pytest.raises(SystemExit):
        parse_args(["--cases", "rss_soak", "--jwt-tokens", "1000"])  # fewer tokens than the cache evicts


@pytest.mark.parametrize("name", ["idle_conns", "rss_soak"])
def test_memory_case_configs_validate(name: str) -> None:
    creds = Creds(public_pem=KeyPair().public_pem, jwt_few=["x"])
    loaded = parse(sidecar_config(CASES[name], 9, creds), "bench.yaml", {"SIDECAR_ADMIN_TOKEN": ADMIN_TOKEN})
    if name == "rss_soak":
        assert loaded.config.cache.max_entries == SOAK_MAX_ENTRIES


def test_idle_case_reads_rss_well_before_the_keep_alive_timeout() -> None:
    from sidecar.server.runner import _uvicorn_config

    assert _uvicorn_config(object(), graceful=1.0).timeout_keep_alive == memory.KEEP_ALIVE_S
    assert memory.IDLE_READ_BY_S < memory.KEEP_ALIVE_S


def test_table_shows_the_memory_column_only_when_there_is_one() -> None:
    plain = CaseResult("anonymous", "anonymous", "", rps=1.0)
    assert "memory" not in table([plain])
    idle = CaseResult("idle_conns", "idle_conns", "", memory={"added_mb": 80.0, "kib_per_conn": 7.8})
    failed = CaseResult("rss_soak", "rss_soak", "", error="boom")
    out = table([plain, idle, failed])
    assert "+80.0 MB, 7.8 KiB/conn" in out and "FAILED" in out
