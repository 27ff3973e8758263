"""What a forward transport is: send one request upstream and stream the reply back.

A transport is two methods (`send`, `aclose`), as httpx's. Each maps its lower-level errors to the sidecar's
refusals: connection failures → 502 `upstream_unavailable`, timeouts → 504 `upstream_timeout`, malformed
replies → 502. One file per transport beside this one; registry.py picks one.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

Headers = list[tuple[bytes, bytes]]
Body = bytes | AsyncIterable[bytes] | None

# The one hop-by-hop set (RFC 9110 §7.6.1, with the legacy Keep-Alive and Proxy-Connection): fields about one
# connection, never passed on in either direction. sidecar/proxy/upstream_request.py drops a few more on requests.
HOP_BY_HOP = frozenset({
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
