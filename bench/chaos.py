"""``python -m bench.chaos``: mixed traffic through a real `sidecar run --workers 2` while faults are injected,
then the checks issue 17 asks for (README "Limits and overload").

Traffic (4 client threads, for `--duration` seconds): JWT, client tokens, IP-bound keys, a validator route and
an emit route whose events go to a webhook receiver. The schedule, as fractions of the duration: Redis restarted
(0.15; down 2 s), the upstream restarted (0.30; down 2 s), the config reloaded (0.45), a worker SIGKILLed (0.60),
the webhook receiver stalled (0.75; 5 s). Everything runs on loopback: a redis-server, the upstream, the
validator and the receiver are started here and stopped by PID or by closing them.

Afterwards it checks, and prints a table: no 5xx other than 502/503/504; no credential in any upstream request
or in any log or audit line; exactly one audit line per answered request (by X-Request-Id); every event delivered
(duplicates counted and reported); the processes' RSS within the Helm chart's derived limit for two workers.
Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from sidecar.echo import EchoApp, read_body
from sidecar.testing import KeyPair, free_port, serve_in_thread

ADMIN = "chaos-admin-token-0123456789abcdef"
CLIENT_SECRET = "chaos-client-secret-0123456789"
VALIDATOR_TOKEN = "chaos-validator-token-0123456789"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"c" * 32).decode()
KEYS_SECRET = "chaos-keys-secret-" + "k" * 32
CHART_LIMIT_2_WORKERS = 448 * 1024 * 1024  # helm/sidecar/values.yaml: 2 x (96 + 48 + 32) + 96 Mi
ALLOWED_5XX = {502, 503, 504}


class Receiver:
    """The webhook receiver: records the ids and bodies it gets; can stall."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.bodies: list[str] = []
        self.stall_until = 0.0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        import asyncio

        body = await read_body(receive)
        while time.monotonic() < self.stall_until:
            await asyncio.sleep(0.05)
        headers = dict(scope["headers"])
        self.ids.append(headers.get(b"webhook-id", b"").decode())
        self.bodies.append(body.decode("utf-8", "replace"))
        await send({"type": "http.response.start", "status": 204, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})


async def validator(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A validation webservice: "1" (yes) for the one good token."""
    query = scope.get("query_string", b"").decode()
    answer = b"1" if VALIDATOR_TOKEN in query else b"0"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"1")]})
    await send({"type": "http.response.body", "body": answer})


class Redis:
    """A redis-server with an append-only file, so a restart keeps what was written (minted tokens)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise SystemExit("redis-server is not on PATH (apt-get install redis-server)")
        self.process = subprocess.Popen([server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                         "--appendonly", "yes", "--appendfsync", "always", "--dir",
                                         str(self.directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), __import__("socket").create_connection(("127.0.0.1", self.port), 0.2):
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


class Upstream:
    """The echo upstream on a fixed port, closed and opened again for the restart."""

    def __init__(self) -> None:
        self.app = EchoApp()
        self.port = free_port()
        self._stack: contextlib.ExitStack | None = None

    def start(self) -> None:
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(serve_in_thread(self.app, self.port))

    def stop(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None


def config(upstream: int, redis: int, receiver: str, validator_url: str, jwt_keys: KeyPair, ttl: str) -> dict[str, Any]:
    secret_hash = "sha256:" + hashlib.sha256(CLIENT_SECRET.encode()).hexdigest()
    return {
        "version": 1, "upstream": f"http://127.0.0.1:{upstream}", "redis": f"redis://127.0.0.1:{redis}/0",
        "admin": {"token": ADMIN}, "keys": {"secret": KEYS_SECRET}, "cache": {"ttl": ttl},
        "authenticators": {
            "jwt": {"type": "jwt", "keys": [jwt_keys.public_pem], "issuer": "https://idp.chaos", "audience": "chaos"},
            "tokens": {"type": "client_token"},
            "keys": {"type": "ip_key"},
            "validator": {"type": "remote", "from": ["query:token"], "url": validator_url + "/v",
                          "allow_private": True, "timeout": "1s"},
        },
        "clients": [{"id": "partner", "secret": secret_hash, "scopes": ["read"]}],
        "routes": [
            {"id": "jwt", "match": {"path": "/jwt/**"}, "auth": ["jwt"]},
            {"id": "tokens", "match": {"path": "/tokens/**"}, "auth": ["tokens"]},
            {"id": "keys", "match": {"path": "/keys/**"}, "auth": ["keys"]},
            {"id": "validator", "match": {"path": "/validator/**"}, "auth": ["validator"]},
            {"id": "emit", "match": {"path": "/emit/**"}, "auth": ["jwt"],
             "emit": [{"event": "chaos.paid", "when": "2xx"}]},
        ],
        "webhooks": [{"id": "receiver", "url": receiver, "events": ["chaos.paid"], "secret": WEBHOOK_SECRET,
                      "allow_private": True, "timeout": "2s",
                      "retry": {"initial": "200ms", "max_delay": "2s", "max_attempts": 30},
                      "breaker": {"failures": 5, "cooldown": "2s"}}],
        "webhook_spool": {"dir": str(Path(tempfile.gettempdir()) / f"chaos-spool-{os.getpid()}")},
    }


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
    return found


def rss(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Traffic:
    def __init__(self, base: str, requests: dict[str, Callable[[int], tuple[str, dict[str, str]]]]) -> None:
        self.base = base
        self.requests = requests
        # kind, status (0: no answer), request id, path, when answered (monotonic)
        self.results: list[tuple[str, int, str | None, str, float]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.counter = iter(range(10**9))

    def run(self, worker: int) -> None:
        kinds = list(self.requests)
        with httpx.Client(timeout=10, trust_env=False) as client:
            i = worker
            while not self.stop.is_set():
                kind = kinds[i % len(kinds)]
                n = next(self.counter)
                path, headers = self.requests[kind](n)
                try:
                    response = client.get(self.base + path, headers=headers)
                    result = (kind, response.status_code, response.headers.get("x-request-id"), path,
                              time.monotonic())
                except httpx.HTTPError:
                    result = (kind, 0, None, path, time.monotonic())
                with self.lock:
                    self.results.append(result)
                i += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of traffic")
    args = parser.parse_args(argv)
    duration = args.duration
    work = Path(tempfile.mkdtemp(prefix="sidecar-chaos-"))
    jwt_keys = KeyPair()
    redis, upstream, receiver = Redis(work), Upstream(), Receiver()
    redis.start()
    upstream.start()
    with contextlib.ExitStack() as stack:
        receiver_url = stack.enter_context(serve_in_thread(receiver)) + "/hooks"
        validator_url = stack.enter_context(serve_in_thread(validator))
        config_path = work / "sidecar.yaml"
        config_path.write_text(json.dumps(config(upstream.port, redis.port, receiver_url, validator_url, jwt_keys,
                                                 "300s")))
        port, admin_port = free_port(), free_port()
        audit_file, log_file = open(work / "audit.jsonl", "ab"), open(work / "stderr.log", "ab")
        stack.callback(audit_file.close)
        stack.callback(log_file.close)
        sidecar = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run", "--config", str(config_path), "--host", "127.0.0.1", "--port",
             str(port), "--admin-port", str(admin_port), "--workers", "2", "--grace", "5"],
            stdout=audit_file, stderr=log_file)
        base, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
        try:
            return run(duration, work, jwt_keys, redis, upstream, receiver, sidecar, base, admin, config_path,
                       receiver_url, validator_url)
        finally:
            if sidecar.poll() is None:
                sidecar.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    sidecar.wait(15)
                if sidecar.poll() is None:
                    sidecar.kill()
            upstream.stop()
            redis.stop()


def run(duration: float, work: Path, jwt_keys: KeyPair, redis: Redis, upstream: Upstream, receiver: Receiver,
        sidecar: subprocess.Popen[bytes], base: str, admin: str, config_path: Path, receiver_url: str,
        validator_url: str) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(admin + "/healthz", timeout=0.5).status_code == 200:
                break
        time.sleep(0.1)
    else:
        raise SystemExit(f"the sidecar did not start: {(work / 'stderr.log').read_text()[-2000:]}")
    auth = {"Authorization": f"Bearer {ADMIN}"}
    minted = httpx.post(admin + "/admin/clients/partner/tokens", headers=auth, timeout=10).json()["token"]
    key = httpx.post(base + "/_sidecar/keys", json={"user": "maria", "ip": "127.0.0.1", "expiry_minutes": 60},
                     auth=("partner", CLIENT_SECRET), timeout=10).json()["key"]
    now = int(time.time())
    jwts = [jwt_keys.token({"iss": "https://idp.chaos", "aud": "chaos", "sub": f"user-{i}", "exp": now + 3600})
            for i in range(200)]
    credentials = [ADMIN, CLIENT_SECRET, VALIDATOR_TOKEN, minted, key, *jwts]
    requests: dict[str, Callable[[int], tuple[str, dict[str, str]]]] = {
        "jwt": lambda n: (f"/jwt/{n}", {"Authorization": f"Bearer {jwts[n % len(jwts)]}"}),
        "client_token": lambda n: (f"/tokens/{n}", {"X-Client-Token": minted}),
        "ip_key": lambda n: (f"/keys/{n}?key={key}", {}),
        "validator": lambda n: (f"/validator/{n}?token={VALIDATOR_TOKEN}", {}),
        "emit": lambda n: (f"/emit/chaos-{n}", {"Authorization": f"Bearer {jwts[n % len(jwts)]}"}),
    }
    traffic = Traffic(base, requests)
    threads = [threading.Thread(target=traffic.run, args=(i,), daemon=True) for i in range(4)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    peak_rss = 0
    kills: list[float] = []
    faults: list[tuple[float, str, Callable[[], None]]] = [
        (0.15, "Redis restarted (down 2 s)", lambda: restart(redis.stop, redis.start)),
        (0.30, "upstream restarted (down 2 s)", lambda: restart(upstream.stop, upstream.start)),
        (0.45, "config reloaded (SIGHUP)", lambda: reload(config_path, sidecar, upstream, redis, receiver_url,
                                                          validator_url, jwt_keys)),
        (0.60, "a worker SIGKILLed", lambda: kills.append(kill_worker(sidecar))),
        (0.75, "webhook receiver stalled 5 s", lambda: setattr(receiver, "stall_until", time.monotonic() + 5)),
    ]
    log = []
    for at, name, fault in faults:
        while time.monotonic() - started < at * duration:
            peak_rss = max(peak_rss, total_rss(sidecar.pid))
            time.sleep(0.2)
        fault()
        log.append(f"{time.monotonic() - started:5.1f}s  {name}")
    while time.monotonic() - started < duration:
        peak_rss = max(peak_rss, total_rss(sidecar.pid))
        time.sleep(0.2)
    traffic.stop.set()
    for thread in threads:
        thread.join(15)
    results = traffic.results
    # The emit requests that got a 2xx: their markers (in the path the echo upstream saw, which the event body
    # carries) must all reach the receiver. Wait for the retries and the spool.
    emit_ok = [r for r in results if r[0] == "emit" and 200 <= r[1] < 300]
    emitted = {m.group(0) for r in emit_ok if (m := re.search(r"chaos-\d+", r[3]))}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not emitted <= set(re.findall(r"chaos-\d+", " ".join(receiver.bodies))):
        time.sleep(0.5)
    delivered = set(re.findall(r"chaos-\d+", " ".join(receiver.bodies)))
    duplicates = sum(count - 1 for count in Counter(receiver.ids).values() if count > 1)
    time.sleep(1.0)  # the audit log flushes every 0.2 s
    audit_lines = [json.loads(line) for line in (work / "audit.jsonl").read_text().splitlines()
                   if line.startswith("{")]
    audit_ids = Counter(line.get("request_id") for line in audit_lines if line.get("request_id"))
    answered_ids = [rid for _, _, rid, _, _ in results if rid]
    twice = [rid for rid in answered_ids if audit_ids.get(rid, 0) > 1]
    # A worker keeps its audit lines up to 0.2 s before writing them: SIGKILL loses what it had not written.
    killed_at = kills[0] if kills else None
    missing = [(rid, when) for _, _, rid, _, when in results if rid and rid not in audit_ids]
    near_kill = [rid for rid, when in missing if killed_at is not None and abs(when - killed_at) < 1.0]
    unexplained = [rid for rid, _ in missing if rid not in near_kill]
    bad_5xx = Counter(status for _, status, _, _, _ in results if status >= 500 and status not in ALLOWED_5XX)
    texts = [(work / "audit.jsonl").read_text(), (work / "stderr.log").read_text()]
    upstream_texts = [f"{r.path}?{r.query} {r.headers} {r.body!r}" for r in upstream.app.received]
    leaked_logs = sum(1 for c in credentials for t in texts if c in t)
    leaked_upstream = sum(1 for c in credentials for t in upstream_texts if c in t)
    by_kind = Counter((kind, status) for kind, status, _, _, _ in results)
    rows = [
        ("requests", str(len(results)), "ok"),
        ("by kind/status", ", ".join(f"{k}:{s}={c}" for (k, s), c in sorted(by_kind.items())), "-"),
        ("no answer (connection cut: worker killed)", str(sum(1 for r in results if r[1] == 0)), "-"),
        ("5xx other than 502/503/504", str(dict(bad_5xx)), "ok" if not bad_5xx else "FAIL"),
        ("credentials in upstream requests", str(leaked_upstream), "ok" if not leaked_upstream else "FAIL"),
        ("credentials in log/audit lines", str(leaked_logs), "ok" if not leaked_logs else "FAIL"),
        ("answered requests with more than one audit line", f"{len(twice)} of {len(answered_ids)}",
         "ok" if not twice else "FAIL"),
        ("answered requests without an audit line", f"{len(unexplained)} of {len(answered_ids)}",
         "ok" if not unexplained else "FAIL"),
        ("  of them answered by the SIGKILLed worker in its last 0.2 s (unflushed)", str(len(near_kill)), "-"),
        ("events emitted (2xx answers on the emit route)", str(len(emitted)), "-"),
        ("events delivered", f"{len(delivered & emitted)} of {len(emitted)}",
         "ok" if emitted <= delivered else "FAIL"),
        ("duplicate deliveries", str(duplicates), "-"),
        ("peak RSS (supervisor + workers)", f"{peak_rss / 2**20:.0f} MiB of {CHART_LIMIT_2_WORKERS / 2**20:.0f} MiB",
         "ok" if peak_rss <= CHART_LIMIT_2_WORKERS else "FAIL"),
    ]
    print("faults:")
    for line in log:
        print("  " + line)
    width = max(len(r[0]) for r in rows)
    print(f"\n{'check'.ljust(width)}  result  value")
    for name, value, verdict in rows:
        print(f"{name.ljust(width)}  {verdict:6}  {value}")
    print(f"\n(work directory: {work})")
    return 1 if any(verdict == "FAIL" for _, _, verdict in rows) else 0


def restart(stop: Callable[[], None], start: Callable[[], None], down: float = 2.0) -> None:
    stop()
    time.sleep(down)
    start()


def total_rss(supervisor: int) -> int:
    return rss(supervisor) + sum(rss(pid) for pid in children(supervisor))


def kill_worker(sidecar: subprocess.Popen[bytes]) -> float:
    """SIGKILL one worker; when."""
    workers = [pid for pid in children(sidecar.pid)
               if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()]
    if workers:
        os.kill(max(workers), signal.SIGKILL)
    return time.monotonic()


def reload(config_path: Path, sidecar: subprocess.Popen[bytes], upstream: Upstream, redis: Redis, receiver_url: str,
           validator_url: str, jwt_keys: KeyPair) -> None:
    config_path.write_text(json.dumps(config(upstream.port, redis.port, receiver_url, validator_url, jwt_keys,
                                             "120s")))
    sidecar.send_signal(signal.SIGHUP)


if __name__ == "__main__":
    sys.exit(main())
