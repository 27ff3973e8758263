"""`--metrics-port`: a listener that serves only `GET /metrics`, so Prometheus can scrape without reaching the
admin API (which mints tokens). Everything else is 404; the admin port keeps its own `/metrics` too."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from sidecar.ops.metrics import Metrics

Send = Callable[[dict[str, Any]], Awaitable[None]]

_TEXT = (b"content-type", b"text/plain; version=0.0.4; charset=utf-8")


class MetricsOnly:
    """The ASGI app of the metrics port."""

    __slots__ = ("metrics",)

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/metrics" and scope["method"] in ("GET", "HEAD"):
            status, body = 200, self.metrics.render()
        else:
            status, body = 404, b"only /metrics is served on this port\n"
        await send({"type": "http.response.start", "status": status,
                    "headers": [_TEXT, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
