"""Issue #13: agents report their revision; `set --wait` and `status` answer "did every pod get it?".

Real servers throughout: the shared PostgreSQL and Redis, a private Redis for the ACL,
a Sentinel set and a Cluster for the scale-out topologies, agents as real processes
(`config-agent run`, and `bench.worker` hosting many agents per process), cut off
from PostgreSQL and Redis by a TCP proxy that stops forwarding (a network partition:
no reset, the sockets stay open).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import anyio
import pytest

from agent.db.roles import redis_acl_command
from agent.db.writer import ConfigWriter
from agent.fleet import AgentReport, FleetReader, agent_key, fleet_rows, index_key, progress
from agent.redis_client import cluster_client, redis_client
from agent.relay import Relay
from agent.settings import load_settings
from bench.common import ROOT
from bench.harness import Worker, first_at_or_after
from tests.agent_harness import eventually, running_agent
from tests.scaleout import RedisClusterSet, RedisSentinelSet
from tests.servers import PrivateRedis, free_port, run_cli, stop_processes

pytestmark = pytest.mark.anyio


def report(agent: str, revision: int, *, services: tuple[str, ...] = (), stale: bool = False,
           age: float = 0.0) -> AgentReport:
    now = time.time()
    return AgentReport(agent=agent, namespace="org-acme", org_id="acme", services=services, revision=revision,
                       stale=stale, ready=True, redis_connected=True, db_connected=True, applied_at=now - age,
                       reported_at=now - age, version="x")


def test_wait_counts_only_agents_serving_the_service_and_rounds_the_percentage_up() -> None:
    fleet = [report(f"a{i}", 7 if i < 9 else 6) for i in range(10)] + [report("other", 1, services=("billing",))]
    state = progress(fleet, 7, "ai", 90, 0.1)
    assert (len(state.served), state.total, state.reached) == (9, 10, True)
    assert not progress(fleet, 7, "ai", 91, 0.1).reached  # 91 % of 10 needs all 10
    assert progress(fleet, 7, "billing", 100, 0.1).total == 11  # the filtered agent serves billing
    assert progress([], 7, "ai", 100, 0.0).reached  # no agent: nothing to wait for
    assert [r.agent for r in progress(fleet, 7, "ai", 100, 0.1).lagging] == ["a9"]


def test_status_rows_put_laggards_first_and_measure_filtered_agents_by_their_services() -> None:
    rows = fleet_rows([report("ok", 9), report("old", 5), report("stale", 9, stale=True),
                       report("billing-only", 4, services=("billing",))], 9, {"billing": 4, "ai": 9}, time.time())
    assert [r["agent"] for r in rows] == ["old", "stale", "billing-only", "ok"]
    assert {r["agent"]: r["behind"] for r in rows} == {"old": 4, "stale": 0, "billing-only": 0, "ok": 0}


def test_reports_of_another_org_or_malformed_are_ignored() -> None:
    good = report("pod-1", 3)
    assert AgentReport.parse("acme", good.to_json()) == good
    assert AgentReport.parse("globex", good.to_json()) is None
    for bad in (b"", b"[]", b"{}", good.to_json().replace('"pod-1"', '"../x"'), b'{"agent": 1}'):
        assert AgentReport.parse("acme", bad) is None


def test_agent_names_are_checked_like_other_settings() -> None:
    with pytest.raises(Exception, match="CONFIG_AGENT_AGENT_NAME"):
        load_settings(agent_name="pod/../x")
    assert load_settings(agent_name="web-7d9f-abc12.x").agent_name == "web-7d9f-abc12.x"


async def test_a_tenants_acl_user_writes_its_own_reports_and_nothing_of_another_org(
        tmp_path: Path, db_url: str, org: str) -> None:
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    try:
        admin = redis_client(server.url)
        await admin.execute_command(*redis_acl_command(org, "tenant_a", "pw-a"))
        cli = ["redis-cli", "-p", str(server.port), "--user", "tenant_a", "--pass", "pw-a", "--no-auth-warning"]

        def as_tenant(*command: str) -> str:
            return subprocess.run([*cli, *command], capture_output=True, text=True, timeout=10).stdout.strip()

        other = "globex"
        await admin.set(agent_key(other, "pod-9"), "their report")
        assert as_tenant("SET", agent_key(org, "pod-1"), "x", "EX", "30") == "OK"
        assert as_tenant("ZADD", index_key(org), "1", "pod-1") == "1"
        for command in (("GET", agent_key(org, "pod-1")),  # write-only, even its own org
                        ("ZRANGE", index_key(org), "0", "-1"),
                        ("GET", agent_key(other, "pod-9")), ("SET", agent_key(other, "pod-9"), "forged"),
                        ("DEL", agent_key(other, "pod-9")), ("ZADD", index_key(other), "1", "pod-1"),
                        ("ZREM", index_key(other), "pod-9"), ("SCAN", "0"), ("KEYS", "*"),
                        ("SET", agent_key(org, "pod-1"), "x", "GET")):
            assert "NOPERM" in as_tenant(*command), command
        assert await admin.get(agent_key(other, "pod-9")) == b"their report"

        # What the agent really sends under that ACL is enough to be listed.
        async with await ConfigWriter.open(db_url) as writer:
            await writer.set(org, "ai", "t", 1, actor="t")
        url = f"redis://tenant_a:pw-a@127.0.0.1:{server.port}"
        async with running_agent(org_id=org, database_url=db_url, redis_url=url, heartbeat_interval=0,
                                 agent_name="pod-1", agent_namespace=f"org-{org}", fleet_report_interval=0.5):
            async with FleetReader(server.url) as fleet:
                with anyio.fail_after(5):
                    while [(r.agent, r.namespace, r.revision, r.ready) for r in await fleet.agents(org)] != [
                            ("pod-1", f"org-{org}", 1, True)]:
                        await anyio.sleep(0.05)
        async with FleetReader(server.url) as fleet:  # a stopped agent removes its report
            assert await fleet.agents(org) == []
        # A reader that may only read (e.g. a status dashboard) lists reports; it cannot
        # prune a gone member, and that is no error.
        await admin.execute_command("ACL", "SETUSER", "viewer", "reset", "on", ">pw-v",
                                    "%R~config-agent:agents:*", "-@all", "+zrange", "+mget", "+ping")
        await admin.zadd(index_key(org), {"ghost": 1})
        async with FleetReader(f"redis://viewer:pw-v@127.0.0.1:{server.port}") as fleet:
            assert await fleet.agents(org) == []
        assert await admin.zrange(index_key(org), 0, -1) == [b"ghost"]
        await admin.aclose()
    finally:
        server.stop()


def _status(env: dict[str, str], org: str) -> list[dict[str, Any]]:
    proc = run_cli("status", org, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    agents: list[dict[str, Any]] = json.loads(proc.stdout)["agents"]
    return agents


async def test_a_killed_agent_leaves_status_within_its_ttl_and_a_restarted_one_comes_back(
        db_url: str, redis_url: str, org: str, tmp_path: Path) -> None:
    async with await ConfigWriter.open(db_url) as writer:
        await writer.set(org, "ai", "t", 1, actor="t")
    env = {**os.environ, "CONFIG_AGENT_DATABASE_URL": db_url, "CONFIG_AGENT_REDIS_URL": redis_url,
           "CONFIG_AGENT_ORG_ID": org, "CONFIG_AGENT_HEARTBEAT_INTERVAL": "0", "CONFIG_AGENT_METRICS_PORT": "0",
           "CONFIG_AGENT_FLEET_REPORT_INTERVAL": "1", "CONFIG_AGENT_AGENT_NAME": "pod-x"}

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "agent", "run", "--http-port", str(free_port())],
                                env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async with FleetReader(redis_url) as fleet:
        async def names() -> list[str]:
            return [r.agent for r in await fleet.agents(org)]

        proc = start()
        try:
            with anyio.fail_after(30):
                while await names() != ["pod-x"]:
                    await anyio.sleep(0.1)
            assert [(a["agent"], a["revision"], a["behind"]) for a in _status(env, org)] == [("pod-x", 1, 0)]
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed = time.monotonic()
            with anyio.fail_after(10):
                while await names():
                    await anyio.sleep(0.1)
            gone_after = time.monotonic() - killed
            print(f"SIGKILLed agent left the fleet after {gone_after:.2f}s (TTL 3 s)")
            assert gone_after <= 3.5
            assert _status(env, org) == []
            proc = start()
            with anyio.fail_after(30):
                while await names() != ["pod-x"]:
                    await anyio.sleep(0.1)
        finally:
            stop_processes([proc])


class CuttableProxy:
    """A TCP proxy (own thread and event loop) that can partition its clients from the server:
    after `cut()` nothing passes in either direction and new connections hang (no reset)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.cut_off = False
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._started.wait(10)

    def cut(self) -> None:
        self.cut_off = True

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self._started.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self.cut_off:
                await asyncio.sleep(3600)
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            try:
                await self._both_ways(reader, writer, up_reader, up_writer)
            finally:
                up_writer.transport.abort()
        finally:
            writer.transport.abort()

    async def _both_ways(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter) -> None:

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    if self.cut_off:
                        await asyncio.sleep(3600)
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def close(self) -> None:
        """Stop serving, drop every connection, end the thread."""
        async def shutdown() -> None:
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
        self._thread.join(5)
        self._loop.close()


@pytest.fixture
def fleet_env(db_url: str, redis_url: str, org: str) -> Iterator[dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIG_AGENT_")}
    env.update({"CONFIG_AGENT_DATABASE_URL": db_url, "CONFIG_AGENT_REDIS_URL": redis_url,
                "CONFIG_AGENT_ORG_ID": org, "CONFIG_AGENT_HEARTBEAT_INTERVAL": "0",
                "CONFIG_AGENT_RECONCILE_INTERVAL": "3600", "CONFIG_AGENT_LOG_LEVEL": "warning"})
    yield env


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_50_agents_wait_returns_promptly_and_names_exactly_the_3_cut_off(
        fleet_env: dict[str, str], db_url: str, redis_url: str, org: str) -> None:
    """Must-holds of #13: 47 agents reach the servers directly, 3 through proxies that get cut."""
    async with await ConfigWriter.open(db_url) as writer:
        await writer.set(org, "ai", "t", 0, actor="t")
    pg, rd = urlparse(db_url), urlparse(redis_url)
    pg_proxy, redis_proxy = CuttableProxy(pg.port or 5432), CuttableProxy(rd.port or 6379)
    cut_env = fleet_env | {
        "CONFIG_AGENT_DATABASE_URL": db_url.replace(f":{pg.port or 5432}/", f":{pg_proxy.port}/"),
        "CONFIG_AGENT_REDIS_URL": f"redis://127.0.0.1:{redis_proxy.port}"}
    workers = [Worker("agents", 24, fleet_env), Worker("agents", 23, fleet_env), Worker("agents", 3, cut_env)]
    try:
        for w in workers:
            await anyio.to_thread.run_sync(w.wait_ready)
        cut_names = {f"{os.uname().nodename}-{workers[2].proc.pid}" + suffix for suffix in ("", "-2", "-3")}
        async with FleetReader(redis_url) as fleet:
            with anyio.fail_after(20):
                while len(await fleet.agents(org)) < 50:
                    await anyio.sleep(0.1)
            assert cut_names <= {r.agent for r in await fleet.agents(org)}

        def set_wait(value: int, *flags: str) -> tuple[subprocess.CompletedProcess[str], float]:
            proc = run_cli("set", org, "ai", "t", str(value), *flags, env=fleet_env, timeout=60)
            return proc, time.time()

        # All 50 serve it: --wait returns within 1 s of the last agent applying it.
        proc, returned = await anyio.to_thread.run_sync(lambda: set_wait(1, "--wait", "--timeout", "20", "--json"))
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        assert doc["wait"]["reached"] and doc["wait"]["served"] == 50
        seen = [s for w in workers for s in await anyio.to_thread.run_sync(w.dump)]
        applied = [first_at_or_after(s, doc["revision"]) for s in seen]
        assert None not in applied
        late = returned - max(a for a in applied if a is not None)
        print(f"set --wait returned {late * 1000:.0f} ms after the last of 50 agents applied the change")
        assert late < 1.0

        # Cut 3 off from PostgreSQL and Redis: they lag and are named, exactly those.
        pg_proxy.cut()
        redis_proxy.cut()
        proc, _ = await anyio.to_thread.run_sync(lambda: set_wait(2, "--wait", "--timeout", "5"))
        assert proc.returncode == 4, proc.stdout + proc.stderr
        error, *laggards = proc.stderr.strip().splitlines()[-4:]
        assert error.startswith("config-agent: error: --wait timed out: 47/50 agents serve revision"), error
        assert {line.split()[0] for line in laggards} == cut_names, laggards
        assert all(" at revision " in line for line in laggards)

        # 90 % is 45 of 50: reached without the three.
        proc, _ = await anyio.to_thread.run_sync(lambda: set_wait(3, "--wait=90", "--timeout", "20"))
        assert proc.returncode == 0, proc.stderr
        assert "served: 47/50 agents serve revision" in proc.stdout
    finally:
        for w in workers:
            w.stop()
        pg_proxy.close()
        redis_proxy.close()


async def test_reports_on_sentinel_and_on_the_orgs_slot_of_a_cluster(
        db_url: str, org: str, tmp_path: Path) -> None:
    async with await ConfigWriter.open(db_url) as writer:
        await writer.set(org, "ai", "t", 1, actor="t")
    with RedisSentinelSet(Path(tempfile.mkdtemp(prefix="ca-sentinel-"))) as sentinels:
        url = sentinels.sentinel_url()
        async with running_agent(org_id=org, database_url=db_url, redis_url=url, heartbeat_interval=0,
                                 agent_name="pod-s", fleet_report_interval=0.5), FleetReader(url) as fleet:
            await _until_listed(fleet, org, "pod-s")
    with RedisClusterSet(Path(tempfile.mkdtemp(prefix="ca-cluster-"))) as cluster:
        url = f"redis+cluster://127.0.0.1:{cluster.ports[0]}"
        async with running_agent(org_id=org, database_url=db_url, redis_url=url, heartbeat_interval=0,
                                 agent_name="pod-c", fleet_report_interval=0.5), FleetReader(url) as fleet:
            await _until_listed(fleet, org, "pod-c")
            client = cluster_client(url)
            await client.initialize()
            # The report, its index and the org's sharded channel share one slot.
            slots = {await client.execute_command("CLUSTER KEYSLOT", key)  # type: ignore[no-untyped-call]
                     for key in (agent_key(org, "pod-c"), index_key(org), f"config:{{{org}}}")}
            assert len(slots) == 1
            await client.aclose()


async def _until_listed(fleet: FleetReader, org: str, name: str) -> None:
    with anyio.fail_after(15):
        while [r.agent for r in await fleet.agents(org)] != [name]:
            await anyio.sleep(0.1)


async def test_relay_exports_the_fleet_summary_per_org(db_url: str, redis_url: str, org: str) -> None:
    async with await ConfigWriter.open(db_url) as writer:
        await writer.set(org, "ai", "t", 1, actor="t")
        await writer.set(org, "ai", "t", 2, actor="t")
    admin = redis_client(redis_url)
    now = time.time()
    for name, revision, stale in (("pod-a", 2, False), ("pod-b", 1, True)):
        doc = AgentReport(agent=name, namespace=None, org_id=org, services=(), revision=revision, stale=stale,
                          ready=True, redis_connected=True, db_connected=not stale, applied_at=now,
                          reported_at=now, version="x")
        await admin.set(agent_key(org, name), doc.to_json(), ex=30)
        await admin.zadd(index_key(org), {name: now + 30})
    relay = Relay(load_settings(database_url=db_url, redis_url=redis_url, heartbeat_interval=0.2))

    def sample(name: str) -> float | None:
        return relay.state.registry.get_sample_value(f"config_agent_fleet_{name}", {"org_id": org})

    try:
        async with anyio.create_task_group() as tg:
            await tg.start(relay.run)
            await eventually(lambda: sample("agents") == 2, 10, "the relay counted both agents")
            assert (sample("behind"), sample("stale"), sample("unready")) == (1, 1, 0)
            await admin.delete(agent_key(org, "pod-b"))  # pod-b's report expired
            await eventually(lambda: sample("agents") == 1 and sample("behind") == 0, 10, "pod-b gone")
            tg.cancel_scope.cancel()
    finally:
        await relay.close()
        await admin.delete(agent_key(org, "pod-a"), index_key(org))
        await admin.aclose()


# -- idle reports are spread (issue #21.5) ------------------------------------------------


async def test_idle_reports_take_a_random_phase_then_the_interval_within_10_percent_inside_the_ttl(
        redis_url: str, org: str) -> None:
    from prometheus_client import CollectorRegistry

    from agent.fleet import TTL_FACTOR, FleetReporter
    from agent.metrics import Metrics
    from agent.status import SyncStatus
    from agent.store import Store

    ranges: list[tuple[float, float]] = []

    def rand(lo: float, hi: float) -> float:  # the longest wait the spread allows
        ranges.append((lo, hi))
        return hi

    interval = 0.2
    reporter = FleetReporter(redis_url, "pod-j", None, (), interval, store=Store(org),
                             status=SyncStatus(metrics=Metrics(org, CollectorRegistry())), rand=rand)
    admin = redis_client(redis_url)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(reporter.run)
            await eventually(lambda: reporter.reports >= 4, 20, "four idle reports")
            ttl_ms = await admin.pttl(agent_key(org, "pod-j"))
            tg.cancel_scope.cancel()
    finally:
        await admin.aclose()
    # A random first phase (a fleet started together spreads at once), then interval ± 10 %.
    assert ranges[0] == (0.0, interval)
    assert len(ranges) >= 3 and all(r == pytest.approx((0.9, 1.1)) for r in ranges[1:]), ranges
    # The longest wait stays well inside the report's life: it never expires between two reports.
    longest = interval * (1 + FleetReporter.JITTER)
    assert longest * 2 <= interval * TTL_FACTOR
    assert 0 < ttl_ms <= interval * TTL_FACTOR * 1000


async def test_a_report_after_a_change_is_one_set_and_the_index_is_written_once_per_interval(
        redis_url: str, org: str) -> None:
    """Per change an agent pays one SET; the index (what readers list) is refreshed at most once
    per interval, and at once after a failed report (a reader may have pruned the member)."""
    from prometheus_client import CollectorRegistry

    from agent.fleet import FleetReporter
    from agent.metrics import Metrics
    from agent.model import Change
    from agent.status import SyncStatus
    from agent.store import Store

    store = Store(org)
    reporter = FleetReporter(redis_url, "pod-k", None, (), 60.0, store=store,
                             status=SyncStatus(metrics=Metrics(org, CollectorRegistry())))
    admin = redis_client(redis_url)
    reader = FleetReader(redis_url)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(reporter.run)
            await eventually(lambda: reporter.reports >= 1, 10, "the first report")
            for version in range(1, 6):
                store.apply([Change("ai", "t", version, version, version, False, "2026-01-01T00:00:00+00:00")],
                            revision=version, source="pubsub")
                await eventually(lambda version=version: reporter.reports >= version + 1, 10, "a report")
            (seen,) = await reader.agents(org)
            assert seen.agent == "pod-k" and seen.revision == 5
            assert reporter.index_writes == 1, (reporter.reports, reporter.index_writes)
            # A reader pruned the member (its key had expired) while reports failed: the next one indexes.
            await admin.zrem(index_key(org), "pod-k")
            reporter._failing = True
            store.apply([Change("ai", "t", 6, 6, 6, False, "2026-01-01T00:00:00+00:00")], revision=6, source="pubsub")
            await eventually(lambda: reporter.reports >= 7, 10, "a report after the failure")
            assert reporter.index_writes == 2
            assert [r.revision for r in await reader.agents(org)] == [6]
            tg.cancel_scope.cancel()
    finally:
        await reader.close()
        await admin.aclose()
