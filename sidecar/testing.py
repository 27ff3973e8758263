"""Helpers for tests of a sidecar deployment — ours and our users': key pairs and tokens, a recording
upstream, and a sidecar running on loopback ports in a background thread."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sidecar.echo import EchoApp, Received
from sidecar.issuer.signing_keys import public_jwk
from sidecar.server.runner import SignalFreeServer

if TYPE_CHECKING:
    from sidecar.runtime import Services
    from sidecar.server.runner import Serving

__all__ = ["KeyPair", "Received", "RecordingUpstream", "RunningSidecar", "SidecarProcess", "delete_sidecar_keys",
           "free_port", "recording_upstream", "redis_url_for_tests", "running_sidecar", "serve_in_thread"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class KeyPair:
    """A signing key pair for tests: its public PEM, its JWKS, and tokens signed with it."""

    def __init__(self, kind: str = "RSA", bits: int = 2048) -> None:
        if kind == "RSA":
            self.private_key: Any = rsa.generate_private_key(public_exponent=65537, key_size=bits)
            self.alg = "RS256"
        else:
            self.private_key = ec.generate_private_key(ec.SECP256R1())
            self.alg = "ES256"
        self.jwk = public_jwk(self.private_key.public_key())
        self.kid = self.jwk["kid"]

    @property
    def public_pem(self) -> str:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    @property
    def public_pem_pkcs1(self) -> str:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.PKCS1).decode()

    @property
    def private_pem(self) -> str:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.jwk]}

    def token(self, claims: dict[str, Any] | None = None, *, lifetime: float = 300, kid: str | None = "default",
              headers: dict[str, Any] | None = None, **extra: Any) -> str:
        now = int(time.time())
        payload: dict[str, Any] = {"sub": "user-1", "iat": now, "exp": now + int(lifetime)}
        payload.update(claims or {})
        payload.update(extra)
        payload = {k: v for k, v in payload.items() if v is not None}
        header = dict(headers or {})
        if kid == "default":
            header["kid"] = self.kid
        elif kid is not None:
            header["kid"] = kid
        return jwt.encode(payload, self.private_key, algorithm=self.alg, headers=header)


@contextlib.contextmanager
def serve_in_thread(app: Any, port: int | None = None, *, tls: ssl.SSLContext | None = None,
                    http: Any = "httptools") -> Iterator[str]:
    """Serve an ASGI app with uvicorn on 127.0.0.1 in a background thread; yields its base URL (https with `tls`,
    a server context). `http`: uvicorn's protocol, or a protocol class such as the sidecar's own."""
    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning",
                            access_log=False, http=http, loop="asyncio",
                            ssl_context_factory=None if tls is None else lambda _config, _default: tls)
    server = SignalFreeServer(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.005)
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


class RecordingUpstream:
    def __init__(self, app: EchoApp, url: str) -> None:
        self.app = app
        self.url = url

    @property
    def received(self) -> list[Received]:
        return self.app.received

    @property
    def last(self) -> Received:
        return self.app.received[-1]


@contextlib.contextmanager
def recording_upstream(port: int | None = None, *, tls: ssl.SSLContext | None = None) -> Iterator[RecordingUpstream]:
    app = EchoApp()
    with serve_in_thread(app, port, tls=tls) as url:
        yield RecordingUpstream(app, url)


class RunningSidecar:
    def __init__(self, url: str, admin_url: str, serving: Serving, config_path: Path,
                 decision_url: str | None = None) -> None:
        self.decision_url = decision_url  # with running_sidecar(..., decision=True)
        self.url = url
        self.admin_url = admin_url
        self.serving = serving
        self.config_path = config_path

    @property
    def services(self) -> Services:
        assert self.serving.services is not None  # set before the sidecar answers
        return self.serving.services


@contextlib.contextmanager
def running_sidecar(config: str | dict[str, Any], *, directory: str | None = None,
                    decision: bool = False, decision_grpc: int | None = None) -> Iterator[RunningSidecar]:
    """Run a sidecar with this configuration (YAML text or a dict) on loopback ports in a background thread; with
    `decision`, the decision listener too (`decision_url`)."""
    from sidecar.server.runner import Serving, bind

    text = config if isinstance(config, str) else json.dumps(config)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        path = Path(tmp) / "sidecar.yaml"
        path.write_text(text)
        main_sock, admin_sock = bind("127.0.0.1", 0), bind("127.0.0.1", 0)
        main_port, admin_port = main_sock.getsockname()[1], admin_sock.getsockname()[1]
        decision_sock = bind("127.0.0.1", 0) if decision else None
        serving = Serving(str(path), main_sock, admin_sock, graceful=5.0, decision_sock=decision_sock,
                          decision_grpc=("127.0.0.1", decision_grpc) if decision_grpc else None)
        failure: list[BaseException] = []

        def target() -> None:
            try:
                asyncio.run(serving.run())
            except BaseException as exc:  # reported to the test below
                failure.append(exc)

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        deadline = time.monotonic() + 15
        while not serving.started.is_set():
            if failure or time.monotonic() > deadline:
                thread.join(1)
                main_sock.close()
                admin_sock.close()
                if decision_sock is not None:
                    decision_sock.close()
                if failure:
                    raise failure[0]
                raise RuntimeError("the sidecar did not start within 15 s")
            time.sleep(0.005)
        try:
            decision_url = f"http://127.0.0.1:{decision_sock.getsockname()[1]}" if decision_sock else None
            yield RunningSidecar(f"http://127.0.0.1:{main_port}", f"http://127.0.0.1:{admin_port}", serving, path,
                                 decision_url)
        finally:
            loop_stop(serving)
            thread.join(15)
            main_sock.close()
            admin_sock.close()
            if decision_sock is not None:
                decision_sock.close()


def loop_stop(serving: Any) -> None:
    serving.stop()


class SidecarProcess:
    """`sidecar run` as a real separate process on loopback ports."""

    def __init__(self, config_path: str | Path, *, workers: int = 1, env: dict[str, str] | None = None,
                 grace: float = 30.0, args: tuple[str, ...] | list[str] = (), stdout: int | None = None) -> None:
        """`args`: more `sidecar run` options; with `--tls-cert` the main URL is https."""
        import os
        import subprocess
        import sys

        self.port, self.admin_port = free_port(), free_port()
        self.url = f"{'https' if '--tls-cert' in args else 'http'}://127.0.0.1:{self.port}"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run", "--config", str(config_path), "--host", "127.0.0.1",
             "--port", str(self.port), "--admin-port", str(self.admin_port), "--workers", str(workers),
             "--grace", str(grace), *args],
            env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL if stdout is None else stdout,
            stderr=subprocess.PIPE,
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 20.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(f"sidecar exited with {self.process.returncode}: {err[-2000:]}")
            try:
                if httpx.get(self.admin_url + "/healthz", timeout=0.5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("sidecar process did not become healthy")

    def stop(self, timeout: float = 15.0) -> int:
        import signal as _signal

        if self.process.poll() is None:
            self.process.send_signal(_signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except Exception:
                self.process.kill()
                self.process.wait(5)
        if self.process.stderr:
            self.process.stderr.close()
        return self.process.returncode

    def __enter__(self) -> SidecarProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def redis_url_for_tests(db: int = 13) -> str:
    """Redis for tests: $SIDECAR_TEST_REDIS_URL, else 127.0.0.1:6379, else a `redis-server` started on a free
    port. Raises with how to get one when none can be had (tests never skip silently)."""
    import os
    import shutil
    import subprocess

    explicit = os.environ.get("SIDECAR_TEST_REDIS_URL")
    if explicit:
        return explicit
    if _redis_answers("127.0.0.1", 6379):
        return f"redis://127.0.0.1:6379/{db}"
    server = shutil.which("redis-server")
    if server is None:
        raise RuntimeError("these tests need Redis: set SIDECAR_TEST_REDIS_URL, run one on 127.0.0.1:6379, "
                           "or install redis-server (apt-get install redis-server)")
    port = free_port()
    subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        if _redis_answers("127.0.0.1", port):
            return f"redis://127.0.0.1:{port}/{db}"
        time.sleep(0.05)
    raise RuntimeError(f"started redis-server on port {port} but it does not answer")


def _redis_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def delete_sidecar_keys(url: str) -> None:
    """Remove the keys a sidecar wrote (prefix `sidecar:`) from this Redis database — never FLUSHALL."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match="sidecar:*", count=1000))
        for key in keys:
            client.delete(key)
    finally:
        client.close()
