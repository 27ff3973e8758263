"""``python -m bench.instructions``: instructions per request, counted by valgrind's callgrind (see bench/README.md).

One ``sidecar run --workers 1`` (it then serves in its own process) under ``valgrind --tool=callgrind``, in front of
the bench's nginx upstream: warm-up requests, ``callgrind_control -z`` (zero the counters), N keep-alive GETs from one
connection, ``callgrind_control -d`` (dump), and the dump's ``summary:`` divided by N. The count is the sidecar
process's own user-space instructions (every thread of it, kernel time excluded): the same whatever else the
machine does, unlike wall-clock CPU figures.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench import configs, tokens, tools
from bench.configs import CASES, Case, Creds
from bench.guard import arm, run_guarded
from bench.nginx import Nginx, upstream_conf
from bench.procs import free_port, tree_pids
from bench.runner import CACHE_DIR, JWT_FEW, _check_redis, _probe, _redis_cleanup, _redis_keys
from bench.sidecar_proc import REPO_ROOT, Sidecar, SidecarError

SUPPORTED = ("anonymous", "jwt_cached", "jwt_new", "client_token", "routes_1000")
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "instructions.json"
ESTIMATE_AT = 0.01  # the sampling ratio whose overhead is estimated from the runs at 0 and 1.0
OUT_PREFIX = "callgrind.out."
REQUEST_TIMEOUT = 120.0  # seconds for one request under valgrind (the first ones translate fresh code)



class DumpError(RuntimeError):
    pass


# ---- pure parts: the dump files, the choice among them, the arithmetic ------------------------------------------


@dataclass
class Dump:
    """The header facts of one callgrind output file."""

    path: Path
    pid: int | None = None
    cmd: str = ""
    part: int | None = None
    events: list[str] = field(default_factory=list)
    summary: int | None = None  # the event counted (Ir) over the part, from the header's `summary:`
    totals: int | None = None  # the same from the closing `totals:` (the sum of the cost lines written)

    @property
    def instructions(self) -> int:
        value = self.summary if self.summary is not None else self.totals
        if value is None:
            raise DumpError(f"{self.path}: neither `summary:` nor `totals:` (an incomplete dump?)")
        return value


def parse_dump(text: str, path: Path, event: str = "Ir") -> Dump:
    """Read pid, cmd, part, events and the `event` column of `summary:` and `totals:` from a callgrind file."""
    d = Dump(path)
    summary: list[int] | None = None
    totals: list[int] | None = None
    for line in text.splitlines():
        if line.startswith("pid:"):
            d.pid = int(line[4:].strip())
        elif line.startswith("cmd:"):
            d.cmd = line[4:].strip()
        elif line.startswith("part:"):
            d.part = int(line[5:].strip())
        elif line.startswith("events:"):
            d.events = line[7:].split()
        elif line.startswith("summary:"):
            summary = [int(v) for v in line[8:].split()]
        elif line.startswith("totals:"):
            totals = [int(v) for v in line[7:].split()]  # the last one wins (combined dumps append parts)
    column = d.events.index(event) if event in d.events else 0
    if summary:
        d.summary = summary[column] if column < len(summary) else 0  # trailing zero costs may be left out
    if totals:
        d.totals = totals[column] if column < len(totals) else 0
    return d


def dump_parts(directory: Path, part: int = 1) -> list[Path]:
    """The files `callgrind.out.<pid>.<part>` in `directory`: one per process dumped by `callgrind_control -d`."""
    pattern = re.compile(re.escape(OUT_PREFIX) + rf"\d+\.{part}$")
    return sorted(p for p in directory.iterdir() if pattern.fullmatch(p.name))


def runs_python(cmd: str) -> bool:
    """Whether a dump's `cmd:` line starts a Python interpreter (not a pyenv shim's bash or a wrapper's env)."""
    try:
        first = shlex.split(cmd)[0]
    except (ValueError, IndexError):
        return False
    return re.fullmatch(r"python[0-9.]*", os.path.basename(first)) is not None


def pick_dump(dumps: Sequence[Dump]) -> Dump:
    """The sidecar's own dump among those of the traced processes: the only one, else the only Python one."""
    if not dumps:
        raise DumpError("no dump part (callgrind.out.<pid>.1): callgrind_control -d reached no sidecar process")
    if len(dumps) == 1:
        return dumps[0]
    python = [d for d in dumps if runs_python(d.cmd)]
    if len(python) == 1:
        return python[0]
    listing = "; ".join(f"pid {d.pid}: {d.cmd}" for d in dumps)
    raise DumpError(f"cannot tell the sidecar's dump among {len(dumps)} ({len(python)} running python): {listing}")


def overhead_pct(off: float, at_zero: float, at_one: float, ratio: float = ESTIMATE_AT) -> float:
    """Tracing's estimated cost at sampling `ratio`, in % of the cost without tracing: what tracing costs on every
    request (ratio 0: spans made, none sampled) plus `ratio` times what a sampled request costs on top (ratio 1.0)."""
    if off <= 0:
        raise ValueError("the cost without tracing must be positive")
    return ((at_zero - off) + ratio * (at_one - off)) / off * 100.0


def parse_ratios(text: str) -> list[float]:
    out = []
    for part in text.split(","):
        if part.strip():
            r = float(part)
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"sampling ratio {r} is not within 0..1")
            out.append(r)
    return out


# ---- the OTLP receiver -------------------------------------------------------------------------------------------


class OtlpSink:
    """A do-nothing OTLP/HTTP receiver on loopback: reads each POST's body, answers 200 (an empty
    ExportTraceServiceResponse), counts the requests."""

    def __init__(self) -> None:
        sink = self
        self.exports = 0
        self.bytes = 0
        self._lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                size = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(size)
                with sink._lock:
                    sink.exports += 1
                    sink.bytes += size
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, name="otlp-sink", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def tracing_env(ratio: float | None, sink_port: int | None) -> dict[str, str | None]:
    """Every inherited OTEL_* variable removed; with a ratio, tracing on towards the sink, batches every second."""
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("OTEL_")}
    env["PYTHONHASHSEED"] = "0"  # the same dict layouts from run to run
    if ratio is not None:
        env.update({
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": repr(ratio),
            "OTEL_BSP_SCHEDULE_DELAY": "1000",  # batches leave inside the counted window
        })
    return env


# ---- one measurement ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    case: str
    command: str  # "sidecar" or "baseline"
    argv: list[str]
    tracing_ratio: float | None  # None: tracing off
    requests: int
    instructions: int | None = None  # summary: of the sidecar's dump part, over the counted requests
    totals: int | None = None
    per_request: float | None = None
    statuses: dict[str, int] = field(default_factory=dict)
    otlp_exports: int | None = None  # POSTs the receiver got between zero and dump
    pid: int | None = None
    dump: str = ""
    seconds: float | None = None  # wall clock of the counted requests (under valgrind: not a speed figure)
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def setting(self) -> str:
        return "off" if self.tracing_ratio is None else f"ratio {self.tracing_ratio:g}"


def send(port: int, path: str, headers_for: Callable[[int], dict[str, str]], start: int, count: int) -> Counter[int]:
    """`count` sequential GETs on one keep-alive connection; the status of each."""
    statuses: Counter[int] = Counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)
    try:
        for i in range(start, start + count):
            conn.request("GET", path, headers=headers_for(i))
            r = conn.getresponse()
            r.read()
            statuses[r.status] += 1
    finally:
        conn.close()
    return statuses


def callgrind_pids(root: int) -> list[int]:
    """The processes under callgrind in the tree started at `root` (valgrind's tool binary as /proc/PID/exe)."""
    out = []
    for pid in tree_pids(root):
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            continue
        if os.path.basename(exe).startswith("callgrind-"):
            out.append(pid)
    return out


class Instructions:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = Path(tempfile.mkdtemp(prefix="sidecar-instructions-"))
        self.valgrind = ""
        self.control = ""
        self.upstream: Nginx | None = None
        self.sink: OtlpSink | None = None
        self.creds = Creds()
        self.fresh: list[str] = []
        self.count = 0

    def setup(self) -> None:
        self.valgrind = tools.ensure("valgrind")
        self.control = tools.ensure("callgrind_control")
        nginx = tools.ensure("nginx")
        port = free_port()
        prefix = self.workdir / "nginx-upstream"
        self.upstream = Nginx(nginx, prefix, upstream_conf(prefix, port), port, "upstream")
        self.upstream.start()
        names = set(self.args.cases)
        if names & {"jwt_cached", "jwt_new"}:
            key = tokens.load_or_create_key(CACHE_DIR)
            self.creds.public_pem = key.public_pem
            self.creds.jwt_few = [tokens.sign(key, f"cached-user-{i}") for i in range(JWT_FEW)]
            if "jwt_new" in names:
                self.fresh = tokens.fresh_tokens(key, self.args.warmup + self.args.requests, CACHE_DIR)
        if "client_token" in names:
            self.creds.client_token = tokens.client_token()
            self.creds.client_token_ref = tokens.sha256_ref(self.creds.client_token)
        if self.args.ratios:
            self.sink = OtlpSink()

    def close(self) -> None:
        for closer in (self.upstream.close if self.upstream else None, self.sink.close if self.sink else None):
            if closer is not None:
                closer()
        if self.args.keep_temp:
            print(f"temporary files (configs, logs, callgrind dumps) kept in {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def headers_for(self, case: Case) -> Callable[[int], dict[str, str]]:
        if case.name == "jwt_cached":
            few = self.creds.jwt_few
            return lambda i: {"Authorization": f"Bearer {few[i % len(few)]}"}
        if case.name == "jwt_new":
            fresh = self.fresh
            return lambda i: {"Authorization": f"Bearer {fresh[i]}"}
        fixed = configs.case_headers(case, self.creds)
        return lambda i: fixed

    def measure(self, case: Case, label: str, command: list[str] | None, ratio: float | None) -> Run:
        a = self.args
        argv = command or [sys.executable, "-m", "sidecar"]
        run = Run(case.name, label, argv, ratio, a.requests)
        print(f"== {case.name}, {label}, tracing {run.setting}", flush=True)
        self.count += 1
        out_dir = self.workdir / f"callgrind-{self.count}"
        out_dir.mkdir()
        assert self.upstream is not None
        prefix = [self.valgrind, "--tool=callgrind", "--trace-children=yes",
                  f"--callgrind-out-file={out_dir}/{OUT_PREFIX}%p"]
        cfg = configs.sidecar_config(case, self.upstream.port, self.creds)
        sc = Sidecar(self.workdir / f"sidecar-{self.count}", cfg, workers=1, transport=a.transport, command=argv,
                     prefix=prefix, env=tracing_env(ratio, self.sink.port if self.sink else None))
        before = _redis_keys() if case.needs_redis else None
        try:
            if case.needs_redis:
                _check_redis()
            t0 = time.monotonic()
            sc.start(timeout=a.startup_timeout)
            print(f"   started under callgrind in {time.monotonic() - t0:.0f}s", flush=True)
            pids = callgrind_pids(sc.pid)
            if not pids:
                raise RuntimeError("no process of the sidecar runs under callgrind:\n" + sc.diagnostics())
            url = f"http://127.0.0.1:{sc.port}{case.path}"
            _probe(url, configs.case_headers(case, self.creds), sc)
            headers = self.headers_for(case)
            warm = send(sc.port, case.path, headers, 0, a.warmup)
            if set(warm) - {200}:
                raise RuntimeError(f"warm-up answers {dict(warm)}, not all 200:\n" + sc.diagnostics())
            exports0 = self.sink.exports if self.sink else 0
            self._control("-z", pids)
            t0 = time.monotonic()
            counted = send(sc.port, case.path, headers, a.warmup, a.requests)
            run.seconds = round(time.monotonic() - t0, 1)
            self._control("-d", pids)
            if ratio is not None and self.sink is not None:
                run.otlp_exports = self.sink.exports - exports0
            run.statuses = {str(k): v for k, v in sorted(counted.items())}
            if set(counted) - {200}:
                run.notes.append(f"not every counted request answered 200: {run.statuses}")
            dump = pick_dump([parse_dump(p.read_text(errors="replace"), p) for p in self._wait_dumps(out_dir, pids)])
            run.pid, run.dump = dump.pid, dump.path.name
            run.instructions, run.totals = dump.instructions, dump.totals
            run.per_request = dump.instructions / a.requests
            if ratio == 1.0 and not run.otlp_exports:
                run.notes.append("tracing at ratio 1.0 but no batch reached the OTLP receiver: was tracing on?")
            exports = "" if run.otlp_exports is None else f", {run.otlp_exports} OTLP exports"
            print(f"   {run.per_request:,.0f} instructions per request ({dump.instructions:,} over {a.requests:,} "
                  f"requests in {run.seconds:g}s, pid {dump.pid}{exports})", flush=True)
        except (SidecarError, RuntimeError, OSError, http.client.HTTPException, subprocess.SubprocessError) as e:
            run.error = str(e)
            print(f"   FAILED: {e}", flush=True)
        finally:
            sc.close()
            if before is not None:
                left = _redis_cleanup(before)
                if left:
                    run.notes.append(f"deleted {len(left)} key(s) the sidecar left without TTL in Redis db 14")
        for note in run.notes:
            print(f"   note: {note}", flush=True)
        return run

    def _control(self, flag: str, pids: list[int]) -> None:
        """callgrind_control -z|-d for exactly these processes (never another callgrind run on the machine)."""
        p = subprocess.run([self.control, flag, *map(str, pids)], capture_output=True, text=True, timeout=120,
                           check=False)
        text = (p.stdout + p.stderr).strip()
        if p.returncode != 0 or "Error" in text or "No active callgrind" in text:
            raise RuntimeError(f"callgrind_control {flag} {' '.join(map(str, pids))} failed: {text}")

    def _wait_dumps(self, out_dir: Path, pids: list[int], timeout: float = 60.0) -> list[Path]:
        """The dump parts of `pids`, once each is complete (its closing `totals:` line written)."""
        wanted = {out_dir / f"{OUT_PREFIX}{pid}.1" for pid in pids}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = [p for p in sorted(wanted) if p.exists() and "\ntotals:" in _tail(p)]
            if len(done) == len(wanted):
                return done
            time.sleep(0.2)
        done = [p for p in dump_parts(out_dir) if "\ntotals:" in _tail(p)]
        if not done:
            raise RuntimeError(f"no complete dump part in {out_dir} after {timeout:g}s")
        return done


def _tail(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 4096))
        return f.read().decode(errors="replace")


# ---- report ------------------------------------------------------------------------------------------------------


def estimates(runs: list[Run]) -> dict[str, dict[str, float]]:
    """Per case and command, the overhead at ratio 0.01 (in % of off), when off, 0 and 1.0 were all measured."""
    cost = {(r.case, r.command, r.tracing_ratio): r.per_request for r in runs if r.per_request}
    out: dict[str, dict[str, float]] = {}
    for (case, command, ratio), off in cost.items():
        if ratio is not None:
            continue
        zero, one = cost.get((case, command, 0.0)), cost.get((case, command, 1.0))
        if zero is not None and one is not None:
            out.setdefault(case, {})[command] = round(overhead_pct(off, zero, one), 2)
    return out


def table(runs: list[Run]) -> str:
    keys: list[tuple[str, float | None]] = []
    by: dict[tuple[str, float | None, str], Run] = {}
    for r in runs:
        if (r.case, r.tracing_ratio) not in keys:
            keys.append((r.case, r.tracing_ratio))
        by[(r.case, r.tracing_ratio, r.command)] = r
    baseline = any(r.command == "baseline" for r in runs)

    def cell(r: Run | None) -> str:
        if r is None:
            return "-"
        return "FAILED" if r.per_request is None else f"{r.per_request:,.0f}"

    head = ["case", "tracing", "instr/req", "x first"] + (["baseline instr/req", "x baseline"] if baseline else [])
    rows = [head]
    first: float | None = None
    for case, ratio in keys:
        ours, base = by.get((case, ratio, "sidecar")), by.get((case, ratio, "baseline"))
        value = ours.per_request if ours else None
        if first is None and value:
            first = value
        row = [case, "off" if ratio is None else f"ratio {ratio:g}", cell(ours),
               f"{value / first:.3f}" if value and first else "-"]
        if baseline:
            bval = base.per_request if base else None
            row += [cell(base), f"{value / bval:.3f}" if value and bval else "-"]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for case, per in estimates(runs).items():
        told = ", ".join(f"{cmd} {pct:+.2f} %" for cmd, pct in per.items())
        lines.append(f"{case}: tracing at ratio {ESTIMATE_AT:g}, estimated (ratio 0 - off) + {ESTIMATE_AT:g} x "
                     f"(ratio 1 - off), in % of off: {told}")
    for r in runs:
        for what in ([f"FAILED: {r.error.splitlines()[0]}"] if r.error else []) + r.notes:
            lines.append(f"{r.case} {r.command} {r.setting}: {what}")
    return "\n".join(lines)


def meta(args: argparse.Namespace, valgrind: str) -> dict[str, Any]:
    def first_line(cmd: list[str]) -> str:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return (p.stdout or p.stderr).strip().splitlines()[0] if (p.stdout or p.stderr).strip() else ""

    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"nproc": os.cpu_count(), "platform": platform.platform()},
        "python": sys.version.split()[0],
        "valgrind": first_line([valgrind, "--version"]) if valgrind else None,
        "git": first_line(["git", "-C", str(REPO_ROOT), "log", "-1", "--format=%h %s"]),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "notes": "instructions = the `summary:` (Ir) of the sidecar process's callgrind dump between "
        "callgrind_control -z and -d, all its threads, user space only; per_request = instructions / requests",
    }


# ---- command line ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--requests", type=int, default=2000, help="counted requests per run")
    p.add_argument("--warmup", type=int, default=300, help="requests before the counters are zeroed")
    p.add_argument("--case", default="jwt_cached", help=f"comma list of: {', '.join(SUPPORTED)}")
    p.add_argument("--sidecar-cmd", type=shlex.split, default=None,
                   help="command that starts the sidecar CLI (default: this python -m sidecar)")
    p.add_argument("--baseline-cmd", type=shlex.split, default=None,
                   help="another sidecar command (e.g. a wrapper running an older tree), measured the same way "
                   "right after each run and shown side by side")
    p.add_argument("--tracing-ratio", default="",
                   help="comma list of sampling ratios to run with tracing on as well (e.g. 0,1.0: then the "
                   f"overhead at {ESTIMATE_AT:g} is estimated)")
    p.add_argument("--transport", default="httptools", help="SIDECAR_FORWARD_TRANSPORT")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for /healthz under valgrind")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the JSON results")
    p.add_argument("--max-time", type=float, default=0.0, help="hard limit in seconds (0: computed from settings)")
    p.add_argument("--keep-temp", action="store_true", help="keep configs, logs and callgrind dumps")
    args = p.parse_args(argv)
    if args.requests < 1 or args.warmup < 0:
        p.error("--requests must be positive and --warmup not negative")
    args.cases = [c.strip() for c in args.case.split(",") if c.strip()]
    bad = [c for c in args.cases if c not in SUPPORTED]
    if bad or not args.cases:
        p.error(f"unknown case(s) {bad}; choose from {', '.join(SUPPORTED)}")
    try:
        args.ratios = parse_ratios(args.tracing_ratio)
    except ValueError as e:
        p.error(f"--tracing-ratio: {e}")
    return args


def plan(args: argparse.Namespace) -> list[tuple[Case, str, list[str] | None, float | None]]:
    """(case, "sidecar"|"baseline", command, tracing ratio or None) in run order: each baseline right after ours."""
    out: list[tuple[Case, str, list[str] | None, float | None]] = []
    for name in args.cases:
        for ratio in [None, *args.ratios]:
            out.append((CASES[name], "sidecar", args.sidecar_cmd, ratio))
            if args.baseline_cmd:
                out.append((CASES[name], "baseline", args.baseline_cmd, ratio))
    return out


def time_limit(args: argparse.Namespace, runs: int) -> float:
    """Per run: start-up, the requests at a pessimistic 10 per second under valgrind, stopping and dumping."""
    if args.max_time > 0:
        return args.max_time
    return 120.0 + runs * (args.startup_timeout + (args.warmup + args.requests) / 10.0 + 120.0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    todo = plan(args)
    limit = time_limit(args, len(todo))

    arm(limit, "instructions run")
    print(f"instructions per request (callgrind): {len(todo)} run(s), {args.warmup} warm-up + {args.requests} "
          f"counted requests each, sidecar --workers 1; hard limit {limit:.0f}s", flush=True)
    bench = Instructions(args)
    runs: list[Run] = []
    started = time.monotonic()

    def work() -> None:
        for case, label, command, ratio in todo:
            runs.append(bench.measure(case, label, command, ratio))

    status = run_guarded(bench, work)
    if status == 2:
        return status
    if not runs:
        return status or 1
    print()
    print(table(runs))
    info = meta(args, bench.valgrind)
    info["elapsed_s"] = round(time.monotonic() - started, 1)
    info["complete"] = status == 0 and len(runs) == len(todo)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    doc = {"meta": info, "runs": [asdict(r) for r in runs], "tracing_overhead_pct_at_0.01": estimates(runs)}
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nJSON: {args.json}")
    if status:
        return status
    return 1 if any(r.error or set(r.statuses) - {"200"} for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
