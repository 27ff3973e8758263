"""Find wrk, nginx and valgrind's tools; install them with apt-get when missing and running as root."""

from __future__ import annotations

import os
import shutil
import subprocess

PACKAGES = {"wrk": "wrk", "nginx": "nginx", "valgrind": "valgrind", "callgrind_control": "valgrind"}
EXTRA_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")


class ToolMissing(RuntimeError):
    pass


def _which(tool: str) -> str | None:
    found = shutil.which(tool)
    if found:
        return found
    for d in EXTRA_DIRS:
        cand = os.path.join(d, tool)
        if os.access(cand, os.X_OK):
            return cand
    return None


def ensure(tool: str) -> str:
    """Path to ``tool``; installs its Debian package when root, else raises with instructions."""
    path = _which(tool)
    if path:
        return path
    pkg = PACKAGES[tool]
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ToolMissing(f"{tool} not found: install it with `sudo apt-get install -y {pkg}` and re-run")
    print(f"{tool} not found: installing Debian package {pkg} ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", pkg]
    if subprocess.run(cmd, env=env, timeout=600, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, timeout=600, check=False)
        subprocess.run(cmd, env=env, timeout=600, check=False)
    path = _which(tool)
    if not path:
        raise ToolMissing(f"could not install {pkg}; try `apt-get update && apt-get install -y {pkg}`")
    return path
