"""The one place httpx failures become errors of the tree (sidecar/errors.py, the `Unavailable` branch).

    with UPSTREAM_SEND:                 # a module-level, stateless instance: nothing allocated per call
        response = await client.send(request, stream=True)

A timeout (httpx's, or `asyncio.timeout`'s `TimeoutError`) becomes the instance's timeout error, any other
httpx or socket failure its unavailable error; everything else passes through untouched. The original exception
is not chained (`from None`): httpx messages can carry URLs, and an error of the tree is all a caller needs.

It lives here and not in sidecar/errors.py so that errors.py, imported by every module including
`sidecar check`, stays free of httpx (about 80 ms to import); the modules that call out already load httpx.
"""

from __future__ import annotations

from types import TracebackType
from typing import Literal

import httpx

from sidecar.errors import Unavailable


class HttpxErrors:
    """A context manager mapping httpx failures to `error(message)` / `timeout(timeout_message)`. With `detail`,
    the audit-only detail names the failure (`timeout`, or the exception's type), never its message."""

    __slots__ = ("detail", "error", "message", "timeout", "timeout_message")

    def __init__(self, error: type[Unavailable], message: str, *, timeout: type[Unavailable] | None = None,
                 timeout_message: str | None = None, detail: bool = False) -> None:
        self.error = error
        self.message = message
        self.timeout = timeout or error
        self.timeout_message = timeout_message or message
        self.detail = detail

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> Literal[False]:
        if exc is None:
            return False
        if isinstance(exc, (httpx.TimeoutException, TimeoutError)):
            raise self.timeout(self.timeout_message, detail="timeout" if self.detail else "") from None
        if isinstance(exc, (httpx.HTTPError, OSError)):
            raise self.error(self.message, detail=type(exc).__name__ if self.detail else "") from None
        return False


__all__ = ["HttpxErrors"]
