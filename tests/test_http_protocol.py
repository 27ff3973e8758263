"""The server protocol (sidecar/server/http_protocol.py) on its own: a real uvicorn server built by the runner's
`_uvicorn_config`, a small ASGI application, and raw sockets on loopback. The adversarial suite checks the framing
rules through the whole sidecar; these check the protocol's own states: pipelining, bad requests behind good ones,
`Expect: 100-continue`, the idle timeout, back-pressure, a failing application, and the Date rule."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.proxy.websocket import SCOPE_KEY as WEBSOCKET
from sidecar.server.http_protocol import HttpProtocol
from sidecar.server.runner import SignalFreeServer, _uvicorn_config
from sidecar.testing import free_port, serve_in_thread

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
async def serving(app: App, idle_timeout: float | None = None,
                  graceful: float = 1.0) -> AsyncIterator[tuple[str, int]]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", free_port()))
        listener.listen()
        config = _uvicorn_config(app, graceful=graceful)
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


@pytest.mark.parametrize(("method", "ending"), [(b"GET", b"\r\n\r\nInternal Server Error"), (b"HEAD", b"\r\n\r\n")])
def test_an_application_that_fails_before_answering_gives_a_500_and_closes(method: bytes, ending: bytes) -> None:
    """A 500 and the connection closed; to a HEAD request, without a body."""

    async def failing(scope: dict[str, Any], receive: Any, send: Any) -> None:
        raise ValueError("boom")

    async def run() -> bytes:
        async with serving(failing) as address:
            return await talk(address, method + b" / HTTP/1.1\r\nHost: a\r\n\r\n")

    reply = asyncio.run(run())
    assert statuses(reply) == [500] and reply.endswith(ending)


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


async def refuse_unread(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers 401 without reading the body, as the gateway does to a request without a credential."""
    await send({"type": "http.response.start", "status": 401, "headers": [(b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


def test_pipelined_requests_filling_a_read_past_the_head_limit_are_all_answered() -> None:
    """3,000 small pipelined requests arrive in one read that ends in the middle of a head: the head limit counts
    that head's bytes, not the whole read (which once looked like an 80 KiB head: every request after the first
    dropped, the connection closed)."""
    gate = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/first":
            await gate.wait()
        await echo(scope, receive, send)

    async def run() -> bytes:
        async with serving(app) as address:
            reader, writer = await asyncio.open_connection(*address)
            # /second is queued behind /first: the socket is no longer read, so what follows waits in the kernel
            # and arrives in one read once /first is answered.
            writer.write(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\nGET /second HTTP/1.1\r\nHost: a\r\n\r\n")
            await asyncio.sleep(0.2)
            writer.write(b"".join(b"GET /p%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(3000))
                         + b"GET /last HTTP/1.1\r\nHo")
            await writer.drain()
            await asyncio.sleep(0.2)
            gate.set()
            await asyncio.sleep(0.2)
            writer.write(b"st: a\r\nConnection: close\r\n\r\n")
            try:
                return await read_all(reader, 10)
            finally:
                writer.close()

    reply = asyncio.run(run())
    assert statuses(reply) == [200] * 3003
    assert reply.index(b"GET /p2999 ") < reply.index(b"GET /last ")


def test_a_refusal_before_100_continue_closes_the_connection_unless_the_body_is_on_its_way() -> None:
    """RFC 9110 §10.1.1. Refused before `100 Continue` and before any of its body came, a client (or a proxy in
    front) may never send that body: had the connection stayed open, its next request would be read as the body
    (a desync). That answer says `Connection: close` and the connection closes. A client that sends its body
    anyway, without waiting, keeps the connection (closing on a body still arriving would reset the connection
    under the answer): the body is read past and the next request answered, as without `Expect`."""

    async def run() -> tuple[bytes, bytes, bytes]:
        async with serving(refuse_unread) as address:
            reader, writer = await asyncio.open_connection(*address)
            writer.write(b"PUT /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
            refused = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            writer.write(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
            after = await read_all(reader)
            writer.close()
            reader, writer = await asyncio.open_connection(*address)
            writer.write(b"PUT /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nhel")
            sending = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            writer.write(b"lo" b"GET /next HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            sending += await read_all(reader)
            writer.close()
            sent_body = await talk(address, b"PUT /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
                                   b"GET /next HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            return refused + after, sending, sent_body

    expecting, sending, sent_body = asyncio.run(run())
    assert statuses(expecting) == [401] and b"connection: close\r\n" in expecting
    assert statuses(sending) == [401, 401] and sending.count(b"connection: close") == 1
    assert statuses(sent_body) == [401, 401] and sent_body.count(b"connection: close") == 1


def test_an_application_failing_after_its_response_leaves_the_next_request_alone() -> None:
    """The first response is whole when its application raises: the error is logged, and the request answered
    next on that keep-alive connection is not cut off by it."""
    second_started = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/first":
            await echo(scope, receive, send)
            await second_started.wait()
            raise ValueError("after the response, e.g. an event that could not be queued")
        second_started.set()
        await asyncio.sleep(0.1)
        await echo(scope, receive, send)

    async def run() -> bytes:
        async with serving(app) as address:
            return await talk(address, b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n"
                              b"GET /second HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")

    reply = asyncio.run(run())
    assert statuses(reply) == [200, 200] and b"GET /second " in reply


def test_trailers_never_join_the_request_headers() -> None:
    """RFC 9110 §6.5.1: a trailer field is not merged into the header section. Merged, a `Host` or a credential
    sent after the body would reach an application that read the body before looking at the headers."""
    seen: list[list[tuple[bytes, bytes]]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await echo(scope, receive, send)
        seen.append(list(scope["headers"]))

    async def run() -> bytes:
        async with serving(app) as address:
            return await talk(address, b"POST /t HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                              b"Connection: close\r\n\r\n5\r\nhello\r\n0\r\nHost: evil\r\n"
                              b"Authorization: Bearer forged\r\n\r\n")

    reply = asyncio.run(run())
    assert statuses(reply) == [200] and b"POST /t hello" in reply
    assert seen == [[(b"host", b"a"), (b"transfer-encoding", b"chunked"), (b"connection", b"close")]]


def test_an_endless_trailer_section_is_cut_off_near_the_head_limit() -> None:
    """httptools buffers an unfinished trailer line as it buffers an unfinished head: bounded the same way (431
    and close, or the connection reset under the sender), not buffered for as long as the client keeps sending."""

    def attack(address: tuple[str, int]) -> tuple[bytes, int]:
        sent, received = 0, b""
        with socket.create_connection(address, timeout=5) as sock:
            try:
                sock.sendall(b"POST /t HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"5\r\nhello\r\n0\r\nX-Pad: ")
                for _ in range(256):  # 16 MiB: one trailer line that never ends
                    sock.sendall(b"v" * 65536)
                    sent += 65536
            except OSError:
                pass  # reset by the server before everything was sent
            with contextlib.suppress(OSError):
                while data := sock.recv(65536):
                    received += data
        return received, sent

    async def run() -> tuple[bytes, int]:
        async with serving(echo) as address:
            return await asyncio.to_thread(attack, address)

    reply, sent = asyncio.run(run())
    assert statuses(reply) in ([431], []), reply[:200]
    assert sent < 8 * 2**20, f"{sent} bytes of trailer section were read"


def test_a_websocket_taken_over_once_shutdown_began_is_closed_at_once() -> None:
    """A handshake still deciding when the server starts shutting down: the tunnel opened afterwards is closed
    at once (as open tunnels are), not left to hold the shutdown for the whole grace period."""
    closed_by: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        client = scope[WEBSOCKET]
        await asyncio.sleep(1.0)  # the upstream's 101 is awaited; meanwhile the server starts shutting down
        closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        transport, _ = client.take_over(lambda: closed.done() or closed.set_result(None))
        transport.write(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n")
        try:
            await closed
            closed_by.append("shutdown")
        finally:
            transport.close()
            client.release()

    async def run() -> tuple[float, bytes]:
        async with serving(app, graceful=5.0) as address:
            reader, writer = await asyncio.open_connection(*address)
            writer.write(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
                         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
            await asyncio.sleep(0.1)
            stopping = time.monotonic()
        took = time.monotonic() - stopping
        reply = await read_all(reader)
        writer.close()
        return took, reply

    took, reply = asyncio.run(run())
    assert statuses(reply) == [101] and closed_by == ["shutdown"]
    assert took < 3.0, f"the shutdown waited {took:.1f} s for a tunnel opened during it"


def test_a_304_with_the_representations_content_length_is_whole_without_a_body() -> None:
    """RFC 9110 §8.6: a 304 may carry the Content-Length its 200 would have had (upstreams forward it). No body
    follows it, so the reply is complete as it is and the connection serves the next request (it was once held to
    1234 body bytes: an error, and the connection closed under the client)."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/cached":
            await send({"type": "http.response.start", "status": 304,
                        "headers": [(b"etag", b'"v1"'), (b"content-length", b"1234")]})
            await send({"type": "http.response.body", "body": b""})
        else:
            await echo(scope, receive, send)

    async def run() -> bytes:
        async with serving(app) as address:
            return await talk(address, b"GET /cached HTTP/1.1\r\nHost: a\r\nIf-None-Match: \"v1\"\r\n\r\n"
                              b"GET /next HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")

    reply = asyncio.run(run())
    assert statuses(reply) == [304, 200] and b"GET /next " in reply
    assert b"content-length: 1234\r\n" in reply and b"transfer-encoding" not in reply


def test_after_the_body_receive_waits_for_the_client_to_leave_and_then_says_disconnect() -> None:
    """The ASGI rule applications use to notice a client that went away: once the body is read, `receive()`
    returns nothing while the client stays (not an empty body), and `http.disconnect` as soon as it leaves — also
    when the body filled the buffer and the socket was no longer being read."""
    events: list[tuple[str, float]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await asyncio.sleep(0.2)  # the body piles up meanwhile: reading pauses above the buffer's limit
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        events.append(("body", size))
        message = await receive()
        events.append((message["type"], time.monotonic()))

    async def run() -> float:
        async with serving(app) as address:
            _, writer = await asyncio.open_connection(*address)
            writer.write(b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 200000\r\n\r\n" + b"x" * 200_000)
            await asyncio.sleep(1.0)
            assert events == [("body", 200_000)]  # receive() is still waiting: the client is still there
            left = time.monotonic()
            writer.close()
            for _ in range(200):
                if len(events) == 2:
                    break
                await asyncio.sleep(0.01)
            return left

    left = asyncio.run(run())
    assert [kind for kind, _ in events] == ["body", "http.disconnect"]
    assert events[1][1] - left < 1.0


def test_an_http_1_0_expectation_is_ignored() -> None:
    """RFC 9110 §10.1.1: a 100-continue expectation in an HTTP/1.0 request is ignored — an HTTP/1.0 client does not
    know interim replies and would take `100 Continue` for the answer."""

    async def run() -> bytes:
        async with serving(echo) as address:
            return await talk(address, b"PUT /up HTTP/1.0\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\ndata")

    reply = asyncio.run(run())
    assert statuses(reply) == [200] and reply.endswith(b"PUT /up data")


def test_a_client_that_half_closes_after_its_request_still_gets_a_prompt_answer() -> None:
    """A client may shut its side down once its request is sent (`nc -N`, some probes). The connection closes on
    that end of input, as under uvicorn's protocol, but an answer written before the close still leaves (it was
    once held for this turn's single write and dropped by the close)."""

    async def prompt(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    def client(address: tuple[str, int]) -> bytes:
        received = b""
        with socket.create_connection(address, timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            sock.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):
                while data := sock.recv(65536):
                    received += data
        return received

    async def run() -> list[bytes]:
        async with serving(prompt) as address:
            return [await asyncio.to_thread(client, address) for _ in range(20)]

    replies = asyncio.run(run())
    assert [statuses(reply) for reply in replies] == [[200]] * 20


def test_bytes_after_an_upgrade_head_are_never_read_as_requests() -> None:
    """What follows an upgrade's head is another protocol: neither in the same read nor in a later one is it read
    as a request. A refused upgrade (here h2c, which the gateway never accepts, and a WebSocket handshake) is
    answered and the connection closes; an accepted WebSocket gets those bytes, in order, with the socket."""
    seen: list[str] = []
    early: list[bytes] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["path"])
        await asyncio.sleep(0.3)  # the later read arrives meanwhile
        if scope["path"] == "/ws-accepted":
            client = scope[WEBSOCKET]
            transport, data = client.take_over(lambda: None)
            early.append(data)
            transport.write(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n")
            transport.close()
            client.release()
            return
        await send({"type": "http.response.start", "status": 403, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    async def exchange(address: tuple[str, int], head: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(*address)
        writer.write(head + b"GET /smuggled-1 HTTP/1.1\r\nHost: a\r\n\r\n")
        await asyncio.sleep(0.1)
        writer.write(b"GET /smuggled-2 HTTP/1.1\r\nHost: a\r\n\r\n")
        try:
            return await read_all(reader)
        finally:
            writer.close()

    async def run() -> list[bytes]:
        websocket = (b"HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        async with serving(app) as address:
            return [await exchange(address, b"GET /h2c HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                                   b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"),
                    await exchange(address, b"GET /ws-refused " + websocket),
                    await exchange(address, b"GET /ws-accepted " + websocket)]

    replies = asyncio.run(run())
    assert [statuses(reply) for reply in replies] == [[403], [403], [101]]
    assert seen == ["/h2c", "/ws-refused", "/ws-accepted"]
    assert early == [b"GET /smuggled-1 HTTP/1.1\r\nHost: a\r\n\r\nGET /smuggled-2 HTTP/1.1\r\nHost: a\r\n\r\n"]


# --- Differential: the response framing written here, read back by h11 (an independent HTTP/1.1 implementation) ---

_PLANS: dict[str, tuple[int, list[tuple[bytes, bytes]], list[bytes], bool]] = {}


async def _planned(scope: dict[str, Any], receive: Any, send: Any) -> None:
    status, headers, chunks, last_inline = _PLANS[scope["path"]]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    for i, chunk in enumerate(chunks):
        last = last_inline and i == len(chunks) - 1
        await send({"type": "http.response.body", "body": chunk, "more_body": not last})
    if not (last_inline and chunks):
        await send({"type": "http.response.body", "body": b""})


@pytest.fixture(scope="module")
def planned_server() -> Iterator[tuple[str, int]]:
    with serve_in_thread(_planned, http=HttpProtocol) as url:
        host, _, port = url.removeprefix("http://").partition(":")
        yield host, int(port)


_names = st.sampled_from([b"x-a", b"x-b", b"content-type", b"cache-control", b"etag", b"x-long-name-here"])
_values = st.binary(max_size=40).filter(lambda v: not re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", v) and v == v.strip())


@given(status=st.sampled_from([200, 201, 204, 206, 301, 304, 400, 404, 500, 503]),
       headers=st.lists(st.tuples(_names, _values), max_size=6),
       chunks=st.lists(st.binary(max_size=3000), max_size=5),
       declare_length=st.booleans(), head=st.booleans(), last_inline=st.booleans())
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_response_framing_reads_back_the_same_in_h11(planned_server: tuple[str, int], status: int,
                                                      headers: list[tuple[bytes, bytes]], chunks: list[bytes],
                                                      declare_length: bool, head: bool, last_inline: bool) -> None:
    """Any status, fields and body split (the last part alone or with `more_body: False`), with or without a
    Content-Length, to GET or HEAD: h11 reads the status, the
    fields and exactly the body sent (none for HEAD, 204 and 304), and the same connection then carries a second
    request — the framing left nothing behind and took nothing extra."""
    import h11

    body = b"".join(chunks)
    if status in (204, 304):
        chunks, body = [], b""
    if declare_length:
        headers = [*headers, (b"content-length", b"%d" % len(body))]
    path = f"/p{len(_PLANS)}"
    _PLANS[path] = (status, headers, chunks, last_inline)
    method = b"HEAD" if head else b"GET"
    client = h11.Connection(h11.CLIENT)
    with socket.create_connection(planned_server, timeout=5) as sock:
        for target in (path, path):
            sock.sendall(client.send(h11.Request(method=method, target=target, headers=[("host", "a")])))
            sock.sendall(client.send(h11.EndOfMessage()))
            response, received = None, b""
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    client.receive_data(sock.recv(65536))
                elif isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.Data):
                    received += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
            assert response is not None and response.status_code == status
            sent_fields = [(k, v) for k, v in headers if k != b"content-length"]
            got_fields = [(k, v) for k, v in response.headers  # less the framing and the server's own fields
                          if k not in (b"content-length", b"date", b"transfer-encoding", b"server")]
            assert got_fields == sent_fields
            assert received == (b"" if head else body)
            assert [v for k, v in response.headers if k == b"date"] and len(
                [v for k, v in response.headers if k == b"date"]) == 1
            client.start_next_cycle()
