"""The HTTP/1.1 server protocol of every listener: the `httptools` (llhttp) parser, ASGI to the application, and
nothing the sidecar does not use.

uvicorn still runs the servers (sockets, TLS handshakes, the Date tick, graceful shutdown: `uvicorn.Server` with
this class as its `http=` protocol), but no longer parses: its own httptools protocol builds, per request, a
response-cycle object, an `asyncio.Event`, a flow-control object, a scope with a copied state dict and a keep-alive
timer, and writes each response in two or three `send(2)`s. Here a request costs one small `_Cycle`, a scope of the
keys ASGI requires, one task, and one send per loop turn (issue 19: bench/README.md has the figures). Parsing is the
same llhttp parser uvicorn uses, with the same settings: no HTTP parsing is written here.

What it keeps from uvicorn's protocol, rule for rule (tests/adversarial/ checks them): a malformed request is a 400
and the connection closes; pipelined requests are answered in order, one at a time; `Expect: 100-continue` is
answered when the application first reads the body; HTTP/1.0 and `Connection: close` close after the response;
a response without Content-Length is sent chunked (not to HEAD, not for 204/304); a response header with a control
character is refused (no response splitting); the application's Content-Length is held to the bytes it sends; a
client that goes away is an `http.disconnect`; body reading and response writing apply back-pressure.

What it adds: the writes of one loop turn leave in one `send(2)`; one `Date` per response (an upstream's own is
forwarded alone, RFC 9110 §6.6.1); the request head is bounded (httptools buffers an unfinished head without limit:
past MAX_HEAD_BYTES, 431 and close), and so is a chunked body's trailer section, whose fields are dropped, never
merged into the request's headers (RFC 9110 §6.5.1); a request answered before its `100 Continue` closes the
connection (its body may never come: RFC 9110 §10.1.1); a 204 or 304 never has a body, whatever its Content-Length;
an application failing after its response was whole does not cut the connection's next request; an absolute-form
target's authority is the Host (RFC 9112 §3.2.2); the idle timeout also covers a connection that never sends a
request; and a WebSocket handshake reaches the gateway as an ordinary request carrying this protocol, which hands
its socket over once the upstream has answered 101."""

from __future__ import annotations

import asyncio
import http
import logging
import re
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import httptools
import uvicorn

from sidecar.errors import ShuttingDown, error_body
from sidecar.proxy.client_cert import tls_extension
from sidecar.proxy.websocket import SCOPE_KEY as WEBSOCKET

log = logging.getLogger("uvicorn.error")
sidecar_log = logging.getLogger("sidecar")

MAX_EARLY_BYTES = 64 * 1024  # what a WebSocket client may send before its handshake is answered
MAX_HEAD_BYTES = 80 * 1024  # request line and headers; the gateway answers 431 above 64 KiB of fields
HIGH_WATER = 64 * 1024  # request body buffered before the socket stops being read
_BODY_431 = error_body("headers_too_large", "the request head is larger than the limit")
_HEAD_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\n", b"content-type: application/json\r\n"
                   b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_BODY_431), _BODY_431))
_INVALID = b"Invalid HTTP request received."
_BAD_REQUEST = (b"HTTP/1.1 400 Bad Request\r\n", b"content-type: text/plain; charset=utf-8\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_INVALID), _INVALID))
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_ASGI = {"version": "3.0", "spec_version": "2.3"}
_BAD_NAME = re.compile(b'[\x00-\x1f\x7f()<>@,;:\\[\\]={} \t\\\\"]')
_BAD_VALUE = re.compile(b"[\x00-\x08\x0a-\x1f\x7f]")


def _status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase.encode()
    except ValueError:
        phrase = b""
    return b"HTTP/1.1 %d %s\r\n" % (status, phrase)


STATUS_LINE = {status: _status_line(status) for status in range(100, 600)}


class ServerConfig(uvicorn.Config):
    """uvicorn's settings, and what this protocol counts for the shutdown line."""

    cut_off = 0  # requests answered 503 or closed when --grace ran out


class _Cycle:
    """One request and its response: the ASGI `receive` and `send` of the application's call."""

    __slots__ = ("body", "chunked", "complete", "delivered", "disconnected", "expect_continue", "head", "keep_alive",
                 "more_body", "protocol", "remaining", "scope", "started", "waiter")

    def __init__(self, protocol: HttpProtocol, scope: dict[str, Any], keep_alive: bool, expect_continue: bool,
                 head: bool) -> None:
        self.protocol = protocol
        self.scope = scope
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue
        self.head = head  # a HEAD request: no body is written
        self.body = bytearray()
        self.more_body = True  # the request body has not been read to its end by the parser
        self.delivered = False  # its last part has gone to the application
        self.waiter: asyncio.Future[None] | None = None  # receive() waiting for body or disconnect
        self.started = self.complete = self.disconnected = False
        self.chunked = False
        self.remaining = -1  # bytes still owed under the application's Content-Length (-1: none given)

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def receive(self) -> dict[str, Any]:
        protocol = self.protocol
        if self.expect_continue:
            self.expect_continue = False
            if not protocol.transport.is_closing():
                protocol.write(_CONTINUE)
        while not (self.disconnected or self.complete) and not self.body and (self.more_body or self.delivered):
            if not protocol.queue:  # not while pipelined requests wait: they are read one at a time
                protocol.resume_reading()
            self.waiter = protocol.loop.create_future()
            await self.waiter
        if self.disconnected or self.complete:
            return {"type": "http.disconnect"}
        body, self.body = bytes(self.body), bytearray()
        if not self.more_body:
            self.delivered = True
        return {"type": "http.request", "body": body, "more_body": self.more_body}

    async def send(self, message: dict[str, Any]) -> None:
        protocol = self.protocol
        if protocol.write_paused and not self.disconnected:
            await protocol.drain()
        if self.disconnected:
            return
        if not self.started:
            if message["type"] != "http.response.start":
                raise RuntimeError(f"Expected ASGI message 'http.response.start', but got {message['type']!r}.")
            if self.expect_continue and self.more_body and not self.body:
                # Answered before `100 Continue` and before any of the body came: the client may never send it, and
                # its next request would be read as that body. The connection closes after this answer (RFC 9110
                # §10.1.1). (A body on its way is read past, as without `Expect`: closing on it would reset the
                # connection under the answer.)
                self.keep_alive = False
            head = self.response_head(message["status"], message.get("headers") or ())  # raises on a bad header
            self.started = True
            self.expect_continue = False
            protocol.write(head)
        elif not self.complete:
            if message["type"] != "http.response.body":
                raise RuntimeError(f"Expected ASGI message 'http.response.body', but got {message['type']!r}.")
            body = message.get("body", b"")
            more = message.get("more_body", False)
            if self.head:
                self.remaining = -1
            elif self.chunked:
                if body:
                    protocol.write(b"%x\r\n%s\r\n" % (len(body), body) if more else
                                   b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
                elif not more:
                    protocol.write(b"0\r\n\r\n")
            else:
                if self.remaining >= 0:
                    if len(body) > self.remaining:
                        raise RuntimeError("Response content longer than Content-Length")
                    self.remaining -= len(body)
                if body:
                    protocol.write(body)
            if not more:
                if self.remaining > 0:
                    raise RuntimeError("Response content shorter than Content-Length")
                self.complete = True
                self.wake()
                protocol.response_done(self)
        else:
            raise RuntimeError(f"Unexpected ASGI message {message['type']!r} sent, after response already completed.")

    def response_head(self, status: int, headers: Any) -> bytes:
        lines = [STATUS_LINE[status]]
        names = values = b""
        dated = close = False
        for name, value in headers:
            names += name
            values += value
            name = name.lower()
            if name == b"content-length":
                if self.remaining < 0 and not self.chunked:
                    self.remaining = int(value)
            elif name == b"transfer-encoding":
                if value.lower() == b"chunked":
                    self.chunked, self.remaining = True, -1
            elif name == b"date":
                dated = True
            elif name == b"connection" and b"close" in [t.strip() for t in value.lower().split(b",")]:
                self.keep_alive = False
                close = True
            lines += (name, b": ", value, b"\r\n")
        if _BAD_NAME.search(names) or _BAD_VALUE.search(values):
            raise RuntimeError("Invalid HTTP header name or value.")
        if not dated:
            for name, value in self.protocol.server_state.default_headers:
                lines += (name, b": ", value, b"\r\n")
        if not self.keep_alive and not close:
            lines.append(b"connection: close\r\n")
        if status in (204, 304):  # no body follows, whatever the fields say (a 304's Content-Length is its 200's)
            self.chunked, self.remaining = False, 0
        elif self.remaining < 0 and not self.chunked:
            if self.head:
                self.remaining = 0  # no body may follow
            else:
                self.chunked = True
                lines.append(b"transfer-encoding: chunked\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    def finished(self, task: asyncio.Task[None]) -> None:
        """The application's call is over: account for a call that failed or never finished its response."""
        protocol = self.protocol
        protocol.tasks.discard(task)
        if task.cancelled():
            self.cut_off()
            return
        error = task.exception()
        if error is not None:
            log.error("Exception in ASGI application", exc_info=error)
            if self.complete:
                return  # the response went out whole: the connection may be answering the next request by now
        elif self.complete or self.disconnected:
            return
        else:
            log.error("ASGI callable returned without %s response.", "completing" if self.started else "starting")
        if not self.started and not self.disconnected:
            self.started = True
            self.keep_alive = False
            protocol.write(b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain; charset=utf-8\r\n"
                           b"content-length: 21\r\nconnection: close\r\n\r\n")
            if not self.head:
                protocol.write(b"Internal Server Error")
        self.complete = True
        protocol.close()

    def cut_off(self) -> None:
        """uvicorn cancels what still runs when --grace runs out. Before the reply has started the caller gets the JSON
        503 `shutting_down` of the error table and the connection closes; after, the connection closes mid-reply —
        never a body made to look whole (a last chunk sent now would pass a truncated reply off as complete)."""
        if self.complete or self.disconnected:
            return
        protocol = self.protocol
        if isinstance(protocol.config, ServerConfig):
            protocol.config.cut_off += 1
        if self.started:
            sidecar_log.warning("grace period over: closed a connection in the middle of its reply")
        else:
            sidecar_log.warning("grace period over: answered 503 shutting_down to a request still in flight")
            refusal = ShuttingDown("the sidecar is shutting down and its grace period ran out before the answer; "
                                   "the upstream may have received the request")
            body = refusal.body()
            self.keep_alive = False
            protocol.write(self.response_head(refusal.status, refusal.headers(body)) + (b"" if self.head else body))
        self.started = self.complete = True
        protocol.close()


class HttpProtocol(asyncio.Protocol):
    """One client connection. Built by `uvicorn.Server` as `HttpProtocol(config=, server_state=, app_state=)`."""

    __slots__ = (
        "app", "bounded", "client", "config", "connections", "cycle", "drain_waiter", "early", "expect_continue",
        "fresh", "head_bytes", "headers", "idle_since", "idle_timeout", "in_head", "loop", "on_shutdown", "out",
        "out_bytes", "parse_error", "parser", "queue", "read_paused", "scheme", "server", "server_state",
        "stopping", "tasks", "timer", "tls", "transport", "url", "write_paused"
    )

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        if not config.loaded:
            config.load()
        self.config = config
        self.app = config.loaded_app
        self.loop = _loop or asyncio.get_event_loop()
        self.server_state = server_state
        self.connections: set[Any] = server_state.connections
        self.tasks: set[asyncio.Task[None]] = server_state.tasks
        self.idle_timeout: float = config.timeout_keep_alive
        self.parser = httptools.HttpRequestParser(self)
        # As uvicorn sets it: a response to the first of pipelined requests that ends with `Connection: close`.
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.client: tuple[str, int] | None = None
        self.server: tuple[str, int] | None = None
        self.scheme = "http"
        self.tls: dict[str, Any] | None = None  # the ASGI TLS extension, on a TLS listener
        self.cycle: _Cycle | None = None  # the request being answered
        self.queue: deque[_Cycle] = deque()  # pipelined requests parsed behind it
        self.out: list[bytes] = []  # writes of this loop turn
        self.out_bytes = 0
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.read_paused = False
        self.parse_error = False
        self.idle_since = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.early: bytearray | None = None  # what a WebSocket client sent after its handshake, held while decided
        self.on_shutdown: Callable[[], None] | None = None  # set while this connection is a WebSocket tunnel
        self.stopping = False  # the server is shutting down
        # Per request, while its head is parsed:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0  # bytes read into the head or trailer section being parsed (see data_received)
        self.in_head = False  # in a request head (not in trailers)
        self.bounded = False  # in a head, or between a chunk's header and its data: maybe the trailer section
        self.fresh = False  # that section began in the read being parsed
        self.expect_continue = False

    # --- asyncio.Protocol ------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport  # uvloop's transports are not asyncio.Transport subclasses, but behave as one
        self.connections.add(self)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.client = (str(peer[0]), int(peer[1]))
        own = transport.get_extra_info("sockname")
        if isinstance(own, tuple) and len(own) >= 2:
            self.server = (str(own[0]), int(own[1]))
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:  # the handshake is over: the client certificate is read once per connection
            self.scheme = "https"
            self.tls = tls_extension(ssl_object)
        self.go_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self.cancel_timer()
        cycle = self.cycle
        if cycle is not None:
            if not cycle.complete:
                cycle.disconnected = True
            cycle.wake()
        self.queue.clear()
        self.out = []
        self.write_paused = False
        self.wake_drain()
        if exc is None:
            self.transport.close()

    def eof_received(self) -> bool:
        # The client has sent all it will: the connection closes, as under uvicorn's protocol, but in a callback of
        # its own, after what this loop turn already runs (an application answering now): close() writes that
        # answer first. Closed by the transport instead, it would be dropped with this turn's unsent writes. (A TLS
        # transport closes on its own whatever this returns, and warns if it is asked not to.)
        self.loop.call_soon(self.close)
        return self.scheme == "http"

    def data_received(self, data: bytes) -> None:
        if self.early is not None:  # a WebSocket handshake is being decided: nothing after it is HTTP
            self.early += data
            if len(self.early) > MAX_EARLY_BYTES:
                self.transport.close()
            return
        if self.parse_error:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # The head was parsed (on_headers_complete). What follows it is not HTTP: kept for a WebSocket tunnel,
            # else never read (the connection closes after the response).
            if self.early is not None:
                self.early += data[upgrade.args[0]:]
        except httptools.HttpParserError:
            log.warning("Invalid HTTP request received.")
            self.unreadable(_BAD_REQUEST)
            return
        # Counted after parsing, in whole reads: a read that finishes the section is not held against it, nor is
        # the read in which it began (where in that read it began is unknown: with pipelined requests before it,
        # the read may be far larger than the section). What httptools can buffer is thus one read past the limit.
        if self.bounded and not self.transport.is_closing():
            if self.fresh:
                self.fresh = False
            else:
                self.head_bytes += len(data)
                if self.head_bytes > MAX_HEAD_BYTES:
                    self.unreadable(_HEAD_TOO_LARGE)

    def unreadable(self, reply: tuple[bytes, bytes]) -> None:
        """Nothing more is read from this connection. A request still reading its body is the bad one: answered
        now (or, mid-response, cut off), its application sees a disconnect. Otherwise the request in progress is
        answered first, then the connection closes; requests pipelined behind the bad one are never started."""
        self.parse_error = True
        self.pause_reading()
        self.queue.clear()
        cycle = self.cycle
        if cycle is None:
            self.refuse(reply)
        elif cycle.more_body:
            cycle.disconnected = True
            cycle.wake()
            if cycle.started:
                self.close()
            else:
                self.refuse(reply)
        else:
            cycle.keep_alive = False

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.wake_drain()

    def refuse(self, reply: tuple[bytes, bytes]) -> None:
        """A request the application never sees (unparsable, or its head too large): answered, with one Date, and the
        connection closed."""
        status, rest = reply
        date = b"".join(b"%s: %s\r\n" % pair for pair in self.server_state.default_headers)
        self.write(status + date + rest)
        self.close()

    # --- httptools callbacks -----------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_head = self.bounded = self.fresh = True
        self.head_bytes = 0
        self.url = b""
        self.headers = []
        self.expect_continue = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:
            return  # a trailer field: never merged into the request's headers (RFC 9110 §6.5.1)
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = self.bounded = False
        parser = self.parser
        version = parser.get_http_version()
        method = parser.get_method().decode("ascii")
        url = self.url
        if url[:1] not in (b"/", b"*"):
            self._host_from_target()
        parsed = httptools.parse_url(url)
        raw_path = parsed.path
        path = raw_path.decode("ascii")
        if "%" in path:
            path = unquote(path)
        scope: dict[str, Any] = {
            "type": "http", "asgi": _ASGI, "http_version": version, "server": self.server, "client": self.client,
            "scheme": self.scheme, "root_path": "", "headers": self.headers, "method": method, "path": path,
            "raw_path": raw_path, "query_string": parsed.query or b"",
        }
        if self.tls is not None:
            scope["extensions"] = self.tls
        upgrade = parser.should_upgrade()
        keep_alive = version != "1.0" and parser.should_keep_alive() and not upgrade
        # An HTTP/1.0 client's expectation is ignored (RFC 9110 §10.1.1): it would take `100 Continue` for the answer.
        cycle = _Cycle(self, scope, keep_alive, self.expect_continue and version == "1.1", method == "HEAD")
        if upgrade and self._is_websocket_handshake(method, version):
            scope[WEBSOCKET] = self  # the gateway's way to take the socket (sidecar/proxy/websocket.py)
            # httptools stops parsing at an upgrade's head: whatever the answer, nothing after it is read as a
            # request. A refusal closes the connection (`Connection: close`); an acceptance takes it over.
            self.early = bytearray()
        if self.cycle is None:
            self.start(cycle)
        else:  # pipelined behind the request in progress: started when its response is complete
            self.queue.append(cycle)
            self.pause_reading()

    def on_chunk_header(self) -> None:
        # The last chunk's header is followed by the trailer section, which httptools buffers like a head: bounded
        # like one. (A chunk with data ends the section at once, in on_body.)
        self.bounded = self.fresh = True
        self.head_bytes = 0

    def on_body(self, body: bytes) -> None:
        self.bounded = False
        cycle = self.queue[-1] if self.queue else self.cycle
        if cycle is None or cycle.complete:
            return
        cycle.body += body
        if len(cycle.body) > HIGH_WATER:
            self.pause_reading()
        cycle.wake()

    def on_message_complete(self) -> None:
        self.bounded = False
        cycle = self.queue[-1] if self.queue else self.cycle
        if cycle is None or cycle.complete:
            return
        cycle.more_body = False
        cycle.wake()

    # --- requests ----------------------------------------------------------------------------------------------

    def start(self, cycle: _Cycle) -> None:
        self.cycle = cycle  # the idle timer, if armed, finds the connection busy and lets it be
        task = self.loop.create_task(self.app(cycle.scope, cycle.receive, cycle.send))
        self.tasks.add(task)
        task.add_done_callback(cycle.finished)

    def response_done(self, cycle: _Cycle) -> None:
        """The response is written whole: the connection closes, or takes the next pipelined request, or waits."""
        self.server_state.total_requests += 1
        if cycle is not self.cycle:
            return
        self.cycle = None
        if not cycle.keep_alive:  # (after a bad request pipelined behind this one too: it is not answered)
            self.close()
            return
        if self.transport.is_closing():
            return
        if self.queue:
            self.start(self.queue.popleft())
            if not self.queue:
                self.resume_reading()
        else:
            self.resume_reading()
            self.go_idle()

    # --- the socket ---------------------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        out = self.out
        if not out:
            self.loop.call_soon(self.flush)
            self.out_bytes = 0
        out.append(data)
        self.out_bytes += len(data)
        if self.out_bytes > HIGH_WATER:  # a large reply goes now: the transport's back-pressure then applies
            self.flush()

    def flush(self) -> None:
        out = self.out
        if out:
            self.out = []
            if not self.transport.is_closing():
                self.transport.write(b"".join(out) if len(out) > 1 else out[0])

    def close(self) -> None:
        self.flush()
        if not self.transport.is_closing():
            self.transport.close()

    async def drain(self) -> None:
        if self.drain_waiter is None or self.drain_waiter.done():
            self.drain_waiter = self.loop.create_future()
        await self.drain_waiter

    def wake_drain(self) -> None:
        waiter = self.drain_waiter
        if waiter is not None:
            self.drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def pause_reading(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and not self.parse_error:
            self.read_paused = False
            self.transport.resume_reading()

    # --- idle timeout ---------------------------------------------------------------------------------------------
    # One timer per idle period, not one per request: it is armed when the connection goes idle and, when it fires,
    # closes the connection only if it is still idle and has been for the whole timeout.

    def go_idle(self) -> None:
        self.idle_since = self.loop.time()
        if self.timer is None:
            self.timer = self.loop.call_later(self.idle_timeout, self.idle_check)

    def idle_check(self) -> None:
        self.timer = None
        if self.cycle is not None or self.transport.is_closing():
            return
        left = self.idle_since + self.idle_timeout - self.loop.time()
        if left > 0.05:
            self.timer = self.loop.call_later(left, self.idle_check)
        else:
            self.transport.close()

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    # --- shutdown (uvicorn.Server calls it on every connection) ------------------------------------------------

    def shutdown(self) -> None:
        """The server is stopping: an idle connection closes now, a busy one after its response; a tunnel is closed
        now (its client reconnects elsewhere) rather than holding the shutdown for the whole grace period."""
        self.stopping = True
        if self.on_shutdown is not None:
            self.on_shutdown()
        elif self.cycle is None or self.cycle.complete:
            self.close()
        else:
            self.cycle.keep_alive = False
            self.queue.clear()

    # --- WebSocket pass-through (sidecar/proxy/websocket.py) -----------------------------------------------------
    # A WebSocket handshake reaches the gateway as an ordinary HTTP request, authenticated and authorised like any
    # other; its scope carries this protocol (a `ClientConnection`), and the gateway calls `take_over` once the
    # upstream has answered 101. Other upgrades (h2c, ...) stay ordinary requests, their Upgrade header dropped as
    # hop-by-hop, and the connection closes after them (the parser reads nothing after an upgrade's head).

    def _is_websocket_handshake(self, method: str, version: str) -> bool:
        """RFC 6455 §4.1: a GET over HTTP/1.1 with `Connection: upgrade` and `Upgrade: websocket`."""
        if method != "GET" or version != "1.1":
            return False
        connection: list[bytes] = []
        upgrade = None
        for name, value in self.headers:
            if name == b"connection":
                connection = [token.lower().strip() for token in value.split(b",")]
            elif name == b"upgrade":
                upgrade = value.lower()
        return b"upgrade" in connection and upgrade == b"websocket"

    def take_over(self, on_shutdown: Callable[[], None]) -> tuple[asyncio.Transport, bytes]:
        """The raw socket for the tunnel, and what the client sent after its handshake. The request's cycle is
        retired first: its `send` becomes a no-op, so nothing the application still writes (such as --grace's 503)
        can land in the middle of the WebSocket stream."""
        self.flush()
        cycle = self.cycle
        if cycle is not None:
            cycle.started = cycle.complete = cycle.disconnected = True
            self.cycle = None
        self.cancel_timer()
        self.on_shutdown = on_shutdown
        if self.stopping:  # the handshake was still being decided when shutdown began: closed as open tunnels were
            self.loop.call_soon(on_shutdown)
        early, self.early = bytes(self.early or b""), None
        return self.transport, early

    def release(self) -> None:
        self.on_shutdown = None
        self.connections.discard(self)

    def _host_from_target(self) -> None:
        """RFC 9112 §3.2.2: with an absolute-form target (`GET http://host/path`) the target's authority is the
        Host, and a received Host header is ignored. The authority becomes the Host here, as sent, for the gateway to
        validate and match like any other (`http://a@evil/` is then a 400)."""
        scheme, sep, rest = self.url.partition(b"://")
        if not sep or not scheme.isalpha():
            return  # not absolute-form: parse_url refuses it, or the gateway does
        end = len(rest)
        for stop in (b"/", b"?", b"#"):
            at = rest.find(stop)
            if at != -1:
                end = min(end, at)
        self.headers[:] = [(name, value) for name, value in self.headers if name != b"host"]
        self.headers.append((b"host", rest[:end]))
