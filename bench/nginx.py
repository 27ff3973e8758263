"""nginx as a foreground process with its own generated config: the upstream and the plain proxy."""

from __future__ import annotations

import grp
import json
import os
import pwd
import ssl
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


def upstream_conf(prefix: Path, port: int, body: str | None = None, tls: tuple[Path, Path] | None = None) -> str:
    """nginx answering every request with 200 and a fixed JSON body (default: ~1 KB); over TLS with `tls`
    (certificate, key), with a session cache so a new connection can resume."""
    body = upstream_body() if body is None else body
    ssl = "" if tls is None else (f" ssl;\n        ssl_certificate {tls[0]};\n        ssl_certificate_key {tls[1]};\n"
                                  "        ssl_protocols TLSv1.2 TLSv1.3;\n        ssl_session_cache shared:bench:10m")
    return (
        _common(prefix)
        + f"""http {{
{_http_common(prefix)}
    server {{
        listen 127.0.0.1:{port} backlog=4096{ssl};
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


RECIPE = Path(__file__).resolve().parent.parent / "examples" / "nginx" / "sidecar.conf"


def auth_request_conf(prefix: Path, port: int, ready_port: int, upstream_port: int, decision_port: int | None) -> str:
    """examples/nginx/sidecar.conf as written, ports substituted, in front of the upstream: asking the sidecar's
    decision port, or (`decision_port` None, the floor) a location of this nginx that always answers 200."""
    floor_port = ready_port
    recipe = RECIPE.read_text().replace("127.0.0.1:8000", f"127.0.0.1:{upstream_port}")
    recipe = recipe.replace("127.0.0.1:9100", f"127.0.0.1:{decision_port or floor_port}")
    recipe = recipe.replace("listen 80;", f"listen 127.0.0.1:{port} backlog=4096;")
    return (
        _common(prefix)
        + f"""http {{
{_http_common(prefix)}
{recipe}
    server {{
        listen 127.0.0.1:{ready_port};
        location / {{ return 200; }}
    }}
}}
"""
    )


class Nginx:
    """One nginx master (foreground) plus its workers, stopped by ``close()``."""

    def __init__(self, binary: str, prefix: Path, conf: str, port: int, name: str, ca: Path | None = None) -> None:
        """`ca`: the listener speaks TLS with a certificate from this CA (the readiness check verifies it)."""
        self.binary, self.prefix, self.port, self.name = binary, prefix, port, name
        self.scheme = "https" if ca else "http"
        self.context = ssl.create_default_context(cafile=str(ca)) if ca else None
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
                with urllib.request.urlopen(f"{self.scheme}://127.0.0.1:{self.port}/ready", timeout=1,
                                            context=self.context) as r:
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


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A private CA and a certificate for localhost/127.0.0.1 it signed: (ca, cert, key) PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])

    def builder(subject: x509.Name, public: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name).public_key(public)
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=2)))

    ca = builder(ca_name, ca_key.public_key()).add_extension(
        x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256())
    cert = builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]), key.public_key()).add_extension(
        x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
        critical=False).sign(ca_key, hashes.SHA256())
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths
