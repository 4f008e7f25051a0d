"""Redis and PostgreSQL outages (private servers, killed and restarted), and start-up without PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import asyncpg
import pytest

from agent.db.writer import ConfigWriter
from tests.agent_harness import agent_state, eventually, metric, running_agent
from tests.servers import PrivatePostgres, PrivateRedis

pytestmark = pytest.mark.anyio


async def test_redis_killed_changes_arrive_by_polling_then_pubsub_again(
        db_url: str, org: str, private_redis: PrivateRedis) -> None:
    writer = await ConfigWriter.open(db_url)  # no Redis: only the agent's fallback sees changes
    publisher = await ConfigWriter.open(db_url, redis_url=private_redis.url)
    await writer.set(org, "ai", "k0", 0, actor="t")
    poll = 1.0
    # No relay runs here: heartbeats off, so the subscription's confirmation is the proof.
    async with running_agent(org_id=org, database_url=db_url, redis_url=private_redis.url,
                             fallback_poll_interval=poll, heartbeat_interval=0) as agent:
        assert metric(agent, "config_agent_redis_connected") == 1
        private_redis.kill()
        await eventually(lambda: metric(agent, "config_agent_redis_connected") == 0, 5, "redis down noticed")
        for i in range(20):
            await writer.set(org, "ai", f"k{i}", i + 100, actor="t")
        expected = {("ai", f"k{i}"): (i + 100, 2 if i == 0 else 1) for i in range(20)}
        took = await eventually(lambda: agent_state(agent) == expected, poll + 1, "applied by polling")
        assert took <= poll + 1
        assert metric(agent, "config_agent_updates_total", {"source": "poll"}) == 20
        # Still serving meanwhile; now Redis returns.
        private_redis.start()
        await eventually(lambda: metric(agent, "config_agent_redis_connected") == 1, 10, "re-subscribed")
        await publisher.set(org, "ai", "after", "yes", actor="t")
        await eventually(lambda: ("ai", "after") in agent_state(agent), 0.5, "pub/sub works again")
        assert metric(agent, "config_agent_updates_total", {"source": "pubsub"}) == 1
    await writer.close()
    await publisher.close()


async def test_postgres_stopped_agent_serves_turns_stale_and_recovers(
        private_postgres: PrivatePostgres, redis_url: str, org: str) -> None:
    url = private_postgres.admin_url
    writer = await ConfigWriter.open(url)
    await writer.set(org, "ai", "t", 1, actor="t")
    await writer.close()
    async with running_agent(org_id=org, database_url=url, redis_url=redis_url,
                             reconcile_interval=0.3, stale_after=1.5) as agent:
        private_postgres.stop()
        await eventually(lambda: metric(agent, "config_agent_db_connected") == 0, 3, "db loss noticed")
        assert agent.store.snapshot.stale is False
        await eventually(lambda: agent.store.snapshot.stale, 3, "stale after stale_after")
        assert metric(agent, "config_agent_stale") == 1
        assert agent_state(agent) == {("ai", "t"): (1, 1)}, "keeps serving the last values"
        private_postgres.start()
        writer = await ConfigWriter.open(url, redis_url=redis_url)
        await writer.set(org, "ai", "t", 2, actor="t")
        await writer.close()
        await eventually(lambda: agent_state(agent) == {("ai", "t"): (2, 2)}, 35, "applied after restart")
        await eventually(lambda: not agent.store.snapshot.stale, 2, "stale cleared")
        assert metric(agent, "config_agent_stale") == 0
        assert metric(agent, "config_agent_db_connected") == 1


async def test_start_without_postgres_serves_last_known_good_flagged_stale(
        private_postgres: PrivatePostgres, redis_url: str, org: str, tmp_path: Path) -> None:
    url = private_postgres.admin_url
    state = tmp_path / "state"
    writer = await ConfigWriter.open(url)
    await writer.set(org, "ai", "t", 1, actor="t")
    await writer.set(org, "email", "r", 3, actor="t")
    await writer.close()
    async with running_agent(org_id=org, database_url=url, redis_url=redis_url, state_dir=state):
        pass
    assert json.loads((state / "last-known-good.json").read_text())["revision"] == 2
    private_postgres.stop()
    async with running_agent(org_id=org, database_url=url, redis_url=redis_url,
                             state_dir=state) as agent:
        assert agent.status.ready and agent.store.snapshot.stale
        assert agent_state(agent) == {("ai", "t"): (1, 1), ("email", "r"): (3, 1)}
        import httpx

        port = agent.settings.http_port
        async with httpx.AsyncClient() as client:
            doc = (await client.get(f"http://127.0.0.1:{port}/v1/configs")).json()
            assert doc["stale"] is True and doc["configs"]["ai"]["t"]["value"] == 1
            assert (await client.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200
        private_postgres.start()
        direct = await asyncpg.connect(url)
        await direct.execute("UPDATE service_configs SET value = '7' WHERE org_id = $1 AND key = 't'", org)
        await direct.close()
        await eventually(lambda: not agent.store.snapshot.stale and
                         agent_state(agent)[("ai", "t")] == (7, 2), 35, "fresh and current")
        assert metric(agent, "config_agent_drift_total") == 0, "a catch-up at start is not drift"


async def test_once_writes_outputs_and_exits_1_when_unreachable(
        db_url: str, org: str, tmp_path: Path) -> None:
    from tests.servers import free_port, run_cli

    writer = await ConfigWriter.open(db_url)
    await writer.set(org, "ai", "threshold", 0.9, actor="t")
    await writer.close()
    env = {"CONFIG_AGENT_DATABASE_URL": db_url, "CONFIG_AGENT_ORG_ID": org,
           "CONFIG_AGENT_OUTPUT_DIR": str(tmp_path / "out"), "CONFIG_AGENT_STATE_DIR": str(tmp_path / "st")}
    proc = run_cli("once", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "out" / "configs.json").read_text())["configs"]["ai"]["threshold"]["value"] == 0.9
    assert (tmp_path / "st" / "last-known-good.json").exists()
    env["CONFIG_AGENT_DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    proc = run_cli("once", env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("config-agent: error: cannot connect to PostgreSQL")


async def test_sigterm_exits_0_within_5_seconds(db_url: str, redis_url: str, org: str, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    import httpx

    from tests.servers import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIG_AGENT_")}
    env.update({"CONFIG_AGENT_DATABASE_URL": db_url, "CONFIG_AGENT_REDIS_URL": redis_url,
                "CONFIG_AGENT_ORG_ID": org, "CONFIG_AGENT_HTTP_PORT": str(port),
                "CONFIG_AGENT_METRICS_PORT": str(free_port()), "CONFIG_AGENT_OUTPUT_DIR": str(tmp_path / "o")})
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run"], env=env)
    try:
        async with httpx.AsyncClient() as client:
            with anyio.fail_after(20):
                while True:
                    try:
                        if (await client.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await anyio.sleep(0.05)
            # an open long-poll must not hold the exit up
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: client.get(f"http://127.0.0.1:{port}/v1/configs?after=999&wait=60",
                                                 timeout=70))
                await anyio.sleep(0.2)
                start = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                code = await anyio.to_thread.run_sync(lambda: proc.wait(timeout=10))
                tg.cancel_scope.cancel()
        assert code == 0
        assert time.monotonic() - start < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
