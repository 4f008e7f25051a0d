"""Tenant reader roles (PostgreSQL RLS) and the matching Redis ACL user."""

from __future__ import annotations

import re

import asyncpg

from agent.db.connect import describe
from agent.errors import DatabaseError, UsageError
from agent.fleet import agent_key, index_key
from agent.model import check_name, org_pattern, sharded_channel

ROLE_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,62}$")
GRANT_READER = "SELECT config_agent_grant_reader($1, $2, $3)"


async def grant_reader(conn: asyncpg.Connection, org_id: str, role: str, password: str | None,
                       connection_limit: int | None = None) -> None:
    """Create or update the LOGIN role `role` that reads only `org_id` and writes nothing.

    `connection_limit` caps the role's sessions (CONNECTION LIMIT; -1 = none), so that a
    fleet of agents larger than the server's slots always leaves room for other clients.
    """
    check_name("org", org_id)
    if not ROLE_RE.match(role):
        raise UsageError(f"invalid role {role!r}: must match {ROLE_RE.pattern}")
    if connection_limit is not None and connection_limit < -1:
        raise UsageError("--connection-limit must be -1 (none) or a number of sessions")
    try:
        await conn.execute(GRANT_READER, role, org_id, password)
        if connection_limit is not None:
            # ROLE_RE admits no quote: the quoted identifier is safe.
            await conn.execute(f'ALTER ROLE "{role}" CONNECTION LIMIT {int(connection_limit)}')
    except asyncpg.UndefinedFunctionError as exc:
        raise DatabaseError("schema not migrated: run `config-agent migrate` first") from exc
    except asyncpg.PostgresError as exc:
        raise DatabaseError(f"cannot grant reader role: {describe(exc)}") from exc


def redis_acl_command(org_id: str, user: str, password: str | None, *, sharded: bool = False,
                      cluster: bool = False) -> list[str]:
    """The `ACL SETUSER` arguments for a tenant agent, allowing exactly what it sends.

    Classic channels: (P)SUBSCRIBE `config:{org}:*` (entries and the relay's heartbeat).
    Sharded: SSUBSCRIBE `config:{org}`. A cluster client also asks for the topology
    (CLUSTER SLOTS) and the command table (COMMAND), neither of which reveals data.
    Always PING (health checks). Fleet reports (README "Did every pod get it?"): write,
    never read, its own org's report keys and index: SET, ZADD, DEL, ZREM.
    """
    check_name("org", org_id)
    if not ROLE_RE.match(user):
        raise UsageError(f"invalid Redis user {user!r}: must match {ROLE_RE.pattern}")
    secret = f">{password}" if password else "nopass"
    if sharded:
        rules = [f"&{sharded_channel(org_id)}", "-@all", "+ssubscribe", "+sunsubscribe"]
    else:
        rules = [f"&{org_pattern(org_id)}", "-@all", "+subscribe", "+psubscribe", "+unsubscribe",
                 "+punsubscribe"]
    if cluster:
        rules += ["+cluster|slots", "+command"]
    reports = [f"%W~{index_key(org_id)}", f"%W~{agent_key(org_id, '*')}", "+set", "+zadd", "+del", "+zrem"]
    return ["ACL", "SETUSER", user, "reset", "on", secret, "resetchannels", *rules, *reports, "+ping"]
