"""Fleet reports (README "Did every pod get it?"): their idle cost and how exactly `set --wait` ends.

    python -m bench.bench_fleet [--agents 200] [--processes 4] [--report-interval 10]
                                [--idle 60] [--changes 5] [--smoke]

Private PostgreSQL and Redis; `--agents` real agents hosted by `--processes` worker
processes (bench/worker.py). Measured:

- idle: with no change for `--idle` seconds, Redis commands per agent per second
  (INFO commandstats after CONFIG RESETSTAT: the reports' SET + ZADD) and the Redis
  memory of one report and of the org's index per agent;
- per change: `config-agent set … --wait --json` as a user runs it: the CLI's own wait
  (`elapsed_s`, from COMMIT to enough reports) and how long after the last agent applied
  the change (workers' clocks) the command had returned (includes its exit), beside a
  Redis PING round trip of the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from typing import Any

import anyio
import redis as redis_sync

from agent.fleet import agent_key, index_key
from bench.common import PYTHON, ROOT, Servers, agent_env, print_table, summarize, write_result
from bench.harness import Worker, first_at_or_after


def idle_cost(servers: Servers, agents: int, seconds: float) -> dict[str, Any]:
    """Commands Redis ran for the idle fleet, per agent and second; memory per agent."""
    r = redis_sync.Redis(port=servers.redis.port)
    try:
        r.config_resetstat()
        time.sleep(seconds)
        stats = r.info("commandstats")
        calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
        reports = calls.get("set", 0) + calls.get("zadd", 0)
        names = [n.decode() for n in r.zrange(index_key(servers.org), 0, -1)]
        key_bytes = r.memory_usage(agent_key(servers.org, names[0])) if names else 0
        index_bytes = r.memory_usage(index_key(servers.org)) or 0
    finally:
        r.close()
    return {
        "seconds": seconds, "agents_listed": len(names), "set": calls.get("set", 0), "zadd": calls.get("zadd", 0),
        # The subscriptions' health-check PINGs (after 15 s without traffic) are not reports.
        "ping": calls.get("ping", 0),
        "other_commands": sum(calls.values()) - reports - sum(calls.get(c, 0) for c in ("info", "config|resetstat",
                                                                                         "ping")),
        "commands_per_agent_per_s": round(reports / agents / seconds, 4),
        # SET + ZADD go in one pipelined round trip: one report.
        "reports_per_agent_per_s": round(calls.get("zadd", 0) / agents / seconds, 4),
        "redis_bytes_per_agent": round((key_bytes or 0) + index_bytes / max(1, len(names))),
    }


def ping_ms(servers: Servers, n: int = 50) -> float:
    r = redis_sync.Redis(port=servers.redis.port)
    try:
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            r.ping()
            samples.append((time.perf_counter() - t0) * 1000)
    finally:
        r.close()
    return round(statistics.median(samples), 3)


def one_change(servers: Servers, workers: list[Worker], value: int) -> dict[str, Any]:
    """`set --wait --json` as a subprocess; when it returned against when the last agent applied."""
    env = agent_env(servers)
    env["CONFIG_AGENT_DATABASE_URL"] = servers.pg.admin_url
    argv = [PYTHON, "-m", "agent", "set", servers.org, "s0", "k0", str(value), "--wait", "--timeout", "30", "--json"]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    returned = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"set --wait exited {proc.returncode}: {proc.stderr.strip()}")
    doc = json.loads(proc.stdout)
    seen = [s for w in workers for s in w.dump()]
    applied = [first_at_or_after(s, doc["revision"]) for s in seen]
    missing = sum(1 for a in applied if a is None)
    last = max(a for a in applied if a is not None)
    return {"served": doc["wait"]["served"], "total": doc["wait"]["total"], "missing": missing,
            "wait_s": doc["wait"]["elapsed_s"], "returned_after_last_ms": round((returned - last) * 1000, 1)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    with Servers() as servers:
        anyio.run(servers.setup, 10)
        env = agent_env(servers, heartbeat_interval=0, fleet_report_interval=args.report_interval,
                        reconcile_interval=3600)
        per = [args.agents // args.processes + (1 if i < args.agents % args.processes else 0)
               for i in range(args.processes)]
        workers = [Worker("agents", n, env) for n in per if n]
        try:
            for w in workers:
                w.wait_ready()
            time.sleep(1.0)  # first reports and the ready ones
            idle = idle_cost(servers, args.agents, args.idle)
            for w in workers:
                w.dump()
            changes = [one_change(servers, workers, i + 1) for i in range(args.changes)]
            baseline = ping_ms(servers)
        finally:
            for w in workers:
                w.stop()
    return {"agents": args.agents, "processes": args.processes, "report_interval_s": args.report_interval,
            "idle": idle, "changes": changes,
            "returned_after_last_ms": summarize([c["returned_after_last_ms"] for c in changes]),
            "cli_wait_ms": summarize([c["wait_s"] * 1000 for c in changes]),
            "redis_ping_ms": baseline}


def report(doc: dict[str, Any]) -> None:
    """The table of one result (also rendered into docs/benchmarks.md by bench.make_docs)."""
    idle = doc["idle"]
    print_table(f"Fleet reports: {doc['agents']} agents, report interval {doc['report_interval_s']:g} s",
                ["idle reports/agent/s", "idle cmds/agent/s", "bytes/agent", "set --wait returned after last (ms, p50)",
                 "max", "CLI wait (ms, p50)", "Redis PING (ms)"],
                [[idle["reports_per_agent_per_s"], idle["commands_per_agent_per_s"], idle["redis_bytes_per_agent"],
                  doc["returned_after_last_ms"]["p50"], doc["returned_after_last_ms"]["max"],
                  doc["cli_wait_ms"]["p50"], doc["redis_ping_ms"]]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--report-interval", type=float, default=10.0)
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of the idle window")
    parser.add_argument("--changes", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny run to check the command works")
    args = parser.parse_args()
    if args.smoke:
        args.agents, args.processes, args.report_interval, args.idle, args.changes = 6, 2, 1.0, 3.0, 2
    doc = run(args)
    report(doc)
    write_result("fleet", doc, smoke=args.smoke)


if __name__ == "__main__":
    main()
