"""Events the sidecar raises (`client.token.created`, `key.issued`, route `emit`s, ...). Sinks subscribe —
the webhook queue is one; tests may add their own."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("sidecar.events")

Sink = Callable[[str, dict[str, Any]], Awaitable[None]]


class Events:
    def __init__(self) -> None:
        self._sinks: list[Sink] = []

    def add_sink(self, sink: Sink) -> None:
        self._sinks.append(sink)

    async def emit(self, event: str, data: dict[str, Any]) -> None:
        for sink in self._sinks:
            try:
                await sink(event, data)
            except Exception:  # an event sink must never fail the request that raised the event
                log.exception("event sink failed for %s", event)
