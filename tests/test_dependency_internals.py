"""The internals of other libraries the sidecar relies on, each used in one place (pyproject.toml caps their
versions): when an upgrade changes one, this file fails first and says which module needs updating, instead
of a proxy test failing somewhere far from the cause."""

from __future__ import annotations

import asyncio
import inspect
import socket
from importlib.metadata import version

import httpx
import pytest
import uvicorn
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from sidecar.ops.metrics import LATENCY_BUCKETS, _fold, _Observations
from sidecar.outbound.guard import UnsafeDestination, delivery_client
from sidecar.server.runner import SignalFreeServer, _uvicorn_config
from sidecar.testing import free_port


def changed(library: str, what: str, module: str) -> str:
    return (f"{library} {version(library)} changed {what}, which {module} relies on: update {module} for this "
            f"version, or install the version pyproject.toml allows")


def test_uvicorn_server_builds_and_shuts_down_our_protocol_as_http_protocol_expects() -> None:
    """sidecar/server/http_protocol.py is uvicorn's `http=` protocol class: `uvicorn.Server` builds it with
    `config=`, `server_state=` and `app_state=`, keeps the Date tick in `server_state.default_headers`, counts
    `total_requests`, waits on `connections` and `tasks` at shutdown, and calls each connection's `shutdown()`."""
    from uvicorn.server import ServerState

    startup = inspect.getsource(uvicorn.Server.startup)
    for needed in ("config.http_protocol_class", "server_state=", "app_state="):
        assert needed in startup, changed("uvicorn", f"how Server builds its protocol ({needed})",
                                          "sidecar/server/http_protocol.py")
    shutdown = inspect.getsource(uvicorn.Server.shutdown) + inspect.getsource(uvicorn.Server._wait_tasks_to_complete)
    for needed in ("connection.shutdown()", "server_state.connections", "server_state.tasks"):
        assert needed in shutdown, changed("uvicorn", f"how Server shuts connections down ({needed})",
                                           "sidecar/server/http_protocol.py")
    state = ServerState()
    assert isinstance(getattr(state, "default_headers", None), list), changed(
        "uvicorn", "ServerState.default_headers", "sidecar/server/http_protocol.py")
    assert isinstance(state.connections, set) and isinstance(state.tasks, set) and state.total_requests == 0, changed(
        "uvicorn", "ServerState's connections, tasks or total_requests", "sidecar/server/http_protocol.py")
    config = uvicorn.Config(_app, timeout_keep_alive=7)
    config.load()
    assert config.loaded_app is not None and config.timeout_keep_alive == 7, changed(
        "uvicorn", "Config.loaded_app or Config.timeout_keep_alive", "sidecar/server/http_protocol.py")


async def _app(scope, receive, send):  # type: ignore[no-untyped-def]
    headers = [(b"x-host", dict(scope["headers"]).get(b"host", b"")), (b"date", b"Thu, 01 Jan 2026 00:00:00 GMT")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


def test_uvicorn_runs_the_sidecar_protocol_and_leaves_signals_alone() -> None:
    """Under the installed uvicorn the runner's server starts with our protocol, takes the target's authority as Host
    and sends the app's own Date alone (sidecar/server/http_protocol.py, with uvicorn's Date tick)."""
    assert "capture_signals" in inspect.getsource(uvicorn.Server.serve), changed(
        "uvicorn", "Server.capture_signals", "sidecar/server/runner.py (SignalFreeServer)")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", free_port()))
        listener.listen()
        server = SignalFreeServer(_uvicorn_config(_app, graceful=1.0))

        async def exchange() -> bytes:
            task = asyncio.ensure_future(server.serve(sockets=[listener]))
            while not server.started:
                await asyncio.sleep(0.01)
            reader, writer = await asyncio.open_connection(*listener.getsockname())
            writer.write(b"GET http://target.example/x HTTP/1.1\r\nHost: other.example\r\n\r\n")
            reply = await reader.readuntil(b"ok")
            writer.close()
            server.should_exit = True
            await task
            return reply

        reply = asyncio.run(exchange()).lower()
    assert reply.startswith(b"http/1.1 200"), reply
    assert b"x-host: target.example\r\n" in reply, changed("uvicorn", "the request head it parses",
                                                           "sidecar/server/http_protocol.py (_host_from_target)")
    assert reply.count(b"\r\ndate:") == 1, changed("uvicorn", "how it adds the Date header",
                                                   "sidecar/server/http_protocol.py (DateUnlessSent)")


def test_prometheus_histogram_children_fold_as_observe_would() -> None:
    """sidecar/ops/metrics.py's bulk fold into a histogram child gives the samples `observe` gives."""
    values = [0.0001, 0.003, 0.003, 0.2, 7.0, 60.0]
    folded_registry, observed_registry = CollectorRegistry(), CollectorRegistry()
    folded = Histogram("t", "t", ["route"], buckets=LATENCY_BUCKETS, registry=folded_registry)
    observed = Histogram("t", "t", ["route"], buckets=LATENCY_BUCKETS, registry=observed_registry)
    pending = _Observations()
    for value in values:
        pending.add(value)
        observed.labels("r").observe(value)
    try:
        _fold(folded.labels("r"), pending)
    except AttributeError as exc:
        pytest.fail(changed("prometheus-client", f"its histogram child ({exc})", "sidecar/ops/metrics.py (_fold)"))
    assert samples(folded_registry) == samples(observed_registry), changed(
        "prometheus-client", "what a histogram child's _buckets and _sum hold", "sidecar/ops/metrics.py (_fold)")


def samples(registry: CollectorRegistry) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


def test_httpx_sends_through_the_pool_the_outbound_guard_sets() -> None:
    """httpx's transport sends through `_pool`, where sidecar/outbound/guard.py puts its checking pool: a request
    to a refused address reaches the guard (not another pool that would just connect)."""
    transport = httpx.AsyncHTTPTransport()
    assert "self._pool" in inspect.getsource(type(transport).handle_async_request), changed(
        "httpx", "AsyncHTTPTransport._pool", "sidecar/outbound/guard.py (_GuardedTransport)")

    async def attempt() -> None:
        async with delivery_client(allow_private=False) as client:
            await client.get(f"http://127.0.0.1:{free_port()}/")

    with pytest.raises(UnsafeDestination):
        asyncio.run(attempt())
