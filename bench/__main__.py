"""``python -m bench``: measure the sidecar against nginx baselines with wrk (see bench/README.md)."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from bench import memory
from bench.configs import CASES, DEFAULT_CASES, SOAK_MAX_ENTRIES, TRANSPORT_CASES, Case
from bench.guard import arm, run_guarded
from bench.report import CaseResult, add_ratios, table, write_json
from bench.runner import Bench, meta

TRANSPORTS = ("httptools", "httpx", "aiohttp")
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "latest.json"



def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measured wrk run")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of discarded warm-up before each case")
    p.add_argument("--connections", type=int, default=64, help="wrk connections")
    p.add_argument("--threads", type=int, default=2, help="wrk threads")
    p.add_argument("--workers", type=int, default=2, help="sidecar worker processes")
    p.add_argument(
        "--cases",
        default=",".join(DEFAULT_CASES),
        help="comma list of cases to run; the memory cases are opt-in: "
        + ", ".join(n for n in CASES if n not in DEFAULT_CASES),
    )
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the JSON results")
    p.add_argument(
        "--transport",
        default="httptools",
        help="SIDECAR_FORWARD_TRANSPORT; a comma list runs anonymous and jwt_cached under each",
    )
    p.add_argument("--light", action="store_true", help="run the light-load pass for every case")
    p.add_argument("--no-light", action="store_true", help="skip the light-load pass everywhere")
    p.add_argument("--light-rate", type=float, default=1000.0, help="light pass: requests per second")
    p.add_argument("--light-duration", type=float, default=5.0, help="light pass: seconds")
    p.add_argument("--light-connections", type=int, default=8, help="light pass: keep-alive connections")
    p.add_argument("--jwt-tokens", type=int, default=300_000, help="never-seen JWTs to pre-generate for jwt_new")
    p.add_argument(
        "--idle-connections", type=int, default=10_000, help="idle_conns: idle keep-alive connections to open"
    )
    p.add_argument(
        "--soak-requests", type=int, default=5_000_000, help="rss_soak: about this many requests (wrk, in slices)"
    )
    p.add_argument("--startup-timeout", type=float, default=30.0, help="seconds to wait for sidecar /healthz")
    p.add_argument(
        "--sidecar-cmd",
        type=lambda s: s.split(),
        default=None,
        help="command that starts the sidecar CLI (default: current python -m sidecar)",
    )
    p.add_argument(
        "--baseline-cmd",
        type=lambda s: s.split(),
        default=None,
        help="another sidecar command (e.g. `env PYTHONPATH=/tmp/old python -m sidecar` for an older commit): "
        "each sidecar case also runs with it, right after, as CASE@baseline, so both are measured in one run",
    )
    p.add_argument("--max-time", type=float, default=0.0, help="hard limit in seconds (0: computed from settings)")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=15.0,
        help="max seconds to wait for other programs to go idle before each case",
    )
    p.add_argument("--keep-temp", action="store_true", help="keep generated configs and logs")
    args = p.parse_args(argv)
    if args.duration < 1 or args.connections < 1 or args.threads < 1 or args.workers < 1:
        p.error("--duration, --connections, --threads and --workers must be positive")
    if args.light and args.no_light:
        p.error("--light and --no-light exclude each other")
    args.case_list = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in args.case_list if c not in CASES]
    if unknown or not args.case_list:
        p.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    if args.idle_connections < 1 or args.soak_requests < 10_000:
        p.error("--idle-connections must be positive and --soak-requests at least 10000")
    if "rss_soak" in args.case_list and args.jwt_tokens // args.threads < 10 * SOAK_MAX_ENTRIES:
        p.error(
            f"rss_soak needs at least {10 * SOAK_MAX_ENTRIES * args.threads:,} --jwt-tokens (each of the "
            f"{args.threads} wrk threads rotates through 10x the verdict cache's {SOAK_MAX_ENTRIES:,} entries)"
        )
    args.transports = [t.strip() for t in args.transport.split(",") if t.strip()]
    bad = [t for t in args.transports if t not in TRANSPORTS]
    if bad or not args.transports:
        p.error(f"unknown transport(s) {bad}; choose from {', '.join(TRANSPORTS)}")
    return args


def build_plan(args: argparse.Namespace) -> list[Case]:
    """Cases in canonical order; anonymous and jwt_cached once per transport."""
    plan: list[Case] = []
    many = len(args.transports) > 1
    for name, case in CASES.items():
        if name not in args.case_list:
            continue
        if case.target != "sidecar":
            plan.append(case)
        elif name in TRANSPORT_CASES and many:
            plan += [replace(case, transport=t, label=f"{name}@{t}") for t in args.transports]
        else:
            plan.append(replace(case, transport=args.transports[0]))
        if case.target == "sidecar" and args.baseline_cmd:
            for ours in [c for c in plan if c.name == name and c.command is None]:
                plan.append(replace(ours, label=f"{ours.label}@baseline", command=args.baseline_cmd))
    return plan


def time_limit(args: argparse.Namespace, plan: list[Case]) -> float:
    if args.max_time > 0:
        return args.max_time
    per_case = args.warmup + args.duration + args.light_duration + args.startup_timeout + args.wait_quiet + 30
    tokens = 400 if any(c.name in ("jwt_new", "rss_soak") for c in plan) else 0
    total = 120.0 + tokens
    for c in plan:
        if c.name == "idle_conns":
            total += args.startup_timeout + args.wait_quiet + 150
        elif c.name == "rss_soak":
            total += args.startup_timeout + args.wait_quiet + args.soak_requests / memory.SOAK_MIN_RATE + 120
        else:
            total += per_case
    return total


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = build_plan(args)
    limit = time_limit(args, plan)

    arm(limit, "benchmark")
    print(
        f"sidecar bench: {len(plan)} case(s), {args.duration:g}s each after {args.warmup:g}s warm-up, "
        f"{args.threads} threads x {args.connections} connections, sidecar --workers {args.workers}; "
        f"hard limit {limit:.0f}s",
        flush=True,
    )
    bench = Bench(args, plan)
    results: list[CaseResult] = []
    started = time.monotonic()

    def work() -> None:
        for case in plan:
            results.append(bench.run_case(case))

    status = run_guarded(bench, work)
    if status == 2:
        return status
    if not results:
        return status or 1
    add_ratios(results)
    print()
    print(table(results))
    info = meta(args, bench)
    info["elapsed_s"] = round(time.monotonic() - started, 1)
    info["complete"] = status == 0 and len(results) == len(plan)
    write_json(args.json, info, results)
    print(f"\nJSON: {args.json}")
    if status:
        return status
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
