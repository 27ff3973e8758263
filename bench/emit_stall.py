"""Does a stalled webhook receiver slow the proxy down? (Issue 6's closing measurement.)

    python -m bench.emit_stall [--duration 5] [--connections 32] [--workers 1]

One sidecar process (Redis DB 12 on 127.0.0.1:6379 — a database of its own; only its `sidecar:` keys are
deleted, before and after), an nginx upstream answering seed 000's JSON, and a webhook receiver that never
answers (a socket that listens and never accepts: connections hang until the webhook timeout). Two routes
that differ only in `emit`; wrk POSTs to each in turn, in the same run: first without emit, then with
(every request queues one event for the stalled receiver), then without again (does the backlog hurt?).
Everything listens on 127.0.0.1; every process started here is stopped in a `finally`.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import redis

from bench.nginx import Nginx, upstream_conf
from bench.procs import free_port, tree_cpu_seconds
from sidecar.testing import SidecarProcess, delete_sidecar_keys, redis_url_for_tests

SEED_REPLY = '{"client-transaction":[{"idtransaction":1,"idcliente":"01400-2","valorpago":10}]}'
SECRET = "whsec_" + "a" * 43 + "="  # 32 bytes of base64; the receiver never checks it
STREAM = "sidecar:{webhooks}:stream"  # deliveries waiting for a worker
POST_LUA = """wrk.method = "POST"
wrk.body = '{"valor": 10}'
wrk.headers["Content-Type"] = "application/json"
"""


def sidecar_config(upstream_port: int, receiver_port: int, redis_url: str) -> str:
    route = {"match": {"methods": ["POST"]}, "auth": ["public"]}
    return json.dumps(
        {
            "version": 1,
            "upstream": f"http://127.0.0.1:{upstream_port}",
            "redis": redis_url,
            "authenticators": {"public": {"type": "anonymous"}},
            "routes": [
                {**route, "id": "plain", "match": {**route["match"], "path": "/plain/**"}},
                {
                    **route,
                    "id": "emit",
                    "match": {**route["match"], "path": "/emit/**"},
                    "emit": [{"event": "client-transaction", "when": "2xx"}],
                },
            ],
            "webhooks": [
                {
                    "id": "stalled",
                    "url": f"http://127.0.0.1:{receiver_port}/hooks",
                    "events": ["client-transaction"],
                    "secret": SECRET,
                    "allow_private": True,
                    "timeout": "10s",
                }
            ],
        }
    )


def wrk(url: str, lua: Path, seconds: int, connections: int) -> tuple[float, int, int]:
    """requests/s, requests, and non-2xx answers plus socket errors."""
    assert url.startswith("http://127.0.0.1:")
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--timeout=5s", "-s", str(lua), url],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return rps, requests, _bad(out)


def _bad(out: str) -> int:
    bad = 0
    if match := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        bad += int(match.group(1))
    if match := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        bad += sum(int(n) for n in match.groups())
    return bad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    if not shutil.which("wrk") or not shutil.which("nginx"):
        raise SystemExit("needs wrk and nginx on PATH (apt-get install wrk nginx)")
    redis_url = redis_url_for_tests(db=12)
    delete_sidecar_keys(redis_url)
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as receiver:
        work = Path(tmp)
        receiver.bind(("127.0.0.1", 0))
        receiver.listen(1024)  # never accepted: every delivery attempt hangs until the webhook timeout
        upstream_port = free_port()
        upstream = Nginx(
            shutil.which("nginx") or "nginx",
            work / "nginx",
            upstream_conf(work / "nginx", upstream_port, SEED_REPLY),
            upstream_port,
            "upstream",
        )
        lua = work / "post.lua"
        lua.write_text(POST_LUA)
        config = work / "sidecar.yaml"
        config.write_text(sidecar_config(upstream_port, receiver.getsockname()[1], redis_url))
        sidecar = None
        try:
            upstream.start()
            sidecar = SidecarProcess(config, workers=args.workers)
            for path in ("/plain/pay", "/emit/pay"):  # warm-up, discarded
                wrk(sidecar.url + path, lua, 1, args.connections)
            pending = redis.Redis.from_url(redis_url)
            results, queued = [], 0
            for path in ("/plain/pay", "/emit/pay", "/plain/pay"):
                before, cpu = int(pending.xlen(STREAM)), tree_cpu_seconds(sidecar.process.pid)
                rps, requests, bad = wrk(sidecar.url + path, lua, args.duration, args.connections)
                cpu_us = (tree_cpu_seconds(sidecar.process.pid) - cpu) / max(requests, 1) * 1e6
                results.append((path, rps, requests, bad, cpu_us))
                queued += int(pending.xlen(STREAM)) - before if path == "/emit/pay" else 0
        finally:
            if sidecar is not None:
                sidecar.stop()
            upstream.close()
            delete_sidecar_keys(redis_url)
    print(f"{'route':<12}{'req/s':>10}{'requests':>10}{'errors':>8}{'CPU µs/req':>12}")
    for path, rps, requests, bad, cpu_us in results:
        print(f"{path:<12}{rps:>10.0f}{requests:>10}{bad:>8}{cpu_us:>12.0f}")
    plain, emit = results[0][1], results[1][1]
    print(f"emit / plain (first run) = {emit / plain:.2f}; the stream grew by {queued} entries during the emit "
          f"run ({results[1][2]} events, plus retries of the deliveries stuck on the receiver)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
