"""Listening sockets for the API and the metrics port, bound before the servers start.

We bind ourselves instead of letting uvicorn do it: a bind failure becomes one
clear SinkError naming the setting (uvicorn would `sys.exit`), the Unix socket gets its mode before
it accepts anyone, and port 0 (tests) tells us the port actually chosen.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from pathlib import Path

from agent.errors import SinkError

BACKLOG = 2048


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
