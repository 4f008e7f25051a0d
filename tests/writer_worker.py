"""A writer process for concurrency tests: N changes on one org, mixed library and plain SQL."""

from __future__ import annotations

import sys

import anyio
import asyncpg

from agent.db.writer import ConfigWriter


async def main(url: str, org: str, worker: int, changes: int, redis_url: str | None = None) -> None:
    writer = await ConfigWriter.open(url, redis_url=redis_url)
    raw = await asyncpg.connect(url)
    try:
        for i in range(changes):
            key = f"k{(worker * 7 + i) % 13}"
            if i % 3 == 0:  # a plain-SQL writer, as a backend would do from psql
                async with raw.transaction():
                    await raw.execute("SELECT set_config('config_agent.actor', $1, true)", f"sql{worker}")
                    await raw.execute(
                        "INSERT INTO service_configs (org_id, service, key, value) VALUES ($1, 's', $2, $3) "
                        "ON CONFLICT (org_id, service, key) DO UPDATE SET value = EXCLUDED.value",
                        org, key, f'{{"w": {worker}, "i": {i}}}')
            else:
                await writer.set(org, "s", key, {"w": worker, "i": i}, actor=f"lib{worker}")
    finally:
        await raw.close()
        await writer.close()


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]),
              sys.argv[5] if len(sys.argv) > 5 else None)
