"""The forward path's transport: send one request upstream and stream the reply back.

A transport is two methods (`send`, `aclose`), as httpx's. Lower-level errors are mapped to the sidecar's
refusals in one place: connection failures → 502 `upstream_unavailable`, timeouts → 504 `upstream_timeout`,
malformed replies → 502. The transport is picked by `SIDECAR_FORWARD_TRANSPORT` (see bench/ for why the
default is what it is).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import httpx

from sidecar.errors import UpstreamTimeout, UpstreamUnavailable

Headers = list[tuple[bytes, bytes]]
Body = bytes | AsyncIterable[bytes] | None

RESPONSE_HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
})


@dataclass(frozen=True, slots=True)
class Upstream:
    scheme: str
    host: str
    port: int
    base_path: str

    @classmethod
    def parse(cls, url: str) -> Upstream:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname or "", port, parts.path.rstrip("/"))


class UpstreamResponse(Protocol):
    status: int
    headers: Headers

    def body(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class Transport(Protocol):
    async def send(self, method: str, target: bytes, headers: Headers, body: Body) -> UpstreamResponse: ...

    async def aclose(self) -> None: ...


class HttpxResponse:
    __slots__ = ("_response", "headers", "status")

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.headers = [(k.lower(), v) for k, v in response.headers.raw if k.lower() not in RESPONSE_HOP_BY_HOP]

    async def body(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable("the upstream broke off its reply") from exc

    async def aclose(self) -> None:
        await self._response.aclose()


class HttpxTransport:
    """httpx with a tuned pool: simple and correct, but ~0.5 ms of CPU per request (see bench/)."""

    def __init__(self, upstream: Upstream, connect_timeout: float, read_timeout: float, max_connections: int = 512):
        self.upstream = upstream
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=connect_timeout, read=read_timeout, write=read_timeout, pool=connect_timeout),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            follow_redirects=False,
            trust_env=False,
            verify=True,
        )

    async def send(self, method: str, target: bytes, headers: Headers, body: Body) -> UpstreamResponse:
        url = httpx.URL(scheme=self.upstream.scheme, host=self.upstream.host, port=self.upstream.port,
                        raw_path=target)
        request = self._client.build_request(method, url, headers=headers, content=body)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout("the upstream did not answer in time") from exc
        except (httpx.HTTPError, OSError) as exc:
            raise UpstreamUnavailable("the upstream could not be reached") from exc
        return HttpxResponse(response)

    async def aclose(self) -> None:
        await self._client.aclose()


TRANSPORTS = ("httptools", "httpx", "aiohttp")


def transport_kind() -> str:
    """The transport chosen by `SIDECAR_FORWARD_TRANSPORT` (default httptools); `sidecar run` checks it at start."""
    kind = os.environ.get("SIDECAR_FORWARD_TRANSPORT", "httptools")
    if kind not in TRANSPORTS:
        raise ValueError(f"unknown SIDECAR_FORWARD_TRANSPORT {kind!r}; use one of {', '.join(TRANSPORTS)}")
    return kind


def make_transport(upstream_url: str, connect_timeout: float, read_timeout: float) -> Transport:
    upstream = Upstream.parse(upstream_url)
    kind = transport_kind()
    if kind == "httpx" or upstream.scheme == "https":
        return HttpxTransport(upstream, connect_timeout, read_timeout)
    if kind == "httptools":
        from sidecar.proxy.transports.httptools_pool import PoolTransport

        return PoolTransport(upstream, connect_timeout, read_timeout)
    from bench.aiohttp_transport import AiohttpTransport  # for comparison in bench/ only: `pip install aiohttp`

    return AiohttpTransport(upstream, connect_timeout, read_timeout)
