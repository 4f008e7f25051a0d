"""Redis connections for publishers and subscribers: credentials from files, TLS, least privilege.

Agents run with an ACL user that may only (P)SUBSCRIBE `config:{org}:*` and PING,
so nothing here may send CLIENT SETINFO/SETNAME, CONFIG or HELLO on connect.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.credentials import CredentialProvider
from redis.exceptions import RedisError as _RedisLibError

from agent.db.connect import read_secret
from agent.errors import RedisError
from agent.model import Announcement

log = logging.getLogger("agent.redis")

# What redis-py raises when the server or network fails (plus OSError for TLS/DNS).
REDIS_ERRORS: tuple[type[BaseException], ...] = (_RedisLibError, OSError, TimeoutError)


class FileCredentials(CredentialProvider):
    """Username from the URL, password from a file re-read on every new connection."""

    def __init__(self, username: str | None, password: str | None, password_file: Path | None):
        self._username = username
        self._password = password
        self._password_file = password_file

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        password = self._password
        if self._password_file is not None:
            password = read_secret(self._password_file)
        if self._username and password is not None:
            return (self._username, password)
        if password is not None:
            return (password,)
        if self._username:
            return (self._username, "")
        return ("",)


def redis_client(
    url: str,
    *,
    password_file: Path | None = None,
    ca_file: Path | None = None,
    **options: Any,
) -> Redis:
    """A Redis client for `url` (redis:// or rediss://) that sends nothing an ACL may refuse."""
    parsed = urlparse(url)
    username = unquote(parsed.username) if parsed.username else None
    password = unquote(parsed.password) if parsed.password else None
    kwargs: dict[str, Any] = {
        "driver_info": None,
        "protocol": 2,
        "socket_connect_timeout": 5,
        # Our loops own reconnects: a silent internal reconnect would skip the replay.
        "retry": Retry(NoBackoff(), 0),
    }
    if username or password or password_file:
        kwargs["credential_provider"] = FileCredentials(username, password, password_file)
    if parsed.scheme == "rediss":
        kwargs["ssl_cert_reqs"] = "required"
        if ca_file is not None:
            kwargs["ssl_ca_certs"] = str(ca_file)
    kwargs.update(options)
    # Credentials come from the provider; strip them from the URL.
    clean = url
    if "@" in parsed.netloc:
        clean = parsed._replace(netloc=parsed.netloc.rpartition("@")[2]).geturl()
    return Redis.from_url(clean, **kwargs)


class RedisPublisher:
    """Publishes announcements; a failure is reported, never raised (the write is committed)."""

    def __init__(self, url: str, *, password_file: Path | None = None, ca_file: Path | None = None):
        self._client = redis_client(url, password_file=password_file, ca_file=ca_file,
                                    socket_timeout=2)

    async def publish(self, announcement: Announcement) -> bool:
        """PUBLISH one announcement; False when Redis could not take it."""
        try:
            await self._client.publish(announcement.channel, announcement.to_json())
        except REDIS_ERRORS as exc:
            log.debug("publish failed: %s", type(exc).__name__)
            return False
        return True

    async def publish_or_raise(self, announcement: Announcement) -> None:
        """PUBLISH one announcement, raising RedisError on failure (for the relay)."""
        try:
            await self._client.publish(announcement.channel, announcement.to_json())
        except REDIS_ERRORS as exc:
            raise RedisError(f"cannot publish to Redis: {type(exc).__name__}: {exc}") from exc

    async def ping(self) -> None:
        """PING, raising RedisError when Redis does not answer."""
        try:
            await self._client.ping()
        except REDIS_ERRORS as exc:
            raise RedisError(f"Redis unreachable: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()
