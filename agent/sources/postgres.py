"""Reading an org's entries from PostgreSQL: warm-load and "changes after revision R".

Each read is ONE query in one snapshot, returning the org revision beside the rows,
so the agent's revision and its entries always agree. Deltas come from the
append-only history, so every change (not only the latest per entry) is seen.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import anyio
import asyncpg

from agent.db.connect import CONNECTION_ERRORS, connect, describe
from agent.errors import DatabaseBusyError, DatabaseError, OrgNotReadableError
from agent.model import Change
from agent.sources.backoff import jittered

# Row-level security hides another org's rows without an error, so "no entries yet"
# and "this role may not read this org" look alike. This asks the reader policy's own
# mapping (002_tenant_roles.sql): NULL when the role sees every org (row security is
# off for it: superuser, table owner, BYPASSRLS; or a writer), else the one org the
# policy lets it read ('' for none).
READER_ORG = """
CASE WHEN NOT row_security_active('service_configs')
          OR pg_has_role('config_agent_writer', 'USAGE') THEN NULL
     ELSE coalesce(config_agent_reader_org(current_user::text), '') END
"""
# Connection slots left for ordinary clients: a crowded server gets each agent's slot
# back right after its read (PgSource.crowded) instead of agents holding idle ones.
# It counts the server's slots and, when the role has a CONNECTION LIMIT (grant-reader
# --connection-limit), the role's own budget: what keeps slots free for other clients.
# pg_stat_activity copies every backend's status entry, so this costs O(backends): it
# never rides on a read (a fleet's change would cost O(pods²)), it is sampled when a
# connection opens (which costs the server a process anyway) and on a held connection
# at most every FREE_SLOTS_EVERY seconds.
FREE_SLOTS = """
SELECT least(
        current_setting('max_connections')::int - current_setting('superuser_reserved_connections')::int
            - count(*)::int,
        (SELECT nullif(rolconnlimit, -1) FROM pg_roles WHERE rolname = current_user)
            - count(*) FILTER (WHERE usename = current_user)::int) AS free_slots
  FROM pg_stat_activity WHERE backend_type = 'client backend'
"""
FREE_SLOTS_EVERY = 60.0
ORG_ACCESS = f"SELECT current_user::text AS role_name, {READER_ORG} AS reader_org"
# Entries live now (deleted ones are not served), plus the org revision and whether
# this role may read the org at all.
WARM_LOAD = f"""
SELECT (SELECT revision FROM config_orgs WHERE org_id = $1) AS org_revision,
       current_user::text AS role_name, {READER_ORG} AS reader_org,
       c.service, c.key, c.value::text AS value, c.version, c.revision, c.deleted,
       c.updated_at
  FROM (SELECT 1) AS one
  LEFT JOIN service_configs c
    ON c.org_id = $1 AND NOT c.deleted AND ($2::text[] IS NULL OR c.service = ANY($2))
"""
# Every change after a revision, in revision order, plus the org revision.
CHANGES_SINCE = """
SELECT (SELECT revision FROM config_orgs WHERE org_id = $1) AS org_revision,
       h.service, h.key, h.new_value::text AS value, h.version, h.revision, h.deleted,
       h.changed_at AS updated_at
  FROM (SELECT 1) AS one
  LEFT JOIN LATERAL (
        SELECT service, key, new_value, version, revision, deleted, changed_at
          FROM config_history
         WHERE org_id = $1 AND revision > $2 AND ($3::text[] IS NULL OR service = ANY($3))
         ORDER BY revision
         LIMIT $4) h ON true
"""
DELTA_PAGE = 5000
# After PostgreSQL refused a connection (too many clients), or a sample showed fewer
# than CROWDED_FREE_SLOTS free connection slots, close the connection after every read
# for this long, so that a crowded server gets its slots back at once.
CROWDED_SECONDS = 30.0
CROWDED_FREE_SLOTS = 5


@dataclass(frozen=True, slots=True)
class Fetched:
    """The result of one read: changes and the org revision they bring the agent to."""

    changes: list[Change]
    revision: int
    complete: bool = True


def _rows_to_fetched(rows: list[asyncpg.Record], limit: int | None = None) -> Fetched:
    org_revision = 0
    changes: list[Change] = []
    for row in rows:
        org_revision = row["org_revision"] or 0
        if row["service"] is None:
            continue
        ts = row["updated_at"]
        changes.append(Change(
            service=row["service"],
            key=row["key"],
            value=None if row["value"] is None else json.loads(row["value"]),
            version=row["version"],
            revision=row["revision"],
            deleted=row["deleted"],
            updated_at=ts.isoformat(),
            committed_at=ts.timestamp(),
        ))
    if limit is not None and len(changes) >= limit:
        # A page: only as far as the last row, the next page continues from there.
        return Fetched(changes, changes[-1].revision, complete=False)
    return Fetched(changes, org_revision)


class PgSource:
    """One lazily opened connection to the read database, reopened after failures."""

    def __init__(
        self,
        url: str,
        org_id: str,
        services: tuple[str, ...] = (),
        *,
        password_file: Path | None = None,
        page: int = DELTA_PAGE,
        pool_mode: str = "session",
    ) -> None:
        self._url = url
        self._org_id = org_id
        self._services = list(services) or None
        self._password_file = password_file
        self._page = page
        self._pool_mode = pool_mode
        self._conn: asyncpg.Connection | None = None
        # One connection, one query at a time (start-up catch-up may overlap the fetcher).
        # fast_acquire: an uncontended read does not yield to the event loop twice.
        self._lock = anyio.Lock(fast_acquire=True)
        self.queries = 0  # for tests and benchmarks: queries sent
        self.connects = 0  # for tests and benchmarks: connections opened
        self.last_used = time.monotonic()
        self._crowded_until = 0.0
        self._slots_due = 0.0  # when a held connection samples the free slots again
        self.slot_samples = 0  # for tests: free-slot samples taken

    async def warm_load(self) -> Fetched:
        """Every live entry of the org (filtered by service) and the org revision.

        Raises OrgNotReadableError when the role may not read the org at all.
        """
        rows = await self._fetch(WARM_LOAD, self._org_id, self._services)
        self._check_readable(rows[0])
        return _rows_to_fetched(rows)

    async def check_org_readable(self) -> None:
        """Raise OrgNotReadableError unless this role may read the org (one small query)."""
        rows = await self._fetch(ORG_ACCESS)
        self._check_readable(rows[0])

    def _check_readable(self, row: asyncpg.Record) -> None:
        reader_org = row["reader_org"]
        if reader_org is None or reader_org == self._org_id:
            return
        role = row["role_name"]
        reads = f"reads org {reader_org!r} only" if reader_org else "is mapped to no org"
        raise OrgNotReadableError(
            f"database role {role!r} may not read org {self._org_id!r}: the reader policy says it "
            f"{reads}; make a reader role of this org: config-agent grant-reader --org {self._org_id} "
            f"--role NAME")

    async def fetch_changes_since(self, revision: int) -> Fetched:
        """Every change after `revision` (one page), with the org revision."""
        rows = await self._fetch(CHANGES_SINCE, self._org_id, revision, self._services, self._page)
        return _rows_to_fetched(rows, self._page)

    @property
    def crowded(self) -> bool:
        """True while the server is (recently was) short of connection slots."""
        return self._crowded_until > time.monotonic()

    @property
    def connected(self) -> bool:
        """True while a connection is open (it may still turn out broken)."""
        return self._conn is not None and not self._conn.is_closed()

    async def close_if_idle(self, idle_timeout: float) -> bool:
        """Close the connection if unused for `idle_timeout` seconds; True if it did."""
        async with self._lock:
            if self.connected and time.monotonic() - self.last_used >= idle_timeout:
                await self.close()
                return True
        return False

    async def reconnect(self) -> None:
        """Drop the connection so the next read logs in anew (new credentials)."""
        async with self._lock:
            await self.close()

    async def close(self) -> None:
        """Close the connection if open."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close(timeout=2)
            except Exception:  # closing a broken connection may fail; it is gone either way
                conn.terminate()

    async def _fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        async with self._lock:
            return await self._fetch_locked(sql, *args)

    async def _fetch_locked(self, sql: str, *args: object) -> list[asyncpg.Record]:
        opened = False
        if self._conn is None or self._conn.is_closed():
            # TLS comes from the URL (sslmode=verify-full&sslrootcert=…).
            try:
                self._conn = await connect(self._url, password_file=self._password_file,
                                           pool_mode=self._pool_mode)
            except DatabaseBusyError:
                # The server is full: for a while, give each slot back right after use.
                self._crowded_until = time.monotonic() + CROWDED_SECONDS
                raise
            self.connects += 1
            opened = True
        self.queries += 1
        self.last_used = time.monotonic()
        try:
            rows = list(await self._conn.fetch(sql, *args, timeout=30))
            if opened or self.last_used >= self._slots_due:
                await self._sample_free_slots(self._conn)
            if self.crowded:
                await self.close()
            return rows
        except CONNECTION_ERRORS as exc:
            await self.close()
            raise DatabaseError(f"PostgreSQL read failed: {describe(exc)}") from exc
        except asyncpg.PostgresError as exc:
            await self.close()
            raise DatabaseError(f"PostgreSQL read failed: {describe(exc)}") from exc

    async def _sample_free_slots(self, conn: asyncpg.Connection) -> None:
        """Crowded when the server (or this role's budget) has few slots left."""
        self.slot_samples += 1
        free = await conn.fetchval(FREE_SLOTS, timeout=30)
        now = time.monotonic()
        self._slots_due = now + jittered(FREE_SLOTS_EVERY, 0.5)
        if free is not None and free < CROWDED_FREE_SLOTS:
            self._crowded_until = now + CROWDED_SECONDS
