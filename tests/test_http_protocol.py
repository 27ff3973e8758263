"""The server protocol (sidecar/server/http_protocol.py) on its own: a real uvicorn server built by the runner's
`_uvicorn_config`, a small ASGI application, and raw sockets on loopback. The adversarial suite checks the framing
rules through the whole sidecar; these check the protocol's own states: pipelining, bad requests behind good ones,
`Expect: 100-continue`, the idle timeout, back-pressure, a failing application, and the Date rule."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from sidecar.server.runner import SignalFreeServer, _uvicorn_config
from sidecar.testing import free_port

App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


async def echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers with the method, the path and the whole body it read."""
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    answer = b"%s %s %s" % (scope["method"].encode(), scope["raw_path"], body)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"%d" % len(answer))]})
    await send({"type": "http.response.body", "body": answer})


@asynccontextmanager
async def serving(app: App, idle_timeout: float | None = None) -> AsyncIterator[tuple[str, int]]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", free_port()))
        listener.listen()
        config = _uvicorn_config(app, graceful=1.0)
        if idle_timeout is not None:
            config.timeout_keep_alive = idle_timeout  # type: ignore[assignment]
        server = SignalFreeServer(config)
        task = asyncio.ensure_future(server.serve(sockets=[listener]))
        while not server.started:
            await asyncio.sleep(0.01)
        try:
            yield listener.getsockname()[:2]
        finally:
            server.should_exit = True
            await task


async def read_all(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    return await asyncio.wait_for(reader.read(), timeout)


async def talk(address: tuple[str, int], data: bytes) -> bytes:
    """Send `data` on a new connection and read until the server closes it."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(data)
        return await read_all(reader)
    finally:
        writer.close()


def statuses(reply: bytes) -> list[int]:
    return [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", reply)]


def test_pipelined_requests_are_answered_in_order_each_with_its_own_body() -> None:
    async def run() -> bytes:
        async with serving(echo) as address:
            return await talk(address, b"POST /one HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
                         b"GET /two HTTP/1.1\r\nHost: a\r\n\r\n"
                         b"POST /three HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                         b"2\r\nxy\r\n0\r\n\r\n")

    reply = asyncio.run(run())
    assert statuses(reply) == [200, 200, 200]
    assert reply.index(b"POST /one abc") < reply.index(b"GET /two ") < reply.index(b"POST /three xy")
    assert reply.count(b"\r\ndate: ") == 3


def test_a_bad_request_behind_a_good_one_closes_the_connection_after_the_good_answer() -> None:
    seen: list[bytes] = []

    async def recording(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["raw_path"])
        await echo(scope, receive, send)

    async def run() -> bytes:
        async with serving(recording) as address:
            return await talk(address, b"GET /good HTTP/1.1\r\nHost: a\r\n\r\n"
                              b"GET /bad HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n"
                         b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n")

    reply = asyncio.run(run())
    assert statuses(reply)[0] == 200 and b"GET /good" in reply
    assert seen == [b"/good"]  # neither the bad request nor the one after it reached the application


def test_an_unparsable_request_is_a_400_with_one_date_and_the_connection_closes() -> None:
    async def run() -> bytes:
        async with serving(echo) as address:
            return await talk(address, b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab")

    reply = asyncio.run(run())
    assert statuses(reply) == [400]
    assert reply.lower().count(b"\r\ndate: ") == 1 and b"connection: close" in reply


def test_expect_100_continue_is_answered_when_the_application_reads_the_body() -> None:
    async def run() -> tuple[bytes, bytes]:
        async with serving(echo) as address:
            reader, writer = await asyncio.open_connection(*address)
            writer.write(b"PUT /up HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            writer.write(b"data")
            final = await asyncio.wait_for(reader.readuntil(b"PUT /up data"), 5)
            writer.close()
            return interim, final

    interim, final = asyncio.run(run())
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert final.startswith(b"HTTP/1.1 200 ")


def test_idle_connections_close_after_the_timeout_even_before_their_first_request() -> None:
    async def run() -> tuple[float, float, bytes]:
        async with serving(echo, idle_timeout=0.4) as address:
            silent_reader, silent = await asyncio.open_connection(*address)
            used_reader, used = await asyncio.open_connection(*address)
            started = time.monotonic()
            used.write(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
            await asyncio.wait_for(used_reader.readuntil(b"GET /x "), 5)
            await asyncio.sleep(0.2)  # activity moves the deadline: a second request, then silence
            used.write(b"GET /y HTTP/1.1\r\nHost: a\r\n\r\n")
            await asyncio.wait_for(used_reader.readuntil(b"GET /y "), 5)
            answered = time.monotonic()
            assert await read_all(silent_reader) == b""
            silent_closed = time.monotonic() - started
            assert await read_all(used_reader) == b""
            silent.close()
            used.close()
            return silent_closed, time.monotonic() - answered, b""

    silent_closed, used_closed, _ = asyncio.run(run())
    assert 0.3 < silent_closed < 2.0
    assert 0.3 < used_closed < 2.0


def test_a_slow_reader_pauses_the_application_instead_of_growing_memory() -> None:
    chunks_sent = 0

    async def big(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal chunks_sent
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(400):  # 400 x 64 KiB = 25 MiB, chunked
            await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
            chunks_sent += 1
        await send({"type": "http.response.body", "body": b""})

    async def run() -> tuple[int, int]:
        async with serving(big) as address:
            reader, writer = await asyncio.open_connection(*address, limit=2**16)
            writer.transport.set_write_buffer_limits(0)
            writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            writer.transport.pause_reading()  # type: ignore[attr-defined]
            await asyncio.sleep(0.5)
            while_paused = chunks_sent
            writer.transport.resume_reading()  # type: ignore[attr-defined]
            received = 0
            while received < 400 * 65536:
                data = await asyncio.wait_for(reader.read(2**20), 10)
                assert data
                received += len(data)
            writer.close()
            return while_paused, chunks_sent

    while_paused, total = asyncio.run(run())
    assert while_paused < 200, f"{while_paused} chunks were accepted while the client read nothing"
    assert total == 400


def test_an_application_that_fails_before_answering_gives_a_500_and_closes() -> None:
    async def failing(scope: dict[str, Any], receive: Any, send: Any) -> None:
        raise ValueError("boom")

    async def run() -> bytes:
        async with serving(failing) as address:
            return await talk(address, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")

    reply = asyncio.run(run())
    assert statuses(reply) == [500] and reply.endswith(b"Internal Server Error")


def test_a_response_head_with_a_control_character_is_never_written() -> None:
    async def splitting(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"x-split", b"a\r\nset-cookie: evil=1")]})

    async def run() -> bytes:
        async with serving(splitting) as address:
            return await talk(address, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")

    reply = asyncio.run(run())
    assert b"evil" not in reply and statuses(reply) == [500]


def test_head_and_204_get_no_body_and_no_chunked_framing() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        status = 204 if scope["path"] == "/empty" else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def run() -> bytes:
        async with serving(app) as address:
            return await talk(address, b"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\nGET /empty HTTP/1.1\r\nHost: a\r\n"
                         b"Connection: close\r\n\r\n")

    reply = asyncio.run(run())
    assert statuses(reply) == [200, 204]
    assert b"transfer-encoding" not in reply.lower()
