"""The real agent, PostgreSQL and Redis end to end: API over TCP and socket, files, hooks, relay probes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import asyncpg
import httpx
import pytest

from agent.db.writer import ConfigWriter
from tests.agent_harness import eventually, running_agent, wait_http_ready
from tests.servers import free_port

pytestmark = pytest.mark.anyio


async def test_change_reaches_long_poll_files_socket_and_hook(
        db_url: str, redis_url: str, org: str, tmp_path: Path) -> None:
    writer = await ConfigWriter.open(db_url, redis_url=redis_url)
    await writer.set(org, "ai", "threshold", 0.5, actor="t")
    out, sock, hook_log = tmp_path / "out", tmp_path / "api.sock", tmp_path / "hook.log"
    async with running_agent(
            org_id=org, database_url=db_url, redis_url=redis_url, output_dir=out, socket_path=sock,
            on_change_exec=f"echo $CONFIG_AGENT_REVISION >> {hook_log}", hook_debounce=0.05) as agent:
        port = agent.settings.http_port
        assert json.loads((out / "configs.json").read_text())["revision"] == 1
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            async with anyio.create_task_group() as tg:
                answer: dict[str, object] = {}

                async def long_poll() -> None:
                    r = await client.get("/v1/configs", params={"after": 1, "wait": 10})
                    answer["at"] = time.perf_counter()
                    answer["doc"] = r.json()

                tg.start_soon(long_poll)
                await anyio.sleep(0.2)
                await writer.set(org, "ai", "threshold", 0.9, actor="t")
                committed = time.perf_counter()
                await eventually(lambda: "at" in answer, 2, "long-poll answered")
            assert float(answer["at"]) - committed < 0.05  # type: ignore[arg-type]
            assert answer["doc"]["configs"]["ai"]["threshold"]["value"] == 0.9  # type: ignore[index]
            tcp = (await client.get("/v1/configs/ai/threshold")).content
        transport = httpx.AsyncHTTPTransport(uds=str(sock))
        async with httpx.AsyncClient(transport=transport, base_url="http://agent") as uds:
            assert (await uds.get("/v1/configs/ai/threshold")).content == tcp
        await eventually(lambda: (out / "ai" / "threshold").read_text() == "0.9", 1, "file swapped")
        await eventually(lambda: hook_log.exists() and hook_log.read_text().split() == ["2"], 2, "hook ran once")
        await writer.delete(org, "ai", "threshold", actor="t")
        await eventually(lambda: not (out / "ai").exists(), 2, "deleted entry gone from the files")
    await writer.close()


async def test_relay_probes_and_metrics(db: asyncpg.Connection, db_url: str, redis_url: str) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIG_AGENT_")}
    env.update({"CONFIG_AGENT_DATABASE_URL": db_url, "CONFIG_AGENT_REDIS_URL": redis_url,
                "CONFIG_AGENT_METRICS_PORT": str(port), "CONFIG_AGENT_METRICS_HOST": "127.0.0.1"})
    relay = subprocess.Popen([sys.executable, "-m", "agent", "relay"], env=env)
    try:
        await wait_http_ready(f"http://127.0.0.1:{port}", 20)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            assert (await client.get("/healthz")).status_code == 200
            metrics = (await client.get("/metrics")).text
            assert "config_relay_db_connected 1.0" in metrics
            assert "config_relay_redis_connected 1.0" in metrics
    finally:
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(timeout=10) == 0
