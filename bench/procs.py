"""Process helpers: free ports, process-tree CPU and RSS from /proc, stopping what we started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stat(pid: int) -> tuple[int, float] | None:
    """(ppid, utime+stime in seconds) of one process, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    ppid = int(fields[1])  # field 4
    utime, stime = int(fields[11]), int(fields[12])  # fields 14, 15
    return ppid, (utime + stime) / CLK_TCK


def tree_pids(root: int) -> list[int]:
    """``root`` and every live process whose PPid chain leads to it."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                parents[int(entry)] = st[0]
    found = {root}
    changed = True
    while changed:
        changed = False
        for pid, ppid in parents.items():
            if ppid in found and pid not in found:
                found.add(pid)
                changed = True
    return sorted(p for p in found if p == root or p in parents)


def _stat_all(pid: int) -> float:
    """utime+stime+cutime+cstime of one process (its own CPU and that of its reaped children)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0.0
    f = raw[raw.rindex(")") + 2 :].split()
    return (int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])) / CLK_TCK


def cpu_snapshot() -> tuple[float, float, float]:
    """(wall clock, CPU seconds of this bench and everything it started, user+nice+system CPU seconds of the machine).

    The difference between two snapshots tells how much CPU *other* programs used meanwhile.
    """
    own = sum(_stat_all(pid) for pid in tree_pids(os.getpid()))
    with open("/proc/stat") as f:
        fields = f.readline().split()
    machine = (int(fields[1]) + int(fields[2]) + int(fields[3])) / CLK_TCK
    return time.monotonic(), own, machine


def foreign_cores(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    """Average number of cores used by processes the bench did not start, between two snapshots."""
    wall = after[0] - before[0]
    if wall <= 0:
        return 0.0
    return max(0.0, ((after[2] - before[2]) - (after[1] - before[1])) / wall)


def tree_cpu_seconds(root: int) -> float:
    """User+system CPU seconds consumed so far by ``root`` and its live descendants."""
    total = 0.0
    for pid in tree_pids(root):
        st = _stat(pid)
        if st is not None:
            total += st[1]
    return total


def rss_by_pid(root: int) -> dict[int, int]:
    """Resident memory in bytes (VmRSS) of ``root`` and each live descendant, by pid."""
    out: dict[int, int] = {}
    for pid in tree_pids(root):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out[pid] = int(line.split()[1]) * 1024
                    break
        except OSError:
            pass
    return out


def tree_rss_bytes(root: int) -> int:
    """Resident memory in bytes of ``root`` and its live descendants together (the sidecar: parent + workers)."""
    return sum(rss_by_pid(root).values())


def socket_count(pid: int) -> int:
    """Open sockets of one process (entries of /proc/PID/fd that are sockets; 0 when it is gone)."""
    n = 0
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                n += 1
        except OSError:
            pass
    return n


def stop(proc: subprocess.Popen[bytes] | None, name: str, grace: float = 5.0) -> None:
    """Stop a process we started in its own session: SIGTERM to its group, then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)  # start_new_session=True: pgid == pid
        except ProcessLookupError:
            return
        except PermissionError:
            proc.send_signal(sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return
            time.sleep(0.05)
    print(f"warning: {name} (pid {proc.pid}) did not stop")


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file ('' if missing)."""
    try:
        data = path.read_bytes()[-16384:]
    except FileNotFoundError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])
