"""Eight writer processes on one org: revisions unique and in commit order, nothing skipped."""

from __future__ import annotations

import subprocess
import sys

import anyio
import asyncpg
import pytest

pytestmark = pytest.mark.anyio

WRITERS = 8
CHANGES = 250


async def test_concurrent_writers_keep_every_invariant(db_url: str, org: str) -> None:
    listener = await asyncpg.connect(db_url)
    notified: list[int] = []
    import json

    await listener.add_listener("config_agent_changes",
                                lambda *a: notified.append(json.loads(a[3])["revision"]))
    reader = await asyncpg.connect(db_url)
    seen: dict[int, tuple[str, int]] = {}
    last = 0
    procs = [subprocess.Popen([sys.executable, "-m", "tests.writer_worker", db_url, org, str(w),
                               str(CHANGES)]) for w in range(WRITERS)]

    async def read_once() -> None:
        nonlocal last
        rows = await reader.fetch(
            "SELECT key, version, revision FROM config_history WHERE org_id = $1 AND revision > $2 "
            "ORDER BY revision", org, last)
        for row in rows:
            assert row["revision"] not in seen
            seen[row["revision"]] = (row["key"], row["version"])
            last = row["revision"]

    with anyio.fail_after(240):
        while any(p.poll() is None for p in procs):
            await read_once()
            await anyio.sleep(0.005)
    assert all(p.returncode == 0 for p in procs)
    await read_once()
    total = WRITERS * CHANGES
    # A reader asking "changes after my last revision" got every change, none skipped.
    assert len(seen) == total
    history = await reader.fetch("SELECT key, version, revision, action FROM config_history "
                                 "WHERE org_id = $1 ORDER BY revision", org)
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
    current = await reader.fetch("SELECT key, version, revision FROM service_configs WHERE org_id = $1", org)
    for row in current:
        assert row["version"] == len(versions[row["key"]])
    await listener.close()
    await reader.close()
