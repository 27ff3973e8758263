"""A strict keep-alive HTTP/1.1 upstream for the pool's desync tests: it parses with h11 (which refuses anything
ambiguous), records every request exactly as it parsed it, and answers each one as its path says.

Why h11 and not uvicorn: the tests need an upstream that answers *before* reading the body and then keeps the
connection, as real backends do (a 401 or 413 decided from the head). A correct server then reads the rest of
that body (its framing says how long it is) and parses the next request after it. That is exactly what makes a
pool that stops mid-body dangerous: the bytes it sends next are read as the rest of that body.

A request's behaviour is encoded in its path, `[prefix]/r/<id>/<when>.<framing>.<connection>.<interim>.<pace>`:
- when: `early` (answer right after the head, then read the body), `after` (read the body, then answer),
  `cut` (close right after the head, nothing answered), `drop` (read the whole request, close, nothing answered);
- framing: `sized` (Content-Length) or `chunked`; connection: `keep` or `close` (Connection: close, then close);
- interim: `none`, `100` or `103` sent before the answer; pace: `fast`, `slow` (the answer in pieces), or `stall`
  (its first piece, then silence for `STALL` seconds before the rest).
Any other path is answered `after.sized.keep.none.fast`. Every answer echoes the request target, in the body
(`reply:<target>`) and in `X-Echo`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import h11

WHEN = ("early", "after", "cut", "drop")
FRAMING = ("sized", "chunked")
CONNECTION = ("keep", "close")
INTERIM = ("none", "100", "103")
PACE = ("fast", "slow", "stall")
STALL = 0.4  # seconds a `stall` reply stops after its first piece: longer than the read timeout the tests use


@dataclass(frozen=True)
class Plan:
    when: str = "after"
    framing: str = "sized"
    connection: str = "keep"
    interim: str = "none"
    pace: str = "fast"

    def path(self, request_id: str) -> str:
        return f"/r/{request_id}/{self.when}.{self.framing}.{self.connection}.{self.interim}.{self.pace}"

    @classmethod
    def of(cls, target: str) -> Plan:
        parts = target.split("/")
        if len(parts) >= 4 and parts[-3] == "r":  # `/r/<id>/<plan>`, under any prefix (`/public/r/...`)
            fields = parts[-1].split(".")
            if len(fields) == 5:
                return cls(*fields)
        return cls()

    def under(self, prefix: str, request_id: str) -> str:
        return prefix + self.path(request_id)

    @property
    def answers(self) -> bool:
        return self.when in ("early", "after")


def reply_body(target: str) -> bytes:
    return b"reply:" + target.encode("latin-1")


@dataclass
class Parsed:
    """One request as the upstream's strict parser read it."""

    method: str
    target: str
    headers: list[tuple[bytes, bytes]]
    connection: int
    body: bytes = b""
    complete: bool = False  # the body ended by its framing (False: the connection went away first)

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)

    def head_size(self) -> int:
        """The size of the head as it came in (h11 lower-cases names and trims values; the pool sends them so)."""
        line = len(self.method) + len(self.target) + len(" HTTP/1.1\r\n") + 1
        return line + sum(len(k) + len(v) + 4 for k, v in self.headers) + 2


@dataclass
class ScriptedUpstream:
    """The upstream itself: `await ScriptedUpstream().start()` in the test's loop, or `scripted_upstream_in_thread()`.
    `parsed` is every request in the order h11 parsed it, `garbage` any protocol error that was not a request cut
    short by its connection closing (there should be none: the pool sends only well-framed requests)."""

    port: int = 0
    parsed: list[Parsed] = field(default_factory=list)
    garbage: list[str] = field(default_factory=list)  # protocol errors other than "closed mid-body"
    connections: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def requests(self) -> list[tuple[str, str]]:
        return [(p.method, p.target) for p in self.parsed]

    async def start(self) -> ScriptedUpstream:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = self.connections
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        eof = [False]

        async def next_event() -> object:
            while True:
                event = conn.next_event()
                if event is not h11.NEED_DATA:
                    return event
                data = await reader.read(65536)
                eof[0] = not data
                conn.receive_data(data)

        async def reply(request: Parsed, plan: Plan) -> None:
            body = reply_body(request.target)
            headers = [(b"x-echo", request.target.encode("latin-1"))]
            headers.append((b"content-length", b"%d" % len(body)) if plan.framing == "sized"
                           else (b"transfer-encoding", b"chunked"))
            if plan.connection == "close":
                headers.append((b"connection", b"close"))
            writer.write(conn.send(h11.Response(status_code=200, headers=headers)))
            pieces = [body] if plan.pace == "fast" else [body[:3], body[3:7], body[7:]]
            if request.method != "HEAD":
                for piece in pieces:
                    writer.write(conn.send(h11.Data(data=piece)))
                    if plan.pace != "fast":
                        await writer.drain()
                        await asyncio.sleep(STALL if plan.pace == "stall" else 0.002)
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()

        try:
            while True:
                event = await next_event()
                if isinstance(event, h11.ConnectionClosed):
                    return
                if not isinstance(event, h11.Request):
                    self.garbage.append(f"unexpected {event!r}")
                    return
                request = Parsed(event.method.decode(), event.target.decode("latin-1"), list(event.headers), number)
                self.parsed.append(request)
                plan = Plan.of(request.target)
                if plan.when == "cut":
                    return
                if plan.interim != "none":
                    status = int(plan.interim)
                    extra = [(b"link", b"</style.css>; rel=preload")] if status == 103 else []
                    writer.write(conn.send(h11.InformationalResponse(status_code=status, headers=extra)))
                    await writer.drain()
                if plan.when == "early":
                    await reply(request, plan)
                while not isinstance(event := await next_event(), h11.EndOfMessage):
                    assert isinstance(event, h11.Data), event
                    request.body += bytes(event.data)
                request.complete = True
                if plan.when == "drop":
                    return
                if plan.when == "after":
                    await reply(request, plan)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return  # Connection: close (either side)
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            if not eof[0]:
                self.garbage.append(str(exc))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@contextlib.contextmanager
def scripted_upstream_in_thread() -> Iterator[ScriptedUpstream]:
    """The strict upstream on its own event loop in a background thread (for a sidecar running in another)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        upstream = asyncio.run_coroutine_threadsafe(ScriptedUpstream().start(), loop).result(5)
        try:
            yield upstream
        finally:
            asyncio.run_coroutine_threadsafe(upstream.stop(), loop).result(5)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
