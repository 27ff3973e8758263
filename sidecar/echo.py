"""A small echo upstream: answers every request with JSON describing what it received, and records it.
Bundled for `sidecar demo`, and used by the tests as the upstream that tells what got through."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Received:
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name.lower():
                return value
        return None

    def header_names(self) -> set[str]:
        return {key for key, _ in self.headers}


@dataclass
class EchoApp:
    received: list[Received] = field(default_factory=list)
    reply_body: bytes | None = None  # a fixed reply instead of the echo

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                while (await receive())["type"] != "lifespan.shutdown":
                    pass
                await send({"type": "lifespan.shutdown.complete"})
            return
        body = await read_body(receive)
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        record = Received(scope["method"], scope["raw_path"].decode("latin-1"), scope["query_string"].decode("latin-1"),
                          headers, body)
        self.received.append(record)
        reply = self.reply_body if self.reply_body is not None else json.dumps({
            "method": record.method, "path": record.path, "query": record.query,
            "headers": dict(headers), "body_bytes": len(body),
        }, indent=1).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(reply)).encode())]})
        await send({"type": "http.response.body", "body": reply})


async def read_body(receive: Any) -> bytes:
    """The whole body of an ASGI request (test servers and the bench's receivers: they want it all)."""
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)
