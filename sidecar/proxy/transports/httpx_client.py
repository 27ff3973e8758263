"""httpx as the forward transport: simple and correct, chosen only explicitly (`SIDECAR_FORWARD_TRANSPORT=httpx`).
An https upstream gets the same `upstream_tls` context as the pool's (a new client when its files change)."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import httpx

from sidecar.errors import UpstreamTimeout, UpstreamUnavailable
from sidecar.outbound.httpx_errors import HttpxErrors
from sidecar.proxy.transports.base import HOP_BY_HOP, Body, Headers, Upstream, UpstreamResponse
from sidecar.proxy.transports.tls import UpstreamTlsContext, ssl_error_in, tls_refusal

if TYPE_CHECKING:
    from sidecar.config.model import UpstreamTlsConfig

_SEND_ERRORS = HttpxErrors(UpstreamUnavailable, "the upstream could not be reached",
                           timeout=UpstreamTimeout, timeout_message="the upstream did not answer in time")
_BODY_ERRORS = HttpxErrors(UpstreamUnavailable, "the upstream broke off its reply")


class HttpxResponse:
    __slots__ = ("_response", "headers", "status")

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.headers = [(k.lower(), v) for k, v in response.headers.raw if k.lower() not in HOP_BY_HOP]

    async def body(self) -> AsyncIterator[bytes]:
        with _BODY_ERRORS:
            async for chunk in self._response.aiter_raw():
                yield chunk

    async def aclose(self) -> None:
        await self._response.aclose()


class HttpxTransport:
    """httpx with a tuned pool: simple and correct, but ~0.5 ms of CPU per request (see bench/)."""

    def __init__(self, upstream: Upstream, connect_timeout: float, read_timeout: float, max_connections: int = 512,
                 *, tls: UpstreamTlsConfig | None = None) -> None:
        self.upstream = upstream
        self._timeout = httpx.Timeout(connect=connect_timeout, read=read_timeout, write=read_timeout,
                                      pool=connect_timeout)
        self._limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self.tls = UpstreamTlsContext(tls, upstream.host) if upstream.scheme == "https" else None
        self._context: ssl.SSLContext | None = self.tls.context() if self.tls else None
        self._client = self._new_client()
        self._retired: list[httpx.AsyncClient] = []  # replaced after a certificate rotation; closed at aclose

    def _new_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(timeout=self._timeout, limits=self._limits, follow_redirects=False, trust_env=False,
                                 verify=self._context or True)

    def _current_client(self) -> httpx.AsyncClient:
        if self.tls is not None:
            context = self.tls.context()
            if context is not self._context:  # the files changed: new connections use the new context
                self._context = context
                self._retired.append(self._client)
                self._client = self._new_client()
        return self._client

    async def send(self, method: str, target: bytes, headers: Headers, body: Body) -> UpstreamResponse:
        url = httpx.URL(scheme=self.upstream.scheme, host=self.upstream.host, port=self.upstream.port,
                        raw_path=target)
        client = self._current_client()
        if self.tls is not None and self.tls.server_name != self.upstream.host:
            # httpx verifies and sends as SNI the name in `sni_hostname`, else the URL's host
            request = client.build_request(method, url, headers=headers, content=body,
                                           extensions={"sni_hostname": self.tls.server_name})
        else:
            request = client.build_request(method, url, headers=headers, content=body)
        try:
            response = await client.send(request, stream=True)
        except (httpx.HTTPError, OSError) as exc:
            tls_error = ssl_error_in(exc)
            if tls_error is not None:
                raise tls_refusal(tls_error) from None
            with _SEND_ERRORS:  # the one mapping of httpx failures (outbound/httpx_errors.py)
                raise
        return HttpxResponse(response)

    async def aclose(self) -> None:
        for client in [*self._retired, self._client]:
            await client.aclose()
