"""Footprint (issue #7.5): idle CPU/RSS/queries, start → ready with 10, 1,000 and 10,000 entries.

    python -m bench.bench_footprint            # full run (~2 minutes)
    python -m bench.bench_footprint --smoke    # CI

start → ready is measured two ways: a real `python -m agent run` process from
spawn to the first `GET /readyz` 200 (interpreter start and imports included),
and an in-process `Agent.run` from the call to `started` (subscribe, warm-load,
servers up). RSS is VmRSS of the process after it is ready and settled.

The agent's modules are byte-compiled first, as `pip install` does for the image:
with PYTHONDONTWRITEBYTECODE=1 (the image's setting, and this tree's shell) Python
would otherwise compile every agent module from source at each start, which costs
a deployed sidecar nothing (~40 ms and ~0.6 MiB here). `--no-bytecode` measures
that way instead (it removes agent/**/__pycache__).
"""

from __future__ import annotations

import argparse
import compileall
import shutil
import statistics
import time
from typing import Any

import anyio

from bench.common import ROOT, Servers, print_table, proc_rss_mib, summarize, write_result
from bench.harness import measure_idle, start_agent_process
from tests.servers import stop_processes


async def in_process_start(servers: Servers) -> float:
    """Seconds from `tg.start(agent.run)` to started (loaded, files written, servers up)."""
    from agent.app import Agent
    from agent.settings import load_settings

    agent = Agent(load_settings(
        database_url=servers.pg.reader_url(), redis_url=servers.redis.url, org_id=servers.org,
        http_port=0, metrics_port=0, log_level="warning"))
    async with anyio.create_task_group() as tg:
        t0 = time.perf_counter()
        await tg.start(agent.run)
        elapsed = time.perf_counter() - t0
        tg.cancel_scope.cancel()
    await agent.source.close()
    return elapsed


async def entries_case(entries: int, runs: int) -> dict[str, Any]:
    with Servers() as servers:
        await servers.setup(entries)
        process_s: list[float] = []
        rss: list[float] = []
        for _ in range(runs):
            proc, ready_s, _port = await start_agent_process(servers)
            try:
                await anyio.sleep(1.0)
                rss.append(proc_rss_mib(proc.pid))
            finally:
                stop_processes([proc], grace=10)
            process_s.append(ready_s)
        inproc = [await in_process_start(servers) for _ in range(runs)]
    return {
        "entries": entries,
        "process_start_to_ready_ms": summarize([s * 1000 for s in process_s]),
        "in_process_run_to_started_ms": summarize([s * 1000 for s in inproc]),
        "rss_mib_median": round(statistics.median(rss), 1),
    }


def prepare_bytecode(compiled: bool) -> None:
    """Byte-compile agent/ like an installed package, or remove its bytecode."""
    package = ROOT / "agent"
    if compiled:
        if not compileall.compile_dir(package, quiet=1):
            raise RuntimeError("cannot byte-compile agent/")
    else:
        for cache in package.rglob("__pycache__"):
            shutil.rmtree(cache, ignore_errors=True)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    prepare_bytecode(args.bytecode)
    cases = [await entries_case(n, args.runs) for n in (int(x) for x in args.entries.split(","))]
    idle_runs = []
    with Servers() as servers:
        await servers.setup(10)
        for _ in range(args.runs):
            idle_runs.append(await measure_idle(servers, args.idle_seconds))
    idle = {k: statistics.median(r[k] for r in idle_runs)
            for k in ("queries", "cpu_percent", "rss_mib", "window_s")}
    return {"settings": vars(args), "start": cases, "idle": idle, "idle_runs": idle_runs}


def report(doc: dict[str, Any]) -> None:
    rows = [[c["entries"], c["process_start_to_ready_ms"]["p50"],
             c["process_start_to_ready_ms"]["max"], c["in_process_run_to_started_ms"]["p50"],
             c["in_process_run_to_started_ms"]["max"], c["rss_mib_median"]] for c in doc["start"]]
    compiled = "byte-compiled" if doc["settings"].get("bytecode", True) else "compiled from source at start"
    print_table(f"start → ready (ms, median / max of {doc['settings']['runs']} runs) and RSS, agent/ {compiled}",
                ["entries", "process→/readyz p50", "max", "Agent.run→started p50", "max",
                 "RSS MiB"], rows)
    idle = doc["idle"]
    print_table(f"idle agent process, 10 entries (median of {len(doc['idle_runs'])} windows)",
                ["window s", "queries", "CPU %", "RSS MiB"],
                [[idle["window_s"], idle["queries"], idle["cpu_percent"], idle["rss_mib"]]])


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", default="10,1000,10000")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--no-bytecode", dest="bytecode", action="store_false",
                        help="do not byte-compile agent/ first: every start compiles it from source")
    args = parser.parse_args()
    if args.smoke:
        args.entries, args.runs, args.idle_seconds = "10", 1, 1.0
    doc = anyio.run(main, args, backend="asyncio", backend_options={"use_uvloop": True})
    report(doc)
    print(f"\nwrote {write_result('footprint', doc, smoke=args.smoke)}")


if __name__ == "__main__":
    cli()
