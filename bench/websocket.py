"""WebSocket tunnels: memory per idle tunnel, and echo throughput through the sidecar next to a direct connection.

    python -m bench.websocket [--tunnels 1000] [--connections 16] [--messages 2000] [--size 256] [--workers 1]

A `websockets` echo server in its own process is the upstream; one sidecar process (`sidecar run`, an anonymous
route, no Redis) tunnels to it. First `--tunnels` tunnels are opened and left idle, and the sidecar's RSS (all its
processes, from /proc) before and after gives the memory per tunnel. Then `--connections` connections each send
`--messages` messages of `--size` bytes one after another, waiting for each echo: messages/s through the sidecar,
then directly to the upstream, in the same run. Everything listens on 127.0.0.1; every process started here is
stopped in a `finally`. Needs `ulimit -n` above twice `--tunnels`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

from bench.procs import free_port, tree_rss_bytes
from sidecar.testing import SidecarProcess


def _echo_server(port: int) -> None:
    from websockets.asyncio.server import ServerConnection, serve

    async def echo(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    async def main() -> None:
        async with serve(echo, "127.0.0.1", port, max_size=None, ping_interval=None, compression=None):
            await asyncio.Future()

    asyncio.run(main())


async def idle_tunnels(url: str, count: int, sidecar_pid: int) -> tuple[int, int]:
    from websockets.asyncio.client import connect

    before = tree_rss_bytes(sidecar_pid)
    opened = []
    try:
        for start in range(0, count, 100):
            batch = [connect(url + f"/ws/idle/{i}", ping_interval=None, compression=None, open_timeout=30)
                     for i in range(start, min(count, start + 100))]
            opened += await asyncio.gather(*batch)
        await asyncio.sleep(1.0)
        after = tree_rss_bytes(sidecar_pid)
    finally:
        await asyncio.gather(*(ws.close() for ws in opened), return_exceptions=True)
    return before, after


async def echo_rate(url: str, connections: int, messages: int, size: int) -> float:
    from websockets.asyncio.client import connect

    payload = os.urandom(size)

    async def one(i: int) -> None:
        async with connect(url + f"/ws/echo/{i}", ping_interval=None, compression=None, max_size=None) as ws:
            for _ in range(messages):
                await ws.send(payload)
                await ws.recv()

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(connections)))
    return connections * messages / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tunnels", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    upstream_port = free_port()
    server = multiprocessing.get_context("spawn").Process(target=_echo_server, args=(upstream_port,), daemon=True)
    server.start()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "sidecar.yaml"
        config.write_text(json.dumps({
            "version": 1, "upstream": f"http://127.0.0.1:{upstream_port}",
            "authenticators": {"open": {"type": "anonymous"}},
            "websocket": {"max_tunnels": max(10_000, args.tunnels * 2)},
            "routes": [{"id": "ws", "match": {"path": "/ws/**"}, "auth": ["open"]}],
        }))
        sidecar = None
        try:
            time.sleep(0.5)
            sidecar = SidecarProcess(config, workers=args.workers, grace=2)
            via = sidecar.url.replace("http://", "ws://")
            direct = f"ws://127.0.0.1:{upstream_port}"
            before, after = asyncio.run(idle_tunnels(via, args.tunnels, sidecar.process.pid))
            asyncio.run(echo_rate(via, args.connections, 50, args.size))  # warm-up, discarded
            through = asyncio.run(echo_rate(via, args.connections, args.messages, args.size))
            straight = asyncio.run(echo_rate(direct, args.connections, args.messages, args.size))
        finally:
            if sidecar is not None:
                sidecar.stop()
            server.terminate()
            server.join(5)
    print(f"idle tunnels: {args.tunnels}, sidecar RSS {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB, "
          f"{(after - before) / max(args.tunnels, 1) / 1024:.1f} KiB per tunnel")
    print(f"echo, {args.connections} connections x {args.messages} messages of {args.size} bytes:")
    print(f"  through the sidecar {through:10.0f} messages/s")
    print(f"  direct              {straight:10.0f} messages/s  (sidecar/direct = {through / straight:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
