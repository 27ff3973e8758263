"""The one size-limited body reader for the endpoints the sidecar answers itself (the issuer's token and key
endpoints, the admin API): the body is read chunk by chunk and reading stops as soon as it passes the limit,
so an oversized body is refused without being held in memory. (The gateway's own reader, which also trusts a
declared Content-Length, is `read_body` in sidecar/proxy/gateway.py.)"""

from __future__ import annotations

from starlette.requests import Request

__all__ = ["read_limited"]


async def read_limited(request: Request, limit: int) -> bytes | None:
    """The request body, or None when it is longer than `limit` bytes (the rest is then not read)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)
