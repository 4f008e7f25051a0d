"""Issue #21's guard: a delta read costs the server the same with 10 or 400 other clients.

Each pod reads once per change, so a read whose cost grows with the server's backends
(a scan of pg_stat_activity rode on every read until #21) makes one change cost
O(pods²) in PostgreSQL. This measures the CPU the agent's backend spends on delta reads
(/proc/PID/schedstat of that backend: nanoseconds on a CPU, not wall time, so a busy
machine makes it noisier but not larger) through the agent's own PgSource, with few and
with many idle connections on a private server, and compares the two as a ratio.
"""

from __future__ import annotations

from collections.abc import Iterator

import asyncpg
import pytest

from agent.sources.postgres import FREE_SLOTS, PgSource
from tests.scaleout import TunedPostgres, running_postgres

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(240)]

ORG = "acme"
READER = "cost_reader"
FEW, MANY = 10, 400
READS = 600
BATCHES = 5
# The read's cost must not grow with the server's clients: 1.5× leaves room for noise
# (caches, a shared machine); the pg_stat_activity scan it guards against made it ~2×
# at 400 clients and grows without bound.
MAX_RATIO = 1.5


@pytest.fixture(scope="module")
def server() -> Iterator[TunedPostgres]:
    with running_postgres(max_connections=MANY + 50) as pg:
        yield pg


def backend_cpu_ns(pid: int) -> int:
    """Time the process has spent on a CPU, in nanoseconds."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


async def cpu_per_read_ns(source: PgSource, revision: int) -> float:
    """The least of several batches' backend CPU per delta read (the least is the least noisy)."""
    await source.fetch_changes_since(revision)  # connected, statement prepared
    assert source._conn is not None
    pid = source._conn.get_server_pid()
    best = float("inf")
    for _ in range(BATCHES):
        before = backend_cpu_ns(pid)
        for _ in range(READS):
            fetched = await source.fetch_changes_since(revision)
        best = min(best, (backend_cpu_ns(pid) - before) / READS)
        assert [c.key for c in fetched.changes] == ["k1"]  # a real delta, one change
    return best


async def test_delta_read_costs_the_same_with_few_and_many_clients(server: TunedPostgres) -> None:
    admin = await asyncpg.connect(server.admin_url)
    idle: list[asyncpg.Connection] = []
    try:
        await admin.execute("SELECT config_agent_grant_reader($1, $2, NULL)", READER, ORG)
        await admin.execute("INSERT INTO service_configs (org_id, service, key, value) "
                            "SELECT $1, 's1', 'k' || i, to_jsonb(i) FROM generate_series(0, 9) i", ORG)
        await admin.execute("UPDATE service_configs SET value = '42' WHERE org_id = $1 AND key = 'k1'", ORG)
        revision = await admin.fetchval("SELECT revision FROM config_orgs WHERE org_id = $1", ORG) - 1
        url = server.admin_url.replace("postgres@", f"{READER}@")
        costs = {}
        for clients in (FEW, MANY):
            while len(idle) < clients:
                idle.append(await asyncpg.connect(server.admin_url))
            source = PgSource(url, ORG)
            try:
                costs[clients] = await cpu_per_read_ns(source, revision)
                # The free-slot sample (O(backends)) came with the connection, not with reads.
                assert source.slot_samples == 1, source.slot_samples
            finally:
                await source.close()
        print({n: f"{ns / 1000:.1f} µs" for n, ns in costs.items()})
        assert costs[MANY] <= MAX_RATIO * costs[FEW], costs
    finally:
        for conn in idle:
            await conn.close()
        await admin.close()


async def test_a_new_connection_samples_the_free_slots_and_turns_crowded(server: TunedPostgres) -> None:
    """The protection of #10 still works: a connection that finds few slots left gives its
    slot back after every read."""
    admin = await asyncpg.connect(server.admin_url)
    try:
        await admin.execute("SELECT config_agent_grant_reader($1, $2, NULL)", READER, ORG)
        url = server.admin_url.replace("postgres@", f"{READER}@")
        free = await admin.fetchval(FREE_SLOTS)
        source = PgSource(url, ORG)
        await source.fetch_changes_since(0)
        assert not source.crowded and source.connected
        # The reader role's budget: as many as it holds now plus 2 (below 5 left).
        await admin.execute(f'ALTER ROLE "{READER}" CONNECTION LIMIT 3')
        await source.reconnect()
        await source.fetch_changes_since(0)
        assert source.crowded, free
        assert not source.connected  # given back right after the read
        await source.close()
    finally:
        await admin.execute(f'ALTER ROLE "{READER}" CONNECTION LIMIT -1')
        await admin.close()
