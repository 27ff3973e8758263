"""Run wrk with a case's Lua script plus bench/wrk/report.lua and parse its JSON summary."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

LUA_DIR = Path(__file__).resolve().parent / "wrk"
MARKER = "BENCH_JSON "


@dataclass
class WrkScript:
    """Which bench/wrk/<name>.lua to use and the arguments wrk passes to its init()."""

    name: str = "plain"
    args: list[str] = field(default_factory=list)


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    rps: float
    latency_ms: dict[str, float]
    errors: dict[str, int]
    wrapped: int
    bytes: int

    @property
    def error_total(self) -> int:
        return sum(self.errors.values())


def compose_script(script: WrkScript, workdir: Path) -> Path:
    """The case script followed by the common reporting code, as one file."""
    text = (LUA_DIR / f"{script.name}.lua").read_text() + "\n" + (LUA_DIR / "report.lua").read_text()
    path = workdir / f"wrk-{script.name}.lua"
    path.write_text(text)
    return path


def run(
    binary: str,
    url: str,
    script: WrkScript,
    workdir: Path,
    *,
    duration: float,
    threads: int,
    connections: int,
    timeout_s: float = 5.0,
) -> WrkResult:
    """One wrk run against ``url`` (must be on 127.0.0.1); raises RuntimeError on failure."""
    if not url.startswith("http://127.0.0.1:"):
        raise ValueError(f"refusing to load-test anything but 127.0.0.1: {url}")
    lua = compose_script(script, workdir)
    cmd = [
        binary,
        f"-t{threads}",
        f"-c{max(connections, threads)}",
        f"-d{max(1, round(duration))}s",
        f"--timeout={timeout_s:g}s",
        "-s",
        str(lua),
        url,
    ]
    if script.args:
        cmd += ["--", *script.args]
    proc = subprocess.run(cmd, capture_output=True, timeout=duration + 60, check=False)
    out = proc.stdout.decode("utf-8", "replace")
    line = next((ln for ln in out.splitlines() if ln.startswith(MARKER)), None)
    if proc.returncode != 0 or line is None:
        err = proc.stderr.decode("utf-8", "replace")
        raise RuntimeError(f"wrk failed (exit {proc.returncode}):\n{out[-2000:]}\n{err[-2000:]}")
    data = json.loads(line[len(MARKER) :])
    secs = data["duration_us"] / 1e6
    lat = {k: v / 1000.0 for k, v in data["latency_us"].items()}
    return WrkResult(
        requests=int(data["requests"]),
        duration_s=secs,
        rps=data["requests"] / secs if secs > 0 else 0.0,
        latency_ms=lat,
        errors={k: int(v) for k, v in data["errors"].items()},
        wrapped=int(data["wrapped"]),
        bytes=int(data["bytes"]),
    )
