"""uvicorn's httptools protocol, with the writes of one event-loop turn coalesced into one send, one `Date` per
response, the request head bounded, and an absolute-form target's authority taken as the Host.

uvicorn writes a response's status line and headers, then each body chunk, as separate `transport.write`s —
each a send(2) on the socket. On loopback a send costs more than everything else the sidecar does for a
request (bench/). Buffering the writes made during one turn of the loop and sending them together at the end
of the turn keeps behaviour identical (same bytes, same order, nothing held across turns) with one system call
where there were two or three.

This is the one module that reaches into uvicorn's internals (the uvicorn version is capped in pyproject.toml;
tests/test_dependency_internals.py fails with a clear message when a new uvicorn changes them): uvicorn has no
public hook for any of the above. Relied on: the class `uvicorn.protocols.http.httptools_impl.HttpToolsProtocol`
(named by uvicorn's own `http=` setting) with its `connection_made`, `data_received`, `on_message_begin` and
`on_headers_complete`; its attributes `loop`, `transport`, `url`, `headers`, `cycle` and
`server_state.default_headers`; and the response cycle's `default_headers`, prepended as `default_headers + headers`.
For WebSocket pass-through also `_get_upgrade`, `_unset_keepalive_if_required`, `_unsupported_upgrade_warning`,
`shutdown`, `connections`, and the cycle's `keep_alive`, `response_started`, `response_complete` and `disconnected`
(its `send` does nothing once that is set)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from sidecar.errors import error_body
from sidecar.proxy.client_cert import tls_extension
from sidecar.proxy.websocket import SCOPE_KEY as WEBSOCKET


class CoalescingTransport:
    """An `asyncio.Transport` front that gathers the writes of one loop turn; everything else passes through."""

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending) if len(self._pending) > 1 else self._pending[0]
            self._pending = []
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(p) for p in self._pending)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


MAX_EARLY_BYTES = 64 * 1024  # what a WebSocket client may send before its handshake is answered
MAX_HEAD_BYTES = 80 * 1024  # request line and headers; the gateway answers 431 above 64 KiB of fields
_BODY_431 = error_body("headers_too_large", "the request head is larger than the limit")
_HEAD_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                   b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_BODY_431), _BODY_431))


class DateUnlessSent(list[tuple[bytes, bytes]]):
    """uvicorn's default headers (`date` alone: the Server header is off), which its response cycle prepends with
    `default_headers + headers`. A response that carries its own Date (the upstream's, forwarded) keeps that one
    alone: RFC 9110 §6.6.1 allows one Date, and a proxy forwards the origin's."""

    def __add__(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:  # type: ignore[override]
        for name, _ in headers:
            if name.lower() == b"date":
                return headers
        return [*self, *headers]


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """Also bounds the request head: httptools buffers an unfinished header without limit, so an endless one
    would grow memory until the connection dies. Past MAX_HEAD_BYTES before the head ends: 431, and close."""

    _head_bytes = 0
    _in_head = True
    _tls: dict[str, Any] | None = None  # the ASGI TLS extension of this connection, on a TLS listener
    _early: bytearray | None = None  # what a WebSocket client sent after its handshake, held while it is decided
    _on_shutdown: Callable[[], None] | None = None  # set while this connection is a WebSocket tunnel

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:  # the handshake is over: the client certificate is read once per connection
            self._tls = tls_extension(ssl_object)
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        if self._early is not None:  # a WebSocket handshake is being decided: nothing after it is HTTP
            self._early += data
            if len(self._early) > MAX_EARLY_BYTES:
                self.transport.close()
            return
        super().data_received(data)
        # Counted after parsing: a read that finishes the head (and carries body bytes) is not held against it.
        if self._in_head and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self.transport.write(_HEAD_TOO_LARGE)
                self.transport.close()

    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        super().on_message_begin()
        if self._tls is not None:
            self.scope["extensions"] = self._tls

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self.url[:1] not in (b"/", b"*"):
            self._host_from_target()
        cycle = self.cycle
        websocket = self._is_websocket_handshake()
        if websocket:
            self.scope[WEBSOCKET] = self  # type: ignore[literal-required]  # the gateway's way to take the socket
        super().on_headers_complete()
        if self.cycle is not cycle and self.cycle is not None:
            self.cycle.default_headers = DateUnlessSent(self.server_state.default_headers)
            if websocket:
                # httptools stops parsing at an upgrade's head: whatever the answer, nothing after it is read as a
                # request. A refusal closes the connection (`Connection: close`); an acceptance takes it over.
                self.cycle.keep_alive = False
                self._early = bytearray()

    # --- WebSocket pass-through (sidecar/proxy/websocket.py) -------------------------------------------------
    # uvicorn runs with ws="none": it never answers an upgrade itself, so a WebSocket handshake reaches the
    # gateway as an ordinary HTTP request, authenticated and authorised like any other. The ASGI application
    # cannot take over the socket through standard ASGI, so the handshake's scope carries this protocol (a
    # `ClientConnection`), and the gateway calls `take_over` once the upstream has answered 101. Other upgrades
    # (h2c, ...) are not marked: they stay ordinary requests and their Upgrade header is dropped as hop-by-hop.

    def _is_websocket_handshake(self) -> bool:
        """RFC 6455 §4.1: a GET over HTTP/1.1 with `Connection: upgrade` and `Upgrade: websocket`."""
        return (self.parser.should_upgrade() and self.parser.get_method() == b"GET"
                and self.parser.get_http_version() == "1.1" and self._get_upgrade() == b"websocket")

    def take_over(self, on_shutdown: Callable[[], None]) -> tuple[asyncio.Transport, bytes]:
        """The raw socket for the tunnel, and what the client sent after its handshake. The request's response
        cycle is retired first: its `send` becomes a no-op, so nothing uvicorn or the ASGI app still writes (such
        as --grace's 503) can land in the middle of the WebSocket stream."""
        coalescing = self.transport
        assert isinstance(coalescing, CoalescingTransport)
        coalescing._flush()
        cycle = self.cycle
        cycle.response_started = cycle.response_complete = cycle.disconnected = True
        self._unset_keepalive_if_required()
        self._on_shutdown = on_shutdown
        early, self._early = bytes(self._early or b""), None
        return coalescing._transport, early

    def _unsupported_upgrade_warning(self) -> None:
        """uvicorn warns about every upgrade it does not perform itself; with ws="none" that is all of them, and
        each is handled: a WebSocket handshake by the gateway, any other as a plain request (Upgrade dropped)."""

    def release(self) -> None:
        self._on_shutdown = None
        self.connections.discard(self)

    def shutdown(self) -> None:
        """The server is stopping: a tunnel is closed now (its client reconnects elsewhere) rather than holding the
        shutdown for the whole grace period."""
        if self._on_shutdown is not None:
            self._on_shutdown()
        else:
            super().shutdown()

    def _host_from_target(self) -> None:
        """RFC 9112 §3.2.2: with an absolute-form target (`GET http://host/path`) the target's authority is the
        Host, and a received Host header is ignored. uvicorn keeps only the path, so the authority becomes the Host
        here, as sent, for the gateway to validate and match like any other (`http://a@evil/` is then a 400)."""
        scheme, sep, rest = self.url.partition(b"://")
        if not sep or not scheme.isalpha():
            return  # not absolute-form: uvicorn refuses it, or the gateway does
        end = len(rest)
        for stop in (b"/", b"?", b"#"):
            at = rest.find(stop)
            if at != -1:
                end = min(end, at)
        self.headers[:] = [(name, value) for name, value in self.headers if name != b"host"]
        self.headers.append((b"host", rest[:end]))
