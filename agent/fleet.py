"""Did every pod get it? Agents report their applied revision to Redis; writers read the reports.

Each agent keeps one key, `config-agent:agents:{ORG}:AGENT` (the braces are literal: a
Redis Cluster hash tag, so an org's keys live on the slot of its sharded channel
`config:{ORG}`), holding a JSON report (revision, stale, ready, connection state; never a
value) that expires 3 × `fleet_report_interval` after it was written, and is listed in
the org's index, the sorted set `config-agent:agents:{ORG}` (score: when the report
expires, by the agent's clock, as of the agent's last index write). A report is written
on every new snapshot (at most every MIN_GAP seconds) and every `fleet_report_interval`
(± 10 %) when idle. A report after a change is one SET; the index is written too (SET +
ZADD, pipelined) by the first and every idle report, and by a change report when the
agent's last index write is older than the interval or a report failed: membership is
all readers use, and a fleet pays one command per agent per change, not two. A stopped
agent deletes its key; a killed one disappears when the key expires. Readers
(`config-agent status`, `set --wait`) list the index, read the keys, and drop members
whose key is gone. The tenant ACL lets an agent write (not read) its
own org's key and index only.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import random
import re
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from agent import __version__
from agent.errors import RedisError
from agent.model import NAME_RE, check_name
from agent.redis_client import REDIS_ERRORS, any_client
from agent.sources.backoff import jittered

if TYPE_CHECKING:
    from agent.status import SyncStatus
    from agent.store import Store

log = logging.getLogger("agent.fleet")

AGENT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,252}")
AGENT_NAME_RULE = "must be 1-253 letters, digits, '.', '_' or '-', starting with a letter or digit"
KEY_PREFIX = "config-agent:agents:"
# A report lives this many report intervals: one lost write does not drop the agent.
TTL_FACTOR = 3
# At most one report per this many seconds while changes arrive (a burst costs 10 a second).
MIN_GAP = 0.1
# Keys read per MGET.
CHUNK = 1000


def index_key(org_id: str) -> str:
    """The org's sorted set of agents that reported."""
    return f"{KEY_PREFIX}{{{org_id}}}"


def agent_key(org_id: str, agent: str) -> str:
    """The key holding one agent's report."""
    return f"{index_key(org_id)}:{agent}"


_agents_in_process = itertools.count(1)


def default_agent_name() -> str:
    """hostname-pid (then -2, -3 … for more agents in one process): unique among agents
    sharing a host. The chart names the pod instead."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()).strip("-.") or "agent"
    n = next(_agents_in_process)
    return f"{host[:230]}-{os.getpid()}" + (f"-{n}" if n > 1 else "")


@dataclass(frozen=True, slots=True)
class AgentReport:
    """What one agent last said about itself."""

    agent: str
    namespace: str | None
    org_id: str
    # The agent's service filter; empty = every service of the org.
    services: tuple[str, ...]
    revision: int
    stale: bool
    ready: bool
    redis_connected: bool
    db_connected: bool
    # Wall-clock time (the agent's) when it reached `revision`, and of this report.
    applied_at: float
    reported_at: float
    version: str

    def to_json(self) -> str:
        # Field by field, not dataclasses.asdict (which deep-copies): one report per change.
        return json.dumps({
            "agent": self.agent, "namespace": self.namespace, "org_id": self.org_id,
            "services": list(self.services), "revision": self.revision, "stale": self.stale,
            "ready": self.ready, "redis_connected": self.redis_connected,
            "db_connected": self.db_connected, "applied_at": self.applied_at,
            "reported_at": self.reported_at, "version": self.version,
        }, separators=(",", ":"))

    @classmethod
    def parse(cls, org_id: str, data: bytes | str) -> AgentReport | None:
        """The report in `data`, or None when it is not a well-formed report of `org_id`."""
        try:
            doc = json.loads(data)
            report = cls(
                agent=str(doc["agent"]), namespace=doc.get("namespace"), org_id=str(doc["org_id"]),
                services=tuple(doc.get("services") or ()), revision=int(doc["revision"]),
                stale=bool(doc["stale"]), ready=bool(doc["ready"]),
                redis_connected=bool(doc["redis_connected"]), db_connected=bool(doc["db_connected"]),
                applied_at=float(doc["applied_at"]), reported_at=float(doc["reported_at"]),
                version=str(doc.get("version", "")),
            )
        except (ValueError, KeyError, TypeError):
            return None
        names_ok = AGENT_NAME_RE.fullmatch(report.agent) and all(
            isinstance(s, str) and NAME_RE.fullmatch(s) for s in report.services)
        if report.org_id != org_id or not names_ok or report.revision < 0:
            return None
        return report

    def serves(self, service: str | None) -> bool:
        """Whether this agent serves `service` (None: any)."""
        return service is None or not self.services or service in self.services


class FleetReporter:
    """Writes this agent's report on every new snapshot and every `interval` ± JITTER when idle.

    The first idle report comes after a random 0..`interval` (a fleet started together
    does not report together), then every `interval` ± JITTER: never later than
    (1 + JITTER) × `interval`, well within the report's TTL of TTL_FACTOR × `interval`.
    """

    # Spread of the idle reports, a fraction of the interval.
    JITTER = 0.1

    def __init__(self, url: str, agent: str, namespace: str | None, services: Sequence[str],
                 interval: float, *, store: Store, status: SyncStatus, password_file: Path | None = None,
                 ca_file: Path | None = None, clock: Callable[[], float] = time.time,
                 rand: Callable[[float, float], float] = random.uniform) -> None:
        self._url, self._password_file, self._ca_file = url, password_file, ca_file
        self._org_id, self._agent, self._namespace = store.snapshot.org_id, agent, namespace
        self._services = tuple(services)
        self._interval = interval
        self._store, self._status = store, status
        self._clock = clock
        self._rand = rand
        self._phased = False  # an idle report has been written: the random phase is taken
        self._applied: tuple[int, float] = (-1, 0.0)  # (revision, when reached)
        self._failing = False
        self._index_due = -math.inf  # when the index entry must be written again (monotonic)
        self.reports = 0
        self.index_writes = 0  # for tests: reports that also wrote the index

    def report(self) -> AgentReport:
        """The report of this agent now."""
        snap = self._store.snapshot
        now = self._clock()
        if snap.revision != self._applied[0]:
            self._applied = (snap.revision, now)
        return AgentReport(
            agent=self._agent, namespace=self._namespace, org_id=self._org_id, services=self._services,
            revision=snap.revision, stale=snap.stale, ready=self._status.ready,
            redis_connected=self._status.redis_connected, db_connected=self._status.db_connected,
            applied_at=self._applied[1], reported_at=now, version=__version__,
        )

    async def run(self) -> None:
        """Report until cancelled; then delete the report (a stopped agent leaves at once)."""
        client = any_client(self._url, password_file=self._password_file, ca_file=self._ca_file, socket_timeout=2)
        try:
            generation, last, idle_report = -1, -math.inf, True
            while True:
                wait = last + MIN_GAP - time.monotonic()
                if wait > 0:
                    await anyio.sleep(wait)
                generation = self._store.snapshot.generation
                last = time.monotonic()
                await self._write(client, self.report(), index=idle_report)
                with anyio.move_on_after(self.idle_wait()) as idle:
                    await self._store.wait_newer(generation)
                idle_report = idle.cancelled_caught
                self._phased = self._phased or idle_report
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                try:
                    pipe = client.pipeline(transaction=False)
                    pipe.delete(agent_key(self._org_id, self._agent))
                    pipe.zrem(index_key(self._org_id), self._agent)
                    await pipe.execute()
                except REDIS_ERRORS:
                    pass
            with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                await client.aclose()

    def idle_wait(self) -> float:
        """Seconds until the next report if nothing changes: a random phase until the first
        idle report, then `interval` ± JITTER."""
        if self._phased:
            return jittered(self._interval, self.JITTER, self._rand)
        return float(self._rand(0.0, self._interval))

    async def _write(self, client: Redis | RedisCluster, report: AgentReport, *, index: bool) -> None:
        """SET the report; with `index` (the first and idle reports), or when the last index
        write is an interval old, or after a failure (the key may have expired and a reader
        pruned the member), ZADD the index too, in the same round trip."""
        ttl = self._interval * TTL_FACTOR
        key, ttl_ms = agent_key(self._org_id, self._agent), max(1, round(ttl * 1000))
        index = index or self._failing or time.monotonic() >= self._index_due
        try:
            if index:
                # Key first: a member of the index without its key is a gone agent.
                pipe = client.pipeline(transaction=False)
                pipe.set(key, report.to_json(), px=ttl_ms)
                pipe.zadd(index_key(self._org_id), {self._agent: report.reported_at + ttl})
                await pipe.execute()
                self._index_due = time.monotonic() + self._interval
                self.index_writes += 1
            else:
                await client.set(key, report.to_json(), px=ttl_ms)
        except REDIS_ERRORS as exc:
            if not self._failing:
                log.warning("cannot report this agent's revision to Redis (retrying every %.0fs): %s",
                            self._interval, f"{type(exc).__name__}: {exc}")
            self._failing = True
            return
        if self._failing:
            log.info("reporting this agent's revision to Redis again")
        self._failing = False
        self.reports += 1


class FleetReader:
    """Reads the live agents of an org (admin credentials: writers, `status`, the relay)."""

    def __init__(self, url: str, *, password_file: Path | None = None, ca_file: Path | None = None) -> None:
        self._client = any_client(url, password_file=password_file, ca_file=ca_file, socket_timeout=2)

    async def agents(self, org_id: str) -> list[AgentReport]:
        """Every live agent's report (key present), sorted by name; prunes gone members."""
        check_name("org", org_id)
        index = index_key(org_id)
        try:
            names = [n.decode() if isinstance(n, bytes) else str(n)
                     for n in await self._client.zrange(index, 0, -1)]
            reports: list[AgentReport] = []
            gone: list[str] = []
            for start in range(0, len(names), CHUNK):
                chunk = names[start:start + CHUNK]
                values = await self._client.mget([agent_key(org_id, n) for n in chunk])
                for name, data in zip(chunk, values, strict=True):
                    report = AgentReport.parse(org_id, data) if data is not None else None
                    if report is None or report.agent != name:
                        gone.append(name)
                    else:
                        reports.append(report)
            if gone:
                await self._prune(index, gone)
        except REDIS_ERRORS as exc:
            raise RedisError(f"cannot read the agents' reports from Redis: {type(exc).__name__}: {exc}") from exc
        return sorted(reports, key=lambda r: (r.namespace or "", r.agent))

    async def _prune(self, index: str, gone: list[str]) -> None:
        """Drop members whose report expired; a reader that may not write leaves them."""
        try:
            await self._client.zrem(index, *gone)
        except REDIS_ERRORS as exc:
            log.debug("cannot prune %d gone agent(s) from %s: %s", len(gone), index, exc)

    async def close(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> FleetReader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


@dataclass(frozen=True, slots=True)
class FleetProgress:
    """Where the fleet is with one revision: agents that serve it and those that lag."""

    revision: int
    service: str | None
    percent: float
    served: tuple[AgentReport, ...]
    lagging: tuple[AgentReport, ...]
    elapsed: float

    @property
    def total(self) -> int:
        return len(self.served) + len(self.lagging)

    @property
    def reached(self) -> bool:
        """PERCENT of the live agents serving `service` have `revision` (true for no agents)."""
        return len(self.served) >= math.ceil(self.total * self.percent / 100 - 1e-9)

    def line(self) -> str:
        share = 100.0 * len(self.served) / self.total if self.total else 100.0
        return (f"{len(self.served)}/{self.total} agents serve revision {self.revision} "
                f"({share:.0f}%, target {self.percent:g}%) after {self.elapsed:.2f}s")

    def to_dict(self) -> dict[str, Any]:
        return {"revision": self.revision, "service": self.service, "percent": self.percent,
                "reached": self.reached, "served": len(self.served), "total": self.total,
                "elapsed_s": round(self.elapsed, 3),
                "lagging": [asdict(r) | {"services": list(r.services)} for r in self.lagging]}


def progress(reports: Sequence[AgentReport], revision: int, service: str | None, percent: float,
             elapsed: float) -> FleetProgress:
    """Split the agents that serve `service` into those at `revision` or later and the rest."""
    mine = [r for r in reports if r.serves(service)]
    return FleetProgress(revision, service, percent,
                         tuple(r for r in mine if r.revision >= revision),
                         tuple(r for r in mine if r.revision < revision), elapsed)


async def wait_for_fleet(reader: FleetReader, org_id: str, revision: int, *, service: str | None = None,
                         percent: float = 100.0, wait_at_most: float = 30.0, poll: float = 0.05,
                         on_progress: Callable[[FleetProgress], None] | None = None) -> FleetProgress:
    """Poll the reports until PERCENT of the org's live agents (those serving `service`)
    report `revision` or later, or `wait_at_most` seconds pass; the last progress either way.

    The caller checks `.reached`. Polling costs two Redis round trips per `poll` seconds
    (ZRANGE + MGET per 1,000 agents).
    """
    if not 0 < percent <= 100:
        raise ValueError("percent must be in (0, 100]")
    start = time.monotonic()
    while True:
        state = progress(await reader.agents(org_id), revision, service, percent, time.monotonic() - start)
        if on_progress is not None:
            on_progress(state)
        if state.reached or state.elapsed >= wait_at_most:
            return state
        await anyio.sleep(min(poll, max(0.0, wait_at_most - state.elapsed)))


def describe_agent(report: AgentReport, now: float) -> str:
    """`ns/agent at revision R (stale, unready, redis down, db down), reported 3.2s ago`."""
    flags = [text for text, bad in (("stale", report.stale), ("unready", not report.ready),
                                    ("redis down", not report.redis_connected),
                                    ("db down", not report.db_connected)) if bad]
    who = f"{report.namespace}/{report.agent}" if report.namespace else report.agent
    return (f"{who} at revision {report.revision}{' (' + ', '.join(flags) + ')' if flags else ''}, "
            f"reported {max(0.0, now - report.reported_at):.1f}s ago")


def fleet_rows(reports: Sequence[AgentReport], org_revision: int, service_revisions: dict[str, int],
               now: float) -> list[dict[str, Any]]:
    """`config-agent status` rows, laggards first: most revisions behind, then stale, unready,
    disconnected, oldest report. `behind` counts against the newest change of the agent's
    services (of the org when it serves every service)."""
    rows = []
    for r in reports:
        target = max((service_revisions.get(s, 0) for s in r.services), default=0) if r.services \
            else org_revision
        rows.append(asdict(r) | {
            "services": list(r.services), "behind": max(0, target - r.revision),
            "report_age_s": round(max(0.0, now - r.reported_at), 1),
        })
    rows.sort(key=lambda row: (-row["behind"], not row["stale"], row["ready"],
                               row["redis_connected"] and row["db_connected"], -row["report_age_s"],
                               row["namespace"] or "", row["agent"]))
    return rows


def fleet_counts(rows: Sequence[dict[str, Any]]) -> tuple[int, int, int, int]:
    """(agents, behind, stale, unready) of `fleet_rows`: the summary of `status` and the relay."""
    return (len(rows), sum(1 for r in rows if r["behind"]), sum(1 for r in rows if r["stale"]),
            sum(1 for r in rows if not r["ready"]))
