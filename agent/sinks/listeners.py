"""Listening sockets for the API and the metrics port, and the bounds of what they accept.

We bind ourselves instead of letting uvicorn do it: a bind failure becomes one
clear SinkError naming the setting (uvicorn would `sys.exit`), the Unix socket gets
its mode before it accepts anyone, and port 0 (tests) tells us the port actually
chosen. `ConnectionGuard` bounds the connections a server holds open (see
protocol.py for the deadlines), and `connection_budget` keeps that bound below
the process's open-file limit.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import socket
import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent.errors import SinkError

BACKLOG = 2048
# File descriptors kept for everything but API connections: PostgreSQL and Redis,
# the file set and state writes, hook processes, inotify, the event loop itself.
FD_RESERVE = 256


class Connection(Protocol):
    """What the guard needs of a connection (GuardedProtocol)."""

    client_id: str

    def close_evicted(self) -> None:
        """Close now; the guard has already forgotten it."""


@dataclass(frozen=True)
class ConnectionLimits:
    """Bounds of one server's connections (README "Settings": CONFIG_AGENT_HTTP_*)."""

    max_connections: int
    # 0: no per-client bound. Clients are told apart by address (all loopback clients
    # are one) and, on a Unix socket, by the peer's uid (SO_PEERCRED).
    max_per_client: int
    # Seconds from accept, or from the first byte of a later request, to a complete head.
    header_timeout: float
    # Seconds a connection may wait between requests.
    idle_timeout: float


def _not_counted(reason: str) -> None:
    pass


class ConnectionGuard:
    """The open connections of one server: counts, the idle ones (oldest first), eviction."""

    def __init__(self, limits: ConnectionLimits, on_drop: Callable[[str], None] = _not_counted) -> None:
        self.limits = limits
        self.open = 0
        self._on_drop = on_drop
        self._per_client: Counter[str] = Counter()
        # Connections without a request in progress; insertion order = idle the longest first.
        self._idle: dict[Connection, None] = {}

    def admit(self, conn: Connection) -> bool:
        """Count a new connection, evicting an idle one at a bound; False: refuse it."""
        limits = self.limits
        if self.open >= limits.max_connections and not self._evict(None):
            self._on_drop("connection_limit")
            return False
        client = conn.client_id
        if (limits.max_per_client and self._per_client[client] >= limits.max_per_client
                and not self._evict(client)):
            self._on_drop("connection_limit")
            return False
        self.open += 1
        self._per_client[client] += 1
        self._idle[conn] = None
        return True

    def release(self, conn: Connection) -> None:
        """Forget a connection that is closing."""
        self.open -= 1
        client = conn.client_id
        self._per_client[client] -= 1
        if not self._per_client[client]:
            del self._per_client[client]
        self._idle.pop(conn, None)

    def set_idle(self, conn: Connection) -> None:
        """The connection has no request in progress (it may be evicted)."""
        self._idle.pop(conn, None)
        self._idle[conn] = None

    def set_busy(self, conn: Connection) -> None:
        """A request is in progress: the connection is never evicted."""
        self._idle.pop(conn, None)

    def count(self, reason: str) -> None:
        """Count a connection dropped for `reason` (a metric label)."""
        self._on_drop(reason)

    def _evict(self, client: str | None) -> bool:
        for conn in self._idle:
            if client is None or conn.client_id == client:
                conn.close_evicted()  # releases it: stop iterating at once
                self._on_drop("evicted")
                return True
        return False


def connection_budget(wanted: int) -> int:
    """`wanted` connections, or fewer when the open-file limit cannot hold them and FD_RESERVE.

    The soft RLIMIT_NOFILE is raised toward the hard limit first, as Go's runtime does:
    a container's soft limit is often 1,024 while its hard limit allows far more.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft == resource.RLIM_INFINITY:
        return wanted
    # Under a tiny limit, half of it for connections rather than none.
    spare = soft - FD_RESERVE if soft >= 2 * FD_RESERVE else soft // 2
    return max(1, min(wanted, spare))


def _reason(exc: OSError) -> str:
    """`address already in use` rather than `[Errno 98] Address already in use`."""
    text = exc.strerror or str(exc)
    return text[:1].lower() + text[1:]


def bind_tcp(host: str, port: int, setting: str) -> list[socket.socket]:
    """Listening sockets for every address `host` resolves to (same port on all).

    `setting` names the port's setting in errors (e.g. CONFIG_AGENT_HTTP_PORT).
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        host_setting = setting.removesuffix("_PORT") + "_HOST"
        raise SinkError(f"cannot resolve listen address {host!r} ({host_setting}): {_reason(exc)}") from exc
    sockets: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, type_, proto, _, address in infos:
            if (family, address[0]) in seen:
                continue
            seen.add((family, address[0]))
            sock = socket.socket(family, type_, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                # "localhost" may be ::1 and 127.0.0.1: serve both on the port chosen first.
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError as exc:
        close_all(sockets)
        raise SinkError(f"cannot listen on {host}:{port} ({setting}): {_reason(exc)}") from exc
    return sockets


SOCKET_SETTING = "CONFIG_AGENT_SOCKET_PATH"


def bind_unix(path: Path, mode: int) -> tuple[socket.socket, int]:
    """A listening Unix socket at `path` with `mode` (and the file's inode).

    A socket file left by a previous run (nobody listening) is replaced.
    """
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fspath(path))
        # Before listen(): nobody can connect while the mode is still the umask's.
        os.chmod(path, mode)
        sock.listen(BACKLOG)
        sock.setblocking(False)
        inode = path.lstat().st_ino
    except OSError as exc:
        sock.close()
        if exc.errno == errno.ENOENT and not path.parent.is_dir():
            reason = f"directory {path.parent} does not exist"
        else:
            reason = _reason(exc)
        raise SinkError(f"cannot listen on unix socket {path} ({SOCKET_SETTING}): {reason}") from exc
    return sock, inode


def _remove_stale_socket(path: Path) -> None:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SinkError(f"cannot use unix socket path {path} ({SOCKET_SETTING}): {_reason(exc)}") from exc
    if not stat.S_ISSOCK(info.st_mode):
        raise SinkError(f"cannot listen on unix socket {path} ({SOCKET_SETTING}): "
                        "it exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(os.fspath(path))
    except OSError:
        try:
            path.unlink(missing_ok=True)  # nobody listens: left over from a previous run
        except OSError as exc:
            raise SinkError(f"cannot replace unix socket {path} ({SOCKET_SETTING}): {_reason(exc)}") from exc
    else:
        raise SinkError(f"cannot listen on unix socket {path} ({SOCKET_SETTING}): "
                        "another process is listening on it")
    finally:
        probe.close()


def remove_socket_file(path: Path, inode: int) -> None:
    """Unlink our Unix socket file at shutdown (only if it is still the one we bound)."""
    with contextlib.suppress(OSError):
        if path.lstat().st_ino == inode:
            path.unlink()


def close_all(sockets: list[socket.socket]) -> None:
    """Close sockets, ignoring errors (used on failure paths)."""
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.close()
