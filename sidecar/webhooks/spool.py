"""The webhook spool (SPEC §14, README "Limits and overload"): events raised while Redis cannot take them are
written to a local directory — bounded by `webhook_spool.max_bytes`, an audit line for what does not fit — and
queued when Redis answers again, with the delivery ids they were given when raised (receivers de-duplicate on
`webhook-id`).

One file per batch (`<ns>-<pid>-<n>.jsonl`, written under a temporary name and renamed, so a reader never sees
half a file). A process drains a file by renaming it to `….draining-<pid>` first — under `--workers N` exactly
one worker takes each — and deletes it once queued; a file left `draining` by a process that died is taken
over by the next one that looks."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from sidecar.config.limits import SpoolConfig
from sidecar.webhooks.queue import Delivery

if TYPE_CHECKING:
    from sidecar.ops.audit import AuditLog
    from sidecar.webhooks.queue import DeliveryQueue

log = logging.getLogger("sidecar.webhooks.worker")

_counter = itertools.count()


def spool_dir(config: SpoolConfig) -> Path:
    return Path(config.dir) if config.dir else Path(tempfile.gettempdir()) / "sidecar-webhook-spool"


class Spool:
    def __init__(self, config: SpoolConfig, audit: AuditLog) -> None:
        self.config = config  # the worker sets the one in force before each use (a reload may change it)
        self.audit = audit
        self._warned = 0.0

    @property
    def directory(self) -> Path:
        return spool_dir(self.config)

    def used(self) -> int:
        total = 0
        with contextlib.suppress(FileNotFoundError), os.scandir(self.directory) as entries:
            for entry in entries:
                with contextlib.suppress(FileNotFoundError):
                    total += entry.stat().st_size
        return total

    def pending(self) -> bool:
        with contextlib.suppress(FileNotFoundError), os.scandir(self.directory) as entries:
            return any(entry.name.endswith(".jsonl") or ".draining-" in entry.name for entry in entries)
        return False

    def put(self, deliveries: list[Delivery], why: str) -> bool:
        """Keep these deliveries for later; False (and an audit line) when the spool has no room for them."""
        data = "".join(json.dumps(d.fields(), separators=(",", ":")) + "\n" for d in deliveries).encode()
        directory = self.directory
        try:
            directory.mkdir(parents=True, exist_ok=True)
            if self.used() + len(data) > self.config.max_bytes:
                raise OSError("the spool is full (webhook_spool.max_bytes)")
            name = f"{time.time_ns():020d}-{os.getpid()}-{next(_counter)}"
            temporary = directory / f".{name}.tmp"
            temporary.write_bytes(data)
            temporary.rename(directory / f"{name}.jsonl")
        except OSError as exc:
            self.audit.write(kind="webhook", decision="lost", reason="spool_full", error=str(exc), why=why,
                             events=sorted({d.event for d in deliveries}), ids=[d.id for d in deliveries])
            log.error("events %s lost: Redis cannot take them (%s) and the spool cannot either (%s)",
                      [d.id for d in deliveries], why, exc)
            return False
        if time.monotonic() - self._warned > 10.0:
            self._warned = time.monotonic()
            log.warning("Redis cannot take webhook events (%s): keeping them in %s until it can", why, directory)
        return True

    async def drain(self, queue: DeliveryQueue) -> int:
        """Queue every spooled delivery (oldest first); how many. Stops at the first failure (Redis still down)."""
        queued = 0
        for path in self._claimable():
            claimed = path.with_name(f"{path.name.split('.draining-')[0]}.draining-{os.getpid()}")
            try:
                path.rename(claimed)
            except FileNotFoundError:
                continue  # another worker took it
            try:
                deliveries = [Delivery.from_fields(json.loads(line)) for line in claimed.read_text().splitlines()
                              if line.strip()]
                await queue.add(deliveries)
            except Exception:
                with contextlib.suppress(OSError):
                    claimed.rename(claimed.with_name(claimed.name.split(".draining-")[0]))
                raise
            claimed.unlink(missing_ok=True)
            queued += len(deliveries)
        return queued

    def _claimable(self) -> list[Path]:
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []
        paths = []
        for name in names:
            if name.endswith(".jsonl"):
                paths.append(self.directory / name)
            elif ".draining-" in name and not _alive(name.rsplit("-", 1)[-1]):
                paths.append(self.directory / name)  # its process died while queuing it
        return paths


def _alive(pid: str) -> bool:
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
