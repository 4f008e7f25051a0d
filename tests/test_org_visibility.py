"""An agent whose database role may not read its org says so in one line and stays unready.

Row-level security hides another org's rows without an error, so without a check an
agent started for org B with the reader role of org A becomes ready with zero entries.
The agent asks the reader policy's own role → org mapping, tells "this role may not
read this org" apart from "this org has no entries yet", keeps retrying, and becomes
ready once the role is granted.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlparse

import anyio
import asyncpg
import httpx
import pytest

from agent.app import Agent
from agent.db.roles import grant_reader
from agent.db.writer import ConfigWriter
from tests.agent_harness import agent_state, eventually, running_agent
from tests.servers import run_cli

pytestmark = pytest.mark.anyio


def role_url(db_url: str, role: str) -> str:
    """The test database's URL, logging in as `role`."""
    p = urlparse(db_url)
    return f"postgresql://{role}@{p.hostname}:{p.port or 5432}{p.path}"


@asynccontextmanager
async def reader_role(db: asyncpg.Connection, org: str, tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """A real reader role of `org` (grant_reader), dropped afterwards (roles are cluster-wide)."""
    role = f"r_{org}"
    await grant_reader(db, org, role, "reader-pw")
    pw_file = tmp_path / f"{role}.pw"
    pw_file.write_text("reader-pw\n")
    try:
        yield role, pw_file
    finally:
        await db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role)
        await db.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")


async def readyz(agent: Agent) -> int:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{agent.settings.metrics_port}/readyz")
        return response.status_code


async def test_reader_of_another_org_stays_unready_says_why_and_recovers_when_granted(
        db: asyncpg.Connection, db_url: str, org: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    other = f"{org}x"  # org A: the one the role may read
    async with await ConfigWriter.open(db_url) as w:
        await w.set(other, "ai", "threshold", 0.1, actor="test")
        await w.set(org, "ai", "threshold", 0.75, actor="test")
        await w.set(org, "email", "max_retries", 3, actor="test")
    state_dir = tmp_path / "state"
    # A last-known-good snapshot of org B exists: it must not make the wrong role look ready.
    async with running_agent(org_id=org, database_url=db_url, state_dir=state_dir) as agent:
        assert len(agent_state(agent)) == 2
    assert any(state_dir.iterdir())

    async with reader_role(db, other, tmp_path) as (role, pw_file):
        caplog.set_level(logging.INFO)
        async with running_agent(wait_ready=False, org_id=org, database_url=role_url(db_url, role),
                                 database_password_file=pw_file, state_dir=state_dir) as agent:
            await eventually(lambda: any("may not read org" in r.getMessage() for r in caplog.records),
                             15, "a log line saying the role may not read the org")
            line = next(r.getMessage() for r in caplog.records if "may not read org" in r.getMessage())
            assert "\n" not in line
            assert repr(role) in line and repr(org) in line and repr(other) in line, line
            await anyio.sleep(1.5)  # retries happened meanwhile: still unready
            assert not agent.status.ready
            assert await readyz(agent) == 503
            assert agent.store.snapshot.entries == {}
            async with httpx.AsyncClient() as client:
                status = (await client.get(f"http://127.0.0.1:{agent.settings.http_port}/v1/status")).json()
            assert "may not read org" in str(status), status

            # The operator fixes the mapping: the agent, still retrying, becomes ready by itself.
            await grant_reader(db, org, role, None)
            await eventually(lambda: agent.status.ready, 40, "ready after the grant")
            assert agent_state(agent) == {("ai", "threshold"): (0.75, 1), ("email", "max_retries"): (3, 1)}
            assert await readyz(agent) == 200


async def test_reader_of_an_org_without_entries_is_ready_with_zero_entries(
        db: asyncpg.Connection, db_url: str, org: str, tmp_path: Path) -> None:
    # "No entries yet" is not an error: the role may read the org, which is empty.
    async with reader_role(db, org, tmp_path) as (role, pw_file):
        async with running_agent(org_id=org, database_url=role_url(db_url, role),
                                 database_password_file=pw_file) as agent:
            assert agent.status.ready and agent.store.snapshot.entries == {}
            assert await readyz(agent) == 200


async def test_once_with_a_reader_of_another_org_exits_1_with_one_line(
        db: asyncpg.Connection, db_url: str, org: str, tmp_path: Path) -> None:
    other = f"{org}x"
    async with await ConfigWriter.open(db_url) as w:
        await w.set(org, "ai", "threshold", 0.75, actor="test")
    async with reader_role(db, other, tmp_path) as (role, pw_file):
        proc = await anyio.to_thread.run_sync(lambda: run_cli(
            "once", env={"CONFIG_AGENT_ORG_ID": org, "CONFIG_AGENT_DATABASE_URL": role_url(db_url, role),
                         "CONFIG_AGENT_DATABASE_PASSWORD_FILE": str(pw_file),
                         "CONFIG_AGENT_OUTPUT_DIR": str(tmp_path / "out")}))
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    # One error line (beside the log's "no Redis URL" warning), no traceback.
    lines = [line for line in proc.stderr.splitlines() if line.startswith("config-agent: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "may not read org" in lines[0] and repr(other) in lines[0], lines[0]
    assert not (tmp_path / "out" / "configs.json").exists()
