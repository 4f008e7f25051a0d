"""The one exception tree of config-agent.

    ConfigAgentError                 base; `exit_code` is what the CLI exits with
    ├── UsageError          (2)      bad input: names, JSON, settings, flags
    │   └── NotFoundError   (2)      an entry or version that does not exist
    ├── ConflictError       (3)      --expect-version did not match
    ├── SourceError         (1)      PostgreSQL or Redis could not be used
    │   ├── DatabaseError   (1)
    │   │   ├── DatabaseBusyError (1) the server refused a connection (too many clients)
    │   │   └── OrgNotReadableError (1) the role's row-level security hides the org
    │   └── RedisError      (1)
    └── SinkError           (1)      a listener or the file set could not be set up or written

Library errors (asyncpg, redis-py, OSError) are translated at the boundary with
``raise … from exc``; components raise, the runtime decides what to log.
"""

from __future__ import annotations


class ConfigAgentError(Exception):
    """Base of every error config-agent raises on purpose."""

    exit_code = 1


class UsageError(ConfigAgentError):
    """The caller gave something invalid (a name, a value, a setting)."""

    exit_code = 2


class NotFoundError(UsageError):
    """The entry or version asked for does not exist."""


class ConflictError(ConfigAgentError):
    """The entry moved on: its version is not the one the caller expected."""

    exit_code = 3


class SourceError(ConfigAgentError):
    """A backing service (PostgreSQL, Redis) could not be reached or used."""


class DatabaseError(SourceError):
    """PostgreSQL failed or is unreachable."""


class DatabaseBusyError(DatabaseError):
    """PostgreSQL refused a new connection because it is full (too many clients)."""


class OrgNotReadableError(DatabaseError):
    """The database role may not read the agent's org (the reader policy maps it elsewhere).

    Not "no entries yet": row-level security would hide every row without an error.
    """


class RedisError(SourceError):
    """Redis failed or is unreachable."""


class SinkError(ConfigAgentError):
    """An output could not be used: a listener cannot bind, the file set cannot be written."""
