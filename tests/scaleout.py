"""Scale-out servers of one test, on free loopback ports: PgBouncer, a lagging streaming
replica, Redis Sentinel and Redis Cluster.

Each class starts real processes (Debian packages `pgbouncer`, `postgresql`,
`redis-server`), never touches the shared servers, and is a context manager whose
exit stops every process it started and removes its directory:

    with PrivatePgBouncer(postgres_scratch_dir("pgb"), "127.0.0.1", primary.port) as pgb:
        conn = await asyncpg.connect(pgb.url("config"), statement_cache_size=0)

The helpers are blocking (subprocess, sync redis-py): call them from fixtures or
through `anyio.to_thread.run_sync` in async tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis
from redis.crc import key_slot

from agent.demo_servers import free_port
from tests.servers import PrivatePostgres, _pg_bin, stop_processes

PGBOUNCER = "/usr/sbin/pgbouncer"
START_TIMEOUT = 30.0


# ---------------------------------------------------------------- process plumbing


def postgres_scratch_dir(prefix: str) -> Path:
    """A fresh directory the `postgres` user owns (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix=f"config-agent-{prefix}-"))
    _give_to_postgres(path)
    return path


def _give_to_postgres(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn: SIGKILL the child if the test process dies without cleaning up.

    Linux delivers it when the *thread* that forked exits, so it is armed only for
    processes started from the main thread (an anyio worker thread exits when idle).
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None).prctl
    except (OSError, AttributeError):
        return None

    def arm() -> None:
        prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG

    return arm


def _spawn(argv: list[str], log: Path, *, as_postgres: bool = False) -> subprocess.Popen[bytes]:
    """Start a server in the foreground, output to `log`; as `postgres` when we are root."""
    switch = as_postgres and os.geteuid() == 0
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_die_with_parent(),
                                user="postgres" if switch else None, group="postgres" if switch else None,
                                extra_groups=[] if switch else None)


def _tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_until(what: str, ready: Callable[[], bool], timeout: float, *, log: Path | None = None) -> None:
    """Poll `ready` (exceptions count as "not yet") until true or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if ready():
                return
        except Exception as exc:  # the server is still starting or electing
            last = exc
        time.sleep(0.05)
    detail = f" (last error: {last!r})" if last else ""
    raise TimeoutError(f"{what} not reached within {timeout:.0f}s{detail}" + (f"\n{_tail(log)}" if log else ""))


def _wait_listening(proc: subprocess.Popen[bytes], name: str, port: int, log: Path,
                    timeout: float = START_TIMEOUT) -> None:
    """Wait until the process accepts connections; fail early (with its log) if it exits."""
    import socket

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{_tail(log)}")
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    deadline = time.monotonic() + timeout
    while not up():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} not listening on {port}:\n{_tail(log)}")
        time.sleep(0.02)


def psql(port: int, dbname: str, sql: str, *, user: str = "postgres", timeout: float = 10.0) -> list[dict[str, str]]:
    """Rows of one simple-protocol query (the PgBouncer admin console accepts nothing else)."""
    proc = subprocess.run(
        [_pg_bin("psql"), "-X", "-h", "127.0.0.1", "-p", str(port), "-U", user, "-d", dbname,
         "-A", "-F", "\t", "-P", "footer=off", "-v", "ON_ERROR_STOP=1", "-c", sql],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, "PGCONNECT_TIMEOUT": "5"},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"psql -p {port} {dbname} -c {sql!r}: {proc.stderr.strip()}")
    header, *rows = proc.stdout.splitlines() or [""]
    names = header.split("\t")
    return [dict(zip(names, row.split("\t"), strict=True)) for row in rows]


class _ContextManaged:
    """`with server:` starts it (destroying whatever started if that fails) and destroys it on exit."""

    def start(self) -> None:
        raise NotImplementedError

    def destroy(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.destroy()


# ---------------------------------------------------------------- PostgreSQL side


class TunedPostgres(PrivatePostgres):
    """A PrivatePostgres with extra postgresql.conf settings, e.g. a low `max_connections`.

    The settings are appended after PrivatePostgres.init's own lines: the last one wins.
    """

    def __init__(self, directory: Path, *, max_connections: int | None = None,
                 settings: Mapping[str, str | int] | None = None) -> None:
        super().__init__(directory)
        self.settings: dict[str, str | int] = dict(settings or {})
        if max_connections is not None:
            self.settings["max_connections"] = max_connections

    def init(self) -> None:
        super().init()
        with open(self.data / "postgresql.conf", "a") as conf:
            for name, value in self.settings.items():
                conf.write(f"{name} = {value!r}\n" if isinstance(value, str) else f"{name} = {value}\n")


@contextlib.contextmanager
def running_postgres(*, max_connections: int | None = None, settings: Mapping[str, str | int] | None = None,
                     migrate: bool = True) -> Iterator[TunedPostgres]:
    """A started (and by default migrated) private PostgreSQL, destroyed on exit."""
    server = TunedPostgres(postgres_scratch_dir("pg"), max_connections=max_connections, settings=settings)
    try:
        server.init()
        server.start()
        if migrate:
            server.migrate()
        yield server
    finally:
        server.destroy()


class PrivatePgBouncer(_ContextManaged):
    """PgBouncer (Debian 1.18) in the foreground in front of one PostgreSQL server.

    Every database name is forwarded (`* = host=… port=…`); `auth_type = trust` with
    `auth_user = postgres`, so any role that exists upstream may connect (PostgreSQL
    itself trusts 127.0.0.1). The admin console (database `pgbouncer`) answers to
    `postgres`, but only over the simple-query protocol: use `show()`, not asyncpg.
    """

    def __init__(self, directory: Path, upstream_host: str, upstream_port: int, *,
                 pool_mode: str = "transaction", default_pool_size: int = 20, max_client_conn: int = 1000,
                 settings: Mapping[str, str | int] | None = None) -> None:
        self.dir = directory
        self.port = free_port()
        self.upstream = (upstream_host, upstream_port)
        self.pool_mode = pool_mode
        self.default_pool_size = default_pool_size
        self.max_client_conn = max_client_conn
        self.settings = dict(settings or {})
        self.log = directory / "pgbouncer.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, dbname: str, user: str = "postgres") -> str:
        """A client URL through the pooler."""
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def _write_config(self) -> Path:
        host, port = self.upstream
        (self.dir / "userlist.txt").write_text('"postgres" ""\n')
        lines = {
            "listen_addr": "127.0.0.1",
            "listen_port": self.port,
            "unix_socket_dir": str(self.dir),
            "auth_type": "trust",
            "auth_file": str(self.dir / "userlist.txt"),
            # Roles missing from auth_file are looked up upstream through this user.
            "auth_user": "postgres",
            "admin_users": "postgres",
            "stats_users": "postgres",
            "pool_mode": self.pool_mode,
            "default_pool_size": self.default_pool_size,
            "max_client_conn": self.max_client_conn,
            # Startup parameters PgBouncer does not track and would otherwise refuse the
            # client for (psycopg/JDBC send extra_float_digits; asyncpg sends only
            # client_encoding and server_settings such as application_name, all tracked).
            "ignore_startup_parameters": "extra_float_digits,statement_timeout",
            **self.settings,
        }
        config = self.dir / "pgbouncer.ini"
        config.write_text(f"[databases]\n* = host={host} port={port}\n\n[pgbouncer]\n"
                          + "".join(f"{k} = {v}\n" for k, v in lines.items()))
        return config

    def start(self) -> None:
        """Start PgBouncer (as `postgres` when we are root: it refuses to run as root)."""
        if not os.access(PGBOUNCER, os.X_OK):
            raise RuntimeError("pgbouncer is not installed (Debian package pgbouncer)")
        _give_to_postgres(self.dir)
        config = self._write_config()
        self.proc = _spawn([PGBOUNCER, str(config)], self.log, as_postgres=True)
        _wait_listening(self.proc, "pgbouncer", self.port, self.log)

    def stop(self) -> None:
        """SIGTERM (immediate shutdown), SIGKILL if it lingers."""
        if self.proc is not None:
            stop_processes([self.proc])
            self.proc = None

    def destroy(self) -> None:
        """Stop and remove the directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def show(self, what: str) -> list[dict[str, str]]:
        """`SHOW <what>` on the admin console, e.g. show("POOLS"), as a list of rows."""
        return psql(self.port, "pgbouncer", f"SHOW {what}")

    def server_connections(self, database: str | None = None) -> int:
        """PostgreSQL connections PgBouncer holds now (all states), optionally for one database."""
        return sum(1 for row in self.show("SERVERS") if database is None or row["database"] == database)


class PrivateReplica(PrivatePostgres, _ContextManaged):
    """A hot-standby streaming replica of a PrivatePostgres that applies commits `apply_delay` late.

    `start()` makes the base backup on first use (pg_basebackup -R, as `postgres`).
    recovery_min_apply_delay counts from the primary's commit timestamp, so a row is
    visible here about `apply_delay` after its COMMIT on the primary.
    """

    def __init__(self, primary: PrivatePostgres, directory: Path, apply_delay: str = "2s") -> None:
        super().__init__(directory)
        self.primary = primary
        self.dbname = primary.dbname
        self.apply_delay = apply_delay

    def url(self, dbname: str | None = None) -> str:
        """A read-only client URL (the primary's database by default)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname or self.dbname}"

    def init(self) -> None:
        _give_to_postgres(self.base)
        self._run(_pg_bin("pg_basebackup"), "-D", str(self.data), "-R", "-X", "stream", "-c", "fast",
                  "--no-sync", "-h", "127.0.0.1", "-p", str(self.primary.port), "-U", "postgres")
        # postgresql.conf was copied from the primary: override its port and socket.
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"\nport = {self.port}\nunix_socket_directories = '{self.base}'\n"
                       f"hot_standby = on\nrecovery_min_apply_delay = '{self.apply_delay}'\n")

    def start(self) -> None:
        if not (self.data / "PG_VERSION").exists():
            self.init()
        super().start()

    def migrate(self) -> None:
        raise RuntimeError("a replica is read-only: migrate the primary")

    def wait_caught_up(self, timeout: float = 20.0) -> None:
        """Block until everything the primary has written so far is applied here."""
        lsn = psql(self.primary.port, "postgres", "SELECT pg_current_wal_lsn() AS lsn")[0]["lsn"]
        _wait_until(f"replica on {self.port} at {lsn}", lambda: psql(
            self.port, "postgres", f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn AS ok")[0]["ok"] == "t",
            timeout, log=self.base / "log")


# ---------------------------------------------------------------- Redis side


def _redis(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=2,
                       decode_responses=True)


def _info(port: int, section: str) -> dict[str, Any]:
    with _redis(port) as client:
        info: dict[str, Any] = client.info(section)
    return info


def _cluster(port: int, subcommand: str) -> Any:
    """A CLUSTER subcommand's reply (redis-py parses INFO and SLOTS)."""
    with _redis(port) as client:
        return client.cluster(subcommand)


def _redis_argv(port: int, directory: Path, *extra: str) -> list[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (Debian package redis-server)")
    # No 5 s pause before a full sync to a new replica (the diskless default waits for more replicas).
    return [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--repl-diskless-sync-delay", "0", "--dir", str(directory), *extra]


class _RedisProcesses(_ContextManaged):
    """redis-server processes by port, each restartable with the arguments it started with."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.argv: dict[int, list[str]] = {}

    def _start_process(self, port: int, argv: list[str]) -> None:
        log = self.dir / f"{port}.log"
        self.argv[port] = argv
        self.procs[port] = proc = _spawn(argv, log)
        _wait_listening(proc, Path(argv[0]).name, port, log)

    def kill(self, port: int) -> None:
        """SIGKILL one process (no shutdown, no failover handshake)."""
        proc = self.procs.pop(port)
        proc.kill()
        proc.wait()

    def restart(self, port: int) -> None:
        """Start a killed process again, same port and arguments."""
        self._start_process(port, self.argv[port])

    def stop(self) -> None:
        stop_processes(list(self.procs.values()))
        self.procs.clear()

    def destroy(self) -> None:
        """Stop every process and remove the directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def live_ports(self) -> list[int]:
        return [port for port, proc in self.procs.items() if proc.poll() is None]


class RedisSentinelSet(_RedisProcesses):
    """One master, one replica and three sentinels watching `service` with quorum 2.

    Failure is noticed after `down_after_ms`; a SIGKILL of the master is usually
    replaced within 2–4 s. Sentinels rewrite their config files (kept writable here).
    """

    QUORUM = 2

    def __init__(self, directory: Path, service: str = "mymaster", *, down_after_ms: int = 1000,
                 failover_timeout_ms: int = 5000) -> None:
        super().__init__(directory)
        self.service = service
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.redis_ports = [free_port(), free_port()]
        self.sentinel_ports = [free_port() for _ in range(3)]

    def sentinel_url(self, service: str | None = None) -> str:
        """`redis+sentinel://` URL naming all three sentinels."""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{service or self.service}"

    def start(self) -> None:
        """Master, replica (synced), then sentinels; returns when every sentinel sees all peers."""
        master, replica = self.redis_ports
        self._start_process(master, _redis_argv(master, self.dir))
        self._start_process(replica, _redis_argv(replica, self.dir, "--replicaof", "127.0.0.1", str(master)))
        _wait_until("replica in sync", lambda: _info(replica, "replication").get("master_link_status") == "up",
                    START_TIMEOUT, log=self.dir / f"{replica}.log")
        binary = shutil.which("redis-sentinel") or shutil.which("redis-server")
        assert binary is not None
        for port in self.sentinel_ports:
            conf = self.dir / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {self.dir}\n"
                "sentinel announce-ip 127.0.0.1\n"
                f"sentinel monitor {self.service} 127.0.0.1 {master} {self.QUORUM}\n"
                f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {self.service} 1\n")
            self._start_process(port, [binary, str(conf), "--sentinel"])
        # Failover needs a quorum of sentinels that found each other (hello messages, every 2 s).
        _wait_until("sentinels know the replica and each other", self._sentinels_ready, START_TIMEOUT)

    def _sentinels_ready(self) -> bool:
        for port in self.sentinel_ports:
            with _redis(port) as client:
                state = client.sentinel_master(self.service)
            if int(state["num-other-sentinels"]) < len(self.sentinel_ports) - 1 or int(state["num-slaves"]) < 1:
                return False
        return True

    def master_port(self) -> int:
        """The master's port as the first live sentinel reports it."""
        for port in self.sentinel_ports:
            if port in self.live_ports:
                with _redis(port) as client:
                    addr = client.sentinel_get_master_addr_by_name(self.service)
                if addr:
                    return int(addr[1])
        raise RuntimeError(f"no sentinel knows a master for {self.service}")

    def kill_master(self) -> int:
        """SIGKILL the current master; returns its port."""
        port = self.master_port()
        self.kill(port)
        return port

    def restart(self, port: int) -> None:
        """Bring a killed data node back as a replica of the current master, in sync.

        (Left to itself, a sentinel reconverts a returning old master only after its next
        INFO poll, about 10 s.)"""
        if port in self.sentinel_ports:
            super().restart(port)
            return
        master = self.master_port()
        self._start_process(port, _redis_argv(port, self.dir, "--replicaof", "127.0.0.1", str(master)))
        _wait_until(f"{port} in sync with {master}",
                    lambda: _info(port, "replication").get("master_link_status") == "up",
                    START_TIMEOUT, log=self.dir / f"{port}.log")
        # A quorum of sentinels seeing it healthy is what a next failover needs. Waiting for
        # every live sentinel timed out once in CI (30 s; which flags it kept went unrecorded).
        seen: dict[int, str | None] = {}

        def quorum_sees_it() -> bool:
            seen.update({sentinel: self._replica_flags(sentinel).get(port)
                         for sentinel in self.sentinel_ports if sentinel in self.live_ports})
            return sum(flags == "slave" for flags in seen.values()) >= self.QUORUM

        try:
            _wait_until(f"a quorum of sentinels sees {port} up again", quorum_sees_it, START_TIMEOUT)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; replica flags per sentinel: {seen}") from None

    def _replica_flags(self, sentinel: int) -> dict[int, str]:
        with _redis(sentinel) as client:
            replicas = client.sentinel_slaves(self.service)
        return {int(replica["port"]): str(replica["flags"]) for replica in replicas}

    def wait_failover(self, old_port: int, timeout: float = 20.0) -> int:
        """Wait until every live sentinel names the same new master, which says role:master."""
        found: list[int] = []

        def promoted() -> bool:
            ports = set()
            for port in self.sentinel_ports:
                if port in self.live_ports:
                    with _redis(port) as client:
                        addr = client.sentinel_get_master_addr_by_name(self.service)
                    ports.add(int(addr[1]) if addr else 0)
            if len(ports) != 1 or old_port in ports or 0 in ports:
                return False
            (new,) = ports
            found[:] = [new]
            return _info(new, "replication").get("role") == "master"

        _wait_until(f"sentinel failover away from {old_port}", promoted, timeout)
        return found[0]


class RedisClusterSet(_RedisProcesses):
    """A Redis Cluster of `masters` masters with `replicas_per_master` replicas each.

    cluster-node-timeout is `node_timeout_ms`; replicas always qualify for failover
    (validity factor 0), so a SIGKILLed master is replaced after about 2–3 s.
    """

    def __init__(self, directory: Path, masters: int = 3, replicas_per_master: int = 1, *,
                 node_timeout_ms: int = 1000) -> None:
        super().__init__(directory)
        self.replicas_per_master = replicas_per_master
        self.node_timeout_ms = node_timeout_ms
        self.ports = [free_port() for _ in range(masters * (1 + replicas_per_master))]
        self._slots_of_killed: dict[int, int] = {}

    @property
    def url(self) -> str:
        """A seed node's URL (clients discover the rest)."""
        return f"redis://127.0.0.1:{(self.live_ports or self.ports)[0]}"

    def start(self) -> None:
        for port in self.ports:
            self._start_process(port, _redis_argv(
                port, self.dir, "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                # An explicit bus port: the default (port + 10000) fails above 55535 or may be taken.
                "--cluster-port", str(free_port()),
                "--cluster-node-timeout", str(self.node_timeout_ms), "--cluster-replica-validity-factor", "0"))
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is not installed (Debian package redis-tools)")
        proc = subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{port}" for port in self.ports),
             "--cluster-replicas", str(self.replicas_per_master), "--cluster-yes"],
            capture_output=True, text=True, timeout=START_TIMEOUT)
        if proc.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {proc.stdout}{proc.stderr}")
        # A new cluster's first replica syncs can take longer than a node's start (CI once
        # timed out at 30 s with every node up): twice the start timeout.
        self.wait_ok(2 * START_TIMEOUT)

    def wait_ok(self, timeout: float = START_TIMEOUT) -> None:
        """Until every live node says cluster_state:ok and knows every node, and every live
        non-master is an online replica (a master killed before that could not be replaced).
        A timeout names what was still missing."""
        def ok() -> bool:
            live = self.live_ports
            for port in live:
                info = _cluster(port, "INFO")
                if info.get("cluster_state") != "ok" or int(info.get("cluster_known_nodes", 0)) < len(self.ports):
                    raise RuntimeError(f"node {port}: cluster_state {info.get('cluster_state')}, "
                                       f"{info.get('cluster_known_nodes')} of {len(self.ports)} nodes known")
            masters = set(self.slot_owners().values())
            replicas = sum(len(self.replicas_of(master)) for master in masters)
            if replicas != len(live) - len(masters):
                raise RuntimeError(f"{replicas} of {len(live) - len(masters)} replicas online")
            return True

        _wait_until("cluster_state:ok on every node", ok, timeout)

    def slot_owners(self, via: int | None = None) -> dict[int, int]:
        """First slot of each range → master port, as one live node sees it."""
        ranges = _cluster(via or self.live_ports[0], "SLOTS")
        return {int(start): int(node[1]) for start, _end, node, *_ in ranges}

    def node_for_slot(self, slot: int, via: int | None = None) -> int:
        """Port of the master serving `slot`."""
        ranges = _cluster(via or self.live_ports[0], "SLOTS")
        for start, end, node, *_ in ranges:
            if int(start) <= slot <= int(end):
                return int(node[1])
        raise LookupError(f"slot {slot} is not served")

    def master_port_for_key(self, key: str) -> int:
        """Port of the master serving `key` (or a sharded channel name)."""
        return self.node_for_slot(key_slot(key.encode()))

    def replicas_of(self, master: int) -> list[int]:
        """Ports of the replicas in sync with `master`."""
        info = _info(master, "replication")
        replicas = (info[f"slave{i}"] for i in range(int(info.get("connected_slaves", 0))))
        return [int(replica["port"]) for replica in replicas if replica.get("state") == "online"]

    def kill(self, port: int) -> None:
        """SIGKILL a node; if it is a master, remembers one of its slots for wait_failover."""
        with contextlib.suppress(LookupError):
            owned = [start for start, owner in self.slot_owners().items() if owner == port]
            if owned:
                self._slots_of_killed[port] = owned[0]
        super().kill(port)

    def wait_failover(self, old_port: int, timeout: float = 20.0) -> int:
        """Wait until a replica serves the slots of master `old_port` (killed with kill()), as
        every live node sees it, with cluster_state:ok; returns the new master's port."""
        slot = self._slots_of_killed[old_port]
        found: list[int] = []

        def moved() -> bool:
            owners = {self.node_for_slot(slot, via=port) for port in self.live_ports}
            if len(owners) != 1 or old_port in owners:
                return False
            found[:] = list(owners)
            return all(_cluster(port, "INFO").get("cluster_state") == "ok" for port in self.live_ports)

        _wait_until(f"cluster failover away from {old_port}", moved, timeout)
        return found[0]
