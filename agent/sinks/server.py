"""Runs the API (TCP + Unix socket) and the metrics port inside the agent's event loop.

uvicorn is driven as a library: `Server.serve(sockets)` runs as a task of our
task group on the loop the agent already runs (anyio on asyncio/uvloop). It must
not touch signals — the agent owns SIGTERM — so `capture_signals` is a no-op.
One uvicorn server serves both API listeners (one event-loop tick, one set of
connections); the metrics port has its own server because it runs another app.
Each server's connections are bounded and timed out (protocol.py, listeners.py);
the bounds fit under the process's open-file limit (`connection_budget`).
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import uvicorn
from anyio.abc import TaskStatus
from prometheus_client import CollectorRegistry

from agent.settings import Settings, is_loopback
from agent.sinks.api import HEARTBEAT, ApiApp
from agent.sinks.listeners import (
    ConnectionGuard,
    ConnectionLimits,
    bind_tcp,
    bind_unix,
    close_all,
    connection_budget,
    remove_socket_file,
)
from agent.sinks.probes import ProbesApp, Readiness
from agent.sinks.protocol import GuardedConfig
from agent.status import SyncStatus
from agent.store import Store

log = logging.getLogger("agent.server")

# uvicorn cancels what is still running this long after shutdown began; our own
# long-polls and streams end at once (ApiApp.close), so this is only a backstop
# that keeps SIGTERM → exit within SPEC's 5 s.
GRACEFUL_SHUTDOWN_SECONDS = 3
# The metrics port answers Prometheus and the kubelet, a few connections at a time; it
# may listen on every interface, so it gets the API's deadlines and a small bound.
METRICS_MAX_CONNECTIONS = 64
HTTP_PORT = "CONFIG_AGENT_HTTP_PORT"
METRICS_PORT = "CONFIG_AGENT_METRICS_PORT"


@dataclass(frozen=True)
class Listening:
    """Where the servers accept connections (ports resolved when 0 was asked)."""

    api: list[tuple[str, int]]
    socket_path: Path | None
    metrics: list[tuple[str, int]]


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signals alone and reports when it accepts."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.accepting = anyio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Do nothing: the agent handles SIGTERM and stops us via `should_exit`."""
        yield

    def install_signal_handlers(self) -> None:
        """Do nothing (the name uvicorn < 0.29 used for the same hook)."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Start serving, then signal that connections are accepted."""
        await super().startup(sockets)
        self.accepting.set()


def _config(app: Any, guard: ConnectionGuard) -> GuardedConfig:
    return GuardedConfig(
        app,
        guard=guard,
        ws="none",
        lifespan="off",
        interface="asgi3",
        # Logging is configured by the agent; uvicorn must not install its own.
        log_config=None,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        forwarded_allow_ips="127.0.0.1",
        workers=1,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )


class ApiServer:
    """The local API on TCP (and a Unix socket when configured) plus the metrics port."""

    def __init__(
        self,
        store: Store,
        status: SyncStatus,
        settings: Settings,
        *,
        heartbeat: float = HEARTBEAT,
    ) -> None:
        self._settings = settings
        metrics = status.metrics
        wanted = settings.http_max_connections
        spare = METRICS_MAX_CONNECTIONS if settings.metrics_port else 0
        api_max = max(1, connection_budget(wanted + spare) - spare)
        if api_max < wanted:
            log.warning("CONFIG_AGENT_HTTP_MAX_CONNECTIONS lowered from %d to %d to fit the "
                        "open-file limit (ulimit -n)", wanted, api_max)
        self.guard = ConnectionGuard(_limits(settings, api_max),
                                     on_drop=lambda reason: metrics.http_rejected.labels(reason).inc())
        metrics.http_connections.set_function(lambda: self.guard.open)
        self._metrics_guard = ConnectionGuard(_limits(settings, METRICS_MAX_CONNECTIONS))
        watchers = min(settings.http_max_watchers, api_max - api_max // 4)
        self.app = ApiApp(store, status, heartbeat=heartbeat, max_watchers=max(1, watchers),
                          flag_services=settings.flag_services)
        self._probes = ProbesApp(status, metrics.registry)

    async def run(self, *, task_status: TaskStatus[Listening] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; `started` once every listener accepts connections."""
        settings = self._settings
        if settings.http_allow_remote and not is_loopback(settings.http_host):
            log.warning("local API listens on %s: reachable from other hosts", settings.http_host)
        api_sockets = bind_tcp(settings.http_host, settings.http_port, HTTP_PORT)
        metrics_sockets: list[socket.socket] = []
        socket_file: tuple[Path, int] | None = None
        try:
            if settings.socket_path is not None:
                sock, inode = bind_unix(settings.socket_path, settings.socket_mode)
                api_sockets.append(sock)
                socket_file = (settings.socket_path, inode)
            if settings.metrics_port:
                metrics_sockets = bind_tcp(settings.metrics_host, settings.metrics_port, METRICS_PORT)
        except BaseException:
            close_all(api_sockets)
            raise
        servers = [(_EmbeddedServer(_config(self.app, self.guard)), api_sockets)]
        if metrics_sockets:
            servers.append((_EmbeddedServer(_config(self._probes, self._metrics_guard)), metrics_sockets))
        try:
            async with anyio.create_task_group() as tg:
                for server, sockets in servers:
                    tg.start_soon(_serve_until_told, server, sockets)
                try:
                    for server, _ in servers:
                        await server.accepting.wait()
                    task_status.started(
                        Listening(
                            api=_tcp_addresses(api_sockets),
                            socket_path=settings.socket_path,
                            metrics=_tcp_addresses(metrics_sockets),
                        )
                    )
                    await anyio.sleep_forever()
                finally:
                    # End long-polls and streams first, or uvicorn waits for them.
                    self.app.close()
                    for server, _ in servers:
                        server.should_exit = True
        finally:
            close_all(api_sockets + metrics_sockets)
            if socket_file is not None:
                remove_socket_file(*socket_file)


async def serve_api(
    store: Store,
    status: SyncStatus,
    settings: Settings,
    *,
    task_status: TaskStatus[Listening] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the local API and the metrics port until cancelled (see ApiServer)."""
    await ApiServer(store, status, settings).run(task_status=task_status)


async def serve_probes(
    status: Readiness,
    registry: CollectorRegistry,
    host: str,
    port: int,
    *,
    task_status: TaskStatus[list[tuple[str, int]]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve only the metrics port (/metrics, /healthz, /readyz) — for the relay."""
    sockets = bind_tcp(host, port, METRICS_PORT)
    limits = _limits(Settings(), METRICS_MAX_CONNECTIONS)  # the defaults
    server = _EmbeddedServer(_config(ProbesApp(status, registry), ConnectionGuard(limits)))
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_serve_until_told, server, sockets)
            try:
                await server.accepting.wait()
                task_status.started(_tcp_addresses(sockets))
                await anyio.sleep_forever()
            finally:
                server.should_exit = True
    finally:
        close_all(sockets)


async def _serve_until_told(server: _EmbeddedServer, sockets: list[socket.socket]) -> None:
    # Shielded: on cancellation the host sets `should_exit` and uvicorn shuts down
    # gracefully (answers in flight, closes idle connections) instead of being
    # torn down mid-write.
    with anyio.CancelScope(shield=True):
        await server.serve(sockets=sockets)


def _limits(settings: Settings, max_connections: int) -> ConnectionLimits:
    return ConnectionLimits(
        max_connections=max_connections,
        max_per_client=settings.http_max_connections_per_client,
        header_timeout=settings.http_header_timeout,
        idle_timeout=settings.http_idle_timeout,
    )


def _tcp_addresses(sockets: list[socket.socket]) -> list[tuple[str, int]]:
    addresses = []
    for sock in sockets:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            host, port = sock.getsockname()[:2]
            addresses.append((str(host), int(port)))
    return addresses
