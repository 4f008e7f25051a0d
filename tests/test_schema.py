"""The change log enforces its own invariants inside PostgreSQL, for plain SQL writers too."""

from __future__ import annotations

import json

import asyncpg
import pytest

from agent.db.roles import grant_reader

pytestmark = pytest.mark.anyio


async def history(db: asyncpg.Connection, org: str) -> list[asyncpg.Record]:
    return await db.fetch("SELECT * FROM config_history WHERE org_id = $1 ORDER BY revision", org)


async def test_plain_sql_insert_update_delete_are_versioned_and_logged(db: asyncpg.Connection, org: str) -> None:
    async with db.transaction():
        await db.execute("SET LOCAL config_agent.actor = 'alice'")
        await db.execute("SET LOCAL config_agent.reason = 'first'")
        await db.execute(
            "INSERT INTO service_configs (org_id, service, key, value, version, revision) "
            "VALUES ($1, 'ai', 'threshold', '0.9', 77, 999)", org)
    await db.execute(
        "INSERT INTO service_configs (org_id, service, key, value) VALUES ($1, 'ai', 'threshold', '0.8') "
        "ON CONFLICT (org_id, service, key) DO UPDATE SET value = EXCLUDED.value", org)
    async with db.transaction():
        await db.execute("SET LOCAL config_agent.actor = 'bob'")
        await db.execute("UPDATE service_configs SET value = '0.7', version = 1 WHERE org_id = $1", org)
    await db.execute("UPDATE service_configs SET value = '0.7' WHERE org_id = $1", org)  # no-op
    await db.execute("DELETE FROM service_configs WHERE org_id = $1", org)

    row = await db.fetchrow("SELECT * FROM service_configs WHERE org_id = $1", org)
    assert row is not None, "a delete must leave a tombstone"
    assert (row["version"], row["revision"], row["deleted"], row["value"]) == (4, 4, True, None)
    rows = await history(db, org)
    assert [(r["version"], r["revision"], r["action"]) for r in rows] == [
        (1, 1, "create"), (2, 2, "update"), (3, 3, "update"), (4, 4, "delete")]
    assert rows[0]["changed_by"] == "alice" and rows[0]["reason"] == "first"
    assert rows[2]["changed_by"] == "bob" and rows[2]["reason"] is None
    assert json.loads(rows[2]["old_value"]) == 0.8 and json.loads(rows[2]["new_value"]) == 0.7
    assert await db.fetchval("SELECT revision FROM config_orgs WHERE org_id = $1", org) == 4


async def test_every_change_notifies_once_without_value(db: asyncpg.Connection, org: str) -> None:
    got: list[str] = []
    await db.add_listener("config_agent_changes", lambda *a: got.append(a[3]))
    async with db.transaction():
        await db.execute("INSERT INTO service_configs (org_id, service, key, value) "
                         "VALUES ($1, 'webhook', 'url', '\"https://secret.example\"')", org)
        await db.execute("UPDATE service_configs SET value = '\"https://x\"' WHERE org_id = $1", org)
    await db.execute("SELECT 1")  # let the notifications arrive
    import anyio

    with anyio.fail_after(5):
        while len(got) < 2:
            await anyio.sleep(0.01)
    docs = [json.loads(p) for p in got]
    assert [(d["version"], d["revision"]) for d in docs] == [(1, 1), (2, 2)]
    assert set(docs[0]) == {"org_id", "service", "key", "version", "revision", "ts"}
    assert "secret" not in got[0] and "https" not in "".join(got)


async def test_rolled_back_transaction_notifies_nothing(db: asyncpg.Connection, org: str) -> None:
    got: list[str] = []
    await db.add_listener("config_agent_changes", lambda *a: got.append(a[3]))
    tr = db.transaction()
    await tr.start()
    await db.execute("INSERT INTO service_configs (org_id, service, key, value) VALUES ($1, 'a', 'b', '1')", org)
    await tr.rollback()
    await db.execute("SELECT pg_sleep(0.1)")
    assert got == []
    assert await history(db, org) == []


@pytest.mark.parametrize("sql", [
    "UPDATE config_history SET reason = 'forged'",
    "DELETE FROM config_history",
    "TRUNCATE config_history",
    "TRUNCATE service_configs",
    "DELETE FROM config_orgs",
    "UPDATE config_orgs SET revision = 0",
])
async def test_history_and_counters_cannot_be_rewritten(db: asyncpg.Connection, org: str, sql: str) -> None:
    await db.execute("INSERT INTO service_configs (org_id, service, key, value) VALUES ($1, 'a', 'b', '1')", org)
    with pytest.raises(asyncpg.PostgresError):
        await db.execute(sql)
    assert len(await history(db, org)) == 1


async def test_history_refuses_even_its_owner(db: asyncpg.Connection, org: str) -> None:
    role = f"own_{org}"
    await db.execute(f"CREATE ROLE {role}")
    try:
        await db.execute(f"ALTER TABLE config_history OWNER TO {role}")
        await db.execute("INSERT INTO service_configs (org_id, service, key, value) VALUES ($1, 'a', 'b', '1')", org)
        await db.execute(f"SET ROLE {role}")
        for sql in ("UPDATE config_history SET reason = 'x'", "DELETE FROM config_history",
                    "TRUNCATE config_history"):
            with pytest.raises(asyncpg.PostgresError, match="append-only"):
                await db.execute(sql)
    finally:
        await db.execute("RESET ROLE")
        await db.execute("ALTER TABLE config_history OWNER TO postgres")
        await db.execute(f"DROP ROLE {role}")


@pytest.mark.parametrize(("org_id", "service", "key", "value"), [
    ("Acme", "ai", "k", "1"),
    ("acme", "-ai", "k", "1"),
    ("acme", "ai", "k" * 64, "1"),
    ("acme", "ai", "bad key", "1"),
])
async def test_names_are_checked_by_the_database(db: asyncpg.Connection, org_id: str, service: str,
                                                 key: str, value: str) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute("INSERT INTO service_configs (org_id, service, key, value) VALUES ($1, $2, $3, $4)",
                         org_id, service, key, value)
    assert await db.fetchval("SELECT count(*) FROM config_history") == 0


async def test_value_size_limit(db: asyncpg.Connection, org: str) -> None:
    await db.execute("INSERT INTO service_configs (org_id, service, key, value) VALUES ($1, 'a', 'ok', $2)",
                     org, json.dumps("x" * (256 * 1024 - 2)))
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute("INSERT INTO service_configs (org_id, service, key, value) VALUES ($1, 'a', 'big', $2)",
                         org, json.dumps("x" * (256 * 1024)))
    assert await db.fetchval("SELECT count(*) FROM config_history") == 1


async def test_reader_role_sees_only_its_org_and_writes_nothing(db: asyncpg.Connection, db_url: str) -> None:
    import secrets

    suffix = secrets.token_hex(4)
    role_a = f"reader_a_{suffix}"
    for org_id, n in (("orga", 3), ("orgb", 2)):
        for i in range(n):
            await db.execute("INSERT INTO service_configs (org_id, service, key, value) VALUES ($1, 's', $2, '1')",
                             org_id, f"k{i}")
    await grant_reader(db, "orga", role_a, "pw-a")
    from urllib.parse import urlparse

    parsed = urlparse(db_url)
    reader = await asyncpg.connect(host=parsed.hostname, port=parsed.port, user=role_a,
                                   password="pw-a", database=parsed.path.lstrip("/"))
    try:
        assert await reader.fetchval("SELECT count(*) FROM service_configs") == 3
        assert await reader.fetchval("SELECT count(*) FROM service_configs WHERE org_id = 'orgb'") == 0
        assert await reader.fetchval("SELECT count(*) FROM config_history WHERE org_id = 'orgb'") == 0
        assert [r[0] for r in await reader.fetch("SELECT org_id FROM config_orgs")] == ["orga"]
        # The policies' mapping (003): a reader sees its own row of it, never another role's.
        assert [r[0] for r in await reader.fetch("SELECT org_id FROM config_agent_my_org")] == ["orga"]
        # The org is keyed to the role: a client-chosen setting changes nothing.
        await reader.execute("SET config_agent.org = 'orgb'")
        assert await reader.fetchval("SELECT count(*) FROM service_configs WHERE org_id = 'orgb'") == 0
        for sql in (
            "INSERT INTO service_configs (org_id, service, key, value) VALUES ('orga', 's', 'x', '1')",
            "UPDATE service_configs SET value = '2'",
            "DELETE FROM service_configs",
            "INSERT INTO config_history (org_id, service, key, version, revision, action, changed_by) "
            "VALUES ('orga', 's', 'k', 9, 9, 'update', 'x')",
            "SELECT config_agent_grant_reader('evil', 'orgb', 'pw')",
            "SELECT * FROM config_reader_roles",
        ):
            with pytest.raises(asyncpg.PostgresError):
                await reader.execute(sql)
    finally:
        await reader.close()
    assert await db.fetchval("SELECT count(*) FROM config_history") == 5
    await db.execute(f"DROP OWNED BY {role_a}; DROP ROLE {role_a}")


async def test_migrate_is_idempotent_and_concurrency_safe(pg_admin_url: str) -> None:
    import secrets

    import anyio

    from agent.db.migrate import available_migrations, migrate
    from tests.servers import admin_url_for

    name = f"ca_mig_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(pg_admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        conns = [await asyncpg.connect(admin_url_for(pg_admin_url, name)) for _ in range(3)]
        results: list[int] = []

        async def one(c: asyncpg.Connection) -> None:
            results.append(len(await migrate(c)))

        async with anyio.create_task_group() as tg:
            for c in conns:
                tg.start_soon(one, c)
        assert sorted(results) == [0, 0, len(available_migrations())]
        assert await migrate(conns[0]) == []
        versions = [r[0] for r in await conns[0].fetch("SELECT version FROM config_schema_migrations ORDER BY 1")]
        assert versions == [m.version for m in available_migrations()]
        for c in conns:
            await c.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
