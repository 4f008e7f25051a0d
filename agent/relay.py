"""`config-agent relay`: PostgreSQL LISTEN → Redis PUBLISH (SPEC §2).

The trigger's pg_notify is delivered only when the change commits, so every
committed change is announced even if its writer crashed right after COMMIT.
After each (re)connect the relay re-announces every org's latest change, so
agents catch up at once instead of at their next reconcile. Several relays may
run at once (at-least-once delivery; agents de-duplicate by version).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import anyio
import asyncpg
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from prometheus_client import CollectorRegistry, Counter, Gauge

from agent.db.connect import connect, describe
from agent.errors import SourceError
from agent.model import Announcement, InvalidMessage, parse_announcement
from agent.redis_client import RedisPublisher
from agent.settings import Settings
from agent.sources.backoff import Backoff

log = logging.getLogger("agent.relay")

NOTIFY_CHANNEL = "config_agent_changes"
LATEST_PER_ORG = """
SELECT h.org_id, h.service, h.key, h.version, h.revision,
       extract(epoch FROM h.changed_at)::float8 AS ts
  FROM config_orgs o
  JOIN LATERAL (SELECT * FROM config_history h
                 WHERE h.org_id = o.org_id ORDER BY h.revision DESC LIMIT 1) h ON true
"""
# Seconds between liveness checks of the idle LISTEN connection.
KEEPALIVE = 10.0
QUEUE_SIZE = 100_000


@dataclass
class RelayState:
    """Connection state and counters of the relay, exported as metrics."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    pg_connected: bool = False
    redis_connected: bool = False

    def __post_init__(self) -> None:
        r = self.registry
        self.published = Counter("config_relay_published", "Announcements published.", registry=r)
        self.invalid = Counter("config_relay_invalid", "Notifications dropped as malformed.",
                               registry=r)
        self.pg_gauge = Gauge("config_relay_db_connected", "1 while LISTENing.", registry=r)
        self.redis_gauge = Gauge("config_relay_redis_connected", "1 while Redis accepts publishes.",
                                 registry=r)

    @property
    def ready(self) -> bool:
        """Both ends connected."""
        return self.pg_connected and self.redis_connected

    def set_pg(self, up: bool) -> None:
        """Record the LISTEN connection state."""
        self.pg_connected = up
        self.pg_gauge.set(int(up))

    def set_redis(self, up: bool) -> None:
        """Record the Redis state."""
        self.redis_connected = up
        self.redis_gauge.set(int(up))


class Relay:
    """LISTENs on PostgreSQL and publishes each announcement to its Redis channel."""

    def __init__(self, settings: Settings, state: RelayState | None = None) -> None:
        settings.require("database_url", "redis_url")
        self.settings = settings
        self.state = state or RelayState()
        self.publisher = RedisPublisher(settings.redis_url or "",
                                        password_file=settings.redis_password_file,
                                        ca_file=settings.redis_ca_file)
        self._send: MemoryObjectSendStream[Announcement]
        self._receive: MemoryObjectReceiveStream[Announcement]
        self._send, self._receive = anyio.create_memory_object_stream[Announcement](QUEUE_SIZE)
        self._reannounce = anyio.Event()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; `started` once LISTENing."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._publish_loop)
            await tg.start(self._listen_loop)
            task_status.started()

    def _on_notify(self, conn: object, pid: int, channel: str, payload: str) -> None:
        try:
            # No Redis channel yet: the relay derives it from the validated fields.
            ann = parse_announcement(None, payload)
        except InvalidMessage:
            self.state.invalid.inc()
            log.warning("dropped a malformed notification on %s", channel)
            return
        try:
            self._send.send_nowait(ann)
        except anyio.WouldBlock:
            # Redis has been down long enough to fill the queue: the re-announce after
            # it returns covers what is dropped here.
            log.error("relay queue full; dropping an announcement (re-announce will cover it)")

    async def _listen_loop(self, *, task_status: TaskStatus[None]) -> None:
        backoff = Backoff(initial=0.5, cap=30.0)
        started = False
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await connect(self.settings.database_url or "",
                                     password_file=self.settings.database_password_file,
                                     application_name="config-agent-relay")
                lost = anyio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
                self.state.set_pg(True)
                backoff.reset()
                log.info("listening for changes on PostgreSQL")
                await self._announce_latest(conn)
                if not started:
                    started = True
                    task_status.started()
                last_check = anyio.current_time()
                while not lost.is_set():
                    with anyio.move_on_after(1.0):
                        await lost.wait()
                    if self._reannounce.is_set():
                        self._reannounce = anyio.Event()
                        await self._announce_latest(conn)
                    if anyio.current_time() - last_check >= KEEPALIVE:
                        await conn.fetchval("SELECT 1", timeout=5)
                        last_check = anyio.current_time()
                raise SourceError("LISTEN connection lost")
            except (SourceError, asyncpg.PostgresError, OSError, TimeoutError,
                    asyncpg.InterfaceError) as exc:
                self.state.set_pg(False)
                delay = backoff.next()
                log.warning("PostgreSQL: %s; reconnecting in %.1fs",
                            exc if isinstance(exc, SourceError) else describe(exc), delay)
                if not started:
                    started = True
                    task_status.started()
                await anyio.sleep(delay)
            finally:
                if conn is not None:
                    conn.terminate()

    async def _announce_latest(self, conn: asyncpg.Connection) -> None:
        rows = await conn.fetch(LATEST_PER_ORG, timeout=30)
        for row in rows:
            ann = Announcement(row["org_id"], row["service"], row["key"], row["version"],
                               row["revision"], row["ts"])
            try:
                self._send.send_nowait(ann)
            except anyio.WouldBlock:
                break
        log.info("re-announced the latest change of %d org(s)", len(rows))

    async def _publish_loop(self) -> None:
        backoff = Backoff(initial=0.2, cap=30.0)
        failed = False
        pending: Announcement | None = None
        while True:
            if pending is None:
                with anyio.move_on_after(KEEPALIVE if self.state.redis_connected else 1.0):
                    pending = await self._receive.receive()
            try:
                if pending is None:
                    await self.publisher.ping()
                else:
                    await self.publisher.publish_or_raise(pending)
                    self.state.published.inc()
                    pending = None
            except SourceError as exc:
                if not failed:
                    log.warning("%s; retrying with backoff", exc)
                failed = True
                self.state.set_redis(False)
                await anyio.sleep(backoff.next())
                continue
            if failed:
                # Agents may have missed messages while Redis was away.
                log.info("Redis is back; re-announcing the latest changes")
                self._reannounce.set()
                failed = False
            self.state.set_redis(True)
            backoff.reset()


async def run_relay(settings: Settings) -> int:
    """`config-agent relay` until SIGTERM/SIGINT."""
    from agent.app import stop_on_signal

    relay = Relay(settings)
    async with anyio.create_task_group() as tg:
        tg.start_soon(stop_on_signal, tg.cancel_scope)
        if settings.metrics_port:
            from agent.sinks.server import serve_probes

            await tg.start(serve_probes, relay.state, relay.state.registry,
                           settings.metrics_host, settings.metrics_port)
        await tg.start(relay.run)
    await relay.publisher.close()
    return 0
