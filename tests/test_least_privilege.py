"""The agent runs with least privilege: RLS reader role, ACL-restricted Redis user over TLS, rotated passwords."""

from __future__ import annotations

import subprocess
from pathlib import Path
from urllib.parse import urlparse

import anyio
import asyncpg
import pytest

from agent.db.roles import grant_reader, redis_acl_command
from agent.db.writer import ConfigWriter
from agent.redis_client import redis_client
from tests.agent_harness import agent_state, eventually, metric, running_agent
from tests.servers import PrivateRedis, free_port

pytestmark = pytest.mark.anyio


def make_ca(directory: Path, name: str) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 signed by it."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = directory / f"{name}-ca.key", directory / f"{name}-ca.crt"
    key, csr, crt = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.crt"
    ext = directory / f"{name}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name} test CA",
        "-keyout", str(ca_key), "-out", str(ca_crt))
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(csr))
    run("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key), "-CAcreateserial",
        "-days", "2", "-out", str(crt), "-extfile", str(ext))
    return ca_crt, crt, key


@pytest.fixture
def tls_redis(tmp_path: Path) -> tuple[PrivateRedis, int, Path, Path]:
    ca, crt, key = make_ca(tmp_path / "tls", "good")
    wrong_ca, _, _ = make_ca(tmp_path / "tls", "wrong")
    tls_port = free_port()
    server = PrivateRedis(tmp_path / "redis", extra=[
        "--tls-port", str(tls_port), "--tls-cert-file", str(crt), "--tls-key-file", str(key),
        "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"])
    server.start()
    yield server, tls_port, ca, wrong_ca  # type: ignore[misc]
    server.stop()


async def test_agent_syncs_over_tls_with_acl_user_and_rls_role(
        tls_redis: tuple[PrivateRedis, int, Path, Path], db: asyncpg.Connection, db_url: str,
        org: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server, tls_port, ca, wrong_ca = tls_redis
    user = f"agent_{org}"
    admin = redis_client(server.url)  # plain port, default user: the operator
    await admin.execute_command(*redis_acl_command(org, user, "redis-pw"))
    # The ACL really is that tight: no GET, no PUBLISH, no other org's channels.
    limited = redis_client(f"redis://{user}:redis-pw@127.0.0.1:{server.port}")
    for command in (("GET", "x"), ("PUBLISH", f"config:{org}:a:b", "x"), ("CONFIG", "GET", "*"),
                    ("CLIENT", "LIST")):
        with pytest.raises(Exception, match="NOPERM|permission"):
            await limited.execute_command(*command)
    with pytest.raises(Exception, match="NOPERM|permission"):
        pubsub = limited.pubsub()
        await pubsub.psubscribe("config:other:*")
        await pubsub.get_message(timeout=1)
    await limited.aclose()

    role = f"r_{org}"
    await grant_reader(db, org, role, "pg-pw")
    p = urlparse(db_url)
    pw_file = tmp_path / "pg-password"
    pw_file.write_text("pg-pw\n")
    reader = f"postgresql://{role}@{p.hostname}:{p.port or 5432}{p.path}"
    redis_pw = tmp_path / "redis-password"
    redis_pw.write_text("redis-pw\n")
    writer = await ConfigWriter.open(db_url)
    await writer.set(org, "ai", "t", 1, actor="t")
    async with running_agent(org_id=org, database_url=reader, database_password_file=pw_file,
                             redis_url=f"rediss://{user}@127.0.0.1:{tls_port}",
                             redis_password_file=redis_pw, redis_ca_file=ca) as agent:
        assert agent_state(agent) == {("ai", "t"): (1, 1)}
        assert metric(agent, "config_agent_redis_connected") == 1
        await writer.set(org, "ai", "t", 2, actor="t")
        await admin.publish(f"config:{org}:ai:t", f'{{"org_id":"{org}","service":"ai","key":"t",'
                                                 f'"version":2,"revision":2,"ts":0}}')
        await eventually(lambda: agent_state(agent) == {("ai", "t"): (2, 2)}, 2, "synced over TLS")

        # Rotate the database password: the next connection must use the new one.
        await db.execute(f"ALTER ROLE {role} PASSWORD 'rotated-pw'")
        pw_file.write_text("rotated-pw\n")
        await anyio.sleep(0.6)  # the file watcher reconnects with the new credential
        await db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role)
        await writer.set(org, "ai", "t", 3, actor="t")
        await admin.publish(f"config:{org}:ai:t", f'{{"org_id":"{org}","service":"ai","key":"t",'
                                                 f'"version":3,"revision":3,"ts":0}}')
        await eventually(lambda: agent_state(agent) == {("ai", "t"): (3, 3)}, 5, "synced after rotation")

    # The wrong CA is refused with a clear error, and the agent never subscribes.
    async with running_agent(org_id=org, database_url=reader, database_password_file=pw_file,
                             redis_url=f"rediss://{user}@127.0.0.1:{tls_port}",
                             redis_password_file=redis_pw, redis_ca_file=wrong_ca) as agent:
        assert metric(agent, "config_agent_redis_connected") == 0
        assert "certificate verify failed" in (agent.status.last_error or "")
        assert any("certificate verify failed" in r.getMessage() for r in caplog.records)
    await writer.close()
    await admin.aclose()
    await db.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")


async def test_postgres_verify_full(private_postgres, tmp_path: Path, org: str) -> None:  # type: ignore[no-untyped-def]
    import os
    import shutil

    ca, crt, key = make_ca(tmp_path / "pgtls", "pg")
    wrong_ca, _, _ = make_ca(tmp_path / "pgtls", "other")
    for src, name in ((crt, "server.crt"), (key, "server.key")):
        dest = private_postgres.data / name
        shutil.copy(src, dest)
        os.chmod(dest, 0o600)
        if os.geteuid() == 0:
            shutil.chown(dest, "postgres", "postgres")
    with open(private_postgres.data / "postgresql.conf", "a") as conf:
        conf.write("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n")
    private_postgres.stop()
    private_postgres.start()
    writer = await ConfigWriter.open(private_postgres.admin_url)
    await writer.set(org, "ai", "t", 1, actor="t")
    await writer.close()
    base = private_postgres.admin_url + "?sslmode=verify-full&sslrootcert="
    async with running_agent(org_id=org, database_url=base + str(ca)) as agent:
        assert agent_state(agent) == {("ai", "t"): (1, 1)}
        conn = await asyncpg.connect(private_postgres.admin_url)
        ssl_in_use = await conn.fetchval(
            "SELECT bool_and(ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
            "WHERE a.application_name = 'config-agent'")
        await conn.close()
        assert ssl_in_use is True
    from tests.servers import run_cli

    proc = run_cli("once", env={"CONFIG_AGENT_DATABASE_URL": base + str(wrong_ca), "CONFIG_AGENT_ORG_ID": org,
                                "CONFIG_AGENT_STATE_DIR": str(tmp_path / "st")})
    assert proc.returncode == 1
    assert "certificate verify failed" in proc.stderr.strip().splitlines()[-1]
