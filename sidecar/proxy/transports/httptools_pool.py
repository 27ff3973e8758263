"""A small HTTP/1.1 keep-alive connection pool on httptools (the parser uvicorn uses): the forward path's
default transport. httpx costs ~0.5 ms of CPU per request on this path; this costs a tenth of that (bench/).

Scope, deliberately small: plain HTTP/1.1 to a configured upstream (https upstreams use httpx); request
bodies as bytes, or streamed with their Content-Length, or chunked; responses streamed with back-pressure.
Replies the parser rejects, oversized headers and broken connections map to 502, silence to 504. A request
whose idle connection turns out to be closed by the upstream is retried once on a new connection when its
body can be sent again (nothing of a reply was received yet)."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from typing import Any

import httptools

from sidecar.errors import UpstreamTimeout, UpstreamUnavailable
from sidecar.proxy.transports.base import RESPONSE_HOP_BY_HOP, Body, Headers, Upstream

MAX_HEADER_BYTES = 64 * 1024
MAX_HEADERS = 256
HIGH_WATER = 256 * 1024


class _StaleConnection(Exception):
    """The upstream closed a kept-alive connection before answering: safe to retry on a fresh one."""


class Connection(asyncio.Protocol):
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
        "keep_alive",
        "loop",
        "parser",
        "pool",
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
        self.reset()

    def reset(self) -> None:
        self.status = 0
        self.headers: Headers = []
        self._header_bytes = 0
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

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_data = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamUnavailable("the upstream switched protocols"))
        except httptools.HttpParserError:
            self._fail(UpstreamUnavailable("the upstream sent a malformed reply"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.forget(self)
        self.transport = None
        if not self.complete and self.until_close:
            self.complete = True  # a reply delimited by the connection closing (RFC 9112 §6.3, last rule)
            self._wake()
        if not self.complete:
            error: Exception = (
                _StaleConnection() if not self.got_data else UpstreamUnavailable("the upstream closed the connection")
            )
            self._fail(error)
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(UpstreamUnavailable("the upstream closed the connection"))

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES or len(self.headers) >= MAX_HEADERS:
            raise httptools.HttpParserError("oversized headers")
        name = name.lower()
        if name == b"transfer-encoding":
            self.until_close = False  # framed by chunks, not by the connection closing
            self._framed = True
        if name not in RESPONSE_HOP_BY_HOP:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # interim reply (e.g. 100 Continue): the real one follows
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

    def _fail(self, error: Exception) -> None:
        self._cancel_timer()
        if self._error is None:
            self._error = error
        if not self._headers_waiter.done():
            self._headers_waiter.set_exception(error)
            self._headers_waiter.exception()  # retrieved here; raised again by the waiter
        self._wake()
        if self.transport is not None:
            self.transport.close()

    def _arm_timer(self, seconds: float) -> None:
        self._cancel_timer()
        self._timer = self.loop.call_later(seconds, self._fail, UpstreamTimeout("the upstream did not answer in time"))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def write(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise self._error or _StaleConnection()
        self.transport.write(data)
        if self._paused:
            self._drain_waiter = self.loop.create_future()
            await self._drain_waiter

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
        if self.transport is not None:
            self.transport.close()
            self.transport = None


class PoolResponse:
    __slots__ = ("_conn", "_done", "_keep", "_pool", "headers", "status")

    def __init__(self, pool: PoolTransport, conn: Connection, keep: bool) -> None:
        self._pool = pool
        self._conn = conn
        self._keep = keep
        self._done = False
        self.status = conn.status
        self.headers = conn.headers

    async def body(self) -> AsyncIterator[bytes]:
        conn = self._conn
        read_timeout = self._pool.read_timeout
        while True:
            chunk = await conn.next_chunk(read_timeout)
            if chunk is None:
                self._done = True
                return
            yield chunk

    async def aclose(self) -> None:
        conn = self._conn
        reusable = self._keep and self._done and conn.complete and conn.keep_alive
        self._pool.release(conn, reusable)


class PoolTransport:
    def __init__(self, upstream: Upstream, connect_timeout: float, read_timeout: float,
                 max_connections: int = 1024, max_idle: int = 256) -> None:
        self.upstream = upstream
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle
        self._idle: collections.deque[Connection] = collections.deque()
        self._slots = asyncio.Semaphore(max_connections)
        self._host_header = f"{upstream.host}:{upstream.port}".encode()
        self.loop: Any = None

    def forget(self, conn: Connection) -> None:
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    def release(self, conn: Connection, reusable: bool) -> None:
        self._slots.release()
        if reusable and conn.transport is not None and len(self._idle) < self.max_idle:
            conn.reset()
            self._idle.append(conn)
        else:
            conn.close()

    async def _connect(self) -> Connection:
        loop = self.loop
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: Connection(self), self.upstream.host, self.upstream.port),
                self.connect_timeout,
            )
        except TimeoutError:
            raise UpstreamTimeout("the upstream did not accept a connection in time") from None
        except OSError:
            raise UpstreamUnavailable("the upstream could not be reached") from None
        return conn

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
        head, chunked = _request_head(method, target, headers, body, self._host_header)
        replayable = body is None or isinstance(body, bytes)
        for attempt in (1, 2):
            conn = self._idle.pop() if self._idle else None
            fresh = conn is None
            if conn is None:
                conn = await self._connect()
            try:
                await self._write_request(conn, head, body, chunked)
                conn._arm_timer(self.read_timeout)
                await conn._headers_waiter
            except _StaleConnection:
                conn.close()
                if fresh or not replayable or attempt == 2:
                    raise UpstreamUnavailable("the upstream closed the connection") from None
                continue
            except BaseException:
                conn.close()
                raise
            keep = method != "HEAD"  # httptools cannot be told a HEAD reply has no body: close after it
            if not keep:
                conn.complete = True
            return PoolResponse(self, conn, keep)
        raise UpstreamUnavailable("the upstream closed the connection")  # pragma: no cover

    async def _write_request(self, conn: Connection, head: bytes, body: Body, chunked: bool) -> None:
        if body is None or isinstance(body, bytes):
            await conn.write(head + (body or b""))
            return
        await conn.write(head)
        async for chunk in body:
            if conn._headers_waiter.done():
                break  # the upstream answered before the whole body was sent; stop sending
            if chunk:
                await conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
        if chunked and not conn._headers_waiter.done():
            await conn.write(b"0\r\n\r\n")

    async def aclose(self) -> None:
        while self._idle:
            self._idle.pop().close()


def _request_head(method: str, target: bytes, headers: Headers, body: Body, host: bytes) -> tuple[bytes, bool]:
    lines = [b"%s %s HTTP/1.1\r\n" % (method.encode("ascii"), target)]
    has_host = has_length = False
    for name, value in headers:
        if name == b"host":
            has_host = True
        elif name == b"content-length":
            has_length = True
        lines.append(b"%s: %s\r\n" % (name, value))
    if not has_host:
        lines.append(b"host: %s\r\n" % host)
    chunked = False
    if isinstance(body, bytes):
        if not has_length:
            lines.append(b"content-length: %d\r\n" % len(body))
    elif body is not None and not has_length:
        lines.append(b"transfer-encoding: chunked\r\n")
        chunked = True
    lines.append(b"\r\n")
    return b"".join(lines), chunked
