"""The audit log: one JSON line per decision on stdout (SPEC §9). Never a credential: at most the first 8
hex characters of its SHA-256, enough to correlate lines without revealing anything.

Lines are written to a buffer and flushed at most every 200 ms (and at exit), so logging stays off the
request's critical path."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any, TextIO

import orjson


def level_of(fields: dict[str, Any]) -> str:
    """error for a 5xx answer, warning for a refusal or an abandoned request, info for the rest."""
    status = fields.get("status")
    if isinstance(status, int) and status >= 500:
        return "error"
    if fields.get("decision") in ("deny", "abandoned", "refused"):
        return "warning"
    return "info"


class AuditLog:
    def __init__(self, stream: TextIO | None = None, *, enabled: bool = True) -> None:
        self._stream = stream or sys.stdout
        self._enabled = enabled
        self._pending: list[str] = []
        self._flush_scheduled = False

    def write(self, **fields: Any) -> None:
        self.record(fields)

    def record(self, fields: dict[str, Any]) -> None:
        if not self._enabled:
            return
        self._pending.append(orjson.dumps({"time": _now_iso(), "level": level_of(fields), **fields},
                                          default=str).decode())
        if not self._flush_scheduled:
            try:
                asyncio.get_running_loop().call_later(0.2, self.flush)
                self._flush_scheduled = True
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        self._flush_scheduled = False
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        try:
            self._stream.write("\n".join(lines) + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass


_last_second = -1
_last_prefix = ""


def _now_iso() -> str:
    global _last_second, _last_prefix
    now = time.time()
    second = int(now)
    if second != _last_second:
        _last_second = second
        _last_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_last_prefix}.{int((now - second) * 1000):03d}Z"
