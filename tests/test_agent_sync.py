"""The agent against real PostgreSQL and Redis: convergence, least privilege, drift, hostile input."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from urllib.parse import urlparse

import anyio
import asyncpg
import pytest

from agent.app import Agent
from agent.db.roles import grant_reader
from agent.db.writer import ConfigWriter
from agent.redis_client import redis_client
from tests.agent_harness import agent_state, db_state, eventually, metric, running_agent
from tests.servers import stop_processes

pytestmark = pytest.mark.anyio


async def reader_url(db: asyncpg.Connection, db_url: str, org: str) -> str:
    """A tenant reader role for `org` (RLS, no writes) and its URL."""
    role = f"r_{org}_{secrets.token_hex(3)}"
    await grant_reader(db, org, role, "reader-pw")
    p = urlparse(db_url)
    return f"postgresql://{role}:reader-pw@{p.hostname}:{p.port or 5432}{p.path}"


async def test_agent_converges_while_four_writers_make_500_changes(
        db: asyncpg.Connection, db_url: str, redis_url: str, org: str) -> None:
    writer = await ConfigWriter.open(db_url)
    await writer.set(org, "ai", "threshold", 0.5, actor="t")
    await writer.close()
    url = await reader_url(db, db_url, org)
    async with running_agent(org_id=org, database_url=url, redis_url=redis_url) as agent:
        assert agent_state(agent) == await db_state(db, org)
        procs = [subprocess.Popen([sys.executable, "-m", "tests.writer_worker", db_url, org, str(w),
                                   "125", redis_url]) for w in range(4)]
        try:
            with anyio.fail_after(120):
                while any(p.poll() is None for p in procs):
                    await anyio.sleep(0.05)
        finally:
            stop_processes(procs)
        assert [p.returncode for p in procs] == [0, 0, 0, 0]
        # Plain-SQL writes in the workers are not published; the relay is not running,
        # so give the final state its announcement the way the relay would.
        expected = await db_state(db, org)
        last = await db.fetchrow("SELECT service, key, version, revision FROM config_history "
                                 "WHERE org_id = $1 ORDER BY revision DESC LIMIT 1", org)
        client = redis_client(redis_url)
        await client.publish(f"config:{org}:{last['service']}:{last['key']}", json.dumps(
            {"org_id": org, "service": last["service"], "key": last["key"],
             "version": last["version"], "revision": last["revision"], "ts": 0}))
        await client.aclose()
        took = await eventually(lambda: agent_state(agent) == expected, 1.0, "agent equals database")
        assert took < 1.0
        assert agent.store.snapshot.revision == last["revision"]
        assert metric(agent, "config_agent_revision", {"org_id": org}) == last["revision"]
        for (service, key), (_, version) in expected.items():
            assert metric(agent, "config_version", {"org_id": org, "service": service, "key": key}) == version


async def change_by_plain_sql_until_reconciled(db: asyncpg.Connection, org: str, agent: Agent) -> None:
    """Update ai.t (at v1) and create ai.u by plain SQL, unannounced; wait until reconcile applied both."""
    await db.execute("UPDATE service_configs SET value = '2' WHERE org_id = $1 AND key = 't'", org)
    await db.execute("INSERT INTO service_configs (org_id, service, key, value) VALUES ($1, 'ai', 'u', '3')", org)
    await eventually(lambda: agent_state(agent) == {("ai", "t"): (2, 2), ("ai", "u"): (3, 1)}, 3,
                     "reconcile applied the changes")


async def test_plain_sql_without_relay_is_applied_by_reconcile_and_counted_as_drift(
        db: asyncpg.Connection, db_url: str, redis_url: str, org: str) -> None:
    await db.execute("INSERT INTO service_configs (org_id, service, key, value) VALUES ($1, 'ai', 't', '1')", org)
    async with running_agent(org_id=org, database_url=db_url, redis_url=redis_url,
                             reconcile_interval=0.5, drift_grace=0.3) as agent:
        await change_by_plain_sql_until_reconciled(db, org, agent)
        await eventually(lambda: metric(agent, "config_agent_drift_total") == 2, 2, "drift counted")
        assert metric(agent, "config_agent_updates_total", {"source": "reconcile"}) == 2
        assert metric(agent, "config_agent_updates_total", {"source": "pubsub"}) == 0
        await anyio.sleep(0.5)
        assert metric(agent, "config_agent_drift_total") == 2, "each change counted once"


async def test_an_announcement_reconcile_overtook_is_not_drift(
        db: asyncpg.Connection, db_url: str, redis_url: str, org: str) -> None:
    """A busy agent's reconcile may read a change before its announcement: late is not lost."""
    await db.execute("INSERT INTO service_configs (org_id, service, key, value) VALUES ($1, 'ai', 't', '1')", org)
    client = redis_client(redis_url)
    async with running_agent(org_id=org, database_url=db_url, redis_url=redis_url,
                             reconcile_interval=0.3, drift_grace=1.5) as agent:
        await change_by_plain_sql_until_reconciled(db, org, agent)
        # ai.t's announcement arrives after reconcile applied it, within the grace; ai.u's never does.
        rev = await db.fetchval("SELECT revision FROM service_configs WHERE org_id = $1 AND key = 't'", org)
        await client.publish(f"config:{org}:ai:t", json.dumps(
            {"org_id": org, "service": "ai", "key": "t", "version": 2, "revision": rev, "ts": 0}))
        await eventually(lambda: metric(agent, "config_agent_drift_total") == 1, 3, "the lost change counted")
        assert metric(agent, "config_agent_messages_total", {"result": "duplicate"}) == 1
        await anyio.sleep(1.0)
        assert metric(agent, "config_agent_drift_total") == 1, "the late announcement is not drift"
    await client.aclose()


async def test_one_query_per_change_and_none_when_idle(
        db: asyncpg.Connection, db_url: str, redis_url: str, org: str) -> None:
    writer = await ConfigWriter.open(db_url, redis_url=redis_url)
    async with running_agent(org_id=org, database_url=db_url, redis_url=redis_url) as agent:
        start = agent.source.queries
        for i in range(20):
            await writer.set(org, "ai", "t", i, actor="t")
            await eventually(lambda i=i: agent_state(agent).get(("ai", "t"), (None, 0))[0] == i, 2)
        assert agent.source.queries - start == 20
        idle = agent.source.queries
        await anyio.sleep(1.0)
        assert agent.source.queries == idle
    await writer.close()


async def test_service_filter(db: asyncpg.Connection, db_url: str, redis_url: str, org: str) -> None:
    writer = await ConfigWriter.open(db_url, redis_url=redis_url)
    await writer.set(org, "ai", "t", 1, actor="t")
    await writer.set(org, "email", "r", 3, actor="t")
    async with running_agent(org_id=org, database_url=db_url, redis_url=redis_url,
                             services="ai") as agent:
        assert agent_state(agent) == {("ai", "t"): (1, 1)}
        await writer.set(org, "email", "r", 4, actor="t")
        await writer.set(org, "ai", "t", 2, actor="t")
        await eventually(lambda: agent_state(agent) == {("ai", "t"): (2, 2)}, 2)
        assert metric(agent, "config_agent_messages_total", {"result": "foreign"}) == 1
    await writer.close()


async def test_deletes_reach_the_agent(db: asyncpg.Connection, db_url: str, redis_url: str, org: str) -> None:
    writer = await ConfigWriter.open(db_url, redis_url=redis_url)
    await writer.set(org, "ai", "t", 1, actor="t")
    async with running_agent(org_id=org, database_url=db_url, redis_url=redis_url) as agent:
        await writer.delete(org, "ai", "t", actor="t")
        await eventually(lambda: agent_state(agent) == {}, 2)
        assert agent.metrics.registry.get_sample_value(
            "config_version", {"org_id": org, "service": "ai", "key": "t"}) is None
        await writer.set(org, "ai", "t", 5, actor="t")
        await eventually(lambda: agent_state(agent) == {("ai", "t"): (5, 3)}, 2)
    await writer.close()


async def test_idle_connection_is_closed_and_reopened_on_the_next_change(
        db: asyncpg.Connection, db_url: str, redis_url: str, org: str) -> None:
    writer = await ConfigWriter.open(db_url, redis_url=redis_url)
    await writer.set(org, "ai", "t", 1, actor="t")

    async def backends(expected: int) -> int:
        """The agents' backends, once they number `expected` (a backend leaves pg_stat_activity
        a moment after its client closed; an earlier test's agent may still be leaving)."""
        count = -1
        for _ in range(200):
            count = int(await db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE "
                                          "application_name = 'config-agent' AND datname = current_database()"))
            if count == expected:
                break
            await anyio.sleep(0.05)
        return count

    async with running_agent(org_id=org, database_url=db_url, redis_url=redis_url,
                             db_idle_timeout=0.3) as agent:
        assert await backends(1) == 1
        await eventually(lambda: not agent.source.connected, 2, "idle connection closed")
        assert await backends(0) == 0
        await writer.set(org, "ai", "t", 2, actor="t")
        await eventually(lambda: agent_state(agent) == {("ai", "t"): (2, 2)}, 2, "applied after reconnect")
        assert agent.source.connects == 2
        assert metric(agent, "config_agent_db_connected") == 1
    await writer.close()
