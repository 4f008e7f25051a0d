"""`config-agent relay`: PostgreSQL LISTEN → Redis PUBLISH (SPEC §2).

The trigger's pg_notify is delivered only when the change commits, so every
committed change is announced even if its writer crashed right after COMMIT.
After each (re)connect the relay re-announces every org's latest change, so
agents catch up at once instead of at their next reconcile. Several relays may
run at once (at-least-once delivery; agents de-duplicate by version).

The relay proves its LISTEN works end to end before it calls itself ready, and
keeps proving it: every PROOF_INTERVAL it sends a NOTIFY of its own from a second
connection and must hear it back within PROOF_TIMEOUT. Behind a transaction
pooler (PgBouncer) LISTEN silently hears nothing; the proof fails, `/readyz`
says 503 and one line says why. Each proof that succeeds is followed by a
heartbeat to every org on Redis (no value), so agents can tell "quiet" from "deaf".
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import asyncpg
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from prometheus_client import CollectorRegistry, Counter, Gauge

from agent.db.connect import POOLER_ERRORS, connect, describe
from agent.db.writer import ORG_REVISIONS
from agent.errors import SourceError, UsageError
from agent.fleet import FleetReader, fleet_counts, fleet_rows
from agent.model import Announcement, InvalidMessage, parse_announcement
from agent.redis_client import RedisPublisher, publish_forms
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
ORGS = "SELECT org_id FROM config_orgs ORDER BY org_id"
# The fleet summary (config_agent_fleet_*) is read every this many LISTEN proofs.
FLEET_EVERY_PROOFS = 3
PROBE = "SELECT pg_notify($1, $2)"
# Seconds between liveness checks of the idle LISTEN connection.
KEEPALIVE = 10.0
QUEUE_SIZE = 100_000
# The LISTEN proof: how often when heartbeats are off, and how long our own NOTIFY may take.
PROOF_INTERVAL = 5.0
PROOF_TIMEOUT = 2.0
# Consecutive failed proofs before the LISTEN connection is made again.
PROOF_FAILURES_BEFORE_RECONNECT = 3
NEEDS_DIRECT = ("LISTEN needs a direct (session) connection to PostgreSQL, not a transaction pooler such as "
                "PgBouncer (CONFIG_AGENT_DATABASE_URL of the relay); not ready")
NOT_HEARD = "LISTEN did not hear the relay's own NOTIFY within {timeout:.0f}s: " + NEEDS_DIRECT
POOLER_ANSWER = "PostgreSQL answered as it does behind a transaction pooler ({error}): " + NEEDS_DIRECT
# Besides connect.POOLER_ERRORS, the same signature in words: a prepared statement found
# on, or missing from, the server that happens to serve the query; PgBouncer's "... not
# allowed in statement pool mode".
POOLER_TEXT = re.compile(r"prepared statement|pool mode", re.IGNORECASE)


class ListenUnheardError(SourceError):
    """Several LISTEN proofs in a row failed: the connection is made again."""


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """"The relay is alive" for one org's agents: no entry, no value."""

    org_id: str
    ts: float


@dataclass
class RelayState:
    """Connection state and counters of the relay, exported as metrics."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    pg_connected: bool = False
    redis_connected: bool = False
    # True while the latest LISTEN proof (our own NOTIFY heard back) succeeded.
    listen_proven: bool = False

    def __post_init__(self) -> None:
        r = self.registry
        self.published = Counter("config_relay_published", "Announcements published.", registry=r)
        self.invalid = Counter("config_relay_invalid", "Notifications dropped as malformed.",
                               registry=r)
        self.pg_gauge = Gauge("config_relay_db_connected", "1 while LISTENing.", registry=r)
        self.redis_gauge = Gauge("config_relay_redis_connected", "1 while Redis accepts publishes.",
                                 registry=r)
        self.listen_gauge = Gauge(
            "config_relay_listen_proven",
            "1 while the relay hears its own NOTIFY back (LISTEN works end to end).", registry=r)
        self.heartbeats = Counter("config_relay_heartbeats", "Heartbeats published (one per org).",
                                  registry=r)
        self.proof_seconds = Gauge("config_relay_listen_proof_seconds",
                                   "Time from the relay's own NOTIFY to hearing it (last proof).",
                                   registry=r)
        # From the agents' reports (README "Did every pod get it?"), one series per org.
        self.fleet_agents = Gauge("config_agent_fleet_agents", "Live agents reporting, per org.",
                                  ["org_id"], registry=r)
        self.fleet_behind = Gauge("config_agent_fleet_behind",
                                  "Live agents behind the newest change of their services.", ["org_id"],
                                  registry=r)
        self.fleet_stale = Gauge("config_agent_fleet_stale", "Live agents serving stale values.", ["org_id"],
                                 registry=r)
        self.fleet_unready = Gauge("config_agent_fleet_unready", "Live agents not ready.", ["org_id"],
                                   registry=r)
        self._fleet_gauges = (self.fleet_agents, self.fleet_behind, self.fleet_stale, self.fleet_unready)
        self._fleet_orgs: set[str] = set()

    def set_fleet(self, counts: dict[str, tuple[int, int, int, int]]) -> None:
        """Per org (agents, behind, stale, unready); orgs no longer listed lose their series."""
        for org_id in self._fleet_orgs - counts.keys():
            for gauge in self._fleet_gauges:
                gauge.remove(org_id)
        for org_id, values in counts.items():
            for gauge, value in zip(self._fleet_gauges, values, strict=True):
                gauge.labels(org_id=org_id).set(value)
        self._fleet_orgs = set(counts)

    @property
    def ready(self) -> bool:
        """Both ends connected and LISTEN proven to hear."""
        return self.pg_connected and self.redis_connected and self.listen_proven

    def set_listen_proven(self, proven: bool) -> None:
        """Record the outcome of the latest LISTEN proof."""
        self.listen_proven = proven
        self.listen_gauge.set(int(proven))

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
        if settings.database_pool_mode == "transaction":
            raise UsageError("the relay LISTENs and needs a direct (session) connection to PostgreSQL: "
                             "unset CONFIG_AGENT_DATABASE_POOL_MODE=transaction for the relay "
                             "(agents and the CLI may use the pooler)")
        self.settings = settings
        self.state = state or RelayState()
        self.publisher = RedisPublisher(settings.redis_url or "",
                                        password_file=settings.redis_password_file,
                                        ca_file=settings.redis_ca_file,
                                        forms=publish_forms(settings.redis_url or "", settings.redis_channels))
        self._send: MemoryObjectSendStream[Announcement | Heartbeat]
        self._receive: MemoryObjectReceiveStream[Announcement | Heartbeat]
        self._send, self._receive = anyio.create_memory_object_stream[Announcement | Heartbeat](QUEUE_SIZE)
        self._reannounce = anyio.Event()
        # Our own probe notifications: "<relay id>:<sequence>"; the listener sets the event.
        self._probe_prefix = f"{secrets.token_hex(6)}:"
        self._probe_heard: dict[str, anyio.Event] = {}
        self.heartbeat_interval = settings.heartbeat_interval
        # One error line per episode of "not a direct connection" (until LISTEN is proven).
        self._said_needs_direct = False
        self.fleet = FleetReader(settings.redis_url or "", password_file=settings.redis_password_file,
                                 ca_file=settings.redis_ca_file)
        self._fleet_failing = False

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; `started` once LISTENing."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._publish_loop)
            await tg.start(self._listen_loop)
            task_status.started()

    def _on_notify(self, conn: object, pid: int, channel: str, payload: str) -> None:
        if payload.startswith('{"relay_probe":'):
            probe = _probe_id(payload)
            if probe is not None and probe in self._probe_heard:
                self._probe_heard[probe].set()
            return  # another relay's probe: not an announcement
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
            prober: asyncpg.Connection | None = None
            try:
                conn = await self._connect("config-agent-relay")
                # The probe comes from another session, as every real change does.
                prober = await self._connect("config-agent-relay-probe")
                lost = anyio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
                self.state.set_pg(True)
                log.info("listening for changes on PostgreSQL")
                await self._announce_latest(conn)
                if not started:
                    started = True
                    task_status.started()
                # The backoff starts again only once LISTEN is proven: behind a pooler
                # every connect succeeds, and the relay must not retry at full speed.
                await self._serve_connection(conn, prober, lost, on_proven=backoff.reset)
            except (SourceError, asyncpg.PostgresError, OSError, TimeoutError,
                    asyncpg.InterfaceError) as exc:
                self.state.set_pg(False)
                self.state.set_listen_proven(False)
                delay = backoff.next()
                self._report_lost(exc, delay)
                if not started:
                    started = True
                    task_status.started()
                await anyio.sleep(delay)
            finally:
                for c in (conn, prober):
                    if c is not None:
                        c.terminate()

    async def close(self) -> None:
        """Close the Redis connections (publisher and fleet reader) and the queue."""
        self._send.close()
        self._receive.close()
        await self.publisher.close()
        await self.fleet.close()

    def _report_lost(self, exc: BaseException, delay: float) -> None:
        """Log a lost connection; signs of a transaction pooler say NEEDS_DIRECT once per episode."""
        pooler = _pooler_error(exc)
        if pooler is None and not isinstance(exc, ListenUnheardError):
            log.warning("PostgreSQL: %s; reconnecting in %.1fs",
                        exc if isinstance(exc, SourceError) else describe(exc), delay)
        elif pooler is not None and not self._said_needs_direct:
            log.error(POOLER_ANSWER.format(error=describe(pooler, pooler_hint=False)))
            self._said_needs_direct = True
        else:  # this episode's line was said (by the failed proof or the pooler's answer)
            log.debug("PostgreSQL: %s; reconnecting in %.1fs",
                      describe(pooler, pooler_hint=False) if pooler is not None else exc, delay)

    async def _connect(self, application_name: str) -> asyncpg.Connection:
        # No named prepared statements (the relay runs a few queries a minute, so the
        # cache saves nothing): behind a transaction pooler they collide with those of an
        # earlier relay process left on the pooled server connections, and that error would
        # come before the LISTEN proof that says what is really wrong.
        return await connect(self.settings.database_url or "",
                             password_file=self.settings.database_password_file,
                             application_name=application_name, statement_cache_size=0)

    async def _serve_connection(self, conn: asyncpg.Connection, prober: asyncpg.Connection,
                                lost: anyio.Event, *, on_proven: Callable[[], None]) -> None:
        """Until the connection is lost: re-announce on demand, keep alive, prove LISTEN."""
        proof_every = self.heartbeat_interval or PROOF_INTERVAL
        next_proof = anyio.current_time()
        last_check = anyio.current_time()
        failures = proofs = 0
        while not lost.is_set():
            if anyio.current_time() >= next_proof:
                next_proof = anyio.current_time() + proof_every
                if await self._prove(prober):
                    failures = 0
                    on_proven()
                    await self._queue_heartbeats(prober)
                    if proofs % FLEET_EVERY_PROOFS == 0:
                        await self._summarize_fleet(prober)
                    proofs += 1
                else:
                    failures += 1
                    if failures >= PROOF_FAILURES_BEFORE_RECONNECT:
                        raise ListenUnheardError("LISTEN heard none of our own NOTIFYs; "
                                                 "making the connection again")
            with anyio.move_on_after(max(0.0, min(1.0, next_proof - anyio.current_time()))):
                await lost.wait()
            if self._reannounce.is_set():
                self._reannounce = anyio.Event()
                await self._announce_latest(conn)
            if anyio.current_time() - last_check >= KEEPALIVE:
                await conn.fetchval("SELECT 1", timeout=5)
                last_check = anyio.current_time()
        raise SourceError("LISTEN connection lost")

    async def _prove(self, prober: asyncpg.Connection) -> bool:
        """Send our own NOTIFY from the other connection; True if LISTEN hears it in time."""
        probe = f"{self._probe_prefix}{time.monotonic_ns()}"
        heard = self._probe_heard[probe] = anyio.Event()
        sent = time.monotonic()
        try:
            await prober.fetchval(PROBE, NOTIFY_CHANNEL, json.dumps({"relay_probe": probe}), timeout=5)
            with anyio.move_on_after(PROOF_TIMEOUT):
                await heard.wait()
        finally:
            del self._probe_heard[probe]
        if heard.is_set():
            self.state.proof_seconds.set(time.monotonic() - sent)
            if not self.state.listen_proven:
                log.info("LISTEN proven: heard our own NOTIFY in %.1f ms", (time.monotonic() - sent) * 1000)
            self._said_needs_direct = False
        elif not self._said_needs_direct:
            log.error(NOT_HEARD.format(timeout=PROOF_TIMEOUT))
            self._said_needs_direct = True
        self.state.set_listen_proven(heard.is_set())
        return heard.is_set()

    async def _queue_heartbeats(self, prober: asyncpg.Connection) -> None:
        """One heartbeat per org that has entries (agents of an empty org expect none)."""
        if not self.heartbeat_interval:
            return
        now = time.time()
        for row in await prober.fetch(ORGS, timeout=10):
            try:
                self._send.send_nowait(Heartbeat(row["org_id"], now))
            except anyio.WouldBlock:
                return  # the queue is full of announcements; the next round sends them

    async def _summarize_fleet(self, prober: asyncpg.Connection) -> None:
        """config_agent_fleet_* from every org's agent reports (a Redis failure: one line)."""
        counts: dict[str, tuple[int, int, int, int]] = {}
        now = time.time()
        try:
            with anyio.fail_after(5):
                for row in await prober.fetch(ORG_REVISIONS, None, timeout=10):
                    reports = await self.fleet.agents(row["org_id"])
                    counts[row["org_id"]] = fleet_counts(
                        fleet_rows(reports, row["revision"], json.loads(row["services"]), now))
        except (SourceError, TimeoutError) as exc:
            if not self._fleet_failing:
                log.warning("cannot read the agents' reports for config_agent_fleet_*: %s", exc or "timed out")
            self._fleet_failing = True
            return
        self._fleet_failing = False
        self.state.set_fleet(counts)

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
        pending: Announcement | Heartbeat | None = None
        while True:
            if pending is None:
                with anyio.move_on_after(KEEPALIVE if self.state.redis_connected else 1.0):
                    pending = await self._receive.receive()
            try:
                if pending is None:
                    await self.publisher.ping()
                elif isinstance(pending, Heartbeat):
                    await self.publisher.publish_heartbeat(pending.org_id, pending.ts)
                    self.state.heartbeats.inc()
                    pending = None
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
    await relay.close()
    return 0


def _pooler_error(exc: BaseException) -> BaseException | None:
    """The library error (`exc` or its cause) that shows a transaction pooler, or None."""
    for error in (exc, exc.__cause__):
        pooled = isinstance(error, POOLER_ERRORS) or (
            isinstance(error, asyncpg.PostgresError) and POOLER_TEXT.search(str(error)) is not None)
        if pooled:
            return error
    return None


def _probe_id(payload: str) -> str | None:
    """The id inside a relay probe notification, or None if it is not one."""
    try:
        doc = json.loads(payload)
    except ValueError:
        return None
    probe = doc.get("relay_probe") if isinstance(doc, dict) else None
    return probe if isinstance(probe, str) else None
