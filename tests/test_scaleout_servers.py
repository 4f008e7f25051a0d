"""The scale-out harness of tests/scaleout.py against the real servers it starts:
PgBouncer, a lagging replica, Redis Sentinel and Redis Cluster."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import asyncpg
import pytest
import redis
from redis.asyncio.cluster import RedisCluster
from redis.sentinel import Sentinel

from tests.scaleout import (
    PrivatePgBouncer,
    PrivateReplica,
    RedisClusterSet,
    RedisSentinelSet,
    TunedPostgres,
    postgres_scratch_dir,
    running_postgres,
)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


@pytest.fixture(scope="module")
def primary() -> Iterator[TunedPostgres]:
    """One migrated private PostgreSQL for this module, with a low max_connections."""
    with running_postgres(max_connections=50) as server:
        yield server


@pytest.fixture
def pgbouncer(primary: TunedPostgres) -> Iterator[PrivatePgBouncer]:
    with PrivatePgBouncer(postgres_scratch_dir("pgbouncer"), "127.0.0.1", primary.port,
                          default_pool_size=5) as server:
        yield server


@pytest.fixture
def replica(primary: TunedPostgres) -> Iterator[PrivateReplica]:
    with PrivateReplica(primary, postgres_scratch_dir("replica"), apply_delay="2s") as server:
        server.wait_caught_up()
        yield server


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[RedisSentinelSet]:
    with RedisSentinelSet(tmp_path / "sentinel") as servers:
        yield servers


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisClusterSet]:
    with RedisClusterSet(tmp_path / "cluster") as servers:
        yield servers


async def test_pgbouncer_pools_transactions(primary: TunedPostgres, pgbouncer: PrivatePgBouncer) -> None:
    direct = await asyncpg.connect(primary.admin_url)
    try:
        assert await direct.fetchval("SHOW max_connections") == "50"
    finally:
        await direct.close()

    async def client() -> None:
        # No named prepared statements: they do not survive a transaction pooler.
        conn = await asyncpg.connect(pgbouncer.url(primary.dbname), statement_cache_size=0,
                                     server_settings={"application_name": "scaleout-test"})
        try:
            async with conn.transaction():
                assert await conn.fetchval("SELECT 1") == 1
                assert await conn.fetchval("SELECT $1::int + 1", 41) == 42
        finally:
            await conn.close()

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for _ in range(30):
                tg.start_soon(client)
        servers = await anyio.to_thread.run_sync(pgbouncer.server_connections, primary.dbname)
    assert 1 <= servers <= 5  # 30 clients shared the pool of 5


async def test_replica_shows_a_commit_after_the_apply_delay(primary: TunedPostgres, replica: PrivateReplica) -> None:
    writer = await asyncpg.connect(primary.admin_url)
    reader = await asyncpg.connect(replica.url())
    try:
        await writer.execute("CREATE TABLE IF NOT EXISTS lag_probe (n int)")
        await anyio.to_thread.run_sync(replica.wait_caught_up)
        await writer.execute("INSERT INTO lag_probe VALUES (1)")
        committed = time.monotonic()
        with anyio.fail_after(10):
            while not await reader.fetchval("SELECT count(*) FROM lag_probe WHERE n = 1"):
                await anyio.sleep(0.05)
        lag = time.monotonic() - committed
        assert 1.5 <= lag < 6, lag
        assert await reader.fetchval("SELECT pg_is_in_recovery()")
    finally:
        await writer.close()
        await reader.close()


def test_sentinel_failover_names_a_new_master(sentinels: RedisSentinelSet) -> None:
    addresses = [("127.0.0.1", port) for port in sentinels.sentinel_ports]
    sentinel = Sentinel(addresses, socket_timeout=1)
    assert sentinels.sentinel_url().startswith("redis+sentinel://127.0.0.1:")
    old = sentinels.master_port()
    assert sentinel.discover_master("mymaster") == ("127.0.0.1", old)
    sentinel.master_for("mymaster").set("k", "before")

    assert sentinels.kill_master() == old
    new = sentinels.wait_failover(old, timeout=20)

    assert new != old and new in sentinels.redis_ports
    assert sentinel.discover_master("mymaster") == ("127.0.0.1", new)
    master = sentinel.master_for("mymaster", socket_timeout=1)
    assert master.get("k") == b"before"  # the replica had it
    master.set("k", "after")
    sentinels.restart(old)  # back as a replica of the new master
    with redis.Redis(port=old) as client:
        assert client.info("replication")["role"] == "slave"


async def _next_message(pubsub: object, timeout: float) -> dict[str, object]:
    with anyio.fail_after(timeout):
        while True:
            message = await pubsub.get_sharded_message(ignore_subscribe_messages=True,  # type: ignore[attr-defined]
                                                       timeout=0.2)
            if message is not None:
                return dict(message)


async def test_cluster_sharded_pubsub_and_failover(cluster: RedisClusterSet) -> None:
    channel = "config:{acme}"
    owner = cluster.master_port_for_key(channel)
    assert owner in cluster.ports

    client = RedisCluster.from_url(cluster.url)
    try:
        await client.initialize()  # ssubscribe routes by the slot map, which only initialize() loads
        pubsub = client.pubsub()
        await pubsub.ssubscribe(channel)
        # ssubscribe returns once sent: publish until the subscription is in place.
        with anyio.fail_after(10):
            while not await client.spublish(channel, "v1"):
                await anyio.sleep(0.05)
        message = await _next_message(pubsub, 5)
        assert (message["channel"], message["data"]) == (channel.encode(), b"v1")
        await pubsub.aclose()
    finally:
        await client.aclose()

    await anyio.to_thread.run_sync(cluster.kill, owner)
    started = time.monotonic()
    new_owner = await anyio.to_thread.run_sync(cluster.wait_failover, owner)
    assert time.monotonic() - started < 15
    assert new_owner != owner and new_owner == cluster.master_port_for_key(channel)

    # A fresh client finds the new owner and sharded pub/sub works again.
    client = RedisCluster.from_url(cluster.url)
    try:
        await client.initialize()  # ssubscribe routes by the slot map, which only initialize() loads
        pubsub = client.pubsub()
        await pubsub.ssubscribe(channel)
        with anyio.fail_after(10):
            while not await client.spublish(channel, "v2"):
                await anyio.sleep(0.05)
        message = await _next_message(pubsub, 5)
        assert message["data"] == b"v2"
        await pubsub.aclose()
    finally:
        await client.aclose()
