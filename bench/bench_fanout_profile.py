"""Where the time goes when one change fans out to N agents (issue #7: targets missed at N ≥ 100).

    python -m bench.bench_fanout_profile                       # N = 100 and 1,000
    python -m bench.bench_fanout_profile --cprofile            # + a profiled pass of each N
    python -m bench.bench_fanout_profile --smoke               # CI: N = 2, a few changes

N in-process `Agent`s in 10 `bench/worker.py` processes (as in bench_propagation),
one change at a time through the direct-publish writer; the agents expect the relay's
heartbeat, which a thread publishes every 5 s (bench.harness.Heartbeats). For every process on the
machine that takes part — the agent workers, every PostgreSQL backend, redis-server
and the writer — it reads the CPU time (/proc utime + stime) before and after, less
the same window measured idle, and divides by the number of changes: CPU
milliseconds per change, by component, beside the latency of the last agent. On
2 cores, (total CPU per change) / 2 is the least a fan-out can take; when the
latency is near that bound, the fan-out is CPU-bound, and a faster agent needs
less CPU per agent, not less waiting.

`--cprofile` then repeats each N with every worker under cProfile (timed by the
thread's CPU clock, over the window of the changes only) and prints the packages
and functions with the most own time, summed over the workers, per change per
agent (cProfile's overhead inflates every figure; read the shares, not the
absolute values).
"""

from __future__ import annotations

import argparse
import os
import pstats
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from bench.bench_baselines import change_spacing, collect_last_and_every, make_changes
from bench.common import (
    READER_ROLE,
    Servers,
    agent_env,
    print_table,
    proc_cpu_seconds,
    raise_fd_limit,
    statements_by_role,
    summarize,
    write_result,
)
from bench.harness import Heartbeats, start_workers, stop_all

ENTRIES = 10
PROCESSES = 10


def _children(pid: int) -> list[int]:
    """Direct children of a process (the postmaster's backends and helpers)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            found.append(int(entry))
    return found


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += proc_cpu_seconds(pid)
        except OSError:  # a backend that ended in the window: its time is lost, not wrong
            pass
    return total


class CpuAccount:
    """CPU seconds of each component's processes, read at once."""

    def __init__(self, servers: Servers, worker_pids: list[int]) -> None:
        postmaster = int((servers.pg.data / "postmaster.pid").read_text().split()[0])
        assert servers.redis.proc is not None
        self.groups = {
            "agents": worker_pids,
            "postgresql": [postmaster, *_children(postmaster)],
            "redis": [servers.redis.proc.pid],
            "writer": [os.getpid()],
        }

    def read(self) -> dict[str, float]:
        return {name: _cpu(pids) for name, pids in self.groups.items()}


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after}


async def measure(servers: Servers, n: int, changes: int, profile_dir: Path | None) -> dict[str, Any]:
    """One fan-out: CPU per change by component, last-agent latency, statements."""
    env = agent_env(servers)
    if profile_dir is not None:
        env["BENCH_CPROFILE_DIR"] = str(profile_dir)
    with Heartbeats(servers.redis.url, servers.org):  # agents expect the relay's heartbeat
        workers = start_workers("agents", n, min(n, PROCESSES), env)
        try:
            account = CpuAccount(servers, [w.proc.pid for w in workers])
            window = changes * change_spacing(n) + 0.5
            await anyio.sleep(1.0)
            idle0 = account.read()
            await anyio.sleep(window)
            idle = _delta(account.read(), idle0)
            for w in workers:
                w.dump()
            q0 = (await statements_by_role(servers.pg)).get(READER_ROLE, 0)
            for w in workers:
                w.send("profile on")
            busy0 = account.read()
            t0 = time.monotonic()
            commits = await make_changes(servers, "ours", n, changes, 0.0, None)
            await anyio.sleep(max(0.0, window - (time.monotonic() - t0)))
            busy = _delta(account.read(), busy0)
            for w in workers:
                w.send("profile off")
            q1 = (await statements_by_role(servers.pg)).get(READER_ROLE, 0)
            last, _every, missed = collect_last_and_every(workers, commits)
        finally:
            stop_all(workers)
    per_change = {k: round(max(0.0, busy[k] - idle[k]) * 1000 / changes, 3) for k in busy}
    total = sum(per_change.values())
    return {
        "agents": n, "processes": min(n, PROCESSES), "changes": changes, "missed": missed,
        "last_agent_ms": summarize(last),
        "cpu_ms_per_change": per_change,
        "cpu_ms_per_change_total": round(total, 3),
        "cpu_bound_floor_ms": round(total / (os.cpu_count() or 1), 3),
        "agent_cpu_us_per_agent": round(per_change["agents"] * 1000 / n, 1),
        "postgresql_cpu_us_per_agent": round(per_change["postgresql"] * 1000 / n, 1),
        "reader_statements_per_change_per_agent": round((q1 - q0) / changes / n, 3),
    }


def _group(filename: str) -> str:
    for marker in ("site-packages/", "lib/python3"):
        if marker in filename:
            rest = filename.split(marker, 1)[1].lstrip("/")
            if marker == "lib/python3":
                rest = rest.split("/", 1)[1] if "/" in rest else rest
                return "stdlib:" + rest.split("/")[0].removesuffix(".py")
            return rest.split("/")[0].removesuffix(".py")
    if "/agent/" in filename:
        return "agent." + filename.split("/agent/", 1)[1].removesuffix(".py").replace("/", ".")
    return filename if filename.startswith("~") else "other"


def profile_report(profile_dir: Path, per: int) -> dict[str, Any]:
    """Own time summed over the workers' profiles, per change per agent (µs)."""
    files = sorted(str(p) for p in profile_dir.glob("*.pstats"))
    if not files:
        return {}
    stats = pstats.Stats(*files)
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    by_function = []
    by_group: dict[str, float] = {}
    total = 0.0
    for (filename, line, name), (_cc, _nc, tottime, _ct, _callers) in raw.items():
        if name in ("<method 'poll' of 'select.epoll' objects>", "<built-in method select.epoll.poll>"):
            continue  # waiting, not working (uvloop waits in C and never shows up here)
        total += tottime
        group = _group(filename) if filename != "~" else "builtins"
        by_group[group] = by_group.get(group, 0.0) + tottime
        by_function.append((tottime, f"{group}:{name}" + (f":{line}" if line else "")))
    by_function.sort(reverse=True)
    return {
        "profiled_us_per_change_per_agent": round(total * 1e6 / per, 1),
        "groups": sorted(((g, round(t * 1e6 / per, 1), round(100 * t / total, 1))
                          for g, t in by_group.items()), key=lambda r: -r[1])[:15],
        "functions": [(f, round(t * 1e6 / per, 1), round(100 * t / total, 1)) for t, f in by_function[:20]],
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    raise_fd_limit()
    results = []
    profiles = {}
    with Servers() as servers:
        await servers.setup(ENTRIES)
        for n in [int(x) for x in args.agents.split(",")]:
            doc = await measure(servers, n, args.changes, None)
            results.append(doc)
            print(f"N={n}: last agent p50 {doc['last_agent_ms'].get('p50')} ms, CPU/change "
                  f"{doc['cpu_ms_per_change']} ms (floor {doc['cpu_bound_floor_ms']} ms)", flush=True)
            if args.cprofile:  # a second pass: the profiler's overhead stays out of the figures above
                profile_dir = Path(tempfile.mkdtemp(prefix="fanout-prof-", dir=servers.tmp))
                await measure(servers, n, args.changes, profile_dir)
                profiles[str(n)] = profile_report(profile_dir, args.changes * n)
    return {"settings": vars(args), "results": results, "profiles": profiles}


def report(doc: dict[str, Any]) -> None:
    rows = []
    for r in doc["results"]:
        cpu, last = r["cpu_ms_per_change"], r["last_agent_ms"]
        rows.append([r["agents"], r["processes"], r["changes"], last.get("p50"), last.get("p99"),
                     cpu["agents"], cpu["postgresql"], cpu["redis"], cpu["writer"],
                     r["cpu_ms_per_change_total"], r["cpu_bound_floor_ms"], r["agent_cpu_us_per_agent"],
                     r["postgresql_cpu_us_per_agent"], r["reader_statements_per_change_per_agent"]])
    print_table("One change to N agents: last-agent latency (ms) beside the CPU it costs (ms per change)",
                ["agents", "procs", "changes", "last p50", "last p99", "CPU agents", "CPU PostgreSQL",
                 "CPU Redis", "CPU writer", "CPU total", "floor on 2 cores", "agent µs/agent",
                 "PostgreSQL µs/agent", "stmts/change/agent"], rows)
    for n, prof in doc["profiles"].items():
        if not prof:
            continue
        print_table(f"cProfile, N = {n}: own time by package (µs per change per agent; "
                    f"{prof['profiled_us_per_change_per_agent']} µs profiled in all)",
                    ["package/module", "µs", "%"], prof["groups"])
        print_table(f"cProfile, N = {n}: functions with the most own time", ["function", "µs", "%"],
                    prof["functions"])


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", default="100,1000")
    parser.add_argument("--changes", type=int, default=30)
    parser.add_argument("--cprofile", action="store_true", help="profile the agent workers too")
    parser.add_argument("--smoke", action="store_true", help="N = 2, 3 changes, with cProfile (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.agents, args.changes, args.cprofile = "2", 3, True
    doc = anyio.run(main, args, backend="asyncio", backend_options={"use_uvloop": True})
    report(doc)
    print(f"\nwrote {write_result('fanout_profile', doc, smoke=args.smoke)}")


if __name__ == "__main__":
    cli()
