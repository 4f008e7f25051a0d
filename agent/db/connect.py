"""Opening PostgreSQL connections, with passwords read from files and errors translated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg

from agent.errors import DatabaseBusyError, DatabaseError, SourceError

# Errors that mean "the server or the network failed", as opposed to a bad query.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidPasswordError,
    TimeoutError,
)


class PooledConnection(asyncpg.Connection):  # type: ignore[misc]
    """A connection safe behind a transaction pooler (PgBouncer `pool_mode = transaction`).

    asyncpg sends a query as Parse/Describe/Sync then Bind/Execute/Sync; between the two
    a transaction pooler may hand the client another server connection. So every query
    with parameters runs inside a transaction (the pooler keeps one server for it), and
    the statement cache is off (no named prepared statements: another client would hit
    them on the same server). Queries already inside a transaction run as they are.
    """

    async def fetch(self, query: str, *args: Any, **kwargs: Any) -> Any:
        return await self._pinned(super().fetch, query, *args, **kwargs)

    async def fetchrow(self, query: str, *args: Any, **kwargs: Any) -> Any:
        return await self._pinned(super().fetchrow, query, *args, **kwargs)

    async def fetchval(self, query: str, *args: Any, **kwargs: Any) -> Any:
        return await self._pinned(super().fetchval, query, *args, **kwargs)

    async def execute(self, query: str, *args: Any, **kwargs: Any) -> Any:
        if not args:  # the simple-query protocol: one message, nothing to pin
            return await super().execute(query, **kwargs)
        return await self._pinned(super().execute, query, *args, **kwargs)

    async def _pinned(self, call: Any, query: str, *args: Any, **kwargs: Any) -> Any:
        if self.is_in_transaction():
            return await call(query, *args, **kwargs)
        async with self.transaction():
            return await call(query, *args, **kwargs)


def read_secret(path: Path | None) -> str | None:
    """Read a credential file (a mounted Secret) fresh, without its trailing newline."""
    if path is None:
        return None
    try:
        return path.read_text().rstrip("\r\n")
    except OSError as exc:
        raise SourceError(f"cannot read password file {path}: {exc.strerror}") from exc


async def connect(
    url: str,
    *,
    password_file: Path | None = None,
    connect_timeout: float = 10.0,
    application_name: str = "config-agent",
    pool_mode: str = "session",
    **kwargs: Any,
) -> asyncpg.Connection:
    """Open one connection; the password file is read anew each time (rotation).

    `pool_mode="transaction"` makes it safe behind a transaction pooler (PooledConnection).

    `application_name` tells operators in pg_stat_activity which part holds it:
    config-agent (an agent), config-agent-relay, config-agent-writer.
    """
    password = read_secret(password_file)
    options: dict[str, Any] = {"timeout": connect_timeout,
                               "server_settings": {"application_name": application_name}}
    if password is not None:
        options["password"] = password
    if pool_mode == "transaction":
        options["statement_cache_size"] = 0
        options["connection_class"] = PooledConnection
    options.update(kwargs)
    try:
        return await asyncpg.connect(url, **options)
    except asyncpg.TooManyConnectionsError as exc:
        raise DatabaseBusyError(f"cannot connect to PostgreSQL: {describe(exc)}") from exc
    except CONNECTION_ERRORS as exc:
        raise DatabaseError(f"cannot connect to PostgreSQL: {describe(exc)}") from exc
    except asyncpg.PostgresError as exc:
        raise DatabaseError(f"cannot connect to PostgreSQL: {describe(exc)}") from exc


# What PostgreSQL answers when consecutive queries of one session land on different server
# connections: the signature of a transaction pooler (PgBouncer) in front of the server.
POOLER_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.DuplicatePreparedStatementError,
    asyncpg.InvalidSQLStatementNameError,
)


def describe(exc: BaseException, *, pooler_hint: bool = True) -> str:
    """A one-line description of a library error, never including a password.

    A prepared-statement clash is the signature of a transaction pooler in front of the
    server; `pooler_hint` adds the advice that fits agents and the CLI (the pool-mode
    setting). The relay passes False: it refuses that setting and says itself what it needs.
    """
    text = str(exc).splitlines()[0] if str(exc) else ""
    line = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    if pooler_hint and isinstance(exc, POOLER_ERRORS):
        line += " (behind a transaction pooler such as PgBouncer? set CONFIG_AGENT_DATABASE_POOL_MODE=transaction)"
    return line
