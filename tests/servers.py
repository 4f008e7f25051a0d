"""Private PostgreSQL and Redis servers for tests that kill or restart them, plus helpers."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import anyio
import asyncpg

from agent.demo_servers import free_port


def admin_url_for(url: str, dbname: str) -> str:
    """The same server URL pointing at another database."""
    parsed = urlparse(url)
    return urlunparse(parsed._replace(path=f"/{dbname}"))


def docker_available() -> bool:
    """True when a Docker engine answers (testcontainers can be used)."""
    if not shutil.which("docker"):
        return False
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


def wait_port(port: int, timeout: float = 15.0) -> None:
    """Block until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on port {port}")


def stop_processes(procs: list[subprocess.Popen[bytes]], grace: float = 5.0) -> None:
    """Reap test subprocesses whatever happened: SIGTERM, then SIGKILL after `grace`."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace)


class PrivateRedis:
    """A redis-server process of one test: start, SIGKILL, restart on the same port."""

    def __init__(self, directory: Path, port: int | None = None, extra: list[str] | None = None):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra = extra or []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (Debian package redis-server)")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        if "--tls-port" not in self.extra:
            wait_port(self.port)
        else:
            wait_port(int(self.extra[self.extra.index("--tls-port") + 1]))

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        self.kill()


def _as_postgres_user() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def _pg_bin(name: str) -> str:
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found (install PostgreSQL server binaries)")
    return found


class PrivatePostgres:
    """A PostgreSQL cluster of one test, run as the `postgres` user when we are root."""

    def __init__(self, directory: Path) -> None:
        self.base = directory
        self.data = directory / "data"
        self.port = free_port()
        self.dbname = "config"

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.dbname}"

    def _run(self, *cmd: str) -> None:
        subprocess.run([*_as_postgres_user(), *cmd], check=True, capture_output=True)

    def init(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.base, "postgres", "postgres")
        self._run(_pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                  "--no-sync", "-E", "UTF8")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                       f"unix_socket_directories = '{self.base}'\nfsync = off\n"
                       "max_connections = 200\n")

    def start(self) -> None:
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.base / "log"),
                  "-w", "-t", "30", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def migrate(self) -> None:
        from agent.db.migrate import migrate

        async def go() -> None:
            conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres")
            try:
                await conn.execute(f"CREATE DATABASE {self.dbname}")
            finally:
                await conn.close()
            db = await asyncpg.connect(self.admin_url)
            try:
                await migrate(db)
            finally:
                await db.close()

        anyio.run(go)

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.base, ignore_errors=True)


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60,
            check: bool = False, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed `config-agent` command (as a user would) and capture its output."""
    import sys

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIG_AGENT_")}
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "agent", *args], env=full_env, text=True,
                          capture_output=True, timeout=timeout, input=stdin)
    if check and proc.returncode != 0:
        raise AssertionError(f"config-agent {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


@contextmanager
def agent_process(env: dict[str, str], url: str, log: Path,
                  timeout: float = 30) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m agent run` with `env` (output to `log`), once `url`/readyz says 200.

    On exit SIGTERM, and the agent must exit 0 within 10 s (else it is killed and the
    test fails).
    """
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "agent", "run"], env=env, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, f"agent exited at start: {log.read_text()[-2000:]}"
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:  # URLError is an OSError
                pass
            assert time.monotonic() < deadline, "agent not ready in time"
            time.sleep(0.05)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
