"""Opening PostgreSQL connections, with passwords read from files and errors translated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg

from agent.errors import DatabaseError, SourceError

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
    **kwargs: Any,
) -> asyncpg.Connection:
    """Open one connection; the password file is read anew each time (rotation).

    `application_name` tells operators in pg_stat_activity which part holds it:
    config-agent (an agent), config-agent-relay, config-agent-writer.
    """
    password = read_secret(password_file)
    options: dict[str, Any] = {"timeout": connect_timeout,
                               "server_settings": {"application_name": application_name}}
    if password is not None:
        options["password"] = password
    options.update(kwargs)
    try:
        return await asyncpg.connect(url, **options)
    except CONNECTION_ERRORS as exc:
        raise DatabaseError(f"cannot connect to PostgreSQL: {describe(exc)}") from exc
    except asyncpg.PostgresError as exc:
        raise DatabaseError(f"cannot connect to PostgreSQL: {describe(exc)}") from exc


def describe(exc: BaseException) -> str:
    """A one-line description of a library error, never including a password."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
