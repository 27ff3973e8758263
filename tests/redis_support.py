"""Redis for tests. The `redis_url` fixture: a database of our own (13) on the machine's Redis or one we start;
the keys the sidecar wrote are removed after each test. Never FLUSHALL, never stop the machine's Redis.

For the scale-out tests, Redis deployments of our own from `redis-server`, on free loopback ports, stopped by PID:
a Sentinel and its master, a 3-master Redis Cluster, either with TLS (certificates made here) and passwords."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sidecar.testing import delete_sidecar_keys, free_port, redis_url_for_tests


@pytest.fixture
def redis_url() -> Iterator[str]:
    url = redis_url_for_tests()
    delete_sidecar_keys(url)
    yield url
    delete_sidecar_keys(url)


def redis_server() -> str:
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not on PATH (apt-get install redis-server): this test starts its own")
    return server


# --- TLS -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tls:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, all signed by the CA."""

    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path

    def server_args(self) -> list[str]:
        return ["--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key),
                "--tls-ca-cert-file", str(self.ca), "--tls-auth-clients", "yes"]

    def client_query(self, ca: Path | None = None) -> str:
        return (f"ssl_ca_certs={quote(str(ca or self.ca))}&ssl_certfile={quote(str(self.client_cert))}"
                f"&ssl_keyfile={quote(str(self.client_key))}")

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context


def make_tls(directory: Path, name: str = "test") -> Tls:
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    Key = ec.EllipticCurvePrivateKey

    def issue(subject: str, key: Key, issuer: x509.Name | None, signer: Key, ca: bool) -> x509.Certificate:
        name_ = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (x509.CertificateBuilder().subject_name(name_).issuer_name(issuer or name_)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            builder = builder.add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                decipher_only=False), critical=True)
        else:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    def write(path: Path, cert: x509.Certificate | None = None, key: ec.EllipticCurvePrivateKey | None = None) -> Path:
        if cert is not None:
            path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        else:
            assert key is not None
            path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return path

    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca_cert = issue(f"{name} CA", ca_key, None, ca_key, ca=True)
    server_cert = issue("localhost", server_key, ca_cert.subject, ca_key, False)
    client_cert = issue("sidecar", client_key, ca_cert.subject, ca_key, False)
    return Tls(
        ca=write(directory / f"{name}-ca.pem", ca_cert),
        cert=write(directory / f"{name}-server.pem", server_cert),
        key=write(directory / f"{name}-server.key", key=server_key),
        client_cert=write(directory / f"{name}-client.pem", client_cert),
        client_key=write(directory / f"{name}-client.key", key=client_key),
    )


# --- servers ---------------------------------------------------------------------------------------------------


def answers_ping(port: int, tls: Tls | None = None, password: str | None = None, timeout: float = 0.5) -> bool:
    """PING (after AUTH when a password is given) over a raw socket."""
    commands = ([["AUTH", password]] if password else []) + [["PING"]]
    request = b"".join(f"*{len(c)}\r\n".encode() + b"".join(f"${len(a)}\r\n{a}\r\n".encode() for a in c)
                       for c in commands)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw, \
                (tls.context().wrap_socket(raw, server_hostname="localhost") if tls else raw) as sock:
            sock.sendall(request)
            reply = b""
            while reply.count(b"\r\n") < len(commands):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
    except OSError:
        return False
    return reply.endswith(b"+PONG\r\n")


def wait_for_ping(port: int, timeout: float = 10.0, tls: Tls | None = None, password: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answers_ping(port, tls, password):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing answers PING on port {port}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@dataclass
class Sentinel:
    url: str
    master: subprocess.Popen[bytes]
    sentinel: subprocess.Popen[bytes]
    master_port: int

    def stop(self) -> None:
        stop(self.sentinel)
        stop(self.master)


def start_sentinel(directory: Path, tls: Tls | None = None, password: str | None = None,
                   sentinel_password: str | None = None) -> Sentinel:
    """A master and one Sentinel watching it. With `tls`, both speak only TLS and want client certificates."""
    server = redis_server()
    directory.mkdir(parents=True, exist_ok=True)
    master_port, sentinel_port = free_port(), free_port()
    listen = (["--port", "0", "--tls-port", str(master_port), *tls.server_args()] if tls
              else ["--port", str(master_port)])
    master = subprocess.Popen([server, *listen, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                               "--dir", str(directory), *(["--requirepass", password] if password else [])],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    conf = directory / "sentinel.conf"
    lines = [f"bind 127.0.0.1\ndir {directory}\n"]
    if tls:
        lines.append(f"port 0\ntls-port {sentinel_port}\ntls-cert-file {tls.cert}\ntls-key-file {tls.key}\n"
                     f"tls-ca-cert-file {tls.ca}\ntls-auth-clients yes\ntls-replication yes\n")
    else:
        lines.append(f"port {sentinel_port}\n")
    if sentinel_password:
        lines.append(f"requirepass {sentinel_password}\n")
    lines.append(f"sentinel monitor mymaster 127.0.0.1 {master_port} 1\n"
                 "sentinel down-after-milliseconds mymaster 5000\n")
    if password:
        lines.append(f"sentinel auth-pass mymaster {password}\n")
    conf.write_text("".join(lines))
    sentinel = subprocess.Popen([server, str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        wait_for_ping(master_port, tls=tls, password=password)
        wait_for_ping(sentinel_port, tls=tls, password=sentinel_password)
    except BaseException:
        stop(sentinel)
        stop(master)
        raise
    scheme = "rediss+sentinel" if tls else "redis+sentinel"
    userinfo = f":{quote(password, safe='')}@" if password else ""
    query = "&".join(q for q in (tls.client_query() if tls else "",
                                 f"sentinel_password={quote(sentinel_password or '', safe='')}") if not q.endswith("="))
    url = f"{scheme}://{userinfo}127.0.0.1:{sentinel_port}/mymaster/0" + (f"?{query}" if query else "")
    return Sentinel(url, master, sentinel, master_port)


class Cluster:
    """A Redis Cluster of `masters` masters (no replicas), each with an append-only file synced on every write so
    that a master killed with SIGKILL comes back with its data, as a crashed master with a disk does."""

    NODE_TIMEOUT_MS = 1000

    def __init__(self, directory: Path, masters: int = 3, tls: Tls | None = None, password: str | None = None) -> None:
        self.directory, self.tls, self.password = directory, tls, password
        self.ports = [free_port() for _ in range(masters)]
        self.bus_ports = [free_port() for _ in range(masters)]
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        try:
            for port in self.ports:
                self.start_node(port)
            for port in self.ports:
                wait_for_ping(port, tls=tls, password=password)
            create = ["redis-cli", *self.cli_args(), "--cluster", "create",
                      *(f"127.0.0.1:{port}" for port in self.ports), "--cluster-replicas", "0", "--cluster-yes"]
            subprocess.run(create, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
            self.wait_state("ok")
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        scheme = "rediss+cluster" if self.tls else "redis+cluster"
        userinfo = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"{scheme}://{userinfo}127.0.0.1:{self.ports[0]}" + (f"?{self.tls.client_query()}" if self.tls else "")

    def cli_args(self) -> list[str]:
        args = ["-a", self.password, "--no-auth-warning"] if self.password else []
        if self.tls:
            args += ["--tls", "--cacert", str(self.tls.ca), "--cert", str(self.tls.client_cert),
                     "--key", str(self.tls.client_key)]
        return args

    def start_node(self, port: int) -> None:
        node_dir = self.directory / str(port)
        node_dir.mkdir(parents=True, exist_ok=True)
        listen = ["--port", "0", "--tls-port", str(port), "--tls-cluster", "yes", *self.tls.server_args()] \
            if self.tls else ["--port", str(port)]
        auth = ["--requirepass", self.password, "--masterauth", self.password] if self.password else []
        self.processes[port] = subprocess.Popen(
            [redis_server(), *listen, *auth, "--bind", "127.0.0.1", "--dir", str(node_dir),
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-port", str(self.bus_ports[self.ports.index(port)]),
             "--cluster-node-timeout", str(self.NODE_TIMEOUT_MS), "--save", "", "--appendonly", "yes",
             "--appendfsync", "always"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def info(self, port: int) -> dict[str, str]:
        out = subprocess.run(["redis-cli", *self.cli_args(), "-p", str(port), "cluster", "info"],
                             capture_output=True, text=True, timeout=5).stdout
        return dict(line.strip().split(":", 1) for line in out.splitlines() if ":" in line)

    def wait_state(self, state: str, ports: list[int] | None = None, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.info(port).get("cluster_state") == state for port in ports or self.ports):
                return
            time.sleep(0.05)
        raise RuntimeError(f"the cluster did not reach cluster_state:{state}")

    def master_of(self, key: str) -> int:
        """The port of the master serving `key`'s hash slot (from `CLUSTER NODES`: address, flags, slot ranges)."""
        from redis.crc import key_slot

        slot = key_slot(key.encode())
        nodes = subprocess.run(["redis-cli", *self.cli_args(), "-p", str(self.ports[0]), "cluster", "nodes"],
                               capture_output=True, text=True, timeout=5).stdout
        for line in nodes.splitlines():
            fields = line.split()
            for served in fields[8:]:
                start, _, end = served.partition("-")
                if start.isdigit() and int(start) <= slot <= int(end or start):
                    return int(fields[1].split("@")[0].rsplit(":", 1)[1])
        raise RuntimeError(f"no master serves slot {slot}")

    def configure(self, name: str, value: str) -> None:
        """CONFIG SET on every running node."""
        for port in self.processes:
            subprocess.run(["redis-cli", *self.cli_args(), "-p", str(port), "config", "set", name, value],
                           check=True, stdout=subprocess.DEVNULL, timeout=5)

    def kill(self, port: int) -> None:
        process = self.processes.pop(port)
        process.send_signal(signal.SIGKILL)
        process.wait(5)

    def restart(self, port: int) -> None:
        self.start_node(port)
        wait_for_ping(port, tls=self.tls, password=self.password)
        self.wait_state("ok")

    def stop(self) -> None:
        for process in self.processes.values():
            stop(process)
        self.processes.clear()
