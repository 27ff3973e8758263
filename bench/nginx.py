"""nginx as a foreground process with its own generated config: the upstream and the plain proxy."""

from __future__ import annotations

import grp
import json
import os
import pwd
import subprocess
import time
import urllib.request
from pathlib import Path

from bench.procs import stop, tail


def upstream_body(size: int = 1024) -> str:
    """A fixed, valid JSON body of exactly ``size`` bytes (no quotes or '$' that nginx would interpret)."""
    items: list[dict[str, object]] = []
    while True:
        i = len(items)
        nxt = [*items, {"id": i, "name": f"item-{i:03d}", "price": 1000 + i, "tags": ["bench", "fixed"]}]
        if len(_dump(nxt, "")) > size:
            break
        items = nxt
    return _dump(items, "x" * (size - len(_dump(items, ""))))


def _dump(items: list[dict[str, object]], pad: str) -> str:
    return json.dumps({"status": "ok", "source": "bench-upstream", "items": items, "pad": pad}, separators=(",", ":"))


def _user_line() -> str:
    if os.geteuid() != 0:
        return ""
    try:
        nobody = pwd.getpwnam("nobody")
        return f"user nobody {grp.getgrgid(nobody.pw_gid).gr_name};"
    except KeyError:
        return ""


def _common(prefix: Path) -> str:
    return f"""daemon off;
master_process on;
worker_processes 2;
{_user_line()}
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
"""


def _http_common(prefix: Path) -> str:
    return f"""    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 75s;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
"""


def upstream_conf(prefix: Path, port: int, body: str | None = None) -> str:
    """nginx answering every request with 200 and a fixed JSON body (default: ~1 KB)."""
    body = upstream_body() if body is None else body
    return (
        _common(prefix)
        + f"""http {{
{_http_common(prefix)}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
}}
"""
    )


def proxy_conf(prefix: Path, port: int, upstream_port: int) -> str:
    return (
        _common(prefix)
        + f"""http {{
{_http_common(prefix)}
    upstream bench_upstream {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""
    )


class Nginx:
    """One nginx master (foreground) plus its workers, stopped by ``close()``."""

    def __init__(self, binary: str, prefix: Path, conf: str, port: int, name: str) -> None:
        self.binary, self.prefix, self.port, self.name = binary, prefix, port, name
        prefix.mkdir(parents=True, exist_ok=True)
        self.conf_path = prefix / "nginx.conf"
        self.conf_path.write_text(conf)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> None:
        cmd = [self.binary, "-p", str(self.prefix), "-c", str(self.conf_path), "-e", str(self.prefix / "error.log")]
        check = subprocess.run([*cmd, "-t", "-q"], capture_output=True, timeout=30, check=False)
        if check.returncode != 0:
            raise RuntimeError(f"nginx config for {self.name} rejected:\n{check.stderr.decode(errors='replace')}")
        stderr = open(self.prefix / "stderr.log", "wb")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        stderr.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx ({self.name}) exited:\n{tail(self.prefix / 'error.log')}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nginx ({self.name}) not ready after {timeout}s:\n{tail(self.prefix / 'error.log')}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def close(self) -> None:
        stop(self.proc, f"nginx {self.name}")
