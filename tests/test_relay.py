"""The relay bridges pg_notify to Redis: plain SQL writes are announced; HA survives SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

import anyio
import asyncpg
import pytest

from agent.redis_client import redis_client

pytestmark = pytest.mark.anyio


def start_relay(db_url: str, redis_url: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIG_AGENT_")}
    env.update({"CONFIG_AGENT_DATABASE_URL": db_url, "CONFIG_AGENT_REDIS_URL": redis_url,
                "CONFIG_AGENT_METRICS_PORT": "0"})
    return subprocess.Popen([sys.executable, "-m", "agent", "relay"], env=env)


async def wait_listening(db: asyncpg.Connection, count: int) -> None:
    with anyio.fail_after(20):
        while await db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                                "'config-agent-relay' AND datname = current_database()") < count:
            await anyio.sleep(0.05)


class Subscriber:
    def __init__(self, redis_url: str, org: str) -> None:
        self.client = redis_client(redis_url)
        self.pubsub = self.client.pubsub()
        self.org = org
        self.messages: list[tuple[bytes, dict[str, Any]]] = []
        self.heartbeats: list[dict[str, Any]] = []

    async def __aenter__(self) -> Subscriber:
        await self.pubsub.psubscribe(f"config:{self.org}:*")
        await self.pubsub.get_message(timeout=2)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.pubsub.aclose()
        await self.client.aclose()

    async def drain(self, until: Any, timeout: float) -> None:
        with anyio.fail_after(timeout):
            while not until():
                msg = await self.pubsub.get_message(timeout=0.1)
                if msg and msg["type"] == "pmessage":
                    doc = json.loads(msg["data"])
                    if "heartbeat" in doc:
                        self.heartbeats.append(doc)
                    else:
                        self.messages.append((msg["channel"], doc))


async def test_plain_sql_update_reaches_redis_through_the_relay(db: asyncpg.Connection, db_url: str,
                                                                redis_url: str, org: str) -> None:
    await db.execute("INSERT INTO service_configs (org_id, service, key, value) "
                     "VALUES ($1, 'ai', 'threshold', '0.5')", org)
    relay = start_relay(db_url, redis_url)
    try:
        async with Subscriber(redis_url, org) as sub:
            await wait_listening(db, 1)
            async with db.transaction():
                await db.execute("SET LOCAL config_agent.actor = 'psql-user'")
                await db.execute("UPDATE service_configs SET value = '0.9' WHERE org_id = $1", org)
            await sub.drain(lambda: any(m[1]["version"] == 2 for m in sub.messages), 10)
        channel, doc = next(m for m in sub.messages if m[1]["version"] == 2)
        assert channel == f"config:{org}:ai:threshold".encode()
        assert doc["revision"] == 2 and doc["org_id"] == org and "value" not in doc
        row = await db.fetchrow("SELECT changed_by, version FROM config_history WHERE org_id = $1 "
                                "ORDER BY revision DESC LIMIT 1", org)
        assert (row["changed_by"], row["version"]) == ("psql-user", 2)
    finally:
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(timeout=10) == 0


async def test_relay_reannounces_latest_change_on_connect(db: asyncpg.Connection, db_url: str,
                                                         redis_url: str, org: str) -> None:
    for v in ("1", "2", "3"):
        await db.execute("INSERT INTO service_configs (org_id, service, key, value) VALUES ($1, 'ai', 't', $2) "
                         "ON CONFLICT (org_id, service, key) DO UPDATE SET value = EXCLUDED.value", org, v)
    async with Subscriber(redis_url, org) as sub:
        relay = start_relay(db_url, redis_url)
        try:
            await sub.drain(lambda: bool(sub.messages), 15)
        finally:
            relay.send_signal(signal.SIGTERM)
            relay.wait(timeout=10)
    assert sub.messages[0][1]["version"] == 3 and sub.messages[0][1]["revision"] == 3


async def test_two_relays_lose_nothing_when_one_is_killed(db: asyncpg.Connection, db_url: str,
                                                         redis_url: str, org: str) -> None:
    relays = [start_relay(db_url, redis_url) for _ in range(2)]
    total = 500
    try:
        async with Subscriber(redis_url, org) as sub:
            await wait_listening(db, 2)
            writer = await asyncpg.connect(db_url)
            for i in range(total):
                await writer.execute(
                    "INSERT INTO service_configs (org_id, service, key, value) VALUES ($1, 's', $2, $3) "
                    "ON CONFLICT (org_id, service, key) DO UPDATE SET value = EXCLUDED.value",
                    org, f"k{i % 17}", str(i))
                if i == total // 3:
                    relays[0].send_signal(signal.SIGKILL)
            await writer.close()
            await sub.drain(lambda: {m[1]["revision"] for m in sub.messages} >= set(range(1, total + 1)), 30)
        revisions = {m[1]["revision"] for m in sub.messages}
        assert revisions >= set(range(1, total + 1))
    finally:
        for r in relays:
            if r.poll() is None:
                r.send_signal(signal.SIGTERM)
                r.wait(timeout=10)


async def test_relay_survives_redis_restart_and_reannounces(db: asyncpg.Connection, db_url: str, org: str,
                                                           private_redis: Any) -> None:
    relay = start_relay(db_url, private_redis.url)
    try:
        await wait_listening(db, 1)
        private_redis.kill()
        await db.execute("INSERT INTO service_configs (org_id, service, key, value) VALUES ($1, 'ai', 't', '1')", org)
        await db.execute("UPDATE service_configs SET value = '2' WHERE org_id = $1", org)
        await anyio.sleep(0.5)
        private_redis.start()
        async with Subscriber(private_redis.url, org) as sub:
            # Queued announcements are retried, and the latest change is re-announced.
            await sub.drain(lambda: any(m[1]["version"] == 2 for m in sub.messages), 40)
        assert relay.poll() is None
    finally:
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(timeout=10) == 0
