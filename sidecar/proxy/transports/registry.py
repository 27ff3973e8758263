"""The forward transports by name, as uvicorn's `HTTP_PROTOCOLS`: `SIDECAR_FORWARD_TRANSPORT` picks one
(default `httptools`; bench/ shows why). `module:Class` names a transport outside the package — bench/ compares
aiohttp's client that way — so the package never imports bench/."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from sidecar.proxy.transports.base import Transport, Upstream
from sidecar.proxy.transports.httptools_pool import PoolTransport
from sidecar.proxy.transports.httpx_client import HttpxTransport

if TYPE_CHECKING:
    from sidecar.config.model import UpstreamTlsConfig

TransportFactory = Callable[..., Transport]  # (upstream, connect_timeout, read_timeout, *, tls=None)

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


def make_transport(upstream_url: str, connect_timeout: float, read_timeout: float,
                   tls: UpstreamTlsConfig | None = None) -> Transport:
    """`tls` (an https upstream's `upstream_tls`) goes to the transport as a keyword; a plugin is given it only
    when set, so one written for plain upstreams keeps working."""
    upstream = Upstream.parse(upstream_url)
    kind = transport_kind()
    if kind in TRANSPORTS:
        return TRANSPORTS[kind](upstream, connect_timeout, read_timeout, tls=tls)
    factory = _plugin(kind)
    assert factory is not None  # transport_kind() refused anything else
    if tls is None:
        return factory(upstream, connect_timeout, read_timeout)
    return factory(upstream, connect_timeout, read_timeout, tls=tls)
