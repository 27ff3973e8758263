"""Runs the selected cases one after the other and collects their results."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import configs, loadgen, memory, tokens, tools, wrk
from bench.configs import Case, Creds
from bench.nginx import Nginx, auth_request_conf, make_certificates, proxy_conf, upstream_conf
from bench.procs import cpu_snapshot, foreign_cores, free_port, tree_cpu_seconds, tree_rss_bytes
from bench.report import CaseResult
from bench.sidecar_proc import REPO_ROOT, Sidecar, SidecarError

CACHE_DIR = Path(__file__).resolve().parent / "results" / "cache"
JWT_FEW = 4
FOREIGN_WARN = 0.15  # cores used by other programs during a measured run before a warning


class Bench:
    def __init__(self, args: argparse.Namespace, plan: list[Case]) -> None:
        self.args = args
        self.plan = plan
        self.workdir = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
        self.wrk_bin = ""
        self.nginx_bin = ""
        self.upstream: Nginx | None = None
        self.proxy: Nginx | None = None
        self.https_upstream: Nginx | None = None
        self.creds = Creds()
        self.fresh_light: list[str] = []
        self.fresh_ready = False
        self.soak_valid_until = 0.0  # rss_soak: the exp of its tokens (0: not prepared)

    # ---- setup / teardown ------------------------------------------------------------------------
    def setup(self) -> None:
        self.wrk_bin = tools.ensure("wrk")
        self.nginx_bin = tools.ensure("nginx")
        up_port = free_port()
        self.upstream = Nginx(
            self.nginx_bin,
            self.workdir / "nginx-upstream",
            upstream_conf(self.workdir / "nginx-upstream", up_port),
            up_port,
            "upstream",
        )
        self.upstream.start()
        if any(c.name == "idle_conns" for c in self.plan):
            # before any sidecar is spawned: its workers inherit the limit
            memory.raise_nofile(self.args.idle_connections)
        if any(c.target == "nginx_proxy" for c in self.plan):
            px = free_port()
            self.proxy = Nginx(
                self.nginx_bin,
                self.workdir / "nginx-proxy",
                proxy_conf(self.workdir / "nginx-proxy", px, up_port),
                px,
                "nginx_proxy",
            )
            self.proxy.start()
        names = {c.name for c in self.plan}
        if "jwt_cached_https" in names:
            ca, cert, cert_key = make_certificates(self.workdir / "tls")
            self.creds.upstream_ca = str(ca)
            tls_port = free_port()
            self.https_upstream = Nginx(
                self.nginx_bin,
                self.workdir / "nginx-https-upstream",
                upstream_conf(self.workdir / "nginx-https-upstream", tls_port, tls=(cert, cert_key)),
                tls_port,
                "https_upstream",
                ca=ca,
            )
            self.https_upstream.start()
        if names & set(configs.JWT_CASES):
            key = tokens.load_or_create_key(CACHE_DIR)
            self.creds.public_pem = key.public_pem
            self.creds.jwt_few = [tokens.sign(key, f"cached-user-{i}") for i in range(JWT_FEW)]
            if names & {"jwt_new", "rss_soak"}:
                soak = "rss_soak" in names
                need = memory.token_validity_needed(self.args.soak_requests) if soak else 0.0
                toks = tokens.fresh_tokens(key, self.args.jwt_tokens, CACHE_DIR, min_valid=need)
                if "jwt_new" in names:
                    self._prepare_fresh(toks)
                if soak:
                    self._prepare_soak(toks)
        if "client_token" in names:
            self.creds.client_token = tokens.client_token()
            self.creds.client_token_ref = tokens.sha256_ref(self.creds.client_token)

    def _prepare_fresh(self, toks: list[str]) -> None:
        """Split the never-seen tokens: light pass, warm-up and measured run, one disjoint file per wrk thread."""
        a = self.args
        light_n = int(a.light_rate * a.light_duration) if self._light_for(configs.CASES["jwt_new"]) else 0
        self.fresh_light, rest = toks[:light_n], toks[light_n:]
        warm_n = int(len(rest) * a.warmup / (a.warmup + a.duration)) if a.warmup > 0 else 0
        warm, measured = rest[:warm_n], rest[warm_n:]
        for prefix, part in (("warm-", warm), ("fresh-", measured)):
            share = max(1, len(part) // a.threads)
            for t in range(a.threads):
                lines = part[t * share : (t + 1) * share] or part[:1] or toks[:1]
                (self.workdir / f"{prefix}{t}.txt").write_text("".join(f"Bearer {x}\n" for x in lines))
        self.fresh_ready = True

    def _prepare_soak(self, toks: list[str]) -> None:
        """rss_soak: all the pre-signed tokens, one disjoint slice per wrk thread, each slice far larger than the
        verdict cache (checked by the flags), recycled when a thread runs past its end."""
        share = len(toks) // self.args.threads
        for t in range(self.args.threads):
            lines = toks[t * share : (t + 1) * share]
            (self.workdir / f"soak-{t}.txt").write_text("".join(f"Bearer {x}\n" for x in lines))
        self.soak_valid_until = float(min(tokens.expires_at(toks[0]), tokens.expires_at(toks[-1])))

    def close(self) -> None:
        for n in (self.proxy, self.upstream, self.https_upstream):
            if n is not None:
                n.close()
        if not self.args.keep_temp:
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            print(f"temporary files kept in {self.workdir}")

    # ---- cases -----------------------------------------------------------------------------------
    def _light_for(self, case: Case) -> bool:
        return not self.args.no_light and (self.args.light or case.light_default)

    def run_case(self, case: Case) -> CaseResult:
        res = CaseResult(label=case.label, case=case.name, description=case.description, transport=case.transport)
        print(f"== {case.label}: {case.description}", flush=True)
        try:
            if case.target == "sidecar":
                self._run_sidecar_case(case, res)
            elif case.target in ("nginx_decision", "nginx_auth_floor"):
                self._run_auth_request_case(case, res)
            else:
                nginx = self.upstream if case.target == "upstream" else self.proxy
                assert nginx is not None
                self._measure(case, res, nginx.port, nginx.pid, f"nginx {case.target} master+workers")
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            res.error = str(e)
            print(f"   FAILED: {e}", flush=True)
        return res

    def _run_sidecar_case(self, case: Case, res: CaseResult) -> None:
        assert self.upstream is not None
        if case.needs_redis:
            _check_redis()
        if case.name == "jwt_new" and not self.fresh_ready:
            raise RuntimeError("fresh JWTs were not prepared")
        if case.name == "rss_soak" and not self.soak_valid_until:
            raise RuntimeError("the soak's JWTs were not prepared")
        upstream = self.https_upstream if case.name == "jwt_cached_https" else self.upstream
        assert upstream is not None
        cfg = configs.sidecar_config(case, upstream.port, self.creds)
        sc = Sidecar(
            self.workdir / f"sidecar-{case.label.replace('@', '-')}",
            cfg,
            workers=self.args.workers,
            transport=case.transport,
            command=case.command or self.args.sidecar_cmd,
        )
        before = _redis_keys() if case.needs_redis else None
        try:
            sc.start(timeout=self.args.startup_timeout)
            scope = f"sidecar process tree ({self.args.workers} workers)"
            if case.name == "idle_conns":
                self._measure_idle(case, res, sc, scope)
            elif case.name == "rss_soak":
                self._measure_soak(case, res, sc, scope)
            else:
                self._measure(case, res, sc.port, sc.pid, scope, sc)
        except SidecarError as e:
            raise RuntimeError(str(e)) from None
        finally:
            sc.close()
            if before is not None:
                left = _redis_cleanup(before)
                if left:
                    res.warnings.append(
                        f"the sidecar left {len(left)} key(s) without TTL in Redis db 14, deleted: "
                        + ", ".join(left[:5])
                    )

    def _run_auth_request_case(self, case: Case, res: CaseResult) -> None:
        """nginx auth_request in front of the upstream, asking the sidecar's decision port (CPU: the sidecar's, the
        decision's cost) or, for the floor, a location of that nginx (CPU: nginx's)."""
        assert self.upstream is not None
        sc = None
        if case.target == "nginx_decision":
            cfg = configs.sidecar_config(case, self.upstream.port, self.creds)
            sc = Sidecar(self.workdir / f"sidecar-{case.name}", cfg, workers=self.args.workers,
                         transport=self.args.transports[0], command=self.args.sidecar_cmd, decision=True)
        prefix = self.workdir / f"nginx-{case.name}"
        port, ready = free_port(), free_port()
        conf = auth_request_conf(prefix, port, ready, self.upstream.port, sc.decision_port if sc else None)
        front = Nginx(self.nginx_bin, prefix, conf, ready, case.name)
        try:
            if sc is not None:
                sc.start(timeout=self.args.startup_timeout)
            front.start()
            if sc is not None:
                self._measure(case, res, port, sc.pid, f"sidecar process tree ({self.args.workers} workers, decision)",
                              sc)
            else:
                self._measure(case, res, port, front.pid, "nginx auth_request front master+workers")
        except SidecarError as e:
            raise RuntimeError(str(e)) from None
        finally:
            front.close()
            if sc is not None:
                sc.close()

    def _measure(self, case: Case, res: CaseResult, port: int, pid: int, scope: str, sc: Sidecar | None = None) -> None:
        a = self.args
        url = f"http://127.0.0.1:{port}{case.path}"
        res.url = url
        _probe(url, configs.case_headers(case, self.creds), sc)
        common = {"threads": a.threads, "connections": a.connections}
        self._wait_quiet()
        if a.warmup > 0:
            warm = configs.wrk_script(case, self.creds, str(self.workdir / "warm-"))
            wrk.run(self.wrk_bin, url, warm, self.workdir, duration=a.warmup, **common)
        script = configs.wrk_script(case, self.creds, str(self.workdir / "fresh-"))
        snap0, cpu0 = cpu_snapshot(), tree_cpu_seconds(pid)
        r = wrk.run(self.wrk_bin, url, script, self.workdir, duration=a.duration, **common)
        snap1, cpu1 = cpu_snapshot(), tree_cpu_seconds(pid)
        res.foreign_cpu_cores = foreign_cores(snap0, snap1)
        if res.foreign_cpu_cores > FOREIGN_WARN:
            res.warnings.append(
                f"other programs used {res.foreign_cpu_cores:.2f} cores during the measured run: numbers are low"
            )
        if sc is not None and not sc.alive():
            raise RuntimeError("sidecar died during the measured run:\n" + sc.diagnostics())
        res.rps, res.requests, res.latency_ms, res.wrk_errors = r.rps, r.requests, r.latency_ms, r.errors
        res.cpu_us_per_req = (cpu1 - cpu0) / r.requests * 1e6 if r.requests else None
        res.cpu_scope = scope
        if r.errors["status"]:
            res.warnings.append(f"{r.errors['status']:,} of {r.requests:,} responses were not 2xx/3xx")
        other = r.error_total - r.errors["status"]
        if other:
            res.warnings.append(f"{other:,} socket errors/timeouts: {r.errors}")
        if r.wrapped:
            res.warnings.append(f"ran out of fresh tokens ({r.wrapped} wrap(s)): raise --jwt-tokens")
        print(
            f"   {r.rps:,.0f} req/s  p50 {r.latency_ms['p50']:.3f} ms  p99 {r.latency_ms['p99']:.3f} ms"
            f"  CPU {_fmt(res.cpu_us_per_req)} µs/req",
            flush=True,
        )
        if self._light_for(case):
            self._light(case, res, port, sc)

    def _measure_idle(self, case: Case, res: CaseResult, sc: Sidecar, scope: str) -> None:
        """idle_conns: RSS of the sidecar's tree before and after --idle-connections used, idle keep-alive
        connections (bench/memory.py)."""
        url = f"http://127.0.0.1:{sc.port}{case.path}"
        res.url = url
        _probe(url, {}, sc)
        self._wait_quiet()
        n = self.args.idle_connections
        m = memory.idle_conns(sc.port, case.path, n, sc.pid)
        if not sc.alive():
            raise RuntimeError("sidecar died during the idle-connections case:\n" + sc.diagnostics())
        res.memory, res.cpu_scope = m, scope
        print(
            f"   {n:,} idle connections: RSS {m['rss_before_mb']:.1f} -> {m['rss_after_mb']:.1f} MB, "
            f"+{m['added_mb']:.1f} MB = {m['kib_per_conn']:.1f} KiB per connection "
            f"(target <= {memory.IDLE_TARGET_MB:g} MB: {'met' if m['met'] else 'NOT met'}); "
            f"sockets added per process {m['sockets_added_by_process']}",
            flush=True,
        )

    def _measure_soak(self, case: Case, res: CaseResult, sc: Sidecar, scope: str) -> None:
        """rss_soak: about --soak-requests through wrk in slices on a full, evicting verdict cache, the sidecar's
        tree RSS sampled meanwhile (bench/memory.py)."""
        a = self.args
        url = f"http://127.0.0.1:{sc.port}{case.path}"
        res.url = url
        _probe(url, configs.case_headers(case, self.creds), sc)
        self._wait_quiet()
        script = configs.wrk_script(case, self.creds, str(self.workdir / "soak-"))
        print(f"   soak: about {a.soak_requests:,} requests, wrk slices of at most {memory.SOAK_SLICE_S}s", flush=True)

        def run_slice(seconds: int) -> wrk.WrkResult:
            r = wrk.run(self.wrk_bin, url, script, self.workdir, duration=seconds, threads=a.threads,
                        connections=a.connections)
            if not sc.alive():
                raise RuntimeError("sidecar died during the soak:\n" + sc.diagnostics())
            print(f"   ... {r.requests:,} requests in {r.duration_s:.0f}s ({r.rps:,.0f} req/s), RSS "
                  f"{tree_rss_bytes(sc.pid) / memory.MB:.1f} MB", flush=True)
            return r

        snap0, cpu0 = cpu_snapshot(), tree_cpu_seconds(sc.pid)
        m, runs, notes = memory.soak(run_slice, lambda: tree_rss_bytes(sc.pid), a.soak_requests, self.soak_valid_until)
        snap1, cpu1 = cpu_snapshot(), tree_cpu_seconds(sc.pid)
        res.foreign_cpu_cores = foreign_cores(snap0, snap1)
        if res.foreign_cpu_cores > FOREIGN_WARN:
            res.warnings.append(f"other programs used {res.foreign_cpu_cores:.2f} cores during the soak")
        res.warnings += notes
        res.requests, res.rps = m["requests"], m["rps"]
        res.cpu_us_per_req = (cpu1 - cpu0) / m["requests"] * 1e6 if m["requests"] else None
        res.cpu_scope = scope
        errors: dict[str, int] = {}
        for r in runs:
            for k, v in r.errors.items():
                errors[k] = errors.get(k, 0) + v
        res.wrk_errors = errors
        if errors.get("status"):
            res.warnings.append(f"{errors['status']:,} of {m['requests']:,} responses were not 2xx/3xx")
        other = sum(errors.values()) - errors.get("status", 0)
        if other:
            res.warnings.append(f"{other:,} socket errors/timeouts: {errors}")
        entries = _metric(sc.admin_port, "sidecar_verdict_cache_entries")
        m["verdict_cache_entries"] = entries
        m["verdict_cache_max_entries"] = configs.SOAK_MAX_ENTRIES * a.workers
        if entries is None or entries < configs.SOAK_MAX_ENTRIES * a.workers:
            res.warnings.append(
                f"verdict cache held {entries} entries at the end, not {configs.SOAK_MAX_ENTRIES:,} per worker: "
                "was it full?"
            )
        res.memory = m
        print(
            f"   RSS after warm-up {m['rss_start_mb']:.1f} MB, end {m['rss_end_mb']:.1f} MB, max "
            f"{m['rss_max_mb']:.1f} MB: drift {m['drift_pct']:+.1f} % (peak {m['peak_over_start_pct']:+.1f} %; "
            f"target ±{memory.SOAK_DRIFT_TARGET:g} %: {'met' if m['met'] else 'NOT met'}) after {m['requests']:,} "
            f"requests at {m['rps']:,.0f} req/s; verdict cache entries {entries}",
            flush=True,
        )

    def _wait_quiet(self) -> None:
        """Wait (at most --wait-quiet seconds) until other programs leave the CPU alone for half a second."""
        deadline = time.monotonic() + self.args.wait_quiet
        busy = 0.0
        while time.monotonic() < deadline:
            before = cpu_snapshot()
            time.sleep(0.5)
            busy = foreign_cores(before, cpu_snapshot())
            if busy < FOREIGN_WARN:
                return
        if self.args.wait_quiet > 0:
            print(f"   (other programs still use {busy:.2f} cores; measuring anyway)", flush=True)

    def _light(self, case: Case, res: CaseResult, port: int, sc: Sidecar | None) -> None:
        a = self.args
        host = f"127.0.0.1:{port}"
        if case.name == "jwt_new":
            toks = self.fresh_light

            def make(i: int) -> bytes:
                return loadgen.simple_request(case.path, host, {"Authorization": f"Bearer {toks[i % len(toks)]}"})
        else:
            fixed = loadgen.simple_request(case.path, host, configs.case_headers(case, self.creds))

            def make(i: int) -> bytes:
                return fixed

        lr = loadgen.run(
            "127.0.0.1", port, make, rate=a.light_rate, duration=a.light_duration, connections=a.light_connections
        )
        if sc is not None and not sc.alive():
            raise RuntimeError("sidecar died during the light-load pass:\n" + sc.diagnostics())
        res.light = asdict(lr)
        bad = lr.sent - lr.ok
        if bad:
            res.warnings.append(f"light pass: {bad} of {lr.sent} requests failed or were not 2xx ({lr.statuses})")
        print(
            f"   light {a.light_rate:g} req/s: p50 {lr.latency_ms.get('p50', float('nan')):.3f} ms"
            f"  p99 {lr.latency_ms.get('p99', float('nan')):.3f} ms",
            flush=True,
        )


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _probe(url: str, headers: dict[str, str], sc: Sidecar | None) -> None:
    """One request before loading: it must answer 200, else report exactly what came back."""
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            status, body = r.status, r.read(600)
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read(600)
    except OSError as e:
        diag = ("\n" + sc.diagnostics()) if sc is not None else ""
        raise RuntimeError(f"probe GET {url} failed: {e}{diag}") from None
    if status != 200:
        diag = ("\n" + sc.diagnostics()) if sc is not None else ""
        raise RuntimeError(f"probe GET {url} answered {status} (expected 200): {body.decode(errors='replace')}{diag}")


def _metric(admin_port: int, name: str) -> float | None:
    """One unlabelled value from the sidecar's admin /metrics (None when missing or unreadable)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as r:
            text = r.read().decode(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == name:
            return float(parts[1])
    return None


def _check_redis() -> None:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=2) as s:
            s.sendall(b"PING\r\n")
            if not s.recv(64).startswith(b"+PONG"):
                raise RuntimeError("Redis at 127.0.0.1:6379 did not answer PING")
    except OSError as e:
        raise RuntimeError(f"the client_token case needs Redis on 127.0.0.1:6379 ({e})") from None


def _redis_keys() -> set[bytes] | None:
    """Keys present in the bench's Redis DB before a case (None: redis-py missing or Redis down)."""
    try:
        import redis
    except ImportError:
        return None
    try:
        with redis.Redis.from_url(configs.REDIS_URL, socket_timeout=5) as r:
            return set(r.scan_iter(count=1000))
    except redis.RedisError:
        return None


def _redis_cleanup(before: set[bytes] | None) -> list[str]:
    """Delete the keys a case added to DB 14 that would never expire (keys with a TTL are left to expire)."""
    if before is None:
        return []
    import redis

    deleted: list[str] = []
    try:
        with redis.Redis.from_url(configs.REDIS_URL, socket_timeout=5) as r:
            for key in r.scan_iter(count=1000):
                if key not in before and r.ttl(key) == -1:
                    r.delete(key)
                    deleted.append(key.decode(errors="replace"))
    except redis.RedisError as e:
        print(f"   warning: could not clean Redis db 14: {e}")
    return deleted


def meta(args: argparse.Namespace, bench: Bench) -> dict[str, Any]:
    def first_line(cmd: list[str]) -> str:
        try:
            p = subprocess.run(cmd, capture_output=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        if p.returncode != 0:
            return ""
        text = (p.stdout or p.stderr).decode(errors="replace").strip()
        return text.splitlines()[0] if text else ""

    try:
        import uvloop

        uv = uvloop.__version__
    except ImportError:
        uv = None
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"nproc": os.cpu_count(), "platform": platform.platform(), "loadavg": os.getloadavg()},
        "python": sys.version.split()[0],
        "uvloop": uv,
        "wrk": first_line([bench.wrk_bin, "--version"]) if bench.wrk_bin else None,
        "nginx": first_line([bench.nginx_bin, "-v"]) if bench.nginx_bin else None,
        "git": first_line(["git", "-C", str(REPO_ROOT), "log", "-1", "--format=%h %s"]),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "notes": "rps/latency from wrk (closed loop); light = open-loop fixed rate, latency write->response; "
        "CPU = utime+stime of the proxy's process tree during the measured run / requests",
    }
