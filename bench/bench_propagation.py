"""Propagation benchmark (issues #3 and #7.1): COMMIT returned → applied → served → files swapped.

    python -m bench.bench_propagation                      # --agents 1: issue #3
    python -m bench.bench_propagation --agents 1,10,100,1000 --runs 3
    python -m bench.bench_propagation --smoke              # CI: tiny N, a few seconds

`--agents 1` (always part of the run when 1 is listed) measures one in-process
`Agent` against the raw Redis PUBLISH→receive round trip taken in the same loop,
the writer's transaction (BEGIN … UPDATE … COMMIT), database statements per change
(the agent's own counter and pg_stat_statements for the reader role), and then
the idle cost of a real `python -m agent run` process.

For every N, real agent processes (N ≤ 10: one agent per process; more: 10
processes sharing N in-process `Agent`s, each with its own store, PostgreSQL
connection, Redis subscription, HTTP port and file set; metrics port 0 = off)
are measured three ways per change, reported for the LAST agent to get there:
applied (store snapshot, in the agent process), served (first byte of a parked
`GET /v1/configs?after=R&wait=30` answer) and swapped (inotify: `..data` renamed).
Both writer paths: direct publish after COMMIT, and trigger → `config-agent relay`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import anyio
import redis.asyncio as aioredis

from bench.common import (
    READER_ROLE,
    Servers,
    agent_env,
    backends,
    median_of_runs,
    print_table,
    raise_fd_limit,
    statements_by_role,
    summarize,
    write_result,
)
from bench.harness import (
    LongPollProbe,
    SwapWatcher,
    TimedWriter,
    first_at_or_after,
    measure_idle,
    start_relay,
    start_workers,
    stop_all,
)
from tests.servers import stop_processes

ENTRIES = 10
PATHS = ("direct", "relay")


async def _open_writer(servers: Servers, path: str) -> TimedWriter:
    redis_url = servers.redis.url if path == "direct" else None
    writer = await TimedWriter.open(servers.pg.admin_url, redis_url=redis_url)
    assert isinstance(writer, TimedWriter)
    return writer


# -- issue #3: one in-process agent -------------------------------------------------


async def in_process(servers: Servers, path: str, changes: int) -> dict[str, Any]:
    """One in-process Agent: commit → applied in its store, beside raw Redis round trips."""
    from agent.app import Agent
    from agent.settings import load_settings

    agent = Agent(load_settings(
        database_url=servers.pg.reader_url(), redis_url=servers.redis.url, org_id=servers.org,
        http_port=0, metrics_port=0, log_level="warning"))
    applied: list[tuple[int, float]] = []
    raw = aioredis.from_url(servers.redis.url)
    sub = raw.pubsub()
    await sub.subscribe("bench:rtt")
    await sub.get_message(timeout=1)  # the subscribe confirmation
    writer = await _open_writer(servers, path)
    commit_ms: list[float] = []
    propagation_ms: list[float] = []
    rtt_ms: list[float] = []
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(agent.run)

            async def follow() -> None:
                snap = agent.store.snapshot
                while True:
                    snap = await agent.store.wait_newer(snap.generation)
                    applied.append((snap.revision, time.time()))

            tg.start_soon(follow)
            q_agent0 = agent.source.queries
            q_pg0 = (await statements_by_role(servers.pg)).get(READER_ROLE, 0)
            for i in range(changes):
                # The raw Redis round trip, same loop, same moment.
                t = time.perf_counter()
                await raw.publish("bench:rtt", b"x")
                while (await sub.get_message(timeout=1)) is None:
                    pass
                rtt_ms.append((time.perf_counter() - t) * 1000)
                start = time.time()
                result = await writer.set(servers.org, "s0", "k0", {"n": i}, actor="bench")
                commit_ms.append((writer.committed_at - start) * 1000)
                with anyio.fail_after(10):
                    while (done := first_at_or_after(applied, result.revision)) is None:
                        await anyio.sleep(0.0002)
                propagation_ms.append((done - writer.committed_at) * 1000)
                applied.clear()
                await anyio.sleep(0.002)
            q_agent = agent.source.queries - q_agent0
            await anyio.sleep(0.3)
            q_pg = (await statements_by_role(servers.pg)).get(READER_ROLE, 0) - q_pg0
            tg.cancel_scope.cancel()
    finally:
        await agent.source.close()
        await writer.close()
        await sub.aclose()  # type: ignore[no-untyped-call]
        await raw.aclose()
    return {
        "path": path,
        "changes": changes,
        "commit_to_applied_ms": summarize(propagation_ms),
        "redis_publish_to_receive_ms": summarize(rtt_ms),
        "writer_transaction_ms": summarize(commit_ms),
        "queries_per_change_agent_counter": round(q_agent / changes, 3),
        "statements_per_change_pg_stat_statements": round(q_pg / changes, 3),
    }


# -- issue #7.1: N agent processes ---------------------------------------------------


async def fleet_batch(servers: Servers, workers: list[Any], probe: LongPollProbe,
                      swaps: SwapWatcher | None, path: str, changes: int,
                      revision: int) -> tuple[dict[str, Any], int]:
    """`changes` commits; per change the last agent's applied / served / swapped time."""
    n = len(probe.ports)
    park = 0.002 if n <= 10 else 0.05 if n <= 100 else 0.25
    writer = await _open_writer(servers, path)
    commits: list[tuple[int, float]] = []
    last_served: list[float] = []
    all_served: list[float] = []
    last_swapped: list[float] = []
    timeouts = 0
    q0 = (await statements_by_role(servers.pg)).get(READER_ROLE, 0)
    try:
        for i in range(changes):
            futures = probe.park(revision)
            await asyncio.sleep(park)
            result = await writer.set(servers.org, "s1", "k1", {"n": i, "t": time.time()},
                                      actor="bench")
            t0 = writer.committed_at
            commits.append((result.revision, t0))
            revision = result.revision
            done, pending = await asyncio.wait(futures, timeout=10)
            timeouts += len(pending)
            served = [(f.result() - t0) * 1000 for f in done if f.exception() is None]
            if served:
                last_served.append(max(served))
                all_served.extend(served)
            if swaps is not None:
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    got = [swaps.first_after(j, t0) for j in range(len(swaps.swaps))]
                    if all(g is not None for g in got):
                        last_swapped.append((max(g for g in got if g) - t0) * 1000)
                        break
                    await asyncio.sleep(0.001)
                else:
                    timeouts += 1
            await asyncio.sleep(park)
    finally:
        await writer.close()
    await asyncio.sleep(0.3)
    statements = (await statements_by_role(servers.pg)).get(READER_ROLE, 0) - q0
    seen = [w for worker in workers for w in worker.dump()]
    last_applied: list[float] = []
    for rev, t0 in commits:
        times = [first_at_or_after(w, rev) for w in seen]
        if all(t is not None for t in times):
            last_applied.append((max(t for t in times if t) - t0) * 1000)
    return {
        "last_applied_ms": summarize(last_applied),
        "last_served_ms": summarize(last_served),
        "every_agent_served_ms": summarize(all_served),
        "last_files_swapped_ms": summarize(last_swapped) if swaps is not None else None,
        "statements_per_change_per_agent": round(statements / (changes * n), 3),
        "timeouts": timeouts,
    }, revision


async def fleet(servers: Servers, n: int, changes: int, runs: int, files: bool,
                paths: tuple[str, ...]) -> list[dict[str, Any]]:
    processes = min(n, 10)
    output_root = servers.tmp / f"out{n}" if files else None
    extra: list[str] = []
    if output_root is not None:
        output_root.mkdir()
        extra = ["--output-root", str(output_root)]
    env = agent_env(servers)
    t = time.monotonic()
    workers = start_workers("agents", n, processes, env, *extra)
    started_s = time.monotonic() - t
    results = []
    try:
        ports = [p for w in workers for p in w.ready["ports"]]
        dirs = [d for w in workers for d in w.ready["dirs"]]
        probe = LongPollProbe(ports)
        await probe.open()
        swaps = SwapWatcher(dirs) if files else None
        if swaps is not None:
            swaps.start()
        held = await backends(servers.pg)
        for w in workers:
            w.dump()
        revision = await _org_revision(servers)
        for path in paths:
            relay = start_relay(servers) if path == "relay" else None
            try:
                run_docs = []
                for _ in range(runs):
                    doc, revision = await fleet_batch(servers, workers, probe, swaps, path,
                                                      changes, revision)
                    run_docs.append(doc)
            finally:
                if relay is not None:
                    stop_processes([relay], grace=10)
            results.append(_fleet_doc(n, processes, path, changes, started_s, held, run_docs))
        probe.close()
        if swaps is not None:
            swaps.close()
    finally:
        stop_all(workers)
    return results


def _fleet_doc(n: int, processes: int, path: str, changes: int, started_s: float, held: int,
               runs: list[dict[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {"agents": n, "processes": processes, "path": path,
                           "changes_per_run": changes, "fleet_start_s": round(started_s, 2),
                           "pg_backends_held": held, "runs": runs}
    for field in ("last_applied_ms", "last_served_ms", "every_agent_served_ms",
                  "last_files_swapped_ms"):
        if runs[0][field] is not None:
            doc[field] = median_of_runs([r[field] for r in runs])
    doc["statements_per_change_per_agent"] = statistics.median(
        r["statements_per_change_per_agent"] for r in runs)
    doc["timeouts"] = sum(r["timeouts"] for r in runs)
    return doc


async def _org_revision(servers: Servers) -> int:
    import asyncpg

    conn = await asyncpg.connect(servers.pg.admin_url)
    try:
        return int(await conn.fetchval(
            "SELECT coalesce(max(revision), 0) FROM config_orgs WHERE org_id = $1", servers.org))
    finally:
        await conn.close()


# -- command ---------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> dict[str, Any]:
    raise_fd_limit()
    agents = [int(a) for a in args.agents.split(",")]
    paths = tuple(args.paths.split(","))
    doc: dict[str, Any] = {"settings": vars(args) | {"output_root": None}}
    with Servers() as servers:
        await servers.setup(ENTRIES)
        if 1 in agents:
            doc["in_process"] = []
            for path in paths:
                relay = start_relay(servers) if path == "relay" else None
                try:
                    runs = [await in_process(servers, path, args.changes_1)
                            for _ in range(args.runs)]
                finally:
                    if relay is not None:
                        stop_processes([relay], grace=10)
                doc["in_process"].append({
                    "path": path, "runs": runs,
                    **{f: median_of_runs([r[f] for r in runs]) for f in (
                        "commit_to_applied_ms", "redis_publish_to_receive_ms",
                        "writer_transaction_ms")},
                    "queries_per_change_agent_counter": statistics.median(
                        r["queries_per_change_agent_counter"] for r in runs),
                    "statements_per_change_pg_stat_statements": statistics.median(
                        r["statements_per_change_pg_stat_statements"] for r in runs),
                })
            doc["idle"] = await measure_idle(servers, args.idle_seconds)
        doc["fleet"] = []
        for n in agents:
            # Fewer changes as N grows (each costs N fetches): 1,000 / 300 / 100 / 30 by default.
            share = 1.0 if n == 1 else 0.3 if n <= 10 else 0.1 if n <= 100 else 0.03
            changes = max(args.min_changes, int(args.changes_1 * share))
            files = not args.no_files and n <= args.files_max
            doc["fleet"].extend(await fleet(servers, n, changes, args.runs, files, paths))
    return doc


def report(doc: dict[str, Any]) -> None:
    if "in_process" in doc:
        rows = []
        for r in doc["in_process"]:
            a, raw, w = (r["commit_to_applied_ms"], r["redis_publish_to_receive_ms"],
                         r["writer_transaction_ms"])
            rows.append([r["path"], a["n"], a["p50"], a["p99"], a["max"], raw["p50"], raw["p99"],
                         w["p50"], w["p99"], r["queries_per_change_agent_counter"],
                         r["statements_per_change_pg_stat_statements"]])
        print_table("One in-process agent: COMMIT returned → applied in the store (ms, median of "
                    f"{doc['in_process'][0]['commit_to_applied_ms']['runs']} runs)",
                    ["path", "changes", "p50", "p99", "max", "raw Redis p50", "raw Redis p99",
                     "writer txn p50", "writer txn p99", "queries/change", "pg statements/change"],
                    rows)
        idle = doc["idle"]
        print_table("Idle `python -m agent run` (10 entries, between reconciles)",
                    ["window s", "queries", "CPU %", "RSS MiB"],
                    [[idle["window_s"], idle["queries"], idle["cpu_percent"], idle["rss_mib"]]])
    rows = []
    for r in doc["fleet"]:
        ap, sv, sw = r["last_applied_ms"], r["last_served_ms"], r.get("last_files_swapped_ms")
        rows.append([r["agents"], r["processes"], r["path"], ap.get("n", 0), ap.get("p50"),
                     ap.get("p99"), sv.get("p50"), sv.get("p99"), sv.get("max"),
                     sw.get("p50") if sw else "-", sw.get("p99") if sw else "-",
                     r["statements_per_change_per_agent"], r["pg_backends_held"], r["timeouts"]])
    print_table("Last agent to get there: COMMIT returned → applied / served (HTTP long-poll) / "
                "files swapped (ms, median of runs)",
                ["agents", "procs", "path", "changes", "applied p50", "applied p99", "served p50",
                 "served p99", "served max", "files p50", "files p99", "stmts/change/agent",
                 "PG backends", "timeouts"], rows)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", default="1", help="comma-separated agent counts (default 1)")
    parser.add_argument("--paths", default="direct,relay")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--changes-1", type=int, default=1000,
                        help="changes per run with one agent (fewer, at least --min-changes, for more)")
    parser.add_argument("--min-changes", type=int, default=30)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--no-files", action="store_true", help="no output_dir / swap timing")
    parser.add_argument("--files-max", type=int, default=100,
                        help="largest N given a file set each (1,000 file sets fsync for minutes)")
    parser.add_argument("--smoke", action="store_true", help="tiny N, a few seconds (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.agents, args.runs, args.changes_1, args.min_changes = "1", 1, 30, 10
        args.idle_seconds = 1.0
    doc = anyio.run(main, args, backend="asyncio", backend_options={"use_uvloop": True})
    report(doc)
    path = write_result("propagation", doc, smoke=args.smoke)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    cli()

