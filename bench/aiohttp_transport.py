"""aiohttp's client as the forward transport — kept only so bench/ can compare it with the others
(`SIDECAR_FORWARD_TRANSPORT=aiohttp`, after `pip install aiohttp`); not a dependency of the sidecar."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from sidecar.errors import UpstreamTimeout, UpstreamUnavailable
from sidecar.proxy.transports.base import HOP_BY_HOP, Body, Headers, Upstream


class AiohttpResponse:
    def __init__(self, response: Any) -> None:
        self._response = response
        self.status = response.status
        self.headers = [(k.lower(), v) for k, v in response.raw_headers if k.lower() not in HOP_BY_HOP]

    async def body(self) -> AsyncIterator[bytes]:
        async for chunk in self._response.content.iter_any():
            yield chunk

    async def aclose(self) -> None:
        self._response.release()


class AiohttpTransport:
    def __init__(self, upstream: Upstream, connect_timeout: float, read_timeout: float) -> None:
        import aiohttp

        self.upstream = upstream
        self._aiohttp = aiohttp
        self._timeout = aiohttp.ClientTimeout(sock_connect=connect_timeout, sock_read=read_timeout)
        self._session: Any = None
        self._base = f"{upstream.scheme}://{upstream.host}:{upstream.port}"

    async def send(self, method: str, target: bytes, headers: Headers, body: Body) -> AiohttpResponse:
        aiohttp = self._aiohttp
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=1024, limit_per_host=1024)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout, auto_decompress=False,
                                                  skip_auto_headers=("User-Agent", "Accept-Encoding"))
        url = aiohttp.client.URL(self._base + target.decode("latin-1"), encoded=True)
        try:
            response = await self._session.request(
                method, url, headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers], data=body,
                allow_redirects=False)
        except TimeoutError as exc:
            raise UpstreamTimeout("the upstream did not answer in time") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable("the upstream could not be reached") from exc
        return AiohttpResponse(response)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
