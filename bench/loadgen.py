"""A small open-loop, fixed-rate HTTP/1.1 load generator (asyncio, raw sockets, keep-alive).

Requests are released on a fixed schedule (``rate`` per second) whatever the server does, and handed to
whichever of ``connections`` keep-alive connections is idle. Each request's latency is measured from the
moment it is written to the socket until its response has been read completely; the delay between the
scheduled time and the write (timer jitter, or every connection busy) is recorded separately.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

RequestFactory = Callable[[int], bytes]


@dataclass
class LightResult:
    rate: float
    duration_s: float
    sent: int
    ok: int
    errors: int
    statuses: dict[int, int] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)  # write -> full response
    from_schedule_ms: dict[str, float] = field(default_factory=dict)  # scheduled time -> full response
    max_send_lag_ms: float = 0.0
    loop: str = "asyncio"


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), int(-(-q * len(sorted_values) // 100))))
    return sorted_values[rank - 1]


def summarize(values: list[float]) -> dict[str, float]:
    vals = sorted(values)
    out = {f"p{q:g}": percentile(vals, q) * 1000.0 for q in (50, 90, 99, 99.9)}
    if vals:
        out["max"] = vals[-1] * 1000.0
        out["mean"] = sum(vals) / len(vals) * 1000.0
    return out


def simple_request(path: str, host: str, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "User-Agent: sidecar-bench-light", "Accept: */*"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one full response; (status, connection may be reused)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length: int | None = None
    chunked = False
    keep = not lines[0].startswith("HTTP/1.0")
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding" and "chunked" in value:
            chunked = True
        elif name == "connection":
            keep = "close" not in value
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                break
            await reader.readexactly(size + 2)
    elif length is not None:
        await reader.readexactly(length)
    elif status not in (204, 304) and status >= 200:
        await reader.read()  # body until close
        keep = False
    return status, keep


async def _run(
    host: str, port: int, make: RequestFactory, rate: float, duration: float, connections: int
) -> LightResult:
    total = int(rate * duration)
    queue: asyncio.Queue[tuple[int, float] | None] = asyncio.Queue()
    latencies: list[float] = []
    from_sched: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    max_lag = 0.0

    async def worker() -> None:
        nonlocal errors, max_lag
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while True:
            item = await queue.get()
            if item is None:
                break
            i, target = item
            try:
                if conn is None:
                    conn = await asyncio.open_connection(host, port)
                reader, writer = conn
                t0 = time.perf_counter()
                max_lag = max(max_lag, t0 - target)
                writer.write(make(i))
                status, keep = await _read_response(reader)
                t1 = time.perf_counter()
                latencies.append(t1 - t0)
                from_sched.append(t1 - target)
                statuses[status] = statuses.get(status, 0) + 1
                if not keep:
                    writer.close()
                    conn = None
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError):
                errors += 1
                if conn is not None:
                    conn[1].close()
                conn = None
        if conn is not None:
            conn[1].close()

    workers = [asyncio.create_task(worker()) for _ in range(connections)]
    start = time.perf_counter() + 0.05
    for i in range(total):
        target = start + i / rate
        delay = target - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        queue.put_nowait((i, target))
    for _ in workers:
        queue.put_nowait(None)
    try:
        await asyncio.wait_for(asyncio.gather(*workers), timeout=duration + 10)
    except TimeoutError:
        for w in workers:
            w.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*workers, return_exceptions=True)
    done = len(latencies)
    ok = sum(n for s, n in statuses.items() if 200 <= s < 300)
    return LightResult(
        rate=rate,
        duration_s=duration,
        sent=total,
        ok=ok,
        errors=errors + (total - done - errors),
        statuses=statuses,
        latency_ms=summarize(latencies),
        from_schedule_ms=summarize(from_sched),
        max_send_lag_ms=max_lag * 1000.0,
    )


def run(
    host: str,
    port: int,
    make: RequestFactory,
    *,
    rate: float = 1000.0,
    duration: float = 5.0,
    connections: int = 8,
) -> LightResult:
    """Run the light-load pass (uvloop when importable) and return its latency summary."""
    if host != "127.0.0.1":
        raise ValueError("the light-load generator only targets 127.0.0.1")
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(_run(host, port, make, rate, duration, connections))
        return result
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(_run(host, port, make, rate, duration, connections))
    result.loop = "uvloop"
    return result
