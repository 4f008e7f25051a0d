"""Scale-out engines our users run (issue #10): PgBouncer, a lagging replica, Redis Sentinel,
Redis Cluster, and a subscription that goes deaf. Real servers, started by the tests."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import anyio
import asyncpg
import httpx
import pytest

from agent.app import Agent
from agent.db.writer import ConfigWriter
from agent.errors import UsageError
from agent.redis_client import parse_redis_url
from agent.settings import load_settings
from tests.agent_harness import agent_state, db_state, eventually, metric, running_agent
from tests.scaleout import (
    PrivatePgBouncer,
    PrivateReplica,
    RedisClusterSet,
    RedisSentinelSet,
    postgres_scratch_dir,
    running_postgres,
)
from tests.servers import free_port, run_cli

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parent.parent


def _dbname(url: str) -> str:
    return urlparse(url).path.lstrip("/")


@pytest.fixture
def pgbouncer(db_url: str) -> Any:
    """A transaction-pooling PgBouncer in front of this test's database (on the shared server)."""
    parsed = urlparse(db_url)
    with PrivatePgBouncer(postgres_scratch_dir("pgbouncer"), parsed.hostname or "127.0.0.1",
                          parsed.port or 5432, default_pool_size=4) as bouncer:
        yield bouncer


@pytest.fixture
def replica_pair() -> Any:
    """A private primary (migrated) and a streaming replica that applies commits 2 s late."""
    with running_postgres() as primary, PrivateReplica(primary, postgres_scratch_dir("replica"), "2s") as replica:
        yield primary, replica


@pytest.fixture
def sentinels() -> Any:
    with RedisSentinelSet(Path(tempfile.mkdtemp(prefix="ca-sentinel-"))) as servers:
        yield servers


@pytest.fixture
def cluster() -> Any:
    with RedisClusterSet(Path(tempfile.mkdtemp(prefix="ca-cluster-"))) as servers:
        yield servers


def start_relay(database_url: str, redis_url: str, metrics_port: int, **settings: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIG_AGENT_")}
    env.update({"CONFIG_AGENT_DATABASE_URL": database_url, "CONFIG_AGENT_REDIS_URL": redis_url,
                "CONFIG_AGENT_METRICS_PORT": str(metrics_port), "CONFIG_AGENT_METRICS_HOST": "127.0.0.1"})
    env.update({f"CONFIG_AGENT_{k.upper()}": v for k, v in settings.items()})
    return subprocess.Popen([sys.executable, "-m", "agent", "relay"], env=env, cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)


def stop(proc: subprocess.Popen[str]) -> str:
    """SIGTERM, wait, and return what it wrote on stderr."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err or ""


async def readyz(port: int) -> int:
    async with httpx.AsyncClient() as client:
        try:
            return (await client.get(f"http://127.0.0.1:{port}/readyz", timeout=1)).status_code
        except httpx.HTTPError:
            return 0


# -- URLs ------------------------------------------------------------------------


def test_redis_urls_parse_and_bad_ones_say_what_is_wrong() -> None:
    t = parse_redis_url("redis+sentinel://agent:pw@10.0.0.1:26379,10.0.0.2:26379/mymaster/2")
    assert (t.kind, t.nodes, t.service, t.db, t.username, t.password) == (
        "sentinel", (("10.0.0.1", 26379), ("10.0.0.2", 26379)), "mymaster", 2, "agent", "pw")
    t = parse_redis_url("rediss+cluster://a:1,b:2")
    assert (t.kind, t.tls, t.nodes) == ("cluster", True, (("a", 1), ("b", 2)))
    assert parse_redis_url("redis://u:p@h:6379/0").plain_url == "redis://h:6379/0"
    for bad, words in [("redis+sentinel://h:1", "service_name"), ("redis+cluster://h:1/0", "no path"),
                       ("redis+sentinel://h/x", "host:port"), ("http://h", "must start with")]:
        with pytest.raises(UsageError, match=words):
            parse_redis_url(bad)
    with pytest.raises(UsageError, match="needs a redis\\+cluster:// CONFIG_AGENT_REDIS_URL for agents"):
        Agent(load_settings(org_id="a", database_url="postgresql://x@127.0.0.1:1/x", redis_url="redis://h:1",
                            redis_channels="sharded"))
    proc = run_cli("once", env={"CONFIG_AGENT_REDIS_URL": "redis+sentinel://h:1", "CONFIG_AGENT_ORG_ID": "a",
                                "CONFIG_AGENT_DATABASE_URL": "postgresql://x@127.0.0.1:1/x"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "config-agent: error: invalid setting CONFIG_AGENT_REDIS_URL: "
        "redis+sentinel:// needs /service_name[/db] after the sentinel addresses"]


# -- PgBouncer -------------------------------------------------------------------


async def test_cli_and_library_through_pgbouncer_in_transaction_mode(
        db_url: str, redis_url: str, org: str, pgbouncer: PrivatePgBouncer) -> None:
    url = pgbouncer.url(_dbname(db_url))
    env = {"CONFIG_AGENT_DATABASE_URL": url, "CONFIG_AGENT_REDIS_URL": redis_url}
    # Without the setting the pooler breaks asyncpg's prepared statements, and we say how to fix it.
    plain = [run_cli("set", org, "ai", "t", str(i), env=env) for i in range(3)]
    failed = [p for p in plain if p.returncode != 0]
    assert failed, "a transaction pooler should break named prepared statements"
    assert "CONFIG_AGENT_DATABASE_POOL_MODE=transaction" in failed[0].stderr
    env["CONFIG_AGENT_DATABASE_POOL_MODE"] = "transaction"
    for args in (("set", org, "ai", "threshold", "0.5"), ("set", org, "ai", "threshold", "0.7"),
                 ("get", org, "ai", "threshold", "--json"), ("list", org, "--json"),
                 ("history", org, "ai", "threshold", "--json"),
                 ("rollback", org, "ai", "threshold", "--to-version", "1"),
                 ("delete", org, "ai", "threshold")):
        proc = run_cli(*args, env=env)
        assert proc.returncode == 0, (args, proc.stderr)
    history = json.loads(run_cli("history", org, "ai", "threshold", "--json", env=env, check=True).stdout)
    assert [h["action"] for h in history] == ["delete", "rollback", "update", "create"]

    # The library: 200 writes from 8 concurrent writers over 4 server connections, no error.
    errors: list[BaseException] = []

    async def write(n: int) -> None:
        writer = await ConfigWriter.open(url, pool_mode="transaction")
        try:
            for i in range(25):
                try:
                    await writer.set(org, "lib", f"k{n}", i, actor="t")
                    await writer.get(org, "lib", f"k{n}")
                    await writer.history(org, "lib", f"k{n}", limit=2)
                except Exception as exc:  # counted: the assertion below names them
                    errors.append(exc)
        finally:
            await writer.close()

    async with anyio.create_task_group() as tg:
        for n in range(8):
            tg.start_soon(write, n)
    assert errors == []
    check = await ConfigWriter.open(db_url)
    rows = await check.list(org, "lib")
    await check.close()
    assert sorted((r["key"], r["version"]) for r in rows) == [(f"k{n}", 25) for n in range(8)]
    assert pgbouncer.server_connections(_dbname(db_url)) <= 4


async def test_agents_through_pgbouncer_converge_without_prepared_statement_errors(
        db_url: str, redis_url: str, org: str, pgbouncer: PrivatePgBouncer,
        caplog: pytest.LogCaptureFixture) -> None:
    url = pgbouncer.url(_dbname(db_url))
    writer = await ConfigWriter.open(db_url, redis_url=redis_url)
    await writer.set(org, "ai", "t", 0, actor="t")
    async with _agents(8, org_id=org, database_url=url, redis_url=redis_url, database_pool_mode="transaction",
                       reconcile_interval=0.5, heartbeat_interval=0, metrics_port=0) as agents:
        for i in range(1, 21):
            await writer.set(org, "ai", f"k{i % 5}", i, actor="t")
        expected = await _db_state(db_url, org)
        await eventually(lambda: all(agent_state(a) == expected for a in agents), 10, "all converged")
        await anyio.sleep(1.2)  # two reconciles each, through the pooler too
    await writer.close()
    assert not [r for r in caplog.records if "prepared statement" in r.getMessage()]
    assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR") and "PostgreSQL" in r.getMessage()]


async def test_relay_behind_pgbouncer_is_never_ready_and_says_why_direct_relay_is(
        db_url: str, redis_url: str, pgbouncer: PrivatePgBouncer) -> None:
    port = free_port()
    relay = start_relay(pgbouncer.url(_dbname(db_url)), redis_url, port, heartbeat_interval="0.5")
    try:
        statuses = []
        for _ in range(30):  # 6 s: many proof rounds
            statuses.append(await readyz(port))
            await anyio.sleep(0.2)
    finally:
        err = stop(relay)
    assert 200 not in statuses and 503 in statuses
    lines = [line for line in err.splitlines() if "LISTEN did not hear" in line]
    assert lines, err
    assert "needs a direct (session) connection" in lines[0] and "PgBouncer" in lines[0]

    direct_port = free_port()
    relay = start_relay(db_url, redis_url, direct_port, heartbeat_interval="0.5")
    try:
        with anyio.fail_after(10):
            while await readyz(direct_port) != 200:
                await anyio.sleep(0.05)
    finally:
        assert "LISTEN did not hear" not in stop(relay)


def test_relay_refuses_the_transaction_pool_mode() -> None:
    proc = run_cli("relay", env={"CONFIG_AGENT_DATABASE_URL": "postgresql://x@127.0.0.1:1/x",
                                 "CONFIG_AGENT_REDIS_URL": "redis://127.0.0.1:1",
                                 "CONFIG_AGENT_DATABASE_POOL_MODE": "transaction"})
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "direct (session) connection" in proc.stderr


# -- a replica behind by 2 s --------------------------------------------------------


async def test_replica_two_seconds_behind_changes_served_within_three_seconds_no_drift(
        redis_url: str, org: str, replica_pair: tuple[Any, PrivateReplica]) -> None:
    primary, replica = replica_pair
    if True:
        writer = await ConfigWriter.open(primary.admin_url, redis_url=redis_url)
        await writer.set(org, "ai", "seed", 0, actor="t")
        await anyio.to_thread.run_sync(replica.wait_caught_up)
        async with running_agent(org_id=org, database_url=primary.admin_url, database_read_url=replica.url(),
                                 redis_url=redis_url, reconcile_interval=0.7, heartbeat_interval=0,
                                 drift_grace=0.5) as agent:
            samples: list[tuple[int, dict[tuple[str, str], int]]] = []
            done = anyio.Event()

            async def sample() -> None:
                while not done.is_set():
                    snap = agent.store.snapshot
                    samples.append((snap.revision, {k: e.version for k, e in snap.entries.items()}))
                    await anyio.sleep(0.005)

            async with anyio.create_task_group() as tg:
                tg.start_soon(sample)
                committed = time.monotonic()
                result = await writer.set(org, "ai", "lone", 1, actor="t")
                lone = await eventually(lambda: agent.store.version_of("ai", "lone") == result.version, 3.5,
                                        "lone change served")
                lone += time.monotonic() - committed - lone  # from the commit, not from the call's return
                for i in range(10):
                    last = await writer.set(org, "burst", f"k{i}", i, actor="t")
                committed = time.monotonic()
                burst = await eventually(lambda: agent.store.snapshot.revision >= last.revision, 3.5,
                                         "burst served")
                await anyio.sleep(1.5)  # reconciles run after the chase: still no drift
                done.set()
            print(f"replica 2 s behind: lone change served after {lone:.2f}s, burst {burst:.2f}s after "
                  "the last commit")
            assert lone <= 3.0 and burst <= 3.0
            assert metric(agent, "config_agent_drift_total") == 0
            # Whichever read saw them first (the chase or a reconcile), all 11 arrived, none as drift.
            assert sum(metric(agent, "config_agent_updates_total", {"source": source})
                       for source in ("pubsub", "reconcile")) == 11
        await writer.close()
    # Nothing ever went backwards.
    for (rev_a, ver_a), (rev_b, ver_b) in zip(samples, samples[1:], strict=False):
        assert rev_b >= rev_a
        assert all(ver_b.get(k, 0) >= v for k, v in ver_a.items())


# -- Redis Sentinel --------------------------------------------------------------------


@asynccontextmanager
async def _agents(count: int, **settings: Any) -> AsyncIterator[list[Agent]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(running_agent(**settings)) for _ in range(count)]


async def _db_state(db_url: str, org: str) -> dict[tuple[str, str], tuple[Any, int]]:
    conn = await asyncpg.connect(db_url)
    try:
        return await db_state(conn, org)
    finally:
        await conn.close()


async def _stream(writer: ConfigWriter, org: str, count: int, every: float,
                  during: Callable[[int], None] | None = None) -> None:
    for i in range(count):
        await writer.set(org, "s", f"k{i % 7}", i, actor="t")
        if during is not None:
            during(i)
        await anyio.sleep(every)


async def test_sentinel_master_killed_during_a_stream_every_agent_gets_every_change(
        db_url: str, org: str, sentinels: RedisSentinelSet) -> None:
    if True:
        url = sentinels.sentinel_url()
        hb = 0.5
        relay_port = free_port()
        relay = start_relay(db_url, url, relay_port, heartbeat_interval=str(hb))
        try:
            writer = await ConfigWriter.open(db_url, redis_url=url)
            await writer.set(org, "s", "k0", -1, actor="t")
            async with _agents(3, org_id=org, database_url=db_url, redis_url=url, heartbeat_interval=hb,
                               fallback_poll_interval=1.0, metrics_port=0) as agents:
                await eventually(lambda: all(metric(a, "config_agent_messages_total", {"result": "heartbeat"}) > 0
                                             for a in agents), 10, "heartbeats heard through Sentinel")
                killed: list[float] = []

                def kill(i: int) -> None:
                    if i == 10:
                        killed.append(time.monotonic())
                        sentinels.kill_master()

                await _stream(writer, org, 60, 0.1, kill)
                expected = await _db_state(db_url, org)
                await eventually(lambda: all(agent_state(a) == expected for a in agents), 15, "all converged")
                # Hearing again: a heartbeat through the new master reached every agent.
                heard = [metric(a, "config_agent_messages_total", {"result": "heartbeat"}) for a in agents]
                took = await eventually(lambda: all(
                    metric(a, "config_agent_messages_total", {"result": "heartbeat"}) > h
                    and metric(a, "config_agent_redis_connected") == 1 for a, h in zip(agents, heard, strict=True)),
                    15, "hearing the new master")
                deaf_for = time.monotonic() - killed[0]
                print(f"sentinel: master killed; all agents converged and hear again "
                      f"{deaf_for:.1f}s after the kill ({took:.1f}s after the stream)")
                # Failover (~2.5 s) plus the reconnect backoff of SPEC §3.5 (1, 2, 4 s …).
                assert deaf_for <= 10
        finally:
            stop(relay)
            await writer.close()


# -- Redis Cluster ----------------------------------------------------------------------


async def test_cluster_sharded_channels_survive_the_loss_of_the_orgs_master(
        db_url: str, org: str, cluster: RedisClusterSet) -> None:
    if True:
        url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in cluster.ports)
        # The tenant ACL on every node (ACLs are not replicated), then agents log in with it.
        pw = Path(tempfile.mkdtemp()) / "pw"
        pw.write_text("agent-pw\n")
        proc = run_cli("grant-reader", "--org", org, "--role", f"{org}_agent", "--password-file", str(pw),
                       "--redis-apply", env={"CONFIG_AGENT_DATABASE_URL": db_url, "CONFIG_AGENT_REDIS_URL": url})
        assert proc.returncode == 0, proc.stderr
        assert f"on {len(cluster.ports)} node(s)" in proc.stdout
        for port in cluster.ports:
            out = (await anyio.run_process(["redis-cli", "-p", str(port), "ACL", "GETUSER", f"{org}_agent"])).stdout
            assert f"&config:{{{org}}}".encode() in out and b"+ssubscribe" in out, (port, out)
        agent_url = url.replace("redis+cluster://", f"redis+cluster://{org}_agent:agent-pw@")
        hb = 0.5
        relay = start_relay(db_url, url, free_port(), heartbeat_interval=str(hb))
        try:
            writer = await ConfigWriter.open(db_url, redis_url=url)
            await writer.set(org, "s", "k0", -1, actor="t")
            async with _agents(3, org_id=org, database_url=db_url, redis_url=agent_url, heartbeat_interval=hb,
                               fallback_poll_interval=1.0, metrics_port=0) as agents:
                await writer.set(org, "s", "k1", 1, actor="t")
                await eventually(lambda: all(a.store.version_of("s", "k1") == 1 for a in agents), 5,
                                 "sharded announcement")
                assert all(metric(a, "config_agent_updates_total", {"source": "pubsub"}) >= 1 for a in agents)
                owner = cluster.master_port_for_key(f"config:{{{org}}}")

                def kill(i: int) -> None:
                    if i == 5:
                        cluster.kill(owner)

                await _stream(writer, org, 40, 0.1, kill)
                expected = await _db_state(db_url, org)
                await eventually(lambda: all(agent_state(a) == expected for a in agents), 20, "no change lost")
                new_owner = await anyio.to_thread.run_sync(cluster.wait_failover, owner)
                assert new_owner != owner
                before = [metric(a, "config_agent_updates_total", {"source": "pubsub"}) for a in agents]
                await eventually(lambda: all(metric(a, "config_agent_redis_connected") == 1 for a in agents), 15,
                                 "resubscribed on the new owner")
                await writer.set(org, "s", "after", 1, actor="t")
                await eventually(lambda: all(a.store.version_of("s", "after") == 1 for a in agents), 10,
                                 "pub/sub on the new owner")
                assert all(metric(a, "config_agent_updates_total", {"source": "pubsub"}) > b
                           for a, b in zip(agents, before, strict=True))
        finally:
            stop(relay)
            await writer.close()


# -- never silently deaf ------------------------------------------------------------------


class FreezableProxy:
    """A TCP proxy to Redis that can stop passing server → client bytes while the socket stays open."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.frozen: set[int] = set()  # connections that hear nothing any more
        self.port = 0
        self.connections = 0

    def freeze(self) -> None:
        """Every connection open now goes deaf; new ones work."""
        self.frozen = set(range(1, self.connections + 1))

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, downstream: bool) -> None:
            try:
                while data := await src.read(65536):
                    if downstream and number in self.frozen:
                        continue  # swallowed: the client hears nothing, its socket stays open
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))

    async def close(self) -> None:
        self.server.close()


async def test_a_deaf_subscription_is_noticed_and_made_again(
        db_url: str, redis_url: str, org: str) -> None:
    proxy = FreezableProxy(urlparse(redis_url).port or 6379)
    await proxy.start()
    hb = 0.3
    relay = start_relay(db_url, redis_url, free_port(), heartbeat_interval=str(hb))
    writer = await ConfigWriter.open(db_url)  # no direct publish: only the relay announces
    await writer.set(org, "ai", "t", 0, actor="t")
    try:
        async with running_agent(org_id=org, database_url=db_url, redis_url=f"redis://127.0.0.1:{proxy.port}",
                                 heartbeat_interval=hb, reconcile_interval=300) as agent:
            await eventually(lambda: metric(agent, "config_agent_messages_total", {"result": "heartbeat"}) > 0,
                             5, "heartbeats heard")
            proxy.freeze()  # silently deaf: the socket stays open, nothing arrives
            await writer.set(org, "ai", "t", 1, actor="t")
            took = await eventually(lambda: metric(agent, "config_agent_redis_deaf_total") >= 1, 5, "deaf noticed")
            assert took <= 3 * hb + 1.0
            await eventually(lambda: agent.store.version_of("ai", "t") == 1, 5, "missed change replayed")
            await eventually(lambda: metric(agent, "config_agent_redis_connected") == 1, 3, "hearing again")
            assert proxy.connections >= 2
            assert metric(agent, "config_agent_drift_total") == 0
    finally:
        stop(relay)
        await writer.close()
        await proxy.close()
