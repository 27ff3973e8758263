"""The forward transports by name, as uvicorn's `HTTP_PROTOCOLS`: `SIDECAR_FORWARD_TRANSPORT` picks one
(default `httptools`; bench/ shows why). `module:Class` names a transport outside the package — bench/ compares
aiohttp's client that way — so the package never imports bench/."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

from sidecar.proxy.transports.base import Transport, Upstream
from sidecar.proxy.transports.httptools_pool import PoolTransport
from sidecar.proxy.transports.httpx_client import HttpxTransport

TransportFactory = Callable[[Upstream, float, float], Transport]

TRANSPORTS: dict[str, TransportFactory] = {
    "httptools": PoolTransport,
    "httpx": HttpxTransport,
}


def transport_kind() -> str:
    """The transport chosen by `SIDECAR_FORWARD_TRANSPORT` (default httptools); `sidecar run` checks it at start."""
    kind = os.environ.get("SIDECAR_FORWARD_TRANSPORT", "httptools")
    if kind not in TRANSPORTS and not _plugin(kind):
        raise ValueError(f"unknown SIDECAR_FORWARD_TRANSPORT {kind!r}; use one of {', '.join(TRANSPORTS)}, "
                         "or module:Class")
    return kind


def _plugin(kind: str) -> TransportFactory | None:
    module, _, name = kind.partition(":")
    if not name:
        return None
    try:
        factory: TransportFactory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    return factory


def make_transport(upstream_url: str, connect_timeout: float, read_timeout: float) -> Transport:
    upstream = Upstream.parse(upstream_url)
    kind = transport_kind()
    if upstream.scheme == "https":
        return HttpxTransport(upstream, connect_timeout, read_timeout)  # the pool speaks plain HTTP only
    factory = TRANSPORTS.get(kind) or _plugin(kind)
    assert factory is not None  # transport_kind() refused anything else
    return factory(upstream, connect_timeout, read_timeout)
