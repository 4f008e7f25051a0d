"""The Redis subscription of one org, reconnecting with backoff, never silently deaf.

Classic channels (one server or Sentinel): PSUBSCRIBE `config:{org}:*`, which also
covers the relay's heartbeat channel `config:{org}:heartbeat`. Sharded (Redis
Cluster): SSUBSCRIBE `config:{org}` on the node that owns the org's slot, through
redis-py's cluster pub/sub; a slot move (the server's SUNSUBSCRIBE) or a node
failure makes us resubscribe with a fresh view of the cluster.

"Hearing" is what counts, not an open socket: the relay publishes a heartbeat per
org every `heartbeat_interval`; when neither a heartbeat nor any other message
arrives for DEAF_AFTER × that interval, the subscription is torn down and made
again (then the agent replays what it missed). Only (P|S)SUBSCRIBE and PING are
sent on the data connection (the tenant ACL allows nothing else).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskStatus

from agent.model import is_heartbeat, org_pattern, sharded_channel
from agent.redis_client import REDIS_ERRORS, channel_form, cluster_client, redis_client
from agent.sources.backoff import Backoff

log = logging.getLogger("agent.redis")

# Seconds without traffic before redis-py PINGs, to notice a half-open connection.
HEALTH_CHECK_INTERVAL = 15.0
SUBSCRIBE_TIMEOUT = 5.0
# Missed heartbeats before the subscription counts as deaf.
DEAF_AFTER = 3


class Deaf(Exception):
    """Nothing heard for too long, or the server dropped our subscription (slot moved)."""


class RedisEvents:
    """Delivers raw (channel, data) messages of one org to `on_message`."""

    def __init__(
        self,
        url: str,
        org_id: str,
        *,
        on_message: Callable[[bytes, bytes], None],
        on_connected: Callable[[bool], None],
        on_disconnected: Callable[[str], None],
        on_heard: Callable[[bool], None] = lambda _heartbeat: None,
        on_deaf: Callable[[str], None] = lambda _reason: None,
        password_file: Path | None = None,
        ca_file: Path | None = None,
        backoff: Backoff | None = None,
        channels: str = "auto",
        heartbeat_interval: float = 0.0,
        expect_heartbeat: Callable[[], bool] = lambda: True,
    ) -> None:
        self._url = url
        self._org_id = org_id
        self._sharded = channel_form(url, channels) == "sharded"
        self._on_message = on_message
        self._on_connected = on_connected
        self._on_disconnected = on_disconnected
        self._on_heard = on_heard
        self._on_deaf = on_deaf
        self._password_file = password_file
        self._ca_file = ca_file
        self._backoff = backoff or Backoff(initial=1.0, cap=60.0)
        self._deaf_after = DEAF_AFTER * heartbeat_interval
        self._expect_heartbeat = expect_heartbeat
        self._hearing = True

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Subscribe and listen forever; `started` after the first attempt (up or not)."""
        started = False
        while True:
            session = _ClusterSession(self) if self._sharded else _ServerSession(self)
            try:
                with anyio.fail_after(SUBSCRIBE_TIMEOUT):
                    await session.subscribe()
                self._backoff.reset()
                # After a deaf spell the socket being open proves nothing: "hearing" waits
                # for the first message.
                self._on_connected(self._hearing)
                if not started:
                    started = True
                    task_status.started()
                await self._listen(session)
            except Deaf as exc:
                self._hearing = False
                self._on_deaf(str(exc))
                log.warning("Redis subscription deaf (%s); resubscribing", exc)
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
                    await session.close()

    async def _listen(self, session: _Session) -> None:
        last_heard = time.monotonic()
        while True:
            wait = HEALTH_CHECK_INTERVAL
            if self._deaf_after:
                wait = min(wait, max(0.01, last_heard + self._deaf_after - time.monotonic()))
            msg = await session.next_message(wait)
            now = time.monotonic()
            if msg is None:
                if self._deaf_after and now - last_heard >= self._deaf_after:
                    if self._expect_heartbeat():
                        raise Deaf(f"no heartbeat or change for {now - last_heard:.0f}s")
                    last_heard = now  # an org without entries has no heartbeat yet
                continue
            kind = msg["type"]
            if kind in (b"sunsubscribe", "sunsubscribe"):
                raise Deaf("the server dropped the shard subscription (slot moved)")
            if kind not in ("pmessage", "smessage", b"pmessage", b"smessage"):
                continue
            last_heard = now
            if not self._hearing:
                self._hearing = True
                log.info("Redis subscription hears again")
            heartbeat = is_heartbeat(msg["channel"], msg["data"], self._org_id)
            self._on_heard(heartbeat)
            if not heartbeat:
                self._on_message(msg["channel"], msg["data"])
            # redis-py hands out buffered messages without yielding: during a flood the
            # fetch a real announcement asked for must still get its turn.
            await anyio.lowlevel.checkpoint()


class _Session:
    """One subscription attempt: connect, subscribe, read messages, close."""

    def __init__(self, events: RedisEvents) -> None:
        self.events = events

    async def subscribe(self) -> None:
        raise NotImplementedError

    async def next_message(self, wait: float) -> dict[str, Any] | None:
        raise NotImplementedError

    async def close(self) -> None:
        """Close the subscription and the client, whatever state they are in."""
        pubsub: Any = getattr(self, "pubsub", None)
        client: Any = getattr(self, "client", None)
        if pubsub is not None:
            await _quietly(pubsub.aclose())
        if client is not None:
            await _quietly(client.aclose())


class _ServerSession(_Session):
    """PSUBSCRIBE on one server (or on the master Sentinel names at connect time)."""

    async def subscribe(self) -> None:
        e = self.events
        self.client = redis_client(e._url, password_file=e._password_file, ca_file=e._ca_file,
                                   health_check_interval=HEALTH_CHECK_INTERVAL)
        self.pubsub = self.client.pubsub()
        await self.pubsub.psubscribe(org_pattern(e._org_id))
        await _confirmed(self.pubsub.get_message, "psubscribe")

    async def next_message(self, wait: float) -> dict[str, Any] | None:
        msg: dict[str, Any] | None = await self.pubsub.get_message(timeout=wait)
        return msg


class _ClusterSession(_Session):
    """SSUBSCRIBE the org's sharded channel on the node that owns its slot."""

    async def subscribe(self) -> None:
        e = self.events
        self.client = cluster_client(e._url, password_file=e._password_file, ca_file=e._ca_file,
                                     health_check_interval=HEALTH_CHECK_INTERVAL)
        await self.client.initialize()
        self.pubsub = self.client.pubsub()
        await self.pubsub.ssubscribe(sharded_channel(e._org_id))
        await _confirmed(self.pubsub.get_sharded_message, "ssubscribe")

    async def next_message(self, wait: float) -> dict[str, Any] | None:
        msg: dict[str, Any] | None = await self.pubsub.get_sharded_message(timeout=wait)
        return msg


async def _confirmed(get_message: Callable[..., Any], kind: str) -> None:
    """Wait for the server's confirmation of our subscription."""
    while True:
        msg = await get_message(timeout=SUBSCRIBE_TIMEOUT)
        if msg is not None and msg["type"] in (kind, kind.encode()):
            return


async def _quietly(closing: Any) -> None:
    try:
        with anyio.move_on_after(2):
            await closing
    except Exception:  # the connection is already broken; nothing left to release
        log.debug("closing a broken Redis connection failed", exc_info=True)
