"""Baselines (issue #7.2, #7.3), measured in the same run as our agents, never computed.

    python -m bench.bench_baselines                  # full run (~6 minutes)
    python -m bench.bench_baselines --smoke          # CI: tiny N, short intervals
    python -m bench.bench_baselines --smoke --skip-etcd   # only where etcd is not installed

Kinds, each hosted by `bench/worker.py` processes (N ≤ 10: one per watcher, else 10):
  ours      config-agent `Agent`s (direct publish after COMMIT): applied in the store; the
            agents expect the relay's heartbeat and a thread publishes it (harness.Heartbeats)
  poll5/1   the seed's design: SELECT every row of the org every 5 s / 1 s
  listen    LISTEN per watcher + SELECT of the changed row on notify (Dapr's
            PostgreSQL configuration store design)
  etcd      a watch on etcd's gRPC gateway (`POST /v3/watch`, streaming HTTP)
For each: COMMIT (or etcd PUT) returned → the LAST watcher held the change, database
statements per change per watcher and per second at idle (pg_stat_statements,
private server), and PostgreSQL backends held.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import random
import time
from typing import Any

import anyio
import httpx

from bench.common import (
    READER_ROLE,
    PrivateEtcd,
    Servers,
    agent_env,
    backends,
    print_table,
    raise_fd_limit,
    statements_by_role,
    summarize,
    write_result,
)
from bench.harness import Heartbeats, TimedWriter, Worker, first_at_or_after, start_workers, stop_all

ENTRIES = 10


async def run_kind(servers: Servers, kind: str, n: int, changes: int, idle_s: float,
                   etcd: PrivateEtcd | None) -> dict[str, Any]:
    """Start N watchers of `kind`, measure idle load, then `changes` changes."""
    interval = {"poll5": 5.0, "poll1": 1.0}.get(kind, 0.0)
    if kind.startswith("poll") and servers.smoke:
        interval /= 10
    worker_kind = "poll" if kind.startswith("poll") else "agents" if kind == "ours" else kind
    extra = ["--interval", str(interval)] if interval else []
    if kind == "etcd":
        assert etcd is not None
        extra = ["--etcd-url", etcd.url]
    env = agent_env(servers)
    # Agents expect the relay's heartbeat (a thread publishes it); the other kinds need none.
    with Heartbeats(servers.redis.url, servers.org) if kind == "ours" else contextlib.nullcontext():
        t = time.monotonic()
        workers = start_workers(worker_kind, n, min(n, 10), env, *extra)
        started_s = time.monotonic() - t
        try:
            await anyio.sleep(max(interval, 0.5))  # every poller through its first round
            held = await backends(servers.pg)
            idle_qps = None
            if idle_s:
                q0 = (await statements_by_role(servers.pg)).get(READER_ROLE, 0)
                t0 = time.monotonic()
                await anyio.sleep(idle_s)
                q1 = (await statements_by_role(servers.pg)).get(READER_ROLE, 0)
                idle_qps = (q1 - q0) / (time.monotonic() - t0)
            for w in workers:
                w.dump()
            q0 = (await statements_by_role(servers.pg)).get(READER_ROLE, 0)
            commits = await make_changes(servers, kind, n, changes, interval, etcd)
            await anyio.sleep(interval + (0.5 if n >= 1000 else 0.2))
            q1 = (await statements_by_role(servers.pg)).get(READER_ROLE, 0)
            last, every, missed = collect_last_and_every(workers, commits)
        finally:
            stop_all(workers)
        return {
            "kind": kind, "watchers": n, "changes": changes, "start_s": round(started_s, 2),
            "last_watcher_ms": summarize(last), "every_watcher_ms": summarize(every),
            "missed": missed, "pg_backends_held": held,
            "statements_per_change_per_watcher": round((q1 - q0) / changes / n, 3)
            if kind != "etcd" else 0,
            "idle_statements_per_s_per_watcher": None if idle_qps is None else round(idle_qps / n, 4),
        }


def change_spacing(n: int) -> float:
    """Seconds between changes, so that each reaches every one of N watchers before the next."""
    return 0.05 if n <= 100 else 0.5


async def make_changes(servers: Servers, kind: str, n: int, changes: int, interval: float,
                        etcd: PrivateEtcd | None) -> list[tuple[int, float]]:
    """Commit `changes` changes, spaced so each one reaches every watcher before the next."""
    rng = random.Random(7)
    spacing = change_spacing(n)
    commits: list[tuple[int, float]] = []
    if kind == "etcd":
        assert etcd is not None
        async with httpx.AsyncClient(base_url=etcd.url) as client:
            for i in range(changes):
                key = base64.b64encode(f"/config/{servers.org}/s1/k1".encode()).decode()
                value = base64.b64encode(f'{{"n": {i}}}'.encode()).decode()
                r = await client.post("/v3/kv/put", json={"key": key, "value": value})
                returned = time.time()  # etcd may notify watchers before the PUT answer arrives
                commits.append((int(r.json()["header"]["revision"]), returned))
                await anyio.sleep(spacing)
        return commits
    writer = await TimedWriter.open(servers.pg.admin_url,
                                    redis_url=servers.redis.url if kind == "ours" else None)
    assert isinstance(writer, TimedWriter)
    try:
        for i in range(changes):
            result = await writer.set(servers.org, "s1", "k1", {"n": i}, actor="bench")
            commits.append((result.revision, writer.committed_at))
            # Polling: a random phase against the pollers' clocks, never two changes per round.
            await anyio.sleep(interval * rng.uniform(1.0, 1.5) if interval else spacing)
    finally:
        await writer.close()
    return commits


def collect_last_and_every(workers: list[Worker], commits: list[tuple[int, float]]
                           ) -> tuple[list[float], list[float], int]:
    """Per change: when the last watcher held it (ms after COMMIT), every watcher's time, misses."""
    seen = [w for worker in workers for w in worker.dump()]
    last: list[float] = []
    every: list[float] = []
    missed = 0
    for rev, t0 in commits:
        times = [first_at_or_after(w, rev) for w in seen]
        got = [(t - t0) * 1000 for t in times if t is not None]
        missed += len(times) - len(got)
        every.extend(got)
        if len(got) == len(times):
            last.append(max(got))
    return last, every, missed


async def main(args: argparse.Namespace) -> dict[str, Any]:
    raise_fd_limit()
    kinds = [k for k in args.kinds.split(",") if not (k == "etcd" and args.skip_etcd)]
    ns = [int(x) for x in args.watchers.split(",")]
    results: list[dict[str, Any]] = []
    with Servers() as servers:
        servers.smoke = args.smoke
        await servers.setup(ENTRIES)
        etcd = None
        if "etcd" in kinds:
            etcd = PrivateEtcd(servers.tmp / "etcd")
            etcd.start()
        try:
            for kind in kinds:
                for n in ns:
                    if kind == "etcd" and n > args.etcd_max:
                        continue
                    if kind.startswith("poll") and n == 10 and not args.smoke:
                        continue  # polling is flat in N: 1, 100 and 1,000 tell the story
                    changes = args.changes
                    if kind == "poll5":
                        changes = args.poll5_changes
                    elif kind == "poll1":
                        changes = args.poll1_changes
                    idle = args.idle_seconds if n == args.idle_n else 0.0
                    doc = await run_kind(servers, kind, n, changes, idle, etcd)
                    results.append(doc)
                    _print_row(doc)
        finally:
            if etcd is not None:
                etcd.stop()
    return {"settings": vars(args), "results": results, "etcd_skipped": args.skip_etcd}


def _print_row(doc: dict[str, Any]) -> None:
    last = doc["last_watcher_ms"]
    print(f"{doc['kind']:>7} N={doc['watchers']:<5} last p50 {last.get('p50')} p99 "
          f"{last.get('p99')} max {last.get('max')} ms; missed {doc['missed']}", flush=True)


def report(doc: dict[str, Any]) -> None:
    rows = []
    for r in doc["results"]:
        last, every = r["last_watcher_ms"], r["every_watcher_ms"]
        rows.append([r["kind"], r["watchers"], last.get("n", 0), last.get("p50"), last.get("p99"),
                     last.get("max"), every.get("p50"), r["missed"],
                     r["statements_per_change_per_watcher"],
                     "-" if r["idle_statements_per_s_per_watcher"] is None
                     else r["idle_statements_per_s_per_watcher"],
                     r["pg_backends_held"]])
    print_table("COMMIT (etcd: PUT) returned → the LAST watcher holds the change (ms), "
                "database load per watcher",
                ["kind", "N", "changes", "last p50", "last p99", "last max", "each p50", "missed",
                 "stmts/change/watcher", "idle stmts/s/watcher", "PG backends"], rows)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="ours,listen,poll1,poll5,etcd")
    parser.add_argument("--watchers", default="1,10,100,1000")
    parser.add_argument("--etcd-max", type=int, default=100, help="largest etcd watcher count")
    parser.add_argument("--changes", type=int, default=30)
    parser.add_argument("--poll1-changes", type=int, default=12)
    parser.add_argument("--poll5-changes", type=int, default=6)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--idle-n", type=int, default=100, help="N at which idle load is measured")
    parser.add_argument("--skip-etcd", action="store_true",
                        help="leave the etcd baseline out (explicit; CI does not pass it)")
    parser.add_argument("--smoke", action="store_true", help="tiny N, polls 10x faster (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.watchers, args.changes, args.poll1_changes, args.poll5_changes = "2", 5, 3, 3
        args.idle_seconds, args.idle_n = 1.0, 2
    doc = anyio.run(main, args, backend="asyncio", backend_options={"use_uvloop": True})
    report(doc)
    print(f"\nwrote {write_result('baselines', doc, smoke=args.smoke)}")


if __name__ == "__main__":
    cli()
