"""Start the sidecar (``python -m sidecar run ...``) for one case, wait for /healthz, stop it."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from bench.configs import ADMIN_TOKEN
from bench.procs import free_port, stop, tail

REPO_ROOT = Path(__file__).resolve().parent.parent


class SidecarError(RuntimeError):
    pass


class Sidecar:
    def __init__(
        self, workdir: Path, config_yaml: str, *, workers: int, transport: str | None, command: list[str] | None = None,
        decision: bool = False, prefix: list[str] | None = None, env: Mapping[str, str | None] | None = None,
    ) -> None:
        """`prefix`: put before the command (bench.instructions runs it under valgrind); `env`: variables to set on
        top of the bench's environment (None: remove the variable)."""
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.config_path = workdir / "sidecar.yaml"
        self.config_path.write_text(config_yaml)
        self.port = free_port()
        self.admin_port = free_port()
        while self.admin_port == self.port:
            self.admin_port = free_port()
        self.decision_port = free_port() if decision else None  # --decision-port (nginx_auth_decision)
        self.workers = workers
        self.transport = transport
        self.command = command or [sys.executable, "-m", "sidecar"]
        self.prefix = prefix or []
        self.env = dict(env or {})
        self.stdout_path = workdir / "stdout.log"
        self.stderr_path = workdir / "stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        return [
            *self.prefix,
            *self.command,
            "run",
            "--config",
            str(self.config_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--admin-port",
            str(self.admin_port),
            "--workers",
            str(self.workers),
            *(["--decision-port", str(self.decision_port)] if self.decision_port else []),
        ]

    def start(self, timeout: float = 30.0) -> None:
        env = {**os.environ, "SIDECAR_ADMIN_TOKEN": ADMIN_TOKEN}
        env.pop("SIDECAR_CONFIG", None)
        if self.transport:
            # aiohttp is not shipped in the package: bench/aiohttp_transport.py is named as module:Class
            env["SIDECAR_FORWARD_TRANSPORT"] = (
                "bench.aiohttp_transport:AiohttpTransport" if self.transport == "aiohttp" else self.transport)
            if self.transport == "aiohttp":
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        for name, value in self.env.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            # stdout carries the audit log (one JSON line per request): kept in a file, as in production.
            self.proc = subprocess.Popen(
                self.argv(),
                cwd=REPO_ROOT,
                env=env,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        started = time.monotonic()
        deadline = started + timeout
        url = f"http://127.0.0.1:{self.admin_port}/healthz"
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SidecarError(self._failure(f"sidecar exited with code {self.proc.returncode} during startup"))
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return
                    last = f"healthz answered {r.status}"
            except urllib.error.HTTPError as e:
                last = f"healthz answered {e.code}"
            except OSError as e:
                last = str(e)
            if time.monotonic() - started > 5 and "Traceback" in tail(self.stderr_path, 200):
                raise SidecarError(self._failure(f"sidecar not healthy after 5s, traceback on stderr ({last})"))
            time.sleep(0.1)
        raise SidecarError(self._failure(f"sidecar not healthy after {timeout:g}s ({last})"))

    def _failure(self, what: str) -> str:
        cmd = shlex.join(self.argv())
        return (
            f"{what}\n  command: {cmd}\n  config: {self.config_path}\n"
            f"  --- stderr (tail) ---\n{_indent(tail(self.stderr_path))}\n"
            f"  --- stdout (tail) ---\n{_indent(tail(self.stdout_path, 10))}"
        )

    def diagnostics(self) -> str:
        return self._failure("sidecar diagnostics")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        stop(self.proc, "sidecar", grace=8.0)


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines()) or "    (empty)"
