"""Serving: the main port, the admin port and (with `--decision-port`) the decision port in each worker process,
under uvicorn (httptools, uvloop).

uvicorn's own proxy-header handling is off (it would trust 127.0.0.1's X-Forwarded-For before we run: we
apply `trusted_proxies` ourselves) and so is its access log (it prints query strings, which may carry
credentials). With `--workers N` the parent binds both sockets and supervises N spawned workers that share
them (the decision socket too); it restarts a worker that dies and passes SIGTERM/SIGINT/SIGHUP on."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import multiprocessing
import os
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import uvicorn

from sidecar.config.loader import load
from sidecar.server.apps import create_apps
from sidecar.server.http_protocol import ServerConfig
from sidecar.server.tls import ListenerTls, ReloadingServerContext, watch

if TYPE_CHECKING:
    from sidecar.runtime import Services

log = logging.getLogger("sidecar")


class SignalFreeServer(uvicorn.Server):
    """A uvicorn server that leaves signals to us (two servers share one process; tests run one in a thread).

    uvicorn has no setting for this: `Server.capture_signals` (a context manager around `serve`, uvicorn ≥ 0.29)
    is undocumented, so it is overridden here only, the uvicorn version is capped in pyproject.toml, and
    tests/test_dependency_internals.py fails with a clear message if a new uvicorn drops or renames it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _uvicorn_config(app: Any, *, graceful: float, tls: ssl.SSLContext | None = None) -> ServerConfig:
    from sidecar.server.http_protocol import HttpProtocol

    # Our own context (server/tls.py), not uvicorn's ssl_* options: TLS 1.2+, chosen suites, reload on change.
    tls_factory = None if tls is None else lambda _config, _default: tls

    return ServerConfig(
        app, lifespan="off", http=HttpProtocol, loop="none", access_log=False, proxy_headers=False,
        server_header=False, log_config=None, log_level=None,  # records go to the handler ops.logging_setup installs
        ws="none",  # our protocol passes WebSocket handshakes to the gateway as requests (proxy/websocket.py)
        timeout_graceful_shutdown=graceful,  # type: ignore[arg-type]  # typed int, but it goes to asyncio.wait_for
        timeout_keep_alive=75, h11_max_incomplete_event_size=64 * 1024, ssl_context_factory=tls_factory,
    )


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class Serving:
    """One worker: both servers over one `Services`, until `stop()` (or SIGTERM/SIGINT)."""

    def __init__(self, config_path: str, main_sock: socket.socket, admin_sock: socket.socket,
                 graceful: float = 30.0, tls: ListenerTls | None = None, admin_tls: ListenerTls | None = None,
                 metrics_sock: socket.socket | None = None, decision_sock: socket.socket | None = None,
                 decision_grpc: tuple[str, int] | None = None) -> None:
        """`tls`: the main listener's files from the command line (else the configuration's `listen:` block);
        `admin_tls`: the admin port's, which is otherwise plain; `metrics_sock`: a listener for /metrics only;
        `decision_sock`: the decision listener's socket (sidecar/proxy/decision.py), served over the same `Services`
        and gateway as the main port; `decision_grpc`: (host, port) of Envoy's gRPC ext_authz service
        (sidecar/proxy/decision_grpc.py, the `grpc` extra)."""
        self.config_path = config_path
        self.sockets = (main_sock, admin_sock)
        self.metrics_sock = metrics_sock
        self.decision_sock = decision_sock
        self.decision_grpc = decision_grpc
        self.graceful = graceful
        self.tls = tls
        self.admin_tls = admin_tls
        self.services: Services | None = None
        self._main: SignalFreeServer | None = None
        self.started = asyncio.Event()
        self.stop_reason = "stopped"
        self.in_flight_at_stop = 0

    def stop(self, reason: str = "stopped") -> None:
        if self._main is not None and not self._main.should_exit:
            self.stop_reason = reason
            self.in_flight_at_stop = self.services.metrics.in_flight if self.services is not None else 0
            self._main.should_exit = True

    async def run(self) -> None:
        from sidecar.ops import tracing

        loaded = load(self.config_path)
        tracing.configure(loaded.config.tracing)
        main_app, admin, services = create_apps(loaded)
        self.services = services
        await services.start()
        # What start-up made (modules, the compiled policy, clients) lives as long as the worker: out of every full
        # collection from now on, which otherwise walks all of it (~15 ms here) and stalls whatever is in flight.
        gc.freeze()
        tls = self.tls or ListenerTls.choose(loaded.config.listen, None, None, None)
        main_tls = ReloadingServerContext(tls) if tls else None
        admin_tls = ReloadingServerContext(self.admin_tls) if self.admin_tls else None
        main = self._main = SignalFreeServer(_uvicorn_config(main_app, graceful=self.graceful,
                                                             tls=main_tls.front if main_tls else None))
        admin_server = SignalFreeServer(
            _uvicorn_config(admin, graceful=1.0, tls=admin_tls.front if admin_tls else None))
        reloading = [c for c in (main_tls, admin_tls) if c is not None]
        watcher = asyncio.ensure_future(watch(reloading)) if reloading else None
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ValueError, RuntimeError):  # not the main thread: signals are not ours to take
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop, sig.name)
            reload = services.reload_from_file
            loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(reload()))
        side_servers = [(admin_server, self.sockets[1])]
        if self.metrics_sock is not None:
            from sidecar.ops.metrics_port import MetricsOnly

            side_servers.append((SignalFreeServer(_uvicorn_config(MetricsOnly(services.metrics), graceful=1.0)),
                                 self.metrics_sock))
        grpc_server = None
        if self.decision_sock is not None or self.decision_grpc is not None:
            from sidecar.proxy.decision import DecisionApp

            decisions = DecisionApp(main_app.gateway)
            if self.decision_sock is not None:
                side_servers.append((SignalFreeServer(_uvicorn_config(decisions, graceful=self.graceful)),
                                     self.decision_sock))
            if self.decision_grpc is not None:
                from sidecar.proxy.decision_grpc import start_server

                grpc_server = await start_server(decisions, *self.decision_grpc)
        side_tasks = [asyncio.ensure_future(server.serve(sockets=[sock])) for server, sock in side_servers]
        main_task = asyncio.ensure_future(main.serve(sockets=[self.sockets[0]]))
        while not (main.started and all(server.started for server, _ in side_servers)) and not main_task.done():
            await asyncio.sleep(0.01)
        self.started.set()
        log.info("sidecar started", extra=startup_fields(self))
        try:
            await main_task
        finally:
            if watcher is not None:
                watcher.cancel()
            for server, _ in side_servers:
                server.should_exit = True
            if grpc_server is not None:
                await grpc_server.stop(self.graceful)
            for task in side_tasks:
                await task
            await services.aclose()
            tracing.shutdown()
            cut_off = main.config.cut_off if isinstance(main.config, ServerConfig) else 0
            log.info("sidecar stopped", extra={"reason": self.stop_reason, "in_flight": self.in_flight_at_stop,
                                               "drained": max(0, self.in_flight_at_stop - cut_off),
                                               "cut_off": cut_off, "pid": os.getpid()})


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def startup_fields(serving: Serving) -> dict[str, Any]:
    """What the start-up line says: enough to tell from the log alone which build runs which file how."""
    from sidecar import __version__
    from sidecar.proxy.transports.registry import transport_kind

    services = serving.services
    assert services is not None
    store = services.store
    listen = {"main": _address(serving.sockets[0]), "admin": _address(serving.sockets[1])}
    if serving.metrics_sock is not None:
        listen["metrics"] = _address(serving.metrics_sock)
    return {"version": __version__, "config_file": serving.config_path, "routes": len(services.policy.config.routes),
            "authenticators": len(services.policy.authenticators), "listen": listen,
            "workers": int(os.environ.get("SIDECAR_WORKERS", "1")), "pid": os.getpid(),
            "redis": store.health.mode if store.health is not None else "in-process", "transport": transport_kind()}


def _run_worker(config_path: str, main_sock: socket.socket, admin_sock: socket.socket, graceful: float,
                tls: ListenerTls | None = None, admin_tls: ListenerTls | None = None,
                metrics_sock: socket.socket | None = None, decision_sock: socket.socket | None = None,
                decision_grpc: tuple[str, int] | None = None) -> None:
    from sidecar.ops.logging_setup import configure

    configure()
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        runner.run(Serving(config_path, main_sock, admin_sock, graceful, tls, admin_tls, metrics_sock, decision_sock,
                           decision_grpc).run())


class ListenError(Exception):
    """A port that cannot be listened on (in use, privileged, no such address): one line for the operator."""


def _listen(host: str, port: int, what: str) -> socket.socket:
    try:
        return bind(host, port)
    except OSError as exc:
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        reason = "the address is already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise ListenError(f"cannot listen on {address} ({what}): {reason}") from None


def run(config_path: str, host: str, port: int, admin_host: str, admin_port: int, workers: int,
        graceful: float = 30.0, tls: ListenerTls | None = None, admin_tls: ListenerTls | None = None,
        metrics_port: int | None = None, decision: tuple[str, int] | None = None,
        decision_grpc: tuple[str, int] | None = None) -> int:
    """`decision`: (host, port) of the decision listener, when `--decision-port` is given; `decision_grpc`: of the
    gRPC ext_authz service (`--decision-grpc-port`), bound by each worker (SO_REUSEPORT)."""
    os.environ["SIDECAR_WORKERS"] = str(max(1, workers))
    main_sock = _listen(host, port, "--port")
    opened = [main_sock]
    try:
        admin_sock = _listen(admin_host, admin_port, "--admin-port")
        opened.append(admin_sock)
        metrics_sock = _listen(host, metrics_port, "--metrics-port") if metrics_port is not None else None
    except ListenError:
        for sock in opened:
            sock.close()
        raise
    try:
        decision_sock = _listen(*decision, "--decision-port") if decision else None
    except ListenError:
        main_sock.close()
        admin_sock.close()
        raise
    if workers <= 1:
        _run_worker(config_path, main_sock, admin_sock, graceful, tls, admin_tls, metrics_sock, decision_sock,
                    decision_grpc)
        return 0
    return _supervise(config_path, main_sock, admin_sock, workers, graceful, tls, admin_tls, metrics_sock,
                      decision_sock, decision_grpc)


def _supervise(config_path: str, main_sock: socket.socket, admin_sock: socket.socket, workers: int,
               graceful: float, tls: ListenerTls | None = None, admin_tls: ListenerTls | None = None,
               metrics_sock: socket.socket | None = None, decision_sock: socket.socket | None = None,
               decision_grpc: tuple[str, int] | None = None) -> int:
    context = multiprocessing.get_context("spawn")
    stopping = 0  # the signal that asked us to stop
    os.environ["SIDECAR_SUPERVISOR_PID"] = str(os.getpid())
    metrics_dir = _multiprocess_metrics_dir()

    def spawn() -> Any:
        process = context.Process(target=_run_worker, daemon=False,
                                  args=(config_path, main_sock, admin_sock, graceful, tls, admin_tls, metrics_sock,
                                        decision_sock, decision_grpc))
        process.start()
        return process

    spawning = True
    processes = [spawn() for _ in range(workers)]
    spawning = False

    def stop_listening() -> None:
        # The workers close their copies when they start draining; while the parent holds one the kernel keeps
        # the port listening and completes handshakes that no worker will ever accept (reset at exit). Closed
        # here, a new connection is refused at once and the client can go to another replica.
        main_sock.close()
        admin_sock.close()
        if metrics_sock is not None:
            metrics_sock.close()
        if decision_sock is not None:
            decision_sock.close()

    def on_signal(sig: int, frame: Any) -> None:
        nonlocal stopping
        if sig != signal.SIGHUP:
            stopping = sig
            if not spawning:  # a worker being started still needs the sockets passed to it; closed after
                stop_listening()
        for process in processes:
            if process.pid and process.is_alive():
                os.kill(process.pid, sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    while not stopping:
        time.sleep(0.2)
        for i, process in enumerate(processes):
            if not process.is_alive() and not stopping:
                log.warning("worker %s exited with %s; starting another", process.pid, process.exitcode)
                _mark_dead(process.pid)
                spawning = True
                processes[i] = spawn()
                spawning = False
    stop_listening()
    for process in processes:  # one started while the signal was passed on has not had it
        if process.pid and process.is_alive():
            os.kill(process.pid, stopping)
    deadline = time.monotonic() + graceful + 5
    for process in processes:
        process.join(max(0.1, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
    import shutil

    shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _multiprocess_metrics_dir() -> str:
    """prometheus-client's multiprocess mode: every worker writes its samples to files in one directory and a
    scrape of any worker sums them all."""
    import tempfile

    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="sidecar-metrics-")
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        if name.endswith(".db"):
            os.unlink(os.path.join(directory, name))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    return directory


def _mark_dead(pid: int | None) -> None:
    if pid is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
