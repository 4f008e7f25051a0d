"""The sync engine of SPEC §3: announcements → coalesced delta fetches → store.apply().

One fetch in flight at a time, at most one more queued; a fetch after an
announcement waits a random 0..`fetch_jitter` (a fleet spreads its queries); an
announced version the read database does not show yet (a replica behind) is
chased with backoff for `lag_chase_timeout` without holding up newer
announcements; periodic reconcile with jitter (what it finds counts as drift only
if it was never announced, not even within `drift_grace`); revision polling while
Redis is down (not while deaf: RedisEvents backs off); retries with backoff while PostgreSQL is down (short,
jittered ones when it refuses connections: too many clients); staleness after
`stale_after` without a successful sync.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Callable

import anyio

from agent.errors import DatabaseBusyError, SourceError
from agent.model import InvalidMessage, parse_announcement
from agent.sources.backoff import Backoff, jittered
from agent.sources.postgres import Fetched, PgSource
from agent.status import SyncStatus
from agent.store import Store

log = logging.getLogger("agent.sync")

# Re-reads while the database shows an older version than announced (a replica
# behind, or a publish that overtook the commit): 5 ms doubling to at most 0.5 s, so
# seconds of replica lag cost a few queries and add at most ~0.5 s.
# Fetch spread while PostgreSQL is short of connection slots (PgSource.crowded).
CROWDED_SPREAD = 1.0
LAG_CHASE_FIRST = 0.005
LAG_CHASE_CAP = 0.5
# Entries whose announced versions are remembered for the drift judgement, at most: a
# publisher flooding made-up entry names cannot grow the agent's memory without bound.
HEARD_MAX = 100_000
# Source precedence when several requests coalesce into one fetch.
_RANK = {"reconcile": 0, "poll": 1, "pubsub": 2}


class Syncer:
    """Owns every read from PostgreSQL after start; sources only *request* fetches."""

    def __init__(
        self,
        store: Store,
        status: SyncStatus,
        source: PgSource,
        *,
        org_id: str,
        services: tuple[str, ...] = (),
        reconcile_interval: float = 300.0,
        fallback_poll_interval: float = 5.0,
        stale_after: float = 600.0,
        db_idle_timeout: float = 0.0,
        clock: Callable[[], float] = time.time,
        db_backoff: Backoff | None = None,
        drift_grace: float = 5.0,
        lag_chase_timeout: float = 15.0,
        fetch_jitter: float = 0.0,
    ) -> None:
        self.store = store
        self.status = status
        self.source = source
        self.org_id = org_id
        self.services = frozenset(services)
        self.reconcile_interval = reconcile_interval
        self.fallback_poll_interval = fallback_poll_interval
        self.stale_after = stale_after
        self.db_idle_timeout = db_idle_timeout
        self._clock = clock
        self._db_backoff = db_backoff or Backoff(initial=0.5, cap=30.0)
        # PostgreSQL refusing connections (too many clients): retry within 0.2 s to 2 s,
        # with full jitter (a retry that finds the server still full costs it a process).
        self._busy_backoff = Backoff(initial=0.1, cap=1.0, jitter=1.0)
        self._said_busy = False  # one warning per spell of refused connections
        self.lag_chase_timeout = lag_chase_timeout
        self.fetch_jitter = fetch_jitter
        self._wanted = anyio.Event()
        self._wanted_source: str | None = None
        self._jitter_due = False
        # (service, key) → highest announced version not yet applied, and until when to chase it.
        self._pending: dict[tuple[str, str], int] = {}
        self._chase_until: dict[tuple[str, str], float] = {}
        self._lagging = anyio.Event()
        self._chase_backoff = Backoff(initial=LAG_CHASE_FIRST, cap=LAG_CHASE_CAP, jitter=0.2)
        # (service, key) → highest version ever announced: what reconcile finds beyond it is drift.
        self._heard: dict[tuple[str, str], int] = {}
        self.heard_max = HEARD_MAX
        self._redis_down = anyio.Event()
        self._redis_up = anyio.Event()
        self.drift_grace = drift_grace
        # (service, key, version) applied by reconcile, not announced yet → when it counts as drift.
        self._suspects: dict[tuple[str, str, int], float] = {}
        self._suspected = anyio.Event()

    # -- start -----------------------------------------------------------------

    async def warm_load(self) -> None:
        """The first full load; raises SourceError when PostgreSQL cannot be read."""
        fetched = await self.source.warm_load()
        self.status.set_db(True)
        self.store.apply(fetched.changes, revision=fetched.revision, source="warmload")

    async def warm_load_until_done(self) -> None:
        """Retry the first load with backoff until it succeeds (used after a stale restore)."""
        while True:
            try:
                if self.store.snapshot.loaded:
                    # Catching up from a last-known-good snapshot: a start, not drift. A
                    # delta the role may not read would be empty, not an error: ask first.
                    await self.source.check_org_readable()
                    await self._fetch_all("warmload")
                else:
                    await self.warm_load()
                self._db_backoff.reset()
                return
            except SourceError as exc:
                self.status.set_db(False, str(exc))
                delay = self._retry_delay(exc)
                self._log_retry("cannot load from PostgreSQL", exc, delay)
                await anyio.sleep(delay)

    # -- inputs from Redis -----------------------------------------------------

    def on_message(self, channel: bytes | str, data: bytes | str) -> None:
        """Validate one Redis message; request a fetch if it announces something new."""
        try:
            ann = parse_announcement(channel, data)
        except InvalidMessage:
            self.status.count_message("invalid")
            return
        if ann.org_id != self.org_id or (self.services and ann.service not in self.services):
            self.status.count_message("foreign")
            return
        ident = (ann.service, ann.key)
        if ann.version > self._heard.get(ident, 0):
            self._heard.pop(ident, None)  # re-inserted: the newest last
            self._heard[ident] = ann.version
            if len(self._heard) > self.heard_max:
                self._forget_heard()
        if self._suspects:
            self._suspects.pop((ann.service, ann.key, ann.version), None)  # late, not lost
        if ann.version <= self.store.version_of(*ident) or ann.revision <= self.store.snapshot.revision:
            self.status.count_message("duplicate")
            return
        if ann.version <= self._pending.get(ident, 0):
            self.status.count_message("duplicate")
            return
        self._pending[ident] = ann.version
        self._chase_until[ident] = time.monotonic() + self.lag_chase_timeout
        self.status.count_message("applied")
        self._jitter_due = True
        self.request("pubsub")

    def _forget_heard(self) -> None:
        """Bound the announced-versions map: first forget what the store already holds
        (reconcile only finds versions above the store's, which count as unannounced
        either way), then the longest-unheard entries, down to 3/4 of the bound."""
        for ident, version in list(self._heard.items()):
            if version <= self.store.version_of(*ident):
                del self._heard[ident]
        excess = len(self._heard) - self.heard_max * 3 // 4
        for ident in list(itertools.islice(self._heard, max(0, excess))):
            del self._heard[ident]

    def on_redis_connected(self, hearing: bool = True) -> None:
        """Subscribed (again): replay whatever was missed while down or deaf.

        `hearing` is False while heartbeats are due: `redis_connected` then waits for a
        message (a subscription that hears nothing is not connected in any useful sense).
        """
        was_down = self._redis_down.is_set()
        self.status.set_redis(hearing)
        self._redis_down = anyio.Event()
        self._redis_up.set()
        if was_down:
            log.info("Redis subscription restored; fetching missed changes")
            self.request("poll")

    def on_redis_heard(self, heartbeat: bool = False) -> None:
        """A message (change or heartbeat) arrived: the subscription demonstrably works."""
        if heartbeat:
            self.status.count_message("heartbeat")
        if not self.status.redis_connected:
            self.status.set_redis(True)

    def on_redis_deaf(self, reason: str) -> None:
        """Nothing heard for too long: say so at once and count the spell.

        No fallback poll: the subscription keeps listening (direct publishes still
        arrive), and each of its spread-out resubscribes replays (on_redis_disconnected,
        then on_redis_connected). Polling here would make a silent relay a fleet-wide
        wave of reads every `fallback_poll_interval`.
        """
        self.status.count_deaf()
        self.status.set_redis(False)
        self.status.last_error = f"Redis: deaf: {reason}"

    def on_redis_disconnected(self, reason: str) -> None:
        """Lost Redis: keep serving; the fallback poll takes over."""
        self.status.set_redis(False)
        self.status.last_error = f"Redis: {reason}"
        self._redis_up = anyio.Event()
        self._redis_down.set()

    # -- the fetch loop --------------------------------------------------------

    def request(self, source: str) -> None:
        """Ask for one delta fetch; requests made while a fetch runs coalesce into one more."""
        if self._wanted_source is None or _RANK[source] > _RANK[self._wanted_source]:
            self._wanted_source = source
        self._wanted.set()

    async def run_fetcher(self) -> None:
        """Serve fetch requests one at a time, retrying with backoff while PostgreSQL is down."""
        while True:
            await self._wanted.wait()
            self._wanted = anyio.Event()
            source, self._wanted_source = self._wanted_source or "reconcile", None
            if self._jitter_due:
                # Spread a fleet's fetches of one announcement: over a few milliseconds, or
                # over a second while the server is short of connection slots (each agent
                # then connects for its read, and connects cost the server a process each).
                self._jitter_due = False
                spread = max(self.fetch_jitter, CROWDED_SPREAD) if self.source.crowded else self.fetch_jitter
                if spread > 0:
                    await anyio.sleep(random.uniform(0, spread))
            try:
                await self._fetch_all(source)
                self._after_fetch()
                self._db_backoff.reset()
                self._busy_backoff.reset()
                self._said_busy = False
            except SourceError as exc:
                self.status.set_db(False, str(exc))
                self.request(source)
                delay = self._retry_delay(exc)
                self._log_retry("PostgreSQL read failed", exc, delay)
                await anyio.sleep(delay)

    def _retry_delay(self, exc: SourceError) -> float:
        """Soon and widely spread when the server is full, else the normal backoff."""
        if isinstance(exc, DatabaseBusyError):
            self.status.count_db_refused()
            return self._busy_backoff.next()
        self._said_busy = False
        return self._db_backoff.next()

    def _log_retry(self, what: str, exc: SourceError, delay: float) -> None:
        """A refused connection is logged once per spell (a full server refuses thousands)."""
        if isinstance(exc, DatabaseBusyError):
            if self._said_busy:
                log.debug("%s (%s); retrying in %.2fs", what, exc, delay)
                return
            self._said_busy = True
            log.warning("%s (%s); retrying within %.1fs, quietly while it stays full "
                        "(config_agent_db_refused_total counts)", what, exc, self._busy_backoff.cap)
            return
        log.warning("%s (%s); retrying in %.1fs", what, exc, delay)

    async def _fetch_all(self, source: str) -> None:
        while True:
            fetched = await self.source.fetch_changes_since(self.store.snapshot.revision)
            self._apply(fetched, source)
            if fetched.complete:
                return

    def _apply(self, fetched: Fetched, source: str) -> None:
        self.status.set_db(True)
        unannounced: set[tuple[str, str, int]] = set()
        if source == "reconcile":
            # Drift is a change pub/sub never announced; one announced but not visible
            # in time (a lagging replica) was delivered, just not readable yet.
            unannounced = {(c.service, c.key, c.version) for c in fetched.changes
                           if c.version > self._heard.get((c.service, c.key), 0)}
        applied = self.store.apply(fetched.changes, revision=fetched.revision, source=source)
        if source == "reconcile" and applied.changes:
            due = time.monotonic() + self.drift_grace
            for c in applied.changes:
                if (c.service, c.key, c.version) in unannounced:
                    self._suspects[(c.service, c.key, c.version)] = due
            if self._suspects:
                self._suspected.set()
        for change in applied.changes:
            ident = (change.service, change.key)
            if self._pending.get(ident, 0) <= change.version:
                self._pending.pop(ident, None)
                self._chase_until.pop(ident, None)

    def _after_fetch(self) -> None:
        """Announced versions still not visible: chase them (until their deadline)."""
        now = time.monotonic()
        expired = 0
        for ident, version in list(self._pending.items()):
            if self.store.version_of(*ident) >= version:
                del self._pending[ident]
                self._chase_until.pop(ident, None)
            elif self._chase_until.get(ident, 0) <= now:
                del self._pending[ident]
                self._chase_until.pop(ident, None)
                expired += 1
        if expired:
            log.warning("%d announced change(s) still not visible after %.0fs (read database behind?); "
                        "reconcile will pick them up", expired, self.lag_chase_timeout)
        if self._pending:
            self._lagging.set()
        else:
            self._chase_backoff.reset()

    async def run_lag_chaser(self) -> None:
        """Re-read with backoff while announced versions are not visible; newer ones go first.

        The chase only *requests* fetches, so an announcement arriving meanwhile is
        fetched at once instead of waiting behind a sleeping retry.
        """
        while True:
            await self._lagging.wait()
            self._lagging = anyio.Event()
            await anyio.sleep(self._chase_backoff.next())
            if self._pending:
                self.request("pubsub")

    # -- timers ----------------------------------------------------------------

    async def run_reconciler(self) -> None:
        """Every reconcile_interval ± 10 %: compare revisions, fetch on mismatch."""
        while True:
            await anyio.sleep(jittered(self.reconcile_interval))
            self.request("reconcile")

    async def run_drift_judge(self) -> None:
        """Count as drift the changes reconcile found that pub/sub still has not delivered."""
        while True:
            await self._suspected.wait()
            now = time.monotonic()
            lost = [ident for ident, due in self._suspects.items() if due <= now]
            for ident in lost:
                del self._suspects[ident]
            if lost:
                log.warning("reconcile found %d change(s) pub/sub had not delivered", len(lost))
                self.status.count_drift(len(lost))
            if self._suspects:
                await anyio.sleep(max(0.0, min(self._suspects.values()) - now))
            else:
                self._suspected = anyio.Event()

    async def run_fallback_poll(self) -> None:
        """While Redis is down, poll the org revision every fallback_poll_interval."""
        while True:
            await self._redis_down.wait()
            while self._redis_down.is_set():
                with anyio.move_on_after(self.fallback_poll_interval):
                    await self._redis_up.wait()
                if self._redis_down.is_set():
                    self.request("poll")

    async def run_staleness(self) -> None:
        """Flag the snapshot stale after stale_after seconds without a successful sync.

        Sleeps until the moment the snapshot would turn stale (no periodic wake-ups
        while idle), re-checking since a sync in between moves that moment.
        """
        while True:
            snapshot = self.store.snapshot
            age = self._clock() - snapshot.last_sync
            overdue = snapshot.last_sync == 0 or age > self.stale_after
            if overdue and not snapshot.stale:
                log.warning("no successful sync for %.0fs: serving stale values", self.stale_after)
            self.store.set_stale(overdue)
            self.status.metrics.stale.set(int(self.store.snapshot.stale))
            if overdue:
                # Stale: the next successful apply clears it; look again a little later.
                await anyio.sleep(min(1.0, self.stale_after / 10))
            else:
                await anyio.sleep(self.stale_after - age + 0.01)

    async def run_idle_closer(self) -> None:
        """Close the read connection after db_idle_timeout seconds without a query."""
        if self.db_idle_timeout <= 0:
            return
        while True:
            due = self.source.last_used + self.db_idle_timeout - time.monotonic()
            await anyio.sleep(max(due, 0.05) if self.source.connected else self.db_idle_timeout)
            if await self.source.close_if_idle(self.db_idle_timeout):
                log.debug("closed the idle PostgreSQL connection")

