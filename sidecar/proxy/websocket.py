"""WebSocket pass-through (RFC 6455): a handshake the gateway has authenticated and authorised like any request is
forwarded to the upstream on a fresh connection (never a pooled one: the connection stops being HTTP), and after
the upstream's `101` the client's and the upstream's sockets are spliced both ways, byte for byte, until either
side closes, the route's `idle_timeout` or `max_lifetime` passes, or the client's token is revoked.

The sidecar never reads the frames: what it vouched for is the handshake (the identity headers the upstream got
with it). A refusal is an ordinary HTTP answer before any upgrade. The client's socket is handed over by the
server (sidecar/server/http_protocol.py) through a `ClientConnection`, since ASGI has no way to give an application
the raw socket; the upstream's `101` is written to it directly, and the ASGI request then ends without a reply.

Both directions are flow-controlled: a side whose peer cannot keep up is paused (its socket is not read) until the
peer's send buffer drains, so a fast sender cannot grow the sidecar's memory."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import httptools

from sidecar.errors import Unavailable, UpstreamTimeout, UpstreamUnavailable
from sidecar.proxy.transports.base import HOP_BY_HOP, Upstream
from sidecar.proxy.transports.tls import UpstreamTlsContext, open_connection

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge

    from sidecar.authn.base import Identity
    from sidecar.config.model import UpstreamTlsConfig, WebSocketConfig

log = logging.getLogger("sidecar")

Headers = list[tuple[bytes, bytes]]
SCOPE_KEY = "sidecar.websocket"  # the scope entry holding the `ClientConnection` of a WebSocket handshake
MAX_REPLY_HEAD = 64 * 1024
MAX_REFUSAL_BODY = 1024 * 1024  # an upstream's non-101 answer to the handshake is relayed up to this size


class ClientConnection(Protocol):
    """The client's side of a WebSocket handshake, as the server offers it."""

    def take_over(self, on_shutdown: Callable[[], None]) -> tuple[asyncio.Transport, bytes]:
        """The client's socket, no longer read as HTTP, and any bytes it sent after its handshake;
        `on_shutdown` is called when the server shuts down while the tunnel is open."""

    def release(self) -> None:
        """The tunnel is over: the server forgets the connection."""


class TooManyTunnels(Unavailable):
    reason = "too_many_tunnels"


class Tunnels:
    """The open tunnels of this worker: at most `limit` (503 `too_many_tunnels` above it), found by token for
    revocation."""

    def __init__(self, limit: int, open_gauge: Gauge | None = None, bytes_counter: Counter | None = None) -> None:
        self.limit = limit
        self._gauge, self._bytes = open_gauge, bytes_counter
        self.open: set[Tunnel] = set()
        self._by_token: dict[str, set[Tunnel]] = {}
        self._tls: dict[tuple[str, UpstreamTlsConfig | None], UpstreamTlsContext] = {}
        self.to_upstream = self.to_client = 0  # bytes not yet folded into the counters

    def flush_metrics(self) -> None:
        """Open tunnels and bytes each way into the metrics (once a second, not per read)."""
        if self._gauge is not None:
            self._gauge.set(len(self.open))
        if self._bytes is not None:
            if self.to_upstream:
                self._bytes.labels("to_upstream").inc(self.to_upstream)
            if self.to_client:
                self._bytes.labels("to_client").inc(self.to_client)
        self.to_upstream = self.to_client = 0

    def close_revoked(self, token_hash: Any) -> None:
        """Close the tunnels opened with this (now revoked) client token."""
        for tunnel in list(self._by_token.get(str(token_hash), ())):
            tunnel.close("token_revoked")

    def close_all(self, why: str) -> None:
        for tunnel in list(self.open):
            tunnel.close(why)

    def tls_for(self, upstream: Upstream, settings: UpstreamTlsConfig | None) -> UpstreamTlsContext:
        key = (upstream.host, settings)
        context = self._tls.get(key)
        if context is None:
            context = self._tls[key] = UpstreamTlsContext(settings, upstream.host)
        return context

    def _add(self, tunnel: Tunnel) -> None:
        self.open.add(tunnel)
        if tunnel.token is not None:
            self._by_token.setdefault(tunnel.token, set()).add(tunnel)

    def _remove(self, tunnel: Tunnel) -> None:
        self.open.discard(tunnel)
        if tunnel.token is not None:
            same = self._by_token.get(tunnel.token)
            if same is not None:
                same.discard(tunnel)
                if not same:
                    del self._by_token[tunnel.token]

    async def run(self, client: ClientConnection, upstream: Upstream, tls: UpstreamTlsConfig | None, head: bytes,
                  settings: WebSocketConfig, identity: Identity | None, timeouts: tuple[float, float], request_id: str,
                  send: Any) -> tuple[int, str]:
        """Forward the handshake `head`; on a `101`, splice until the tunnel ends. Returns the status the client
        got and why the tunnel ended (or "" when the upstream refused the upgrade: its answer was relayed)."""
        if len(self.open) >= self.limit:
            raise TooManyTunnels(f"this sidecar already holds {self.limit} WebSocket connections; retry later")
        connect_timeout, read_timeout = timeouts
        upstream_side = await _connect(upstream, self.tls_for(upstream, tls) if upstream.scheme == "https" else None,
                                       connect_timeout)
        connection = upstream_side.transport
        assert connection is not None  # set by connection_made before create_connection returns
        try:
            connection.write(head)
            status, headers, rest = await upstream_side.reply(read_timeout)
        except BaseException:
            connection.abort()
            raise
        if status != 101:
            connection.close()
            headers = [(k, v) for k, v in headers if k not in HOP_BY_HOP and k != b"content-length"]
            headers.append((b"x-request-id", request_id.encode()))
            headers.append((b"content-length", b"%d" % len(rest)))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": rest})
            return status, ""
        if len(self.open) >= self.limit:  # others were opened while this one waited for its upstream
            connection.abort()
            raise TooManyTunnels(f"this sidecar already holds {self.limit} WebSocket connections; retry later")
        token = identity.claims.get("token_hash") if identity is not None else None
        tunnel = Tunnel(self, upstream_side, settings, str(token) if token else None)
        client_transport, early = client.take_over(lambda: tunnel.close("shutting_down"))
        self._add(tunnel)
        try:
            reply = [b"HTTP/1.1 101 Switching Protocols\r\n"]
            reply += [b"%s: %s\r\n" % (k, v) for k, v in headers]
            reply.append(b"x-request-id: %s\r\n\r\n" % request_id.encode())
            client_transport.write(b"".join(reply))
            tunnel.start(client_transport, early, rest)
            return 101, await tunnel.closed
        finally:
            tunnel.close("cancelled")
            self._remove(tunnel)
            client.release()


async def _connect(upstream: Upstream, tls: UpstreamTlsContext | None, timeout: float) -> UpstreamSide:
    return await open_connection(UpstreamSide, upstream.host, upstream.port, tls, timeout)


class _Side(asyncio.Protocol):
    """One socket of a tunnel: what it reads is written to the peer; it pauses the peer when it cannot write."""

    tunnel: Tunnel | None = None
    peer: asyncio.Transport | None = None
    transport: asyncio.Transport | None = None
    to_client = False  # the direction of what this side reads (for the byte counters)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is None or self.peer is None:
            return
        tunnel.last_read = tunnel.loop.time()
        self.peer.write(data)
        if self.to_client:
            tunnel.registry.to_client += len(data)
        else:
            tunnel.registry.to_upstream += len(data)

    def eof_received(self) -> bool | None:
        if self.tunnel is not None:
            self.tunnel.close("closed_by_" + ("upstream" if self.to_client else "client"))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.tunnel is not None:
            self.tunnel.close("closed_by_" + ("upstream" if self.to_client else "client"))

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and not self.peer.is_closing():
            self.peer.resume_reading()


class ClientSide(_Side):
    pass


class UpstreamSide(_Side):
    """The upstream's socket: first the reply to the handshake (parsed by httptools), then the tunnel."""

    to_client = True

    def __init__(self) -> None:
        self.parser: Any = httptools.HttpResponseParser(self)
        self.head_size = 0
        self.headers: Headers = []
        self.body: list[bytes] = []
        self.size = 0
        self.waiter: asyncio.Future[tuple[int, Headers, bytes]] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            super().data_received(data)
            return
        if self.waiter.done():
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:  # a 101: what follows its head is the upstream's first bytes
            if self.transport is not None:
                self.transport.pause_reading()  # until the tunnel is spliced
            self._done(101, data[upgrade.args[0]:])
            return
        except httptools.HttpParserError:
            self._fail(UpstreamUnavailable("the upstream sent a malformed reply to the WebSocket handshake"))
            return
        self.head_size += len(data)
        if not self.headers and self.head_size > MAX_REPLY_HEAD:
            self._fail(UpstreamUnavailable("the upstream's reply head is too large"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > MAX_REFUSAL_BODY:
            self._fail(UpstreamUnavailable("the upstream refused the WebSocket upgrade with too large a reply"))
        else:
            self.body.append(body)

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if status == 101:
            return  # the upgrade exception follows (or the connection is misused: the 101 is then never seen)
        self._done(status, b"".join(self.body))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.tunnel is not None:
            super().connection_lost(exc)
        else:
            self._fail(UpstreamUnavailable("the upstream closed the connection during the WebSocket handshake"))

    def _done(self, status: int, rest: bytes) -> None:
        if not self.waiter.done():
            self.waiter.set_result((status, self.headers, rest))

    def _fail(self, error: Exception) -> None:
        if not self.waiter.done():
            self.waiter.set_exception(error)
        if self.transport is not None:
            self.transport.abort()

    async def reply(self, timeout: float) -> tuple[int, Headers, bytes]:
        try:
            return await asyncio.wait_for(asyncio.shield(self.waiter), timeout)
        except TimeoutError:
            raise UpstreamTimeout("the upstream did not answer the WebSocket handshake in time") from None


class Tunnel:
    """Two sockets spliced both ways; `closed` resolves with why it ended."""

    def __init__(self, registry: Tunnels, upstream: UpstreamSide, settings: WebSocketConfig,
                 token: str | None) -> None:
        self.registry = registry
        self.loop = asyncio.get_running_loop()
        self.upstream = upstream
        self.client = ClientSide()
        self.settings = settings
        self.token = token
        self.closed: asyncio.Future[str] = self.loop.create_future()
        self.started = self.last_read = self.loop.time()
        self._timer: asyncio.TimerHandle | None = None

    def start(self, client_transport: asyncio.Transport, early: bytes, rest: bytes) -> None:
        if client_transport.is_closing():  # the client left while its handshake was decided
            self.close("closed_by_client")
            return
        client, upstream = self.client, self.upstream
        assert upstream.transport is not None  # connected: _connect returned it
        client.transport = client_transport
        client.peer, upstream.peer = upstream.transport, client_transport
        client.tunnel = upstream.tunnel = self
        client_transport.set_protocol(client)
        if early:
            client.data_received(early)
        if rest:
            upstream.data_received(rest)
        client_transport.resume_reading()
        upstream.transport.resume_reading()
        self._arm()

    def _arm(self) -> None:
        settings = self.settings
        deadline = self.last_read + settings.idle_timeout
        if settings.max_lifetime is not None:
            deadline = min(deadline, self.started + settings.max_lifetime)
        self._timer = self.loop.call_at(deadline, self._check)

    def _check(self) -> None:
        now = self.loop.time()
        if self.settings.max_lifetime is not None and now >= self.started + self.settings.max_lifetime:
            self.close("max_lifetime")
        elif now >= self.last_read + self.settings.idle_timeout:
            self.close("idle_timeout")
        else:
            self._arm()

    def close(self, why: str) -> None:
        if self.closed.done():
            return
        self.closed.set_result(why)
        if self._timer is not None:
            self._timer.cancel()
        for side in (self.client, self.upstream):
            side.tunnel = None
            if side.transport is not None:
                side.transport.close()  # what is already buffered is still sent
