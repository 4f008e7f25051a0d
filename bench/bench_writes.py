"""Write throughput of the change log: changes/s with 1 and 8 concurrent writer processes.

Each change is one transaction through the writer API (row lock, trigger: version,
revision under the org counter lock, history row, pg_notify). All writers share one
org, the worst case: the org counter serializes them.

    python bench/bench_writes.py [--database-url URL] [--changes 2000] [--runs 3] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import secrets
import statistics
import time
from pathlib import Path

import asyncpg

from agent.db.migrate import migrate
from agent.db.writer import ConfigWriter

RESULTS = Path(__file__).parent / "results"


def _writer(url: str, org: str, worker: int, changes: int, start: mp.synchronize.Event) -> None:
    async def go() -> None:
        writer = await ConfigWriter.open(url)
        start.wait()
        for i in range(changes):
            await writer.set(org, "bench", f"k{(worker * 31 + i) % 50}", i, actor="bench")
        await writer.close()

    asyncio.run(go())


def run_once(url: str, writers: int, changes: int) -> float:
    """Changes per second with `writers` processes making `changes` changes in total."""
    org = f"b{secrets.token_hex(4)}"
    start = mp.Event()
    per = changes // writers
    procs = [mp.Process(target=_writer, args=(url, org, w, per, start)) for w in range(writers)]
    for p in procs:
        p.start()
    time.sleep(1.0)  # let every writer connect first
    t0 = time.perf_counter()
    start.set()
    for p in procs:
        p.join(timeout=600)
    elapsed = time.perf_counter() - t0
    return per * writers / elapsed


async def prepare(admin_url: str) -> str:
    name = f"bench_writes_{os.getpid()}"
    conn = await asyncpg.connect(admin_url)
    await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    url = admin_url.rsplit("/", 1)[0] + f"/{name}"
    db = await asyncpg.connect(url)
    await migrate(db)
    await db.close()
    return url


async def drop(admin_url: str, url: str) -> None:
    conn = await asyncpg.connect(admin_url)
    await conn.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
    await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default=os.environ.get(
        "CONFIG_AGENT_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--changes", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny run to check the command works")
    args = parser.parse_args()
    if args.smoke:
        args.changes, args.runs = 80, 1
    url = asyncio.run(prepare(args.database_url))
    result: dict[str, object] = {"changes": args.changes, "runs": args.runs}
    try:
        for writers in (1, 8):
            rates = [run_once(url, writers, args.changes) for _ in range(args.runs)]
            result[f"writers_{writers}"] = {"median_changes_per_s": round(statistics.median(rates), 1),
                                            "runs": [round(r, 1) for r in rates]}
    finally:
        asyncio.run(drop(args.database_url, url))
    print(f"{'writers':>8} {'changes/s (median)':>20}  runs")
    for writers in (1, 8):
        r = result[f"writers_{writers}"]
        assert isinstance(r, dict)
        print(f"{writers:>8} {r['median_changes_per_s']:>20}  {r['runs']}")
    # Smoke runs never overwrite the full figures; BENCH_RESULTS_DIR redirects (tests).
    out_dir = Path(os.environ.get("BENCH_RESULTS_DIR", RESULTS))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / ("writes.smoke.json" if args.smoke else "writes.json")).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
