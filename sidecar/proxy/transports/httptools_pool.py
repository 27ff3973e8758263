"""A small HTTP/1.1 keep-alive connection pool on httptools (the parser uvicorn uses): the forward path's
default transport. httpx costs ~0.5 ms of CPU per request on this path; this costs a tenth of that (bench/).

Scope, deliberately small: HTTP/1.1 to a configured upstream, plain or over TLS (`upstream_tls`: the TLS layer is
asyncio's, under the same protocol, and a kept-alive connection keeps its TLS session); request bodies as bytes, or
streamed with their Content-Length, or chunked; responses streamed with back-pressure. Replies the parser rejects,
oversized headers and broken connections map to 502, silence to 504. A request whose kept-alive connection turns
out to be closed by the upstream before any byte of a reply is retried once on a new connection, when its body can
be sent again and its method is idempotent (RFC 9112 §9.3.1: a POST the upstream may have run is never sent twice).

A connection is reused only when it is known to be between two messages (see `Connection`): HTTP/1.1 has no
message ids, so a pool that reuses a connection whose request body was cut short makes the upstream read the
next request as the rest of that body, and the body of the next as a request of its own (request smuggling)."""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httptools

from sidecar.errors import UpstreamTimeout, UpstreamUnavailable
from sidecar.proxy.transports.base import HOP_BY_HOP, Body, Headers, Upstream
from sidecar.proxy.transports.tls import UpstreamTlsContext, open_connection, tls_refusal

if TYPE_CHECKING:
    from sidecar.config.model import UpstreamTlsConfig

MAX_HEADER_BYTES = 64 * 1024
MAX_HEADERS = 256
HIGH_WATER = 256 * 1024
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})  # RFC 9110 §9.2.2
# Request fields the pool reads while writing the head: the framing it owns, and the request's own keep-alive.
_HEAD_FIELDS = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection"})


_CLOSED_AFTER_HANDSHAKE = ("the upstream closed a new TLS connection before answering; if it requires a client "
                           "certificate, check upstream_tls cert_file and key_file")


class _StaleConnection(Exception):
    """The upstream closed a kept-alive connection before answering: safe to retry on a fresh one. On a fresh TLS
    connection the TLS error that closed it, if any, is `tls_error` (TLS 1.3 servers refuse a client certificate
    after the handshake, on the first read)."""

    def __init__(self, tls_error: ssl.SSLError | None = None) -> None:
        super().__init__()
        self.tls_error = tls_error


class Connection(asyncio.Protocol):
    """One upstream connection, carrying one request at a time.

    Its life: connected → busy (the request written, the reply read) → released, then either idle in the pool
    or closed; an idle connection becomes busy again, or is closed (by either side). HTTP/1.1 frames each message
    by its own headers and nothing else: the upstream reads the next request where it believes the last one
    ended, and this parser reads the next reply where it believes the last one ended. So the invariant is:

        A connection is in the idle pool only if its last request was handed to the socket whole and exactly as
        its head framed it (`sent`), its final reply ended by its own framing (`complete`, not by the connection
        closing), neither side asked to close and the reply is one httptools can frame (`keep_alive`, false for
        HEAD), no error was seen (`_error`: timeout, malformed reply, a byte beyond the reply, closed), and its
        socket is open. `reusable()` checks exactly that; every other state ends in `close()`.

    The states that end in `close()`, each of which once could leave the two ends out of step: a body stopped
    because the upstream answered first (or a 100-continue refused with a final status); a body iterator that
    raised or was cancelled (client gone); a write that failed or timed out; a reply not read to its end (the
    gateway gave up, the client left, a read timeout); a reply delimited by the connection closing; a HEAD
    reply; bytes after the final reply, or any byte while idle (they would be read as the next request's reply).
    Interim 1xx replies are skipped by the parser and never end a request.
    """

    __slots__ = (
        "_body_bytes",
        "_body_waiter",
        "_chunks",
        "_drain_waiter",
        "_error",
        "_framed",
        "_header_bytes",
        "_headers_waiter",
        "_paused",
        "_paused_reading",
        "_timer",
        "complete",
        "got_data",
        "headers",
        "idle",
        "keep_alive",
        "loop",
        "parser",
        "pool",
        "request_keep_alive",
        "sent",
        "status",
        "transport",
        "until_close",
    )

    def __init__(self, pool: PoolTransport) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self._drain_waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._paused_reading = False
        self._timer: asyncio.TimerHandle | None = None
        self.idle = False
        self.reset()

    def reset(self) -> None:
        """Ready for the next request; called only on a connection that is `reusable()`."""
        self.status = 0
        self.headers: Headers = []
        self._header_bytes = 0
        self.sent = False
        self.request_keep_alive = False
        self.complete = False
        self.keep_alive = False
        self.until_close = False
        self._framed = False
        self.got_data = False
        self._error: Exception | None = None
        self._headers_waiter: asyncio.Future[None] = self.loop.create_future()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._body_bytes = 0
        self._body_waiter: asyncio.Future[None] | None = None
        self._cancel_timer()
        if self._paused_reading and self.transport is not None:  # a reply left unread, though whole on the wire
            self.transport.resume_reading()
            self._paused_reading = False

    def reusable(self) -> bool:
        transport = self.transport
        return (self.sent and self.complete and self.keep_alive and self.request_keep_alive and self._error is None
                and transport is not None and not transport.is_closing())

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.idle or self.complete:
            # Nothing is owed after the final reply: these bytes would be read as the next request's reply.
            if self.idle:
                self.idle = False
                self.pool.forget(self)
            self._fail(UpstreamUnavailable("the upstream sent bytes beyond its reply"))
            return
        self.got_data = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamUnavailable("the upstream switched protocols"))
        except httptools.HttpParserError:  # also raised from on_message_begin after the final reply
            self._fail(UpstreamUnavailable("the upstream sent a malformed reply"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.forget(self)
        self.idle = False
        self.transport = None
        if not self.complete and self.until_close:
            self.complete = True  # a reply delimited by the connection closing (RFC 9112 §6.3, last rule)
            self._wake()
        if not self.complete:
            error: Exception = (
                _StaleConnection(exc if isinstance(exc, ssl.SSLError) else None) if not self.got_data
                else UpstreamUnavailable("the upstream closed the connection")
            )
            self._fail(error)
        self._release_writer(UpstreamUnavailable("the upstream closed the connection"))

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._release_writer(None)

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self.complete:  # a second reply in the same read: never parse it into this one's status and headers
            raise httptools.HttpParserError("bytes beyond the reply")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES or len(self.headers) >= MAX_HEADERS:
            raise httptools.HttpParserError("oversized headers")
        name = name.lower()
        if name == b"transfer-encoding":
            self.until_close = False  # framed by chunks, not by the connection closing
            self._framed = True
        if name not in HOP_BY_HOP:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # interim reply (100 Continue, 103 Early Hints): the real one follows
            self.headers = []
            self._framed = False
            self._header_bytes = 0
            return
        self.status = status
        # llhttp answers should_keep_alive() reliably only here, not after the message completes.
        self.keep_alive = self.parser.should_keep_alive()
        framed = self._framed or any(name == b"content-length" for name, _ in self.headers)
        self.until_close = not framed and status not in (204, 304)
        self._cancel_timer()
        if not self._headers_waiter.done():
            self._headers_waiter.set_result(None)
        if self._drain_waiter is not None:  # a write waiting on an upstream that answered instead of reading: stop
            self._release_writer(None)

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._body_bytes += len(body)
        if self._body_bytes > HIGH_WATER and self.transport is not None and not self._paused_reading:
            self.transport.pause_reading()
            self._paused_reading = True
        self._wake()

    def on_message_complete(self) -> None:
        if self.status == 0:
            return  # the end of an interim reply
        self.complete = True
        self._wake()

    # used by the pool and the response
    def _wake(self) -> None:
        waiter = self._body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _release_writer(self, error: Exception | None) -> None:
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)

    def _fail(self, error: Exception) -> None:
        self._cancel_timer()
        if self._error is None:
            self._error = error
        if not self._headers_waiter.done():
            self._headers_waiter.set_exception(error)
            self._headers_waiter.exception()  # retrieved here; raised again by the waiter
        self._wake()
        self._release_writer(error)
        if self.transport is not None:
            self.transport.abort()  # not close(): that would wait for an upstream that may never read again

    def _arm_timer(self, seconds: float) -> None:
        self._cancel_timer()
        self._timer = self.loop.call_later(seconds, self._timed_out)

    def _timed_out(self) -> None:
        self._fail(UpstreamTimeout("the upstream did not answer in time"))  # made here, not per request when armed

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def write(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            if self._error is None and self._headers_waiter.done():
                return  # answered, then closed by the upstream: the rest of the request is moot (never reused)
            raise self._error or _StaleConnection()
        self.transport.write(data)
        if self._paused and not self._headers_waiter.done():
            # The upstream is not reading: wait, but not forever, and not past its answer (on_headers_complete).
            self._drain_waiter = self.loop.create_future()
            self._arm_timer(self.pool.read_timeout)
            try:
                await self._drain_waiter
            finally:
                self._cancel_timer()

    async def next_chunk(self, read_timeout: float) -> bytes | None:
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._body_bytes -= len(chunk)
                if self._paused_reading and self._body_bytes < HIGH_WATER // 2 and self.transport is not None:
                    self.transport.resume_reading()
                    self._paused_reading = False
                return chunk
            if self.complete:
                return None
            if self._error is not None:
                raise self._error if not isinstance(self._error, _StaleConnection) else UpstreamUnavailable(
                    "the upstream closed the connection")
            self._body_waiter = self.loop.create_future()
            self._arm_timer(read_timeout)
            try:
                await self._body_waiter
            finally:
                self._body_waiter = None
                self._cancel_timer()

    def close(self) -> None:
        self._cancel_timer()
        self.idle = False
        if self.transport is not None:
            self.transport.abort()  # whatever is still buffered belongs to a request that will not be completed
            self.transport = None


class PoolResponse:
    __slots__ = ("_conn", "_pool", "headers", "status")

    def __init__(self, pool: PoolTransport, conn: Connection) -> None:
        self._pool = pool
        self._conn: Connection | None = conn
        self.status = conn.status
        self.headers = conn.headers

    def body(self) -> AsyncIterator[bytes]:
        return _Body(self._conn, self._pool.read_timeout)

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:  # released once: a second aclose must not free a second slot
            self._pool.release(conn)


class _Body:
    """The reply body as an async iterator. A class, not an async generator: the event loop registers every async
    generator in a weak set (for shutdown_asyncgens) as it starts, a cost paid on every request."""

    __slots__ = ("_conn", "_read_timeout")

    def __init__(self, conn: Connection | None, read_timeout: float) -> None:
        self._conn = conn  # None: already released, and the connection may be carrying another request now
        self._read_timeout = read_timeout

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        if conn is not None:
            chunk = await conn.next_chunk(self._read_timeout)
            if chunk is not None:
                return chunk
            self._conn = None
        raise StopAsyncIteration


class PoolTransport:
    def __init__(self, upstream: Upstream, connect_timeout: float, read_timeout: float,
                 max_connections: int = 1024, max_idle: int = 256, *, tls: UpstreamTlsConfig | None = None) -> None:
        self.upstream = upstream
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle
        self._idle: collections.deque[Connection] = collections.deque()
        self._slots = asyncio.Semaphore(max_connections)
        self._host_header = f"{upstream.host}:{upstream.port}".encode()
        self.tls = UpstreamTlsContext(tls, upstream.host) if upstream.scheme == "https" else None
        self._closed = False
        self.loop: Any = None

    def forget(self, conn: Connection) -> None:
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    def release(self, conn: Connection) -> None:
        """Back to the pool if `conn.reusable()` (the whole invariant, from explicit state), else closed."""
        self._slots.release()
        if conn.reusable() and len(self._idle) < self.max_idle and not self._closed:
            conn.reset()
            conn.idle = True
            self._idle.append(conn)
        else:
            conn.close()

    async def _connect(self) -> Connection:
        return await open_connection(lambda: Connection(self), self.upstream.host, self.upstream.port, self.tls,
                                     self.connect_timeout)

    async def send(self, method: str, target: bytes, headers: Headers, body: Body) -> PoolResponse:
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        await self._slots.acquire()
        try:
            return await self._send(method, target, headers, body)
        except BaseException:
            self._slots.release()
            raise

    async def _send(self, method: str, target: bytes, headers: Headers, body: Body) -> PoolResponse:
        head, chunked, declared, close = _request_head(method, target, headers, body, self._host_header)
        retryable = (body is None or isinstance(body, bytes)) and method in IDEMPOTENT
        for attempt in (1, 2):
            conn = self._idle.pop() if self._idle else None
            fresh = conn is None
            if conn is None:
                conn = await self._connect()
            conn.idle = False
            # httptools cannot be told a HEAD reply has no body, so its parser would be left mid-message.
            conn.request_keep_alive = not close and method != "HEAD"
            try:
                await self._write_request(conn, head, body, chunked, declared)
                if not conn._headers_waiter.done():
                    conn._arm_timer(self.read_timeout)
                await conn._headers_waiter
            except _StaleConnection as stale:
                conn.close()
                if fresh and stale.tls_error is not None:
                    raise tls_refusal(stale.tls_error) from None
                if fresh and self.tls is not None:  # TLS 1.3: a client certificate is checked after
                    # the handshake, and a server may close without an alert
                    raise UpstreamUnavailable("the upstream closed the connection",
                                              detail=_CLOSED_AFTER_HANDSHAKE) from None
                if fresh or not retryable or attempt == 2:
                    raise UpstreamUnavailable("the upstream closed the connection") from None
                continue
            except BaseException:  # errors, timeouts, a body that raised, cancellation: the connection is spent
                conn.close()
                raise
            if method == "HEAD":
                conn.complete = True  # a HEAD reply ends with its head (RFC 9112 §6.3); nothing of a body is read
                conn._chunks.clear()
            return PoolResponse(self, conn)
        raise UpstreamUnavailable("the upstream closed the connection")  # pragma: no cover

    async def _write_request(self, conn: Connection, head: bytes, body: Body, chunked: bool,
                             declared: int | None) -> None:
        """Write the request. `conn.sent` is set only once all of it, exactly as its head frames it, was handed to
        the socket; a body stopped early (the upstream answered first) leaves it unset, so the connection is closed
        after the reply rather than reused."""
        if body is None or isinstance(body, bytes):
            await conn.write(head + body if body else head)
            conn.sent = body is not None or not declared  # a bodiless request with a length > 0 is never complete
            return
        await conn.write(head)
        answered = conn._headers_waiter
        left = declared
        async for chunk in body:
            if answered.done():
                return  # the upstream answered (or failed) before the whole body was sent: stop sending
            if chunk:
                if chunked:
                    await conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                else:
                    left -= len(chunk)  # type: ignore[operator]  # declared is set when not chunked
                    if left < 0:
                        raise UpstreamUnavailable("the request body is longer than its Content-Length")
                    await conn.write(chunk)
        if chunked:
            await conn.write(b"0\r\n\r\n")
        conn.sent = chunked or left == 0

    async def aclose(self) -> None:
        self._closed = True  # connections still busy are closed when released
        while self._idle:
            self._idle.pop().close()


def _request_head(method: str, target: bytes, headers: Headers, body: Body,
                  host: bytes) -> tuple[bytes, bool, int | None, bool]:
    """The request head, whether the pool chunks the body, the body length the head declares (None when chunked
    or absent), and whether the request asks to close. The pool frames the body itself: a body it holds gets its
    own Content-Length (a caller's would be trusted over the bytes sent), a stream without one is chunked."""
    lines = [b"%s %s HTTP/1.1\r\n" % (method.encode("ascii"), target)]
    has_host = close = False
    declared: int | None = None
    for name, value in headers:
        if name in _HEAD_FIELDS:
            if name == b"host":
                has_host = True
            elif name == b"content-length":
                if isinstance(body, bytes):
                    continue
                if declared is not None or not value.isdigit():  # two lengths, or one a backend may read otherwise
                    raise UpstreamUnavailable("the request's Content-Length is malformed")
                declared = int(value)
            elif name == b"transfer-encoding":
                continue  # the pool's own chunking, never a caller's
            else:
                close = close or b"close" in value.lower()
        lines.append(b"%s: %s\r\n" % (name, value))
    if not has_host:
        lines.append(b"host: %s\r\n" % host)
    chunked = False
    if isinstance(body, bytes):
        lines.append(b"content-length: %d\r\n" % len(body))
    elif body is not None and declared is None:
        lines.append(b"transfer-encoding: chunked\r\n")
        chunked = True
    lines.append(b"\r\n")
    return b"".join(lines), chunked, declared, close
