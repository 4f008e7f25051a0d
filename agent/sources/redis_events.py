"""Redis Pub/Sub subscription to `config:{org}:*`, reconnecting with backoff.

Only PSUBSCRIBE and PING are sent (the tenant ACL allows nothing else).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import anyio
from anyio.abc import TaskStatus

from agent.model import org_pattern
from agent.redis_client import REDIS_ERRORS, redis_client
from agent.sources.backoff import Backoff

log = logging.getLogger("agent.redis")

# Seconds without traffic before redis-py PINGs, to notice a half-open connection.
HEALTH_CHECK_INTERVAL = 15.0
SUBSCRIBE_TIMEOUT = 5.0


class RedisEvents:
    """Delivers raw (channel, data) messages of one org to `on_message`."""

    def __init__(
        self,
        url: str,
        org_id: str,
        *,
        on_message: Callable[[bytes, bytes], None],
        on_connected: Callable[[], None],
        on_disconnected: Callable[[str], None],
        password_file: Path | None = None,
        ca_file: Path | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self._url = url
        self._pattern = org_pattern(org_id)
        self._on_message = on_message
        self._on_connected = on_connected
        self._on_disconnected = on_disconnected
        self._password_file = password_file
        self._ca_file = ca_file
        self._backoff = backoff or Backoff(initial=1.0, cap=60.0)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Subscribe and listen forever; `started` after the first attempt (up or not)."""
        started = False
        while True:
            client = redis_client(self._url, password_file=self._password_file,
                                  ca_file=self._ca_file, health_check_interval=HEALTH_CHECK_INTERVAL)
            pubsub = client.pubsub()
            try:
                with anyio.fail_after(SUBSCRIBE_TIMEOUT):
                    await pubsub.psubscribe(self._pattern)
                    while True:
                        msg = await pubsub.get_message(timeout=SUBSCRIBE_TIMEOUT)
                        if msg is not None and msg["type"] == "psubscribe":
                            break
                self._backoff.reset()
                self._on_connected()
                if not started:
                    started = True
                    task_status.started()
                await self._listen(pubsub)
            except REDIS_ERRORS as exc:  # TimeoutError included
                reason = f"{type(exc).__name__}: {exc}"
                self._on_disconnected(reason)
                if not started:
                    started = True
                    task_status.started()
                delay = self._backoff.next()
                log.warning("Redis subscription lost (%s); retrying in %.1fs", reason, delay)
                await anyio.sleep(delay)
            finally:
                with anyio.CancelScope(shield=True):
                    await _quietly_close(pubsub, client)

    async def _listen(self, pubsub: object) -> None:
        from redis.asyncio.client import PubSub

        assert isinstance(pubsub, PubSub)
        while True:
            msg = await pubsub.get_message(timeout=HEALTH_CHECK_INTERVAL)
            if msg is None:
                continue
            if msg["type"] == "pmessage":
                self._on_message(msg["channel"], msg["data"])


async def _quietly_close(pubsub: object, client: object) -> None:
    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub

    assert isinstance(pubsub, PubSub) and isinstance(client, Redis)
    try:
        with anyio.move_on_after(2):
            await pubsub.aclose()  # type: ignore[no-untyped-call]
            await client.aclose()
    except Exception:  # the connection is already broken; nothing left to release
        log.debug("closing a broken Redis connection failed", exc_info=True)
