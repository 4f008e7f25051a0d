"""The writer API: set, delete, rollback, get, list, history (SPEC §1, §7).

Invariants (version, revision, history, notification) are enforced by the
database's triggers; this module adds who/why, optimistic concurrency
(`expect_version`) and the optional direct publish to Redis after COMMIT.

Example::

    async with await ConfigWriter.open("postgresql://app@db/config", redis_url="redis://redis") as w:
        result = await w.set("acme", "ai", "threshold", 0.9, actor="alice", reason="tune")
        print(result.version, result.revision)
"""

from __future__ import annotations

import builtins
import json
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import asyncpg

from agent.db.connect import connect, describe
from agent.errors import ConflictError, DatabaseError, NotFoundError, UsageError
from agent.flags.definition import DEFAULT_FLAG_SERVICES, check_flag_value
from agent.fleet import FleetProgress, FleetReader, wait_for_fleet
from agent.model import Announcement, check_name, encode_value
from agent.redis_client import RedisPublisher, publish_forms

log = logging.getLogger("agent.writer")

SET_CONTEXT = """
SELECT set_config('config_agent.actor', $1, true),
       set_config('config_agent.reason', coalesce($2, ''), true),
       set_config('config_agent.action', $3, true)
"""
SELECT_ENTRY = """
SELECT org_id, service, key, value::text AS value, version, revision, deleted, updated_at, updated_by
  FROM service_configs WHERE org_id = $1 AND service = $2 AND key = $3
"""
# Lock order everywhere is entry row, then the org counter (taken by the trigger):
# the same order a plain-SQL UPDATE or INSERT … ON CONFLICT follows, so no deadlock.
LOCK_ENTRY = SELECT_ENTRY + " FOR UPDATE"
UPSERT = """
INSERT INTO service_configs AS c (org_id, service, key, value) VALUES ($1, $2, $3, $4::jsonb)
ON CONFLICT (org_id, service, key) DO UPDATE SET value = EXCLUDED.value, deleted = false
RETURNING version, revision, updated_at
"""
TOMBSTONE = """
UPDATE service_configs SET deleted = true
 WHERE org_id = $1 AND service = $2 AND key = $3 AND NOT deleted
RETURNING version, revision, updated_at
"""
SELECT_LIST = """
SELECT org_id, service, key, value::text AS value, version, revision, deleted, updated_at, updated_by
  FROM service_configs
 WHERE org_id = $1 AND ($2::text IS NULL OR service = $2) AND (deleted = false OR $3)
 ORDER BY service, key
"""
SELECT_HISTORY = """
SELECT id, org_id, service, key, version, revision, action, old_value::text AS old_value,
       new_value::text AS new_value, changed_by, changed_at, reason
  FROM config_history
 WHERE org_id = $1 AND ($2::text IS NULL OR service = $2) AND ($3::text IS NULL OR key = $3)
 ORDER BY revision DESC
 LIMIT $4
"""
# Per org (all, or the one in $1): its revision and each service's newest revision (a
# filtered agent is behind only when one of its services moved on). Also the relay's.
ORG_REVISIONS = """
SELECT o.org_id, o.revision,
       coalesce((SELECT jsonb_object_agg(service, revision)::text FROM (
           SELECT service, max(revision) AS revision FROM service_configs c WHERE c.org_id = o.org_id
            GROUP BY service) s), '{}') AS services
  FROM config_orgs o WHERE $1::text IS NULL OR o.org_id = $1 ORDER BY o.org_id
"""
SELECT_VERSION = """
SELECT new_value::text AS value, deleted FROM config_history
 WHERE org_id = $1 AND service = $2 AND key = $3 AND version = $4
"""


@dataclass(frozen=True, slots=True)
class WriteResult:
    """The outcome of one write: the entry's version and revision after it."""

    org_id: str
    service: str
    key: str
    version: int
    revision: int
    changed: bool
    deleted: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON form for `--json` output."""
        return {
            "org_id": self.org_id, "service": self.service, "key": self.key,
            "version": self.version, "revision": self.revision,
            "changed": self.changed, "deleted": self.deleted,
        }


def _row_dict(row: asyncpg.Record) -> dict[str, Any]:
    out = dict(row)
    for field in ("value", "old_value", "new_value"):
        if field in out and out[field] is not None:
            out[field] = json.loads(out[field])
    for field in ("updated_at", "changed_at"):
        if field in out and out[field] is not None:
            out[field] = out[field].isoformat()
    return out


class ConfigWriter:
    """Writes config entries; one connection, one transaction per write."""

    def __init__(self, conn: asyncpg.Connection, publisher: RedisPublisher | None = None,
                 fleet: FleetReader | None = None) -> None:
        self._conn = conn
        self._publisher = publisher
        self._fleet = fleet

    @classmethod
    async def open(
        cls,
        database_url: str,
        *,
        password_file: Path | None = None,
        redis_url: str | None = None,
        redis_password_file: Path | None = None,
        redis_ca_file: Path | None = None,
        redis_channels: str = "auto",
        pool_mode: str = "session",
    ) -> ConfigWriter:
        """Connect to PostgreSQL (and prepare a Redis publisher when a URL is given).

        `pool_mode="transaction"` behind a transaction-pooling PgBouncer; `redis_channels`
        as CONFIG_AGENT_REDIS_CHANNELS (auto, classic, sharded, both).
        """
        conn = await connect(database_url, password_file=password_file,
                             application_name="config-agent-writer", pool_mode=pool_mode)
        publisher = fleet = None
        if redis_url:
            publisher = RedisPublisher(
                redis_url, password_file=redis_password_file, ca_file=redis_ca_file,
                forms=publish_forms(redis_url, redis_channels),
            )
            fleet = FleetReader(redis_url, password_file=redis_password_file, ca_file=redis_ca_file)
        return cls(conn, publisher, fleet)

    async def close(self) -> None:
        """Close the connections."""
        if self._publisher is not None:
            await self._publisher.close()
        if self._fleet is not None:
            await self._fleet.close()
        await self._conn.close()

    async def __aenter__(self) -> ConfigWriter:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def set(
        self,
        org_id: str,
        service: str,
        key: str,
        value: Any,
        *,
        actor: str,
        reason: str | None = None,
        expect_version: int | None = None,
        flag_services: Collection[str] = DEFAULT_FLAG_SERVICES,
    ) -> WriteResult:
        """Create or update an entry. `expect_version=0` means "must not exist yet".

        A flag definition written to one of `flag_services` (CONFIG_AGENT_FLAG_SERVICES)
        must pass flagd's schema, else UsageError (agent/flags/definition.py).
        """
        encoded = encode_value(value)
        check_flag_value(service, key, value, flag_services)
        return await self._write(
            org_id, service, key, actor=actor, reason=reason, action="set",
            expect_version=expect_version, sql=UPSERT, args=(encoded,),
        )

    async def delete(
        self, org_id: str, service: str, key: str, *, actor: str, reason: str | None = None,
        expect_version: int | None = None,
    ) -> WriteResult:
        """Delete an entry (a tombstone with a new version and revision)."""
        return await self._write(
            org_id, service, key, actor=actor, reason=reason, action="delete",
            expect_version=expect_version, sql=TOMBSTONE, args=(), must_exist=True,
        )

    async def rollback(
        self, org_id: str, service: str, key: str, *, to_version: int, actor: str,
        reason: str | None = None, expect_version: int | None = None,
    ) -> WriteResult:
        """Set an entry back to the value it had at `to_version` (a new version)."""
        _check_names(org_id, service, key)
        row = await self._fetchrow(SELECT_VERSION, org_id, service, key, to_version)
        if row is None:
            raise NotFoundError(f"{org_id}/{service}/{key} has no version {to_version}")
        if row["deleted"]:
            raise UsageError(f"version {to_version} of {org_id}/{service}/{key} is a deletion; "
                             "use delete instead")
        return await self._write(
            org_id, service, key, actor=actor, reason=reason, action="rollback",
            expect_version=expect_version, sql=UPSERT, args=(row["value"],), must_exist=True,
        )

    async def get(self, org_id: str, service: str, key: str) -> dict[str, Any]:
        """The current entry (NotFoundError when missing or deleted)."""
        _check_names(org_id, service, key)
        row = await self._fetchrow(SELECT_ENTRY, org_id, service, key)
        if row is None or row["deleted"]:
            raise NotFoundError(f"no entry {org_id}/{service}/{key}")
        return _row_dict(row)

    async def list(
        self, org_id: str, service: str | None = None, *, include_deleted: bool = False
    ) -> list[dict[str, Any]]:
        """All entries of an org (optionally one service)."""
        check_name("org", org_id)
        if service is not None:
            check_name("service", service)
        try:
            rows = await self._conn.fetch(SELECT_LIST, org_id, service, include_deleted)
        except asyncpg.PostgresError as exc:
            raise DatabaseError(describe(exc)) from exc
        return [_row_dict(r) for r in rows]

    async def history(
        self, org_id: str, service: str | None = None, key: str | None = None, *, limit: int = 50
    ) -> builtins.list[dict[str, Any]]:
        """Newest-first change history of an org, service or entry."""
        check_name("org", org_id)
        if service is not None:
            check_name("service", service)
        if key is not None:
            check_name("key", key)
        try:
            rows = await self._conn.fetch(SELECT_HISTORY, org_id, service, key, limit)
        except asyncpg.PostgresError as exc:
            raise DatabaseError(describe(exc)) from exc
        return [_row_dict(r) for r in rows]

    @property
    def fleet(self) -> FleetReader:
        """The agents' reports (needs the Redis URL)."""
        if self._fleet is None:
            raise UsageError("the agents report to Redis: setting redis_url is required "
                             "(CONFIG_AGENT_REDIS_URL or --redis-url)")
        return self._fleet

    async def wait_for_agents(self, result: WriteResult, *, percent: float = 100.0, wait_at_most: float = 30.0,
                              on_progress: Callable[[FleetProgress], None] | None = None) -> FleetProgress:
        """After a write: wait until PERCENT of the org's live agents that serve the entry's
        service report its revision (README "Did every pod get it?"); check `.reached`."""
        return await wait_for_fleet(self.fleet, result.org_id, result.revision, service=result.service,
                                    percent=percent, wait_at_most=wait_at_most, on_progress=on_progress)

    async def revisions(self, org_id: str) -> tuple[int, dict[str, int]]:
        """The org revision and each service's newest revision."""
        check_name("org", org_id)
        row = await self._fetchrow(ORG_REVISIONS, org_id)
        return (row["revision"], json.loads(row["services"])) if row is not None else (0, {})

    async def _fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        try:
            return await self._conn.fetchrow(sql, *args)
        except asyncpg.PostgresError as exc:
            raise DatabaseError(describe(exc)) from exc

    async def _write(
        self, org_id: str, service: str, key: str, *, actor: str, reason: str | None,
        action: str, expect_version: int | None, sql: str, args: tuple[Any, ...],
        must_exist: bool = False,
    ) -> WriteResult:
        _check_names(org_id, service, key)
        try:
            async with self._conn.transaction():
                await self._conn.fetchrow(SET_CONTEXT, actor, reason, action)
                current = await self._conn.fetchrow(LOCK_ENTRY, org_id, service, key)
                live_version = 0 if current is None or current["deleted"] else current["version"]
                if must_exist and live_version == 0:
                    raise NotFoundError(f"no entry {org_id}/{service}/{key}")
                if expect_version is not None and expect_version != live_version:
                    raise ConflictError(
                        f"conflict: {org_id}/{service}/{key} is at version {live_version}, "
                        f"not {expect_version}"
                    )
                row = await self._conn.fetchrow(sql, org_id, service, key, *args)
        except asyncpg.PostgresError as exc:
            raise _translate(exc) from exc
        if row is None:  # nothing changed: the trigger skipped a no-op update
            assert current is not None
            return WriteResult(org_id, service, key, current["version"], current["revision"],
                               changed=False, deleted=current["deleted"])
        result = WriteResult(org_id, service, key, row["version"], row["revision"],
                             changed=True, deleted=action == "delete")
        await self._announce(result, time.time())
        return result

    async def _announce(self, result: WriteResult, committed_at: float) -> None:
        if self._publisher is None:
            return
        ann = Announcement(result.org_id, result.service, result.key, result.version,
                           result.revision, committed_at)
        # The relay will deliver it anyway: a Redis outage must not fail the write.
        if not await self._publisher.publish(ann):
            log.warning("committed %s/%s/%s v%d but could not publish to Redis; "
                        "the relay or reconcile will deliver it",
                        result.org_id, result.service, result.key, result.version)


def _check_names(org_id: str, service: str, key: str) -> None:
    check_name("org", org_id)
    check_name("service", service)
    check_name("key", key)


def _translate(exc: asyncpg.PostgresError) -> Exception:
    if isinstance(exc, asyncpg.CheckViolationError | asyncpg.DataError | asyncpg.NotNullViolationError):
        return UsageError(f"rejected by the database: {str(exc).splitlines()[0]}")
    if isinstance(exc, asyncpg.SerializationError | asyncpg.DeadlockDetectedError):
        return ConflictError(f"conflict: {str(exc).splitlines()[0]}; retry")
    return DatabaseError(describe(exc))
