"""A relay outage is not a storm (issue #21.3): resubscribes and replay reads per second.

    python -m bench.bench_outage [--agents 200] [--processes 4] [--relay-outage 90]
                                 [--changes 3] [--change-gap 5] [--smoke]

How the agents run: as deployed with a relay. A real relay process (`python -m agent
relay`, superuser URL, its default heartbeat interval of 5 s) publishes heartbeats;
the agents (`--agents` of them in `--processes` bench/worker.py processes, reader
role, default settings: heartbeats expected, deaf after 3 × 5 s, fleet reports on)
read the seeded org. Phases, on one timeline that starts at the kill:

1. healthy: the relay up for `--healthy` seconds; the agents' logs must hold no
   "deaf" and no "subscription lost" line;
2. outage: the relay SIGKILLed, `--relay-outage` seconds with no change;
3. still down: `--changes` changes by the direct-publish writer (COMMIT, then PUBLISH
   from the writer itself, as the CLI and the library do), `--change-gap` s apart,
   each of which must reach every agent (missed = agents that did not hold it before
   the relay came back; latency = COMMIT returned → the last agent held it);
4. the relay restarted, `--after` seconds.

Per second after the kill: new subscriptions (`CLIENT LIST`: subscribed clients with an
id never seen subscribed before, so one per resubscribe that lives past a sample), new
Redis connections (`INFO stats` total_connections_received) and statements of the
reader role (pg_stat_statements: the agents' replay reads, fallback polls and
reconciles). Private servers on loopback; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from pathlib import Path
from typing import IO, Any

import anyio
import redis.asyncio as aioredis

from bench.common import (
    PYTHON,
    READER_ROLE,
    ROOT,
    Servers,
    agent_env,
    print_table,
    raise_fd_limit,
    statements_by_role,
    summarize,
    write_result,
)
from bench.harness import TimedWriter, Worker, first_at_or_after, start_workers, stop_all
from tests.servers import stop_processes

ENTRIES = 10
# Log lines that mean "the subscription was made again" (agent.redis warnings).
DEAF_LINE = "deaf"
LOST_LINE = "subscription lost"


def start_relay_process(servers: Servers, heartbeat: float | None, stderr: IO[Any]) -> subprocess.Popen[bytes]:
    """`python -m agent relay` (superuser URL: it LISTENs); heartbeat at its default unless given."""
    env = agent_env(servers) if heartbeat is None else agent_env(servers, heartbeat_interval=heartbeat)
    env["CONFIG_AGENT_DATABASE_URL"] = servers.pg.admin_url
    return subprocess.Popen([PYTHON, "-m", "agent", "relay"], cwd=ROOT, env=env, stderr=stderr)


async def wait_heard(client: aioredis.Redis, servers: Servers, seconds: float) -> bool:
    """True once a heartbeat of the org was seen on Redis (the relay is up and LISTENs)."""
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(f"config:{servers.org}:heartbeat")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            msg = await pubsub.get_message(timeout=max(0.01, deadline - time.monotonic()))
            if msg is not None and msg["type"] == "message":
                return True
        return False
    finally:
        await pubsub.aclose()


class Sampler:
    """Once a second: new subscriptions, new connections, reader statements (cumulative)."""

    def __init__(self, servers: Servers, client: aioredis.Redis) -> None:
        self.servers = servers
        self.client = client
        self.subscribed: set[int] = set()  # ids of every client ever seen subscribed
        self.rows: list[dict[str, Any]] = []

    async def _subscribers(self) -> set[int]:
        clients = await self.client.client_list()
        return {int(c["id"]) for c in clients
                if int(c.get("psub", 0)) or int(c.get("ssub", 0)) or int(c.get("sub", 0))}

    async def snapshot(self) -> tuple[int, int, int]:
        """(new subscriptions since the last snapshot, connections received, reader statements)."""
        ids = await self._subscribers()
        new = ids - self.subscribed
        self.subscribed |= ids
        received = int((await self.client.info("stats"))["total_connections_received"])
        statements = (await statements_by_role(self.servers.pg)).get(READER_ROLE, 0)
        return len(new), received, statements

    async def run(self, t0: float, seconds: int) -> None:
        """Sample at t0 + 1, t0 + 2 … (monotonic), `seconds` times; row i covers (i, i+1]."""
        _, received, statements = await self.snapshot()
        for i in range(seconds):
            await anyio.sleep(max(0.0, t0 + i + 1 - time.monotonic()))
            new, r, s = await self.snapshot()
            self.rows.append({"second": i, "subscriptions": new, "connections": r - received,
                              "reader_statements": s - statements})
            received, statements = r, s


def count_lines(paths: list[Path], offsets: list[int]) -> tuple[dict[str, int], list[int]]:
    """Deaf / lost lines the workers logged since `offsets`; the new offsets."""
    counts = {"deaf": 0, "lost": 0}
    ends = []
    for path, start in zip(paths, offsets, strict=True):
        data = path.read_bytes()
        ends.append(len(data))
        for line in data[start:].decode(errors="replace").splitlines():
            if DEAF_LINE in line.lower():
                counts["deaf"] += 1
            elif LOST_LINE in line.lower():
                counts["lost"] += 1
    return counts, ends


async def run(servers: Servers, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    hb = args.heartbeat_interval
    env = agent_env(servers) if hb is None else agent_env(servers, heartbeat_interval=hb)
    relay_log = open(log_dir / "relay.log", "wb")  # closed below
    relay = start_relay_process(servers, hb, relay_log)
    worker_logs = [log_dir / f"worker-{i}.log" for i in range(args.processes)]
    files = [open(p, "w") for p in worker_logs]  # closed below
    workers: list[Worker] = []
    client = aioredis.Redis(host="127.0.0.1", port=servers.redis.port)
    writer = None
    try:
        if not await wait_heard(client, servers, 30):
            raise RuntimeError("the relay published no heartbeat within 30 s")
        t = time.monotonic()
        workers = await anyio.to_thread.run_sync(
            lambda: start_workers("agents", args.agents, args.processes, env, stderr=files))
        started_s = time.monotonic() - t
        offsets = [0] * len(worker_logs)
        _, offsets = count_lines(worker_logs, offsets)  # start-up lines are not the healthy phase
        await anyio.sleep(args.healthy)
        healthy, offsets = count_lines(worker_logs, offsets)
        for w in workers:
            w.dump()
        writer = await TimedWriter.open(servers.pg.admin_url, redis_url=servers.redis.url)
        assert isinstance(writer, TimedWriter)

        quiet = args.relay_outage
        down_s = quiet + args.changes * args.change_gap
        total = int(down_s + args.after) + 1
        sampler = Sampler(servers, client)
        commits: list[tuple[int, float]] = []
        events: list[tuple[float, str]] = []
        restarted_at = 0.0
        async with anyio.create_task_group() as tg:
            relay.kill()
            relay.wait()
            t_kill, kill_wall = time.monotonic(), time.time()
            events.append((0.0, "relay killed"))
            tg.start_soon(sampler.run, t_kill, total)
            await anyio.sleep(quiet)
            outage_quiet, offsets = count_lines(worker_logs, offsets)
            for i in range(args.changes):
                result = await writer.set(servers.org, "s1", "k1", {"outage": i}, actor="bench")
                commits.append((result.revision, writer.committed_at))
                events.append((round(time.monotonic() - t_kill, 1), f"change {i + 1}"))
                await anyio.sleep(max(0.0, t_kill + quiet + (i + 1) * args.change_gap - time.monotonic()))
            outage_changes, offsets = count_lines(worker_logs, offsets)
            restarted_at = time.time()
            events.append((round(time.monotonic() - t_kill, 1), "relay restarted"))
            relay = start_relay_process(servers, hb, relay_log)
        after, offsets = count_lines(worker_logs, offsets)
        seen = [w for worker in workers for w in worker.dump()]
    finally:
        if writer is not None:
            await writer.close()
        stop_all(workers)
        stop_processes([relay], grace=10)
        relay_log.close()
        for f in files:
            f.close()
        await client.aclose()

    changes = []
    for rev, t0 in commits:
        times = [first_at_or_after(w, rev) for w in seen]
        before_restart = [(t - t0) * 1000 for t in times if t is not None and t < restarted_at]
        changes.append({
            "revision": rev, "at_s": round(t0 - kill_wall, 1),
            "missed": len(times) - len(before_restart),
            "last_agent_ms": round(max(before_restart), 1) if len(before_restart) == len(times) else None,
            "agents_ms": summarize(before_restart),
        })
    rows = sampler.rows
    quiet_rows = rows[:int(quiet)]
    subs = [r["subscriptions"] for r in quiet_rows]
    reads = [r["reader_statements"] for r in quiet_rows]
    busiest = max(subs, default=0)
    return {
        "settings": {k: v for k, v in vars(args).items()},
        "agents": args.agents, "start_s": round(started_s, 1),
        "heartbeat_interval": hb if hb is not None else "default",
        "per_second": rows, "events": [{"at_s": at, "event": what} for at, what in events],
        "quiet_outage": {
            "seconds": quiet,
            "resubscribes": sum(subs),
            "resubscribes_per_agent": round(sum(subs) / args.agents, 2),
            "max_resubscribes_in_1s": busiest,
            "busiest_second_share": round(busiest / sum(subs), 3) if sum(subs) else 0.0,
            "seconds_with_resubscribes": sum(1 for n in subs if n),
            "new_connections": sum(r["connections"] for r in quiet_rows),
            "reader_statements": sum(reads),
            "max_reader_statements_in_1s": max(reads, default=0),
            "median_reader_statements_per_s": statistics.median(reads) if reads else 0,
        },
        "log_lines": {"healthy": healthy, "outage_quiet": outage_quiet, "outage_changes": outage_changes,
                      "after_restart": after},
        "changes": changes,
    }


def _decades(rows: list[dict[str, Any]], field: str) -> list[list[Any]]:
    """One table row per 10 s: the per-second counts +0 … +9 and their sum."""
    out = []
    for start in range(0, len(rows), 10):
        window = [r[field] for r in rows[start:start + 10]]
        out.append([f"{start}–{start + 9}", *window, *([""] * (10 - len(window))), sum(window)])
    return out


def report(doc: dict[str, Any]) -> None:
    q = doc["quiet_outage"]
    print_table(f"Relay SIGKILLed, {q['seconds']:g} s with no change: {doc['agents']} agents "
                f"(heartbeat interval {doc['heartbeat_interval']})",
                ["resubscribes", "per agent", "max in 1 s", "busiest 1 s share", "seconds with any",
                 "new Redis connections", "reader statements", "max/s", "median/s"],
                [[q["resubscribes"], q["resubscribes_per_agent"], q["max_resubscribes_in_1s"],
                  q["busiest_second_share"], q["seconds_with_resubscribes"], q["new_connections"],
                  q["reader_statements"], q["max_reader_statements_in_1s"], q["median_reader_statements_per_s"]]])
    header = ["s after kill", *[f"+{i}" for i in range(10)], "sum"]
    print_table("Resubscribes per second (new subscribed Redis clients)", header,
                _decades(doc["per_second"], "subscriptions"))
    print_table("Reader statements per second (replay reads, polls, reconciles)", header,
                _decades(doc["per_second"], "reader_statements"))
    print("\nevents: " + ", ".join(f"{e['event']} at {e['at_s']:g} s" for e in doc["events"]))
    lines = doc["log_lines"]
    print_table("Agents' log lines (all agents)", ["phase", "deaf", "subscription lost"],
                [[phase, c["deaf"], c["lost"]] for phase, c in lines.items()])
    print_table("Changes published directly during the outage (relay down)",
                ["change", "s after kill", "missed", "last agent ms", "p50 agent ms"],
                [[i + 1, c["at_s"], c["missed"], "-" if c["last_agent_ms"] is None else c["last_agent_ms"],
                  c["agents_ms"].get("p50", "-")] for i, c in enumerate(doc["changes"])])


async def main(args: argparse.Namespace) -> dict[str, Any]:
    raise_fd_limit()
    with Servers() as servers:
        servers.smoke = args.smoke
        await servers.setup(ENTRIES)
        log_dir = Path(servers.tmp) / "logs"
        log_dir.mkdir()
        return await run(servers, args, log_dir)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--relay-outage", type=float, default=90.0,
                        help="seconds the relay stays down before the changes")
    parser.add_argument("--changes", type=int, default=3, help="direct-publish changes while the relay is down")
    parser.add_argument("--change-gap", type=float, default=5.0)
    parser.add_argument("--healthy", type=float, default=20.0, help="seconds with the relay up first")
    parser.add_argument("--after", type=float, default=10.0, help="seconds after the relay restarted")
    parser.add_argument("--heartbeat-interval", type=float, default=None,
                        help="relay and agents (default: the settings' default, 5 s)")
    parser.add_argument("--smoke", action="store_true", help="4 agents, 0.5 s heartbeats, a 3 s outage (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.agents, args.processes, args.relay_outage = 4, 2, 3.0
        args.change_gap, args.healthy, args.after, args.heartbeat_interval = 0.5, 1.0, 1.0, 0.5
    doc = anyio.run(main, args, backend="asyncio", backend_options={"use_uvloop": True})
    report(doc)
    print(f"\nwrote {write_result('outage', doc, smoke=args.smoke)}")


if __name__ == "__main__":
    cli()
