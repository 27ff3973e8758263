"""The memory cases of issue 19: `idle_conns` (RSS per idle keep-alive client connection) and `rss_soak` (RSS of a
long run with a full, evicting verdict cache). RSS is that of the sidecar's whole process tree (parent and
workers, from /proc), as bench/websocket.py measures its tunnels. See bench/README.md."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from bench.loadgen import _read_response, simple_request
from bench.procs import rss_by_pid, socket_count
from bench.wrk import WrkResult

MB = 1_000_000
KEEP_ALIVE_S = 75.0  # uvicorn's timeout_keep_alive in sidecar/server/runner.py (tests/unit/test_bench_memory.py)
IDLE_READ_BY_S = 45.0  # RSS is read at most this long after the first idle connection got its answer
IDLE_BATCH = 250  # connections opened at once (each sends its request; under limits.max_in_flight)
IDLE_TIMEOUT_S = 15.0  # per connection: connect, request and answer
IDLE_TARGET_MB = 150.0  # issue 19: at most 150 MB added across the workers for 10,000 idle connections

SOAK_CALIBRATION_S = 2  # the first wrk slice, which measures the rate the rest is planned with
SOAK_WARMUP_SHARE = 0.05  # the first 5 % of the requests are the warm-up: RSS "start" is read after them
SOAK_SLICE_S = 30  # wrk runs of at most this long; RSS is also read between them
SOAK_SAMPLE_S = 1.0  # RSS sampled this often while wrk runs
SOAK_DRIFT_TARGET = 10.0  # issue 19: RSS flat within ±10 %
SOAK_EST_RATE = 3000.0  # req/s assumed before anything is measured: how long the pre-signed tokens must stay valid
SOAK_MIN_RATE = 1500.0  # req/s assumed for the bench's hard time limit
TOKEN_MARGIN_S = 60.0  # no wrk slice ends later than this before the tokens' exp

T = TypeVar("T")


def raise_nofile(connections: int) -> tuple[int, int]:
    """Raise this process's RLIMIT_NOFILE soft limit to the hard limit, before the sidecar is spawned (its workers
    inherit it); RuntimeError when even that is too low for ``connections`` sockets (held by this process, and by
    one worker in the worst case). Returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    need = connections + 1024
    if soft != resource.RLIM_INFINITY and soft < need:
        raise RuntimeError(
            f"RLIMIT_NOFILE is {soft} (hard limit {hard}): {connections:,} connections need about {need:,}; "
            "raise the hard limit (ulimit -Hn) or lower --idle-connections"
        )
    return soft, hard


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on uvloop when importable, else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _used_connection(port: int, request: bytes) -> Conn:
    """A keep-alive connection to 127.0.0.1:port that sent ``request`` and read its 200, left open."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), IDLE_TIMEOUT_S)
    try:
        status, keep = await asyncio.wait_for(_request(reader, writer, request), IDLE_TIMEOUT_S)
    except BaseException:
        writer.close()
        raise
    if status != 200 or not keep:
        writer.close()
        raise RuntimeError(f"answered {status}" + ("" if keep else " and closed the connection"))
    return reader, writer


async def _request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bool]:
    writer.write(request)
    return await _read_response(reader)


async def _open(port: int, request: bytes, count: int, into: list[Conn]) -> None:
    """Open ``count`` used connections, IDLE_BATCH at a time, appending each to ``into`` (so a caller's `finally`
    closes them all, also after a failure); RuntimeError at the first batch with a failed connection."""
    for start in range(0, count, IDLE_BATCH):
        n = min(IDLE_BATCH, count - start)
        results = await asyncio.gather(*(_used_connection(port, request) for _ in range(n)), return_exceptions=True)
        failed: list[BaseException] = []
        for r in results:
            if isinstance(r, BaseException):
                failed.append(r)
            else:
                into.append(r)
        if failed:
            first = failed[0]
            raise RuntimeError(
                f"{len(failed)} of {n} connections failed after {start:,} were open "
                f"(first: {type(first).__name__}: {first}); is the sidecar out of file descriptors?"
            )


async def _close(conns: list[Conn]) -> None:
    for _, writer in conns:
        writer.close()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(w.wait_closed() for _, w in conns), return_exceptions=True), 30)
    conns.clear()


def _label(pid: int, root: int) -> str:
    return f"{pid} (parent)" if pid == root else str(pid)


async def _idle(port: int, path: str, count: int, root: int) -> dict[str, Any]:
    request = simple_request(path, f"127.0.0.1:{port}")
    conns: list[Conn] = []
    try:
        # Warm-up, closed again: the workers' first-request costs and the upstream connections a burst of
        # IDLE_BATCH requests leaves in the forward pool are in "before", not charged to the idle connections.
        for _ in range(2):
            await _open(port, request, min(count, IDLE_BATCH), conns)
            await _close(conns)
        await asyncio.sleep(1.0)
        before = rss_by_pid(root)
        sockets_before = {pid: socket_count(pid) for pid in before}
        first = time.monotonic()  # before the first request: the keep-alive timer starts later than this
        await _open(port, request, count, conns)
        open_s = time.monotonic() - first
        await asyncio.sleep(1.0)  # let the workers finish the last requests
        age = time.monotonic() - first
        if age > IDLE_READ_BY_S:
            raise RuntimeError(
                f"opening {count:,} connections took {open_s:.0f}s: the first ones may already be closed by the "
                f"sidecar's {KEEP_ALIVE_S:g}s keep-alive timeout, RSS not read"
            )
        after = rss_by_pid(root)
        sockets_after = {pid: socket_count(pid) for pid in after}
        closed = sum(1 for reader, _ in conns if reader.at_eof())
        if closed:
            raise RuntimeError(f"the sidecar closed {closed:,} of the {count:,} idle connections before RSS was read")
    finally:
        await _close(conns)
    added = sum(after.values()) - sum(before.values())
    return {
        "connections": count,
        "rss_before_mb": sum(before.values()) / MB,
        "rss_after_mb": sum(after.values()) / MB,
        "added_mb": added / MB,
        "kib_per_conn": added / count / 1024,
        "target_mb": IDLE_TARGET_MB,
        "met": added / MB <= IDLE_TARGET_MB,
        "open_s": round(open_s, 2),
        "rss_read_after_s": round(age, 2),
        "keep_alive_timeout_s": KEEP_ALIVE_S,
        "rss_mb_by_process": {
            _label(pid, root): [before.get(pid, 0) / MB, after.get(pid, 0) / MB] for pid in sorted(before | after)
        },
        "sockets_added_by_process": {
            _label(pid, root): sockets_after.get(pid, 0) - sockets_before.get(pid, 0) for pid in sorted(sockets_after)
        },
    }


def idle_conns(port: int, path: str, count: int, root: int) -> dict[str, Any]:
    """RSS of the process tree under ``root`` before and after ``count`` idle keep-alive connections to
    127.0.0.1:``port`` were opened, each after one GET ``path`` answered 200 (all closed before returning)."""
    return _run(_idle(port, path, count, root))


# ---- rss_soak --------------------------------------------------------------------------------------------


def drift_pct(start: float, end: float) -> float:
    """How far ``end`` is from ``start``, in % of ``start``."""
    if start <= 0:
        raise ValueError("start RSS must be positive")
    return (end - start) / start * 100.0


def flat(start: float, end: float, peak: float, target: float = SOAK_DRIFT_TARGET) -> bool:
    """RSS stayed within ±``target`` % of ``start``: at the end, and at its peak."""
    return abs(drift_pct(start, end)) <= target and drift_pct(start, peak) <= target


def token_validity_needed(requests: int) -> float:
    """Seconds the pre-signed tokens should stay valid for a soak of ``requests`` (at SOAK_EST_RATE, plus margin)."""
    return requests / SOAK_EST_RATE + 2 * TOKEN_MARGIN_S


class _Sampler(threading.Thread):
    """Reads RSS every SOAK_SAMPLE_S seconds until stopped: (seconds since start, bytes)."""

    def __init__(self, rss: Callable[[], int]) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.rss = rss
        self.samples: list[tuple[float, int]] = []
        self.started_at = time.monotonic()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            with contextlib.suppress(OSError, ValueError):
                self.samples.append((time.monotonic() - self.started_at, self.rss()))
            self._stop_event.wait(SOAK_SAMPLE_S)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)


def soak(
    run_slice: Callable[[int], WrkResult],
    rss: Callable[[], int],
    target: int,
    valid_until: float,
    settle_s: float = 0.5,
) -> tuple[dict[str, Any], list[WrkResult], list[str]]:
    """Run wrk in slices (``run_slice(seconds)``) until about ``target`` requests are done, RSS sampled meanwhile.

    The first slice measures the rate; the slices up to SOAK_WARMUP_SHARE of ``target`` are the warm-up, after
    which RSS "start" is read; the last slice is sized to end near ``target``. Start and end are read the same way,
    ``settle_s`` after a slice, so they compare. No slice ends later than TOKEN_MARGIN_S before ``valid_until``
    (the tokens' exp, wall clock): a run cut short by that says so in the returned warnings."""
    runs: list[WrkResult] = []
    warnings: list[str] = []
    points: list[dict[str, float]] = []
    done = 0
    rate = 0.0
    sampler = _Sampler(rss)
    sampler.start()

    def one(seconds: int) -> bool:
        nonlocal done, rate
        allowed = int(valid_until - TOKEN_MARGIN_S - time.time())
        if allowed < 1:
            warnings.append(
                f"stopped after {done:,} of {target:,} requests: the pre-signed JWTs expire at "
                f"{time.strftime('%H:%M:%S', time.localtime(valid_until))} (fewer --soak-requests, or sign new "
                "ones: delete bench/results/cache/jwt-tokens.*)"
            )
            return False
        r = run_slice(min(seconds, allowed))
        runs.append(r)
        done += r.requests
        rate = r.rps or rate
        time.sleep(settle_s)
        points.append({"requests": done, "s": round(time.monotonic() - sampler.started_at, 1), "rss_mb": rss() / MB})
        return rate > 0

    def remaining_s(goal: int) -> int:
        """Seconds of wrk still needed to reach ``goal`` (0: within half a second of it)."""
        left = goal - done
        if rate <= 0 or left < rate * 0.5:
            return 0
        return max(1, min(SOAK_SLICE_S, round(left / rate)))

    try:
        going = one(SOAK_CALIBRATION_S)
        if not points:
            raise RuntimeError(warnings[0] if warnings else "the soak ran no wrk slice")
        if rate <= 0:
            raise RuntimeError("wrk completed no request in the soak's first slice")
        warm_goal = round(target * SOAK_WARMUP_SHARE)
        while going and (d := remaining_s(warm_goal)):
            going = one(d)
        warm_requests, warm_index, start, warm_at = done, len(points) - 1, points[-1]["rss_mb"], points[-1]["s"]
        while going and (d := remaining_s(target)):
            going = one(d)
    finally:
        sampler.stop()
    end = points[-1]["rss_mb"]
    measured = [p["rss_mb"] for p in points[warm_index:]]
    measured += [b / MB for s, b in sampler.samples if s >= warm_at]
    peak = max(measured)
    wrk_s = sum(r.duration_s for r in runs)
    summary = {
        "requests": done,
        "target_requests": target,
        "warmup_requests": warm_requests,
        "rps": done / wrk_s if wrk_s else 0.0,
        "wrk_slices": len(runs),
        "rss_start_mb": start,
        "rss_end_mb": end,
        "rss_max_mb": peak,
        "rss_min_mb": min(measured),
        "drift_pct": drift_pct(start, end),
        "peak_over_start_pct": drift_pct(start, peak),
        "target_pct": SOAK_DRIFT_TARGET,
        "met": flat(start, end, peak),
        "samples": len(sampler.samples),
        "sample_every_s": SOAK_SAMPLE_S,
        "after_each_slice": points,
    }
    if done < target * 0.99 and not warnings:
        warnings.append(f"only {done:,} of {target:,} requests were done")
    return summary, runs, warnings
