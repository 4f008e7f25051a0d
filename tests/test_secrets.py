"""Secrets never leak (issue 14, item 7).

Two real agents (`python -m agent run`, text and json logs, debug level) read as a
password-protected PostgreSQL reader role and an ACL-restricted Redis user, both
passwords from files, while a change with a sentinel value is written and applied.
Neither the value nor any password may appear in their logs, /metrics or /v1/status,
nor anywhere in the Redis traffic, watched with MONITOR from an admin connection:
Redis carries announcements, never values, and Redis 7 shows AUTH as "(redacted)".
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import anyio
import asyncpg
import httpx
import pytest

from agent.db.roles import grant_reader, redis_acl_command
from agent.db.writer import ConfigWriter
from agent.redis_client import redis_client
from tests.servers import PrivateRedis, free_port, wait_port

pytestmark = pytest.mark.anyio


def start_agent(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`python -m agent run` with only these settings, stdout and stderr into `log`."""
    import os

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIG_AGENT_")}
    full_env.update(env)
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "agent", "run"], env=full_env,
                                stdout=out, stderr=subprocess.STDOUT)


async def test_sentinel_value_and_passwords_never_leak(
        db: asyncpg.Connection, db_url: str, org: str, tmp_path: Path) -> None:
    tag = secrets.token_hex(6)
    value = f"S3NTINEL-value-{tag}"
    pg_password = f"S3NTINEL-pw-{tag}"
    redis_password = f"S3NTINEL-redis-{tag}"
    admin_password = f"S3NTINEL-admin-{tag}"
    sentinels = {"value": value, "pg password": pg_password, "redis password": redis_password,
                 "admin password": admin_password}

    redis = PrivateRedis(tmp_path / "redis", extra=["--requirepass", admin_password])
    redis.start()
    role = f"r_{org}"
    agents: list[subprocess.Popen[bytes]] = []
    monitor: subprocess.Popen[bytes] | None = None
    try:
        admin_url = f"redis://:{admin_password}@127.0.0.1:{redis.port}"
        admin = redis_client(admin_url)
        user = f"agent_{org}"
        await admin.execute_command(*redis_acl_command(org, user, redis_password))
        await admin.aclose()
        monitor_log = tmp_path / "monitor.log"
        with monitor_log.open("wb") as out:
            monitor = subprocess.Popen(
                ["redis-cli", "-p", str(redis.port), "--no-auth-warning", "-a", admin_password, "monitor"],
                stdout=out, stderr=subprocess.STDOUT)
        await anyio.sleep(0.3)  # MONITOR is on before anyone else connects

        await grant_reader(db, org, role, pg_password)
        p = urlparse(db_url)
        reader_url = f"postgresql://{role}@{p.hostname}:{p.port or 5432}{p.path}"
        (tmp_path / "pg.pw").write_text(pg_password + "\n")
        (tmp_path / "redis.pw").write_text(redis_password + "\n")
        async with await ConfigWriter.open(db_url) as w:
            await w.set(org, "ai", "threshold", 0.75, actor="test")

        ports = {}
        for fmt in ("text", "json"):
            ports[fmt] = (free_port(), free_port())
            agents.append(start_agent({
                "CONFIG_AGENT_ORG_ID": org,
                "CONFIG_AGENT_DATABASE_URL": reader_url,
                "CONFIG_AGENT_DATABASE_PASSWORD_FILE": str(tmp_path / "pg.pw"),
                "CONFIG_AGENT_REDIS_URL": f"redis://{user}@127.0.0.1:{redis.port}",
                "CONFIG_AGENT_REDIS_PASSWORD_FILE": str(tmp_path / "redis.pw"),
                "CONFIG_AGENT_HTTP_PORT": str(ports[fmt][0]),
                "CONFIG_AGENT_METRICS_PORT": str(ports[fmt][1]),
                "CONFIG_AGENT_LOG_FORMAT": fmt,
                "CONFIG_AGENT_LOG_LEVEL": "debug",
            }, tmp_path / f"agent-{fmt}.log"))
        for http_port, _ in ports.values():
            await anyio.to_thread.run_sync(wait_port, http_port, 30.0)

        async with httpx.AsyncClient(timeout=5) as client:
            for http_port, _ in ports.values():
                for _ in range(300):  # ready: warm-loaded
                    if (await client.get(f"http://127.0.0.1:{http_port}/readyz")).status_code == 200:
                        break
                    await anyio.sleep(0.1)
            # The sentinel value, written (and announced) as any writer would.
            async with await ConfigWriter.open(db_url, redis_url=admin_url) as w:
                await w.set(org, "secret", "token", value, actor="test")
            for http_port, _ in ports.values():
                url = f"http://127.0.0.1:{http_port}/v1/configs/secret/token"
                for _ in range(300):
                    response = await client.get(url)
                    if response.status_code == 200 and response.json()["value"] == value:
                        break
                    await anyio.sleep(0.05)
                else:
                    raise AssertionError(f"the agent on {http_port} never served the value")
            outputs = {}
            for fmt, (http_port, metrics_port) in ports.items():
                outputs[f"{fmt} agent /metrics"] = (await client.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
                status = await client.get(f"http://127.0.0.1:{http_port}/v1/status")
                outputs[f"{fmt} agent /v1/status"] = status.text
                assert status.status_code == 200 and '"ready"' in status.text
            assert "config_agent_messages_total" in outputs["text agent /metrics"]
        for proc in agents:
            proc.send_signal(signal.SIGTERM)
        for proc in agents:
            assert await anyio.to_thread.run_sync(lambda proc=proc: proc.wait(10)) == 0
        monitor.send_signal(signal.SIGTERM)
        monitor.wait(5)

        for fmt in ("text", "json"):
            outputs[f"{fmt} agent log"] = (tmp_path / f"agent-{fmt}.log").read_text()
        assert "ready: org" in outputs["text agent log"]
        for fmt in ("text", "json"):  # redis-py's warning for a provider without an async method
            assert "backward compatibility" not in outputs[f"{fmt} agent log"]
        json_lines = outputs["json agent log"].splitlines()
        assert json_lines and all(json.loads(line) for line in json_lines)
        traffic = monitor_log.read_text(errors="replace")
        outputs["Redis MONITOR"] = traffic
        # MONITOR saw the traffic: the agents' logins and subscriptions, and the announcement.
        assert traffic.count('"AUTH" "(redacted)"') >= 2, traffic[:2000]
        assert traffic.count(f'"PSUBSCRIBE" "config:{org}:*"') >= 2, traffic[:2000]
        assert f'"PUBLISH" "config:{org}:secret:token"' in traffic, traffic[:2000]
        for where, text in outputs.items():
            for what, sentinel in sentinels.items():
                assert sentinel not in text, f"the {what} appears in the {where}"
            assert "S3NTINEL" not in text, where
    finally:
        for proc in [*agents, *([monitor] if monitor else [])]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        redis.stop()
        await db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role)
        await db.execute(f"DROP OWNED BY {role}; DROP ROLE IF EXISTS {role}")
