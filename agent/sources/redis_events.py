"""The Redis subscription of one org, reconnecting with backoff, never silently deaf.

Classic channels (one server or Sentinel): PSUBSCRIBE `config:{org}:*`, which also
covers the relay's heartbeat channel `config:{org}:heartbeat`. Sharded (Redis
Cluster): SSUBSCRIBE `config:{org}` on the node that owns the org's slot, through
redis-py's cluster pub/sub; a slot move (the server's SUNSUBSCRIBE) or a node
failure makes us resubscribe with a fresh view of the cluster.

"Hearing" is what counts, not an open socket: the relay publishes a heartbeat per
org every `heartbeat_interval`. When neither a heartbeat nor any other message
arrives for DEAF_AFTER × that interval (and the org has entries, so heartbeats are
due), the subscription is *deaf*, and `on_deaf` says so at once (status, metrics,
one warning per deaf spell). It is made again (then the agent replays what it
missed) only after a random wait, with full jitter that doubles per attempt: before
the k-th resubscribe of a spell, uniform(0, min(cap, base · 2^k)), base = DEAF_AFTER
× heartbeat_interval, cap = DEAF_BACKOFF_CAP × base (0–15 s, 0–30 s, then 0–60 s by
default). A relay that is down silences every agent of a fleet in the same second;
without the spread they would all resubscribe and replay on the same beat. Meanwhile
the agent keeps listening on the subscription it has: a change published directly
(the CLI and the library publish after COMMIT) still arrives within milliseconds,
and any message ends the spell (and resets the backoff). A shard subscription the
server dropped is made again at once: there is nothing left to listen on.

After every (re)subscribe, `on_connected(hearing)` gets hearing=False while
heartbeats are due (`redis_connected` then waits for the first message); with
heartbeats off the server's confirmation is the proof. Only (P|S)SUBSCRIBE and PING
are sent on the data connection (the tenant ACL allows nothing else).
"""

from __future__ import annotations

import logging
import math
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
# While deaf, resubscribes wait at most this many deaf thresholds (60 s by default).
DEAF_BACKOFF_CAP = 4


class Deaf(Exception):
    """Time to resubscribe: nothing heard for long enough, or the server dropped our subscription."""


class RedisEvents:
    """Delivers raw (channel, data) messages of one org to `on_message`.

    `deaf_backoff` (default: full jitter, base DEAF_AFTER × heartbeat_interval, cap
    DEAF_BACKOFF_CAP × that) spaces the resubscribes of a deaf spell; tests pass one
    with their own `rand`.
    """

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
        deaf_backoff: Backoff | None = None,
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
        self._deaf_backoff = deaf_backoff or Backoff(
            initial=self._deaf_after, cap=DEAF_BACKOFF_CAP * self._deaf_after, full_jitter=True)
        self._expect_heartbeat = expect_heartbeat
        # The current deaf spell: when it began (monotonic), None while hearing.
        self._deaf_since: float | None = None
        self.deaf_resubscribes = 0  # made in the current (or last) spell

    @property
    def deaf(self) -> bool:
        """True from the deaf threshold until something is heard again."""
        return self._deaf_since is not None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Subscribe and listen forever; `started` after the first attempt (up or not)."""
        started = False
        while True:
            session = _ClusterSession(self) if self._sharded else _ServerSession(self)
            try:
                with anyio.fail_after(SUBSCRIBE_TIMEOUT):
                    await session.subscribe()
                self._backoff.reset()
                # An open socket proves nothing while heartbeats are due: the first message does.
                self._on_connected(not self._heartbeat_due())
                if not started:
                    started = True
                    task_status.started()
                await self._listen(session)
            except Deaf as exc:
                # Down until subscribed again; the agent replays once it is.
                self._on_disconnected(f"deaf: {exc}")
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

    def _heartbeat_due(self) -> bool:
        return bool(self._deaf_after) and self._expect_heartbeat()

    async def _listen(self, session: _Session) -> None:
        now = time.monotonic()
        last_heard = now
        # Subscribed again within a deaf spell: the next resubscribe is already scheduled.
        resubscribe_at = now + self._deaf_backoff.next() if self.deaf else math.inf
        while True:
            wait = HEALTH_CHECK_INTERVAL
            if self._deaf_after:
                due = resubscribe_at if self.deaf else last_heard + self._deaf_after
                wait = min(wait, max(0.01, due - now))
            msg = await session.next_message(wait)
            now = time.monotonic()
            if msg is None:
                if self.deaf:
                    if now >= resubscribe_at:
                        self.deaf_resubscribes += 1
                        log.debug("Redis subscription still deaf; resubscribing (%d in this spell)",
                                  self.deaf_resubscribes)
                        raise Deaf("nothing heard since the last resubscribe")
                elif self._deaf_after and now - last_heard >= self._deaf_after:
                    if self._expect_heartbeat():
                        self._begin_spell(now, f"no heartbeat or change for {now - last_heard:.3g}s")
                        resubscribe_at = now + self._deaf_backoff.next()
                    else:
                        last_heard = now  # an org without entries has no heartbeat yet
                continue
            kind = msg["type"]
            if kind in (b"sunsubscribe", "sunsubscribe"):
                reason = "the server dropped the shard subscription (slot moved)"
                self._on_deaf(reason)
                log.warning("Redis subscription deaf (%s); resubscribing", reason)
                raise Deaf(reason)
            if kind not in ("pmessage", "smessage", b"pmessage", b"smessage"):
                continue
            last_heard = now
            if self.deaf:
                self._end_spell(now)
            heartbeat = is_heartbeat(msg["channel"], msg["data"], self._org_id)
            self._on_heard(heartbeat)
            if not heartbeat:
                self._on_message(msg["channel"], msg["data"])
            # redis-py hands out buffered messages without yielding: during a flood the
            # fetch a real announcement asked for must still get its turn.
            await anyio.lowlevel.checkpoint()

    def _begin_spell(self, now: float, reason: str) -> None:
        """At the deaf threshold: say so at once; resubscribe later, spread (one warning per spell)."""
        self._deaf_since = now
        self.deaf_resubscribes = 0
        self._on_deaf(reason)
        log.warning("Redis subscription deaf (%s); listening on, resubscribing after a random "
                    "0-%.0fs, doubling up to 0-%.0fs, until something is heard",
                    reason, self._deaf_backoff.initial, self._deaf_backoff.cap)

    def _end_spell(self, now: float) -> None:
        assert self._deaf_since is not None
        log.info("Redis subscription hears again after %.0fs deaf (%d resubscribes)",
                 now - self._deaf_since, self.deaf_resubscribes)
        self._deaf_since = None
        self._deaf_backoff.reset()


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
