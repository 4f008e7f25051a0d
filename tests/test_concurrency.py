"""Eight writer processes on one org: revisions unique and in commit order, nothing skipped."""

from __future__ import annotations

import json
import subprocess
import sys

import anyio
import asyncpg
import pytest

from agent.db.writer import ConfigWriter
from tests.servers import stop_processes

pytestmark = pytest.mark.anyio

WRITERS = 8
CHANGES = 250
UPSERT_SQL = ("INSERT INTO service_configs (org_id, service, key, value) VALUES ($1, 's', $2, $3) "
              "ON CONFLICT (org_id, service, key) DO UPDATE SET value = EXCLUDED.value")


async def test_concurrent_writers_keep_every_invariant(db_url: str, org: str) -> None:
    notified: list[int] = []
    seen: dict[int, tuple[str, int]] = {}
    last = 0
    listener = await asyncpg.connect(db_url, timeout=10)
    reader = await asyncpg.connect(db_url, timeout=10)
    await listener.add_listener("config_agent_changes",
                                lambda *a: notified.append(json.loads(a[3])["revision"]))
    procs = [subprocess.Popen([sys.executable, "-m", "tests.writer_worker", db_url, org, str(w),
                               str(CHANGES)]) for w in range(WRITERS)]

    async def read_once() -> None:
        nonlocal last
        rows = await reader.fetch(
            "SELECT key, version, revision FROM config_history WHERE org_id = $1 AND revision > $2 "
            "ORDER BY revision", org, last, timeout=30)
        for row in rows:
            assert row["revision"] not in seen
            seen[row["revision"]] = (row["key"], row["version"])
            last = row["revision"]

    try:
        with anyio.fail_after(240):
            while any(p.poll() is None for p in procs):
                await read_once()
                await anyio.sleep(0.005)
        assert [p.returncode for p in procs] == [0] * WRITERS, "a writer process failed"
        await read_once()
        total = WRITERS * CHANGES
        # A reader asking "changes after my last revision" got every change, none skipped.
        assert len(seen) == total
        history = await reader.fetch("SELECT key, version, revision, action FROM config_history "
                                     "WHERE org_id = $1 ORDER BY revision", org, timeout=30)
        assert len(history) == total, "exactly one history row per change"
        assert sorted(seen) == [r["revision"] for r in history]
        assert len({r["revision"] for r in history}) == total
        # Each key's versions are consecutive from 1.
        versions: dict[str, list[int]] = {}
        for r in history:
            versions.setdefault(r["key"], []).append(r["version"])
        for key, vs in versions.items():
            assert vs == list(range(1, len(vs) + 1)), key
        # Notifications arrive in commit order: revisions must be strictly increasing there too.
        with anyio.fail_after(10):
            while len(notified) < total:
                await anyio.sleep(0.01)
        assert notified == sorted(notified) and len(set(notified)) == total
        current = await reader.fetch("SELECT key, version, revision FROM service_configs WHERE org_id = $1",
                                     org, timeout=30)
        for row in current:
            assert row["version"] == len(versions[row["key"]])
    finally:
        stop_processes(procs)
        with anyio.move_on_after(10, shield=True):
            await listener.close(timeout=5)
            await reader.close(timeout=5)


async def test_creating_one_entry_from_many_writers_at_once_never_deadlocks(db_url: str, org: str) -> None:
    """Library writers (entry lock first) and plain-SQL upserts all create the same new entry at once.

    An INSERT whose first look missed an entry being created concurrently must not hold the org
    counter while it waits for that entry's row: before the per-entry creation lock this race
    deadlocked in most rounds.
    """
    rounds, per_kind = 30, 4
    writers = [await ConfigWriter.open(db_url) for _ in range(per_kind)]
    raws = [await asyncpg.connect(db_url, timeout=10) for _ in range(per_kind)]
    try:
        with anyio.fail_after(120):
            for r in range(rounds):
                key = f"new{r}"
                async with anyio.create_task_group() as tg:
                    for i, w in enumerate(writers):
                        tg.start_soon(lambda w=w, i=i, key=key: w.set(org, "s", key, i, actor="lib"))
                    for i, conn in enumerate(raws):
                        tg.start_soon(lambda c=conn, i=i, key=key: c.execute(UPSERT_SQL, org, key, str(10 + i)))
        rows = await raws[0].fetch("SELECT key, version, revision FROM config_history WHERE org_id = $1 "
                                   "ORDER BY revision", org)
        # Every write changed its entry (distinct values): one history row each, versions 1..8,
        # and no revision handed out to a write that then took the update path.
        assert len(rows) == rounds * per_kind * 2
        assert [r["revision"] for r in rows] == list(range(1, len(rows) + 1))
        for r in range(rounds):
            assert sorted(x["version"] for x in rows if x["key"] == f"new{r}") == list(range(1, 2 * per_kind + 1))
    finally:
        with anyio.move_on_after(10, shield=True):
            for w in writers:
                await w.close()
            for conn in raws:
                await conn.close(timeout=5)
