"""A benchmark worker process: hosts K watchers of one kind and reports when each saw what.

    python -m bench.worker KIND --count K [--interval S] [--output-root DIR] [--etcd-url U]
                           [--start-together]

KIND is `agents` (K in-process config-agent `Agent`s, each with its own store,
PostgreSQL connection, Redis subscription and HTTP port; metrics port 0 = off),
`poll` (SELECT the org's rows every --interval seconds), `listen` (one LISTEN
connection per watcher, SELECT the changed row on notify: the Dapr PostgreSQL
configuration-store design) or `etcd` (a watch stream on the etcd gRPC gateway).

Protocol on stdin/stdout, one JSON document per line: the worker prints
`{"ready": true, "ports": [...], "dirs": [...]}` once every watcher runs; on the
line `dump` it prints `{"seen": [[[revision, unix_time], ...] per watcher]}` (the
first moment each watcher held each new revision) and forgets them; `profile on` /
`profile off` run cProfile over that window when BENCH_CPROFILE_DIR is set (the
stats go there); on `quit` (or end of input) it exits. Times are `time.time()`:
the coordinator compares them with its own commit timestamps on the same machine
clock.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import asyncpg

Seen = list[list[tuple[int, float]]]

POLL_SQL = "SELECT service, key, value::text, version, revision FROM service_configs WHERE org_id = $1"
ROW_SQL = ("SELECT value::text, version, revision FROM service_configs "
           "WHERE org_id = $1 AND service = $2 AND key = $3")


def _env(name: str) -> str:
    return os.environ[f"CONFIG_AGENT_{name}"]


async def host_agents(count: int, seen: Seen, output_root: Path | None, ready: dict[str, Any],
                      tg: anyio.abc.TaskGroup, together: bool = False) -> None:
    """K in-process agents; one more task per agent records each new snapshot revision.

    They start one after the other, or all at once with `together` (a fleet restarting)."""
    from agent.app import Agent
    from agent.settings import load_settings

    agents = []
    for i in range(count):
        overrides: dict[str, Any] = {"http_port": 0, "metrics_port": 0}
        if output_root is not None:
            out = output_root / f"a{os.getpid()}_{i}"
            overrides["output_dir"] = out
            ready["dirs"].append(str(out))
        agent = Agent(load_settings(**overrides))
        agents.append(agent)
        if not together:
            await tg.start(agent.run)
            tg.start_soon(_follow_store, agent, seen[i])
    if together:
        async with anyio.create_task_group() as starting:
            for agent in agents:
                starting.start_soon(tg.start, agent.run)
        for i, agent in enumerate(agents):
            tg.start_soon(_follow_store, agent, seen[i])
    for agent in agents:
        assert agent.listening is not None  # set once run() started
        ready["ports"].append(agent.listening.api[0][1])


async def _follow_store(agent: Any, out: list[tuple[int, float]]) -> None:
    snapshot = agent.store.snapshot
    while True:
        snapshot = await agent.store.wait_newer(snapshot.generation)
        out.append((snapshot.revision, time.time()))


async def poll_loop(url: str, org: str, interval: float, out: list[tuple[int, float]],
                    phase: float, task_status: anyio.abc.TaskStatus[None]) -> None:
    """The seed's polling design: every `interval` SELECT every row of the org."""
    conn = await asyncpg.connect(url)
    task_status.started()
    await anyio.sleep(phase)
    last = -1
    next_at = time.monotonic()
    while True:
        rows = await conn.fetch(POLL_SQL, org)
        top = max((r["revision"] for r in rows), default=0)
        if top != last:
            out.append((top, time.time()))
            last = top
        next_at += interval
        await anyio.sleep(max(0.0, next_at - time.monotonic()))


async def listen_loop(url: str, org: str, out: list[tuple[int, float]],
                      task_status: anyio.abc.TaskStatus[None]) -> None:
    """LISTEN per watcher; on each notification of our org, SELECT the changed row."""
    conn = await asyncpg.connect(url)
    send, receive = anyio.create_memory_object_stream[tuple[str, str]](10_000)

    def on_notify(_c: object, _pid: int, _channel: str, payload: str) -> None:
        doc = json.loads(payload)
        if doc.get("org_id") == org:
            send.send_nowait((doc["service"], doc["key"]))

    await conn.add_listener("config_agent_changes", on_notify)
    task_status.started()
    async for service, key in receive:
        row = await conn.fetchrow(ROW_SQL, org, service, key)
        if row is not None:
            out.append((row["revision"], time.time()))


async def etcd_loop(url: str, prefix: str, out: list[tuple[int, float]],
                    task_status: anyio.abc.TaskStatus[None]) -> None:
    """A watch stream on etcd's gRPC gateway (`POST /v3/watch`), one HTTP connection each."""
    import httpx

    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    body = {"create_request": {"key": base64.b64encode(prefix.encode()).decode(),
                               "range_end": base64.b64encode(end.encode()).decode()}}
    async with httpx.AsyncClient(base_url=url, timeout=None) as client:
        async with client.stream("POST", "/v3/watch", json=body) as response:
            lines = response.aiter_lines()
            await lines.__anext__()  # the "created" answer: the watch is registered
            task_status.started()
            async for line in lines:
                now = time.time()
                for event in json.loads(line).get("result", {}).get("events", []):
                    out.append((int(event["kv"]["mod_revision"]), now))


def _profile(on: bool) -> None:
    """`profile on` / `profile off` (bench_fanout_profile --cprofile): cProfile this window only."""
    global _profiler
    directory = os.environ.get("BENCH_CPROFILE_DIR")
    if not directory:
        return
    import cProfile

    if on:
        # CPU time of this thread, not wall time: time the process waited for a core
        # (2 cores, dozens of processes) must not land on whatever function ran last.
        _profiler = cProfile.Profile(time.thread_time)
        _profiler.enable()
    elif _profiler is not None:
        _profiler.disable()
        _profiler.dump_stats(Path(directory) / f"worker-{os.getpid()}.pstats")
        _profiler = None


_profiler: Any = None


async def main(args: argparse.Namespace) -> None:
    seen: Seen = [[] for _ in range(args.count)]
    ready: dict[str, Any] = {"ready": True, "ports": [], "dirs": [], "pid": os.getpid()}
    async with anyio.create_task_group() as tg:
        if args.kind == "agents":
            await host_agents(args.count, seen, args.output_root, ready, tg, args.start_together)
        for i in range(args.count):
            if args.kind == "poll":
                phase = args.interval * ((i * 0.618034) % 1.0)  # spread like pods started at random
                await tg.start(poll_loop, _env("DATABASE_URL"), _env("ORG_ID"), args.interval,
                               seen[i], phase)
            elif args.kind == "listen":
                await tg.start(listen_loop, _env("DATABASE_URL"), _env("ORG_ID"), seen[i])
            elif args.kind == "etcd":
                await tg.start(etcd_loop, args.etcd_url, f"/config/{_env('ORG_ID')}/", seen[i])
        print(json.dumps(ready), flush=True)
        stdin = anyio.wrap_file(sys.stdin)
        async for line in stdin:
            if line.strip() == "dump":
                print(json.dumps({"seen": seen}), flush=True)
                for watcher in seen:
                    watcher.clear()
            elif line.strip() == "quit":
                break
            elif line.strip() in ("profile on", "profile off"):
                _profile(line.strip() == "profile on")
        tg.cancel_scope.cancel()


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("agents", "poll", "listen", "etcd"))
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--output-root", type=Path)
    parser.add_argument("--etcd-url")
    parser.add_argument("--start-together", action="store_true", help="agents: start all at once")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from bench.common import raise_fd_limit

    raise_fd_limit()
    try:
        import uvloop  # noqa: F401

        options: dict[str, Any] = {"use_uvloop": True}
    except ImportError:
        options = {}
    anyio.run(main, args, backend="asyncio", backend_options=options)


if __name__ == "__main__":
    cli()
