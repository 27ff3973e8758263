"""A validation webservice for tests (seed 001: `valida_token`, credential and revalidation services, RFC 7662
introspection): a real HTTP server on loopback that records every call and answers through a test's function."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from sidecar.testing import serve_in_thread


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def form(self) -> dict[str, str]:
        return dict(parse_qsl(self.body.decode()))

    def json(self) -> Any:
        return json.loads(self.body)


Answer = tuple[int, str | bytes | dict[str, Any]]


class ValidatorApp:
    """Answers each call with `answer(call)` -> (status, body); a dict body is sent as JSON. `delay` seconds are
    waited before answering (to test timeouts and coalescing)."""

    def __init__(self, answer: Callable[[Call], Answer], delay: float = 0.0) -> None:
        self.answer = answer
        self.delay = delay
        self.calls: list[Call] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        call = Call(scope["method"], scope["path"], dict(parse_qsl(scope["query_string"].decode())),
                    {k.decode(): v.decode() for k, v in scope["headers"]}, b"".join(chunks))
        self.calls.append(call)
        if self.delay:
            await asyncio.sleep(self.delay)
        result = self.answer(call)
        status, body = await result if inspect.isawaitable(result) else result
        content_type = b"text/plain; charset=utf-8"
        if isinstance(body, dict):
            body, content_type = json.dumps(body), b"application/json"
        data = body.encode() if isinstance(body, str) else body
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", content_type), (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})


@contextlib.contextmanager
def validator(answer: Callable[[Call], Answer], delay: float = 0.0) -> Iterator[tuple[ValidatorApp, str]]:
    """A running validation service: (the app, with its recorded `calls`; its base URL)."""
    app = ValidatorApp(answer, delay)
    with serve_in_thread(app) as url:
        yield app, url
