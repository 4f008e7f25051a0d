"""The writer CLI: JSON/table output, exit codes, nothing written on bad input."""

from __future__ import annotations

import json

import asyncpg
import pytest

from tests.servers import run_cli

pytestmark = pytest.mark.anyio


def env(db_url: str, redis_url: str | None = None) -> dict[str, str]:
    e = {"CONFIG_AGENT_DATABASE_URL": db_url}
    if redis_url:
        e["CONFIG_AGENT_REDIS_URL"] = redis_url
    return e


async def count(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("SELECT count(*) FROM config_history"))


async def test_set_get_list_history_rollback_delete(db: asyncpg.Connection, db_url: str, org: str) -> None:
    e = env(db_url)
    out = run_cli("set", org, "ai", "threshold", "0.9", "--reason", "init", "--actor", "alice",
                  "--json", env=e, check=True)
    assert json.loads(out.stdout) == {"org_id": org, "service": "ai", "key": "threshold",
                                      "version": 1, "revision": 1, "changed": True, "deleted": False}
    run_cli("set", org, "ai", "threshold", "0.5", env=e, check=True)
    run_cli("set", org, "webhook", "url", "https://old.example.com", "--string", env=e, check=True)
    got = json.loads(run_cli("get", org, "ai", "threshold", "--json", env=e, check=True).stdout)
    assert (got["value"], got["version"]) == (0.5, 2)
    table = run_cli("list", org, env=e, check=True).stdout
    assert "threshold" in table and '"https://old.example.com"' in table
    listed = json.loads(run_cli("list", org, "--json", env=e, check=True).stdout)
    assert {(r["service"], r["key"]) for r in listed} == {("ai", "threshold"), ("webhook", "url")}
    back = json.loads(run_cli("rollback", org, "ai", "threshold", "--to-version", "1", "--json",
                              env=e, check=True).stdout)
    assert back["version"] == 3
    assert (await db.fetchval("SELECT value::text FROM service_configs WHERE key = 'threshold'")) == "0.9"
    run_cli("delete", org, "webhook", "url", "--reason", "gone", env=e, check=True)
    hist = json.loads(run_cli("history", org, "--json", env=e, check=True).stdout)
    assert [h["action"] for h in hist] == ["delete", "rollback", "create", "update", "create"]
    assert hist[-1]["changed_by"] == "alice" and hist[-1]["reason"] == "init"
    # a same-value set is not a change
    same = json.loads(run_cli("set", org, "ai", "threshold", "0.9", "--json", env=e, check=True).stdout)
    assert same["changed"] is False and same["version"] == 3


async def test_expect_version_conflict_exits_3(db: asyncpg.Connection, db_url: str, org: str) -> None:
    e = env(db_url)
    run_cli("set", org, "ai", "t", "1", "--expect-version", "0", env=e, check=True)
    proc = run_cli("set", org, "ai", "t", "2", "--expect-version", "0", env=e)
    assert proc.returncode == 3
    assert proc.stderr.strip().count("\n") == 0 and "version 1, not 0" in proc.stderr
    run_cli("set", org, "ai", "t", "2", "--expect-version", "1", env=e, check=True)
    assert await count(db) == 2


@pytest.mark.parametrize("args", [
    ("set", "Bad-Org", "ai", "t", "1"),
    ("set", "{org}", "ai", "t", "{{not json"),
    ("set", "{org}", "ai", "bad key", "1"),
    ("set", "{org}", "ai", "t", "NaN"),
    ("get", "{org}", "ai", "missing"),
    ("rollback", "{org}", "ai", "t", "--to-version", "7"),
    ("delete", "{org}", "ai", "missing"),
    ("history", "{org}", "--limit", "0"),
])
async def test_bad_input_exits_2_with_one_line(db: asyncpg.Connection, db_url: str, org: str,
                                               args: tuple[str, ...]) -> None:
    run_cli("set", org, "ai", "t", "1", env=env(db_url), check=True)
    proc = run_cli(*(a.replace("{org}", org) for a in args), env=env(db_url))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config-agent: error:"), proc.stderr
    assert await count(db) == 1


async def test_value_from_stdin_and_size_limit(db: asyncpg.Connection, db_url: str, org: str) -> None:
    big = '"' + "x" * (256 * 1024) + '"'
    proc = run_cli("set", org, "ai", "t", "-", env=env(db_url), stdin=big)
    assert proc.returncode == 2 and "limit" in proc.stderr
    assert await count(db) == 0
    run_cli("set", org, "ai", "t", "-", env=env(db_url), stdin='{"a": [1, 2]}\n', check=True)
    assert await db.fetchval("SELECT value::text FROM service_configs") == '{"a": [1, 2]}'


def test_missing_database_url_is_a_usage_error() -> None:
    proc = run_cli("list", "acme")
    assert proc.returncode == 2 and "database_url" in proc.stderr


def test_bad_setting_names_the_variable() -> None:
    proc = run_cli("run", env={"CONFIG_AGENT_HTTP_PORT": "99999", "CONFIG_AGENT_ORG_ID": "acme"})
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "config-agent: error: invalid setting CONFIG_AGENT_HTTP_PORT: "
        "Input should be less than or equal to 65535")


async def test_redis_outage_does_not_fail_a_write(db: asyncpg.Connection, db_url: str, org: str) -> None:
    from tests.servers import free_port

    proc = run_cli("set", org, "ai", "t", "1", env=env(db_url, f"redis://127.0.0.1:{free_port()}"))
    assert proc.returncode == 0, proc.stderr
    assert "could not publish" in proc.stderr
    assert await count(db) == 1


async def test_set_publishes_after_commit(db_url: str, redis_url: str, org: str) -> None:
    from agent.redis_client import redis_client

    client = redis_client(redis_url)
    pubsub = client.pubsub()
    await pubsub.psubscribe(f"config:{org}:*")
    await pubsub.get_message(timeout=2)
    run_cli("set", org, "webhook", "url", "https://secret.example/hook", "--string",
            env=env(db_url, redis_url), check=True)
    msg = None
    for _ in range(50):
        msg = await pubsub.get_message(timeout=0.2)
        if msg and msg["type"] == "pmessage":
            break
    assert msg is not None and msg["channel"] == f"config:{org}:webhook:url".encode()
    doc = json.loads(msg["data"])
    assert {k: doc[k] for k in ("org_id", "service", "key", "version", "revision")} == {
        "org_id": org, "service": "webhook", "key": "url", "version": 1, "revision": 1}
    assert b"secret" not in msg["data"]
    await pubsub.aclose()
    await client.aclose()


async def test_grant_reader_prints_a_least_privilege_acl(db_url: str, org: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    role = f"r_{org}"
    proc = run_cli("grant-reader", "--org", org, "--role", role, "--password-file", str(pw),
                   env=env(db_url), check=True)
    assert "s3cret" not in proc.stdout + proc.stderr
    assert f"'&config:{org}:*'" in proc.stdout and "-@all" in proc.stdout and "+psubscribe" in proc.stdout
    conn = await asyncpg.connect(db_url)
    await conn.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")
    await conn.close()


async def test_grant_reader_redis_apply(db_url: str, org: str, tmp_path, private_redis) -> None:  # type: ignore[no-untyped-def]
    from agent.redis_client import redis_client

    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    role = f"r_{org}"
    proc = run_cli("grant-reader", "--org", org, "--role", role, "--password-file", str(pw), "--redis-apply",
                   env={**env(db_url), "CONFIG_AGENT_REDIS_URL": private_redis.url}, check=True)
    assert "applied Redis ACL" in proc.stdout and "s3cret" not in proc.stdout + proc.stderr
    client = redis_client(f"redis://{role}:s3cret@127.0.0.1:{private_redis.port}")
    assert await client.ping()
    with pytest.raises(Exception, match="no permissions"):
        await client.get("anything")
    await client.aclose()
    conn = await asyncpg.connect(db_url)
    await conn.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")
    await conn.close()
