"""The httptools pool never hands the upstream a connection out of step: a connection goes back to the pool only
when its request was written whole and its reply read whole (see `Connection` in
proxy/transports/httptools_pool.py). Each test drives
`PoolTransport` against a real upstream on loopback (`pool_support.ScriptedUpstream`, strict h11 parsing, or a raw
socket server where the upstream itself must misbehave) and asserts on what the upstream parsed and what each
caller got back."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from pool_support import Plan, ScriptedUpstream, reply_body

from sidecar.errors import UpstreamTimeout, UpstreamUnavailable
from sidecar.proxy.transports.base import Upstream
from sidecar.proxy.transports.httptools_pool import HIGH_WATER, PoolTransport

HOST = [(b"host", b"backend")]


@pytest.fixture
async def strict() -> AsyncIterator[ScriptedUpstream]:
    upstream = await ScriptedUpstream().start()
    yield upstream
    await upstream.stop()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_upstream(handler: Handler) -> AsyncIterator[list[bytes]]:
    """A raw socket upstream for misbehaviour h11 would not produce; yields the list of request heads it read."""
    heads: list[bytes] = []
    tasks: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            heads.append(await reader.readuntil(b"\r\n\r\n"))
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the test is over, or the pool closed the connection
        finally:
            writer.close()

    def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(serve(reader, writer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    heads.append(b"%d" % server.sockets[0].getsockname()[1])  # heads[0]: the port
    try:
        yield heads
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


def pool_for(port: int, read_timeout: float = 2.0, **kw: int) -> PoolTransport:
    return PoolTransport(Upstream("http", "127.0.0.1", port, ""), connect_timeout=1.0, read_timeout=read_timeout, **kw)


async def call(pool: PoolTransport, method: str, target: str, body: object = None,
               headers: list[tuple[bytes, bytes]] | None = None) -> tuple[int, dict[bytes, bytes], bytes]:
    response = await pool.send(method, target.encode(), list(headers or HOST), body)  # type: ignore[arg-type]
    try:
        data = b"".join([chunk async for chunk in response.body()])
    finally:
        await response.aclose()
    return response.status, dict(response.headers), data


async def test_early_answer_mid_body_does_not_smuggle_the_next_request(strict: ScriptedUpstream) -> None:
    """An upstream answers before the request body has been forwarded and keeps the connection: the next request
    through the pool is parsed as itself, not as the rest of that body (its own body is never run as a request)."""
    pool = pool_for(strict.port)
    smuggled = b"GET /admin/secret HTTP/1.1\r\nhost: backend\r\nx-auth-subject: admin\r\ncontent-length: 0\r\n\r\n"
    next_head = b"POST /next HTTP/1.1\r\nhost: backend\r\ncontent-length: %d\r\n\r\n" % len(smuggled)
    first_part = b"0123456789"
    early = Plan(when="early").path("first")

    async def slow_body() -> AsyncIterator[bytes]:
        yield first_part
        await asyncio.sleep(0.2)  # the upstream has answered by now
        yield b"x" * len(next_head)

    declared = [*HOST, (b"content-length", b"%d" % (len(first_part) + len(next_head)))]
    assert await call(pool, "POST", early, slow_body(), declared) == (200, {
        b"x-echo": early.encode(), b"content-length": b"%d" % len(reply_body(early))}, reply_body(early))
    status, headers, body = await call(pool, "POST", "/next", smuggled)
    await asyncio.sleep(0.1)
    await pool.aclose()

    assert (status, headers[b"x-echo"], body) == (200, b"/next", reply_body("/next"))
    assert strict.requests() == [("POST", early), ("POST", "/next")]
    first, second = strict.parsed
    assert not first.complete and first_part.startswith(first.body)
    assert second.complete and second.body == smuggled
    assert strict.garbage == []


async def test_body_shorter_than_its_content_length_is_not_reused(strict: ScriptedUpstream) -> None:
    """A streamed body that ends before its declared length is never followed by another request on that
    connection: the upstream would read that request as the missing bytes."""
    pool = pool_for(strict.port)
    early = Plan(when="early").path("short")

    async def short_body() -> AsyncIterator[bytes]:
        yield b"only-a-bit"

    declared = [*HOST, (b"content-length", b"200")]
    assert (await call(pool, "POST", early, short_body(), declared))[0] == 200
    assert (await call(pool, "POST", "/next", b"next-body"))[2] == reply_body("/next")
    await pool.aclose()
    assert strict.requests() == [("POST", early), ("POST", "/next")]
    assert strict.parsed[1].complete and strict.parsed[1].body == b"next-body"
    assert strict.garbage == []


async def test_body_longer_than_its_content_length_is_refused(strict: ScriptedUpstream) -> None:
    """A streamed body longer than its declared length is a 502 before the excess is written: the excess never
    reaches the upstream as a request of its own."""
    pool = pool_for(strict.port)
    smuggled = b"GET /admin/secret HTTP/1.1\r\nhost: backend\r\n\r\n"

    async def long_body() -> AsyncIterator[bytes]:
        yield b"12345"
        yield smuggled

    with pytest.raises(UpstreamUnavailable):
        await call(pool, "POST", "/a", long_body(), [*HOST, (b"content-length", b"5")])
    assert (await call(pool, "GET", "/after"))[2] == reply_body("/after")
    await pool.aclose()
    assert strict.requests() == [("POST", "/a"), ("GET", "/after")]
    assert strict.parsed[0].body == b"12345"


@pytest.mark.parametrize("lengths", [[b"5", b"5"], [b"5, 5"], [b"+5"], [b"0x5"]])
async def test_a_streamed_body_with_an_ambiguous_length_is_refused(
    strict: ScriptedUpstream, lengths: list[bytes],
) -> None:
    """A streamed body whose Content-Length a backend could read two ways is a 502 before anything is sent."""
    pool = pool_for(strict.port)

    async def body() -> AsyncIterator[bytes]:
        yield b"12345"

    with pytest.raises(UpstreamUnavailable):
        await call(pool, "POST", "/a", body(), [*HOST, *((b"content-length", v) for v in lengths)])
    await pool.aclose()
    await asyncio.sleep(0.05)
    assert strict.parsed == []


async def test_the_pool_frames_a_body_it_holds_itself(strict: ScriptedUpstream) -> None:
    """A caller's Content-Length that disagrees with the bytes given is replaced: the upstream reads one request
    with the whole body."""
    pool = pool_for(strict.port)
    body = b"abc" + b"GET /admin/secret HTTP/1.1\r\nhost: backend\r\n\r\n"
    assert (await call(pool, "POST", "/a", body, [*HOST, (b"content-length", b"3")]))[2] == reply_body("/a")
    assert (await call(pool, "GET", "/b"))[2] == reply_body("/b")
    await pool.aclose()
    assert strict.requests() == [("POST", "/a"), ("GET", "/b")]
    assert strict.parsed[0].body == body


@pytest.mark.parametrize("how", ["cancelled", "body-raised"])
async def test_a_body_broken_off_closes_the_connection(strict: ScriptedUpstream, how: str) -> None:
    """A request whose body iterator raises (the client went away) or whose task is cancelled mid-body releases its
    slot and its connection; the next request is parsed as itself."""
    pool = pool_for(strict.port, max_connections=1)
    assert (await call(pool, "GET", "/warm"))[0] == 200

    async def broken_body() -> AsyncIterator[bytes]:
        yield b"part-one"
        await asyncio.sleep(0.1 if how == "body-raised" else 10)
        raise ConnectionResetError("the client went away")

    task = asyncio.ensure_future(call(pool, "POST", "/broken", broken_body(), [*HOST, (b"content-length", b"99")]))
    await asyncio.sleep(0.05)
    if how == "cancelled":
        task.cancel()
    with pytest.raises((asyncio.CancelledError, ConnectionResetError)):
        await task
    assert (await asyncio.wait_for(call(pool, "POST", "/next", b"n"), 2))[2] == reply_body("/next")
    await pool.aclose()
    await asyncio.sleep(0.05)
    assert strict.requests() == [("GET", "/warm"), ("POST", "/broken"), ("POST", "/next")]
    assert not strict.parsed[1].complete and strict.parsed[2].body == b"n"
    assert strict.garbage == []


async def test_a_request_the_upstream_may_have_run_is_not_sent_twice(strict: ScriptedUpstream) -> None:
    """A POST on a kept-alive connection that the upstream closes after reading it, without a reply, is a 502 and
    is not retried (RFC 9112 §9.3.1); a GET in the same case is retried once."""
    pool = pool_for(strict.port)
    assert (await call(pool, "GET", "/warm"))[0] == 200
    drop = Plan(when="drop").path("post")
    with pytest.raises(UpstreamUnavailable):
        await call(pool, "POST", drop, b"charge-once")
    assert (await call(pool, "GET", "/warm"))[0] == 200
    get_drop = Plan(when="drop").path("get")
    with pytest.raises(UpstreamUnavailable):
        await call(pool, "GET", get_drop)
    await pool.aclose()
    assert strict.requests() == [("GET", "/warm"), ("POST", drop), ("GET", "/warm"), ("GET", get_drop),
                                 ("GET", get_drop)]


async def test_a_stale_read_timer_never_fires_on_the_next_request(strict: ScriptedUpstream) -> None:
    """A reply that arrives while the body is still being sent leaves no read timer behind: a slow upload that
    follows on the same connection is not cut off by the previous request's timeout."""
    pool = pool_for(strict.port, read_timeout=0.5)
    early = Plan(when="early").path("timer")

    async def body(parts: int, pause: float) -> AsyncIterator[bytes]:
        for _ in range(parts):
            yield b"0123456789"
            await asyncio.sleep(pause)

    assert (await call(pool, "POST", early, body(1, 0.2), [*HOST, (b"content-length", b"10")]))[0] == 200
    started = time.monotonic()
    assert (await call(pool, "POST", "/slow-upload", body(6, 0.15), [*HOST, (b"content-length", b"60")]))[0] == 200
    assert time.monotonic() - started > 0.75  # longer than the read timeout, and never cut off
    await pool.aclose()
    assert [p.connection for p in strict.parsed] == [0, 0]  # the same connection: the first one was reusable


async def test_a_second_reply_in_the_same_read_is_never_the_next_requests_reply() -> None:
    """Bytes after a complete reply (here a second reply sent at once) close the connection: the first caller gets
    the first reply, the next caller its own."""
    async def two_replies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirstHTTP/1.1 403 Forbidden\r\nX-Forged: 1\r\n"
                     b"Content-Length: 6\r\n\r\nforged")
        await writer.drain()
        while await reader.readuntil(b"\r\n\r\n"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nlater")

    async with raw_upstream(two_replies) as heads:
        pool = pool_for(int(heads[0]))
        assert await call(pool, "GET", "/one") == (200, {b"content-length": b"5"}, b"first")
        assert await call(pool, "GET", "/two") == (200, {b"content-length": b"5"}, b"first")
        await pool.aclose()
    assert len(heads) == 3  # the port, then each request on a connection of its own


async def test_bytes_from_an_idle_connection_are_never_the_next_requests_reply() -> None:
    """A reply the upstream sends while its connection sits idle in the pool is dropped with the connection: the
    next request gets the reply to itself."""
    async def unsolicited(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Forged: 1\r\nContent-Length: 6\r\n\r\nforged")
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate")
        await writer.drain()

    async with raw_upstream(unsolicited) as heads:
        pool = pool_for(int(heads[0]))
        assert (await call(pool, "GET", "/one"))[2] == b"first"
        await asyncio.sleep(0.2)
        assert (await call(pool, "GET", "/two"))[2] == b"first"
        await pool.aclose()
    assert len(heads) == 3


async def test_an_upstream_that_answers_instead_of_reading_does_not_hang_the_upload() -> None:
    """An upstream that answers at once and never reads the (large) body: the caller gets that answer without
    waiting for the socket to drain, and the connection is not reused."""
    async def answer_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n\r\nbig")
        await writer.drain()
        await asyncio.sleep(5)  # keeps the connection open, reads nothing more

    async def large_body() -> AsyncIterator[bytes]:
        for _ in range(256):
            yield b"x" * 65536

    async with raw_upstream(answer_only) as heads:
        pool = pool_for(int(heads[0]), read_timeout=3)
        started = time.monotonic()
        assert await call(pool, "POST", "/upload", large_body()) == (413, {b"content-length": b"3"}, b"big")
        assert time.monotonic() - started < 2
        await pool.aclose()


async def test_an_upstream_that_never_reads_nor_answers_times_out() -> None:
    """An upstream that reads nothing of a large body and never answers: 504 after the read timeout, not a hang."""
    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    async def large_body() -> AsyncIterator[bytes]:
        for _ in range(256):
            yield b"x" * 65536

    async with raw_upstream(deaf) as heads:
        pool = pool_for(int(heads[0]), read_timeout=0.5)
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            await call(pool, "POST", "/upload", large_body())
        assert time.monotonic() - started < 2
        await pool.aclose()


async def test_a_whole_reply_left_unread_leaves_the_connection_usable() -> None:
    """A reply that arrived whole but was not consumed (the caller gave up on it, reading paused on a large body)
    does not stall the next request on that connection."""
    big = b"y" * (HIGH_WATER + 1)  # reading pauses exactly when the last byte arrives: whole, and paused

    async def large_replies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(big), big))
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext")
        await writer.drain()
        await asyncio.sleep(1)

    async with raw_upstream(large_replies) as heads:
        pool = pool_for(int(heads[0]), read_timeout=1)
        response = await pool.send("GET", b"/big", list(HOST), None)
        await asyncio.sleep(0.2)  # the whole reply arrives, and is never read
        await response.aclose()
        assert (await call(pool, "GET", "/next"))[2] == b"next"
        await pool.aclose()
    assert len(heads) == 2  # one connection, reused
