"""A relay pointed at a transaction-pooling PgBouncer (issue #21).

Restarted again and again behind the pooler, the relay says every time, in one line, that
LISTEN needs a direct (session) connection, never advises the pool-mode setting it refuses,
stays not ready and keeps retrying with its backoff; the same relay on a direct URL is ready.
Real PgBouncer 1.18 (tests/scaleout.py), PostgreSQL and Redis; deadlines bound waits for
events, never assert durations.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import anyio
import asyncpg
import httpx
import pytest

from agent.errors import DatabaseError
from agent.relay import Relay
from agent.settings import load_settings
from tests.scaleout import PrivatePgBouncer, postgres_scratch_dir
from tests.servers import free_port

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parent.parent
RESTARTS = 5
# Generous: how long an expected event may take on a crowded 2-core machine.
DEADLINE = 60.0
CLEAR_LINE = "LISTEN needs a direct (session) connection to PostgreSQL, not a transaction pooler"
POOL_MODE_ADVICE = "CONFIG_AGENT_DATABASE_POOL_MODE"


@pytest.fixture
def pgbouncer(db_url: str) -> Iterator[PrivatePgBouncer]:
    """A transaction-pooling PgBouncer in front of this test's database (on the shared server)."""
    parsed = urlparse(db_url)
    with PrivatePgBouncer(postgres_scratch_dir("pgbouncer"), parsed.hostname or "127.0.0.1",
                          parsed.port or 5432, default_pool_size=4) as bouncer:
        yield bouncer


class RelayProcess:
    """`config-agent relay` (debug log to a file, read while it runs) and its probes port."""

    def __init__(self, database_url: str, redis_url: str, log: Path) -> None:
        self.port = free_port()
        self.log = log
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIG_AGENT_")}
        env.update({"CONFIG_AGENT_DATABASE_URL": database_url, "CONFIG_AGENT_REDIS_URL": redis_url,
                    "CONFIG_AGENT_METRICS_HOST": "127.0.0.1", "CONFIG_AGENT_METRICS_PORT": str(self.port),
                    "CONFIG_AGENT_HEARTBEAT_INTERVAL": "0.5", "CONFIG_AGENT_LOG_LEVEL": "debug"})
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "agent", "relay"], env=env, cwd=ROOT,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self.statuses: list[int] = []  # every /readyz answer seen while waiting

    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def relay_lines(self, *levels: str) -> list[str]:
        """The relay's own log lines at these levels."""
        return [line for line in self.lines() if any(f" {level} agent.relay: " in line for level in levels)]

    async def readyz(self) -> int:
        async with httpx.AsyncClient() as client:
            try:
                status = (await client.get(f"http://127.0.0.1:{self.port}/readyz", timeout=2)).status_code
            except httpx.HTTPError:
                return 0
        self.statuses.append(status)
        return status

    async def metric(self, name: str) -> float | None:
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"http://127.0.0.1:{self.port}/metrics", timeout=2)).text
        found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else None

    async def wait_for(self, text: str, count: int = 1) -> None:
        """Until `count` lines contain `text`, sampling /readyz meanwhile."""
        with anyio.fail_after(DEADLINE):
            while sum(text in line for line in self.lines()) < count:
                assert self.proc.poll() is None, "\n".join(self.lines()[-20:])
                await self.readyz()
                await anyio.sleep(0.1)

    async def wait_ready(self) -> None:
        with anyio.fail_after(DEADLINE):
            while await self.readyz() != 200:
                assert self.proc.poll() is None, "\n".join(self.lines()[-20:])
                await anyio.sleep(0.1)

    def stop(self) -> int:
        """SIGTERM and the exit code (SIGKILL if it lingers)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


async def test_relay_restarted_behind_a_transaction_pooler_always_says_listen_needs_a_direct_connection(
        db: asyncpg.Connection, db_url: str, redis_url: str, org: str, pgbouncer: PrivatePgBouncer,
        tmp_path: Path) -> None:
    # An org with a change: the relay's re-announce query has a row to read.
    await db.execute("INSERT INTO service_configs (org_id, service, key, value) VALUES ($1, 'ai', 't', '1')", org)
    pooled_url = pgbouncer.url(urlparse(db_url).path.lstrip("/"))
    # Back to back on one PgBouncer: its server connections outlive each relay process.
    for attempt in range(RESTARTS):
        relay = RelayProcess(pooled_url, redis_url, tmp_path / f"relay-{attempt}.log")
        try:
            await relay.wait_for(CLEAR_LINE)
            assert await relay.readyz() == 503
            assert await relay.metric("config_relay_listen_proven") == 0
            if attempt == RESTARTS - 1:
                # It keeps retrying, each time after a longer delay, without another error line.
                await relay.wait_for("reconnecting in", count=2)
        finally:
            code = relay.stop()
        log = "\n".join(relay.lines())
        assert code == 0, log
        said = [line for line in relay.lines() if CLEAR_LINE in line]
        assert len(said) == 1 and "CONFIG_AGENT_DATABASE_URL of the relay" in said[0], log
        assert POOL_MODE_ADVICE not in log
        assert relay.relay_lines("WARNING", "ERROR") == said, log
        assert 200 not in relay.statuses and 503 in relay.statuses, relay.statuses
        if attempt == RESTARTS - 1:
            delays = [float(d) for d in re.findall(r"reconnecting in ([0-9.]+)s", log)]
            assert len(delays) >= 2 and delays[1] > delays[0], delays

    relay = RelayProcess(db_url, redis_url, tmp_path / "relay-direct.log")
    try:
        await relay.wait_ready()
        assert await relay.metric("config_relay_listen_proven") == 1
    finally:
        assert relay.stop() == 0
    assert not [line for line in relay.lines() if CLEAR_LINE in line or POOL_MODE_ADVICE in line]


async def test_a_prepared_statement_clash_is_said_as_the_listen_line_once(
        db: asyncpg.Connection, db_url: str, redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """What a pooler makes PostgreSQL answer, before any LISTEN proof, names the relay's real need."""
    await db.execute("PREPARE clash AS SELECT 1")
    with pytest.raises(asyncpg.DuplicatePreparedStatementError) as clash:
        await db.execute("PREPARE clash AS SELECT 1")
    with pytest.raises(DatabaseError) as wrapped:
        raise DatabaseError("cannot connect to PostgreSQL") from clash.value
    caplog.set_level(logging.DEBUG, logger="agent.relay")
    relay = Relay(load_settings(database_url=db_url, redis_url=redis_url))
    try:
        for exc in (clash.value, wrapped.value, clash.value):
            relay._report_lost(exc, 1.0)
    finally:
        await relay.close()
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(loud) == 1 and CLEAR_LINE in loud[0] and "already exists" in loud[0], loud
    assert not [r for r in caplog.records if POOL_MODE_ADVICE in r.getMessage()]
