"""Coordinator-side tools: worker processes, HTTP long-poll probes, inotify, a timed writer.

The coordinator takes every timestamp that starts a measurement (COMMIT returned)
and, for "served" and "files swapped", every timestamp that ends one, so those
figures are differences of one process's clock. "Applied" times come from the
worker processes (`time.time()`, the same machine clock).
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import struct
import subprocess
import threading
import time
from types import TracebackType
from typing import IO, Any

import anyio
import httpx

from agent.db.writer import ConfigWriter, WriteResult
from bench.common import PYTHON, ROOT, Servers, agent_env, proc_cpu_seconds, proc_rss_mib
from tests.servers import stop_processes

# -- worker processes ---------------------------------------------------------


class Worker:
    """One `python -m bench.worker` process (see its docstring for the protocol)."""

    def __init__(self, kind: str, count: int, env: dict[str, str], *extra: str,
                 stderr: IO[Any] | None = None) -> None:
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "bench.worker", kind, "--count", str(count), *extra],
            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
        )
        self.ready: dict[str, Any] = {}

    def wait_ready(self, timeout: float = 300) -> dict[str, Any]:
        line = _readline(self.proc, timeout)
        self.ready = json.loads(line)
        return self.ready

    def send(self, line: str) -> None:
        """One protocol line (`dump`, `profile on`, …)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def dump(self, timeout: float = 60) -> list[list[tuple[int, float]]]:
        self.send("dump")
        doc = json.loads(_readline(self.proc, timeout))
        return [[(int(r), float(t)) for r, t in w] for w in doc["seen"]]

    def stop(self) -> None:
        """Ask it to quit (kill it if it does not within 15 s), then close our pipes."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=15)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    import select

    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError(f"worker {proc.pid} did not answer within {timeout}s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"worker {proc.pid} exited with {proc.wait()}")
    return line


def start_workers(kind: str, total: int, processes: int, env: dict[str, str],
                  *extra: str, stderr: list[IO[Any]] | None = None,
                  ready_timeout: float = 300) -> list[Worker]:
    """`total` watchers spread over `processes` worker processes, all ready.

    `stderr`: one open file per process for its log (default: inherited)."""
    per = [total // processes + (1 if i < total % processes else 0) for i in range(processes)]
    workers = [Worker(kind, n, env, *extra, stderr=stderr[i] if stderr else None)
               for i, n in enumerate(per) if n > 0]
    try:
        deadline = time.monotonic() + ready_timeout
        for w in workers:
            w.wait_ready(max(0.1, deadline - time.monotonic()))
    except BaseException:
        stop_all(workers)
        raise
    return workers


def stop_all(workers: list[Worker]) -> None:
    for w in workers:
        w.stop()


def first_at_or_after(seen: list[tuple[int, float]], revision: int) -> float | None:
    """When a watcher first held `revision` or a later one (None: never)."""
    for rev, when in seen:
        if rev >= revision:
            return when
    return None


# -- the relay as a real process ----------------------------------------------


def start_relay(servers: Servers, stderr: IO[Any] | None = None) -> subprocess.Popen[bytes]:
    """`python -m agent relay` with the superuser URL (it LISTENs), no metrics port."""
    env = agent_env(servers)
    env["CONFIG_AGENT_DATABASE_URL"] = servers.pg.admin_url
    proc = subprocess.Popen([PYTHON, "-m", "agent", "relay"], cwd=ROOT, env=env, stderr=stderr)
    time.sleep(1.5)  # it LISTENs and re-announces within well under a second
    if proc.poll() is not None:
        raise RuntimeError("relay exited at start")
    return proc


class Heartbeats:
    """Publishes an org's heartbeat every `interval` seconds from a thread, as a relay does.

    Agents run as deployed: they expect a heartbeat (`heartbeat_interval`, 5 s) and would
    resubscribe after 3 silent intervals. A thread, not a task: the coordinator blocks
    while it starts workers. Changes are announced once, by the writer's direct publish;
    a relay would add one duplicate announcement per replica (dropped by version).
    """

    def __init__(self, redis_url: str, org_id: str, interval: float = 5.0) -> None:
        import redis

        from agent.model import heartbeat_channel, heartbeat_json

        self._client = redis.Redis.from_url(redis_url, socket_timeout=5)
        self._channel = heartbeat_channel(org_id)
        self._message = lambda: heartbeat_json(org_id, time.time())
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeats", daemon=True)
        self.sent = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self._client.publish(self._channel, self._message())
            self.sent += 1
            self._stop.wait(self._interval)

    def __enter__(self) -> Heartbeats:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._client.close()


# -- writer with a COMMIT timestamp --------------------------------------------


class TimedWriter(ConfigWriter):
    """ConfigWriter that notes when COMMIT returned (just before its direct publish)."""

    committed_at = 0.0

    async def _announce(self, result: WriteResult, committed_at: float) -> None:
        self.committed_at = time.time()
        await super()._announce(result, committed_at)


# -- HTTP long-poll probes ----------------------------------------------------


class _LongPoll(asyncio.Protocol):
    """One keep-alive connection issuing `GET /v1/configs?after=R&wait=30` requests."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.first_byte = 0.0
        self.buffer = b""
        self.done: asyncio.Future[float] | None = None
        self.status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def request(self, after: int) -> asyncio.Future[float]:
        assert self.transport is not None
        self.first_byte = 0.0
        self.buffer = b""
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(b"GET /v1/configs?after=%d&wait=30 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                             % after)
        return self.done

    def data_received(self, data: bytes) -> None:
        if not self.first_byte:
            self.first_byte = time.time()
        self.buffer += data
        head, sep, body = self.buffer.partition(b"\r\n\r\n")
        if not sep:
            return
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(body) >= length and self.done is not None and not self.done.done():
            self.status = int(head.split(b" ", 2)[1])
            self.done.set_result(self.first_byte)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("long-poll connection lost"))


class LongPollProbe:
    """Parks one long-poll per agent; the answer's first byte is the "served" moment."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.conns: list[_LongPoll] = []

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        for port in self.ports:
            _, proto = await loop.create_connection(_LongPoll, "127.0.0.1", port)
            self.conns.append(proto)

    def park(self, after: int) -> list[asyncio.Future[float]]:
        return [c.request(after) for c in self.conns]

    def close(self) -> None:
        for c in self.conns:
            if c.transport is not None:
                c.transport.close()


# -- inotify on the file sets -----------------------------------------------

_IN_MOVED_TO = 0x00000080
_IN_CREATE = 0x00000100
_IN_NONBLOCK = 0o4000
_EVENT = struct.Struct("iIII")


class SwapWatcher:
    """inotify on each output dir: the moment `..data` is renamed into place (the swap)."""

    def __init__(self, dirs: list[str]) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(_IN_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.index: dict[int, int] = {}
        for i, d in enumerate(dirs):
            wd = self._libc.inotify_add_watch(self.fd, os.fsencode(d), _IN_MOVED_TO | _IN_CREATE)
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {d}")
            self.index[wd] = i
        self.swaps: list[list[float]] = [[] for _ in dirs]

    def start(self) -> None:
        asyncio.get_running_loop().add_reader(self.fd, self._read)

    def _read(self) -> None:
        now = time.time()
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return
        offset = 0
        while offset < len(data):
            wd, _mask, _cookie, length = _EVENT.unpack_from(data, offset)
            name = data[offset + _EVENT.size: offset + _EVENT.size + length].rstrip(b"\0")
            offset += _EVENT.size + length
            if name == b"..data" and wd in self.index:
                self.swaps[self.index[wd]].append(now)

    def first_after(self, i: int, t0: float) -> float | None:
        for when in self.swaps[i]:
            if when >= t0:
                return when
        return None

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.fd)
        os.close(self.fd)


# -- a real agent process: start → ready, idle cost ------------------------------


async def start_agent_process(servers: Servers, **settings: Any) -> tuple[subprocess.Popen[bytes],
                                                                            float, int]:
    """`python -m agent run`; returns (process, seconds from spawn to /readyz 200, port)."""
    from agent.demo_servers import free_port

    port = free_port()
    env = agent_env(servers, http_port=port, **settings)
    t0 = time.perf_counter()
    proc = subprocess.Popen([PYTHON, "-m", "agent", "run"], cwd=ROOT, env=env)
    async with httpx.AsyncClient(timeout=1) as client:
        with anyio.fail_after(60):
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"agent exited with {proc.returncode}")
                try:
                    r = await client.get(f"http://127.0.0.1:{port}/readyz")
                    if r.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await anyio.sleep(0.002)
    return proc, time.perf_counter() - t0, port


async def measure_idle(servers: Servers, seconds: float, settle: float = 2.0) -> dict[str, Any]:
    """Queries, CPU and RSS of a real agent process between reconciles."""
    from bench.common import READER_ROLE, statements_by_role

    proc, ready_s, _port = await start_agent_process(servers)
    try:
        await anyio.sleep(settle)
        q0 = (await statements_by_role(servers.pg)).get(READER_ROLE, 0)
        c0, t0 = proc_cpu_seconds(proc.pid), time.monotonic()
        await anyio.sleep(seconds)
        c1, t1 = proc_cpu_seconds(proc.pid), time.monotonic()
        q1 = (await statements_by_role(servers.pg)).get(READER_ROLE, 0)
        return {
            "window_s": round(t1 - t0, 2),
            "queries": q1 - q0,
            "cpu_percent": round(100 * (c1 - c0) / (t1 - t0), 3),
            "cpu_seconds": round(c1 - c0, 3),
            "rss_mib": round(proc_rss_mib(proc.pid), 1),
            "ready_s": round(ready_s, 3),
        }
    finally:
        stop_processes([proc], grace=10)
