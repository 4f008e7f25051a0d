"""Every Prometheus metric of SPEC §5, defined in one place. No values are ever exported."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from agent.store import Applied

# Commit → applied, in seconds; fine buckets below 100 ms where we live.
PROPAGATION_BUCKETS = (
    0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0, 60.0, 300.0,
)
SOURCES = ("pubsub", "reconcile", "poll", "warmload")
RESULTS = ("applied", "duplicate", "invalid", "foreign", "heartbeat")


class Metrics:
    """The metrics of one agent, on its own registry (several agents may share a process)."""

    def __init__(
        self,
        org_id: str,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # `_created` series double the scrape size and no alert or panel uses them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.org_id = org_id
        self.registry = registry if registry is not None else CollectorRegistry()
        self._clock = clock
        r = self.registry
        self.version = Gauge(
            "config_version", "Applied version of a config entry.",
            ["org_id", "service", "key"], registry=r,
        )
        self.revision = Gauge(
            "config_agent_revision", "Applied org revision.", ["org_id"], registry=r
        )
        self.ready = Gauge("config_agent_ready", "1 once the first full load is applied.", registry=r)
        self.stale = Gauge(
            "config_agent_stale", "1 while values may be out of date.", registry=r
        )
        self.redis_connected = Gauge(
            "config_agent_redis_connected",
            "1 while the Redis subscription hears (changes or the relay's heartbeats arrive).", registry=r
        )
        self.db_connected = Gauge(
            "config_agent_db_connected", "1 while the last PostgreSQL contact succeeded.",
            registry=r,
        )
        self.last_sync = Gauge(
            "config_agent_last_sync_timestamp_seconds",
            "Unix time of the last successful sync with PostgreSQL.", registry=r,
        )
        self.propagation = Histogram(
            "config_agent_propagation_seconds", "Commit time to applied in this agent.",
            buckets=PROPAGATION_BUCKETS, registry=r,
        )
        self.updates = Counter(
            "config_agent_updates", "Changes applied, by source.", ["source"], registry=r
        )
        self.drift = Counter(
            "config_agent_drift", "Changes found by reconcile that pub/sub had not delivered.",
            registry=r,
        )
        self.messages = Counter(
            "config_agent_messages", "Redis messages received, by result.", ["result"], registry=r
        )
        # The labelled children, looked up once: `labels()` takes a lock and builds a key
        # on every call, and these are touched for every message and every change.
        self.updates_by_source = {source: self.updates.labels(source=source) for source in SOURCES}
        self.messages_by_result = {result: self.messages.labels(result=result) for result in RESULTS}
        self.org_revision = self.revision.labels(org_id=org_id)
        self.db_refused = Counter(
            "config_agent_db_refused",
            "Connections PostgreSQL refused because it was full (too many clients, or the role's "
            "CONNECTION LIMIT); the agent retries within 2 s at most.", registry=r,
        )
        self.redis_deaf = Counter(
            "config_agent_redis_deaf",
            "Deaf spells: the Redis subscription heard neither a change nor a heartbeat for 3 "
            "heartbeat intervals (one per spell), or the server dropped its shard.", registry=r,
        )
        self.hook_runs = Counter(
            "config_agent_hook_runs", "Change hook runs, by hook (exec|signal|webhook) and result.",
            ["hook", "result"], registry=r,
        )
        # Outputs on disk (agent/status.py OutputHealth): failing writes and what is left out.
        self.files_ok = Gauge(
            "config_agent_files_ok", "0 while the file set cannot be written (it keeps the last "
            "complete one), else 1.", registry=r,
        )
        self.files_write_failures = Counter(
            "config_agent_files_write_failures", "Failed attempts to write the file set.", registry=r
        )
        self.files_skipped = Gauge(
            "config_agent_files_skipped", "Entries (for reason=occupied: top-level names) the "
            "current file set leaves out, by reason.", ["reason"], registry=r,
        )
        self.state_ok = Gauge(
            "config_agent_state_ok", "0 while the last-known-good snapshot cannot be saved (the "
            "previous one is kept), else 1.", registry=r,
        )
        self.state_write_failures = Counter(
            "config_agent_state_write_failures",
            "Failed attempts to save the last-known-good snapshot.", registry=r,
        )
        # The local API's self-defence (agent/sinks/protocol.py): a rising count means a
        # neighbour holds connections open or the limits are too low for the app.
        self.http_connections = Gauge(
            "config_agent_http_connections", "Open connections to the local API (TCP and socket).",
            registry=r,
        )
        self.http_rejected = Counter(
            "config_agent_http_rejected",
            "Local API connections and requests turned away, by reason (header_timeout, evicted, "
            "connection_limit, watch_limit).", ["reason"], registry=r,
        )
        # OpenFeature evaluations (agent/flags/): the labels are flag keys that exist as flags
        # (any other key counts as "(unknown)"), their variants and the reason; never values
        # or context, so the series are bounded by the flags the writers defined.
        self.flag_evaluations = Counter(
            "config_agent_flag_evaluations", "OFREP flag evaluations, by flag, variant and reason "
            "(STATIC, TARGETING_MATCH, DEFAULT, DISABLED, ERROR).", ["flag", "variant", "reason"], registry=r,
        )
        self.flag_errors = Counter(
            "config_agent_flag_errors", "OFREP flag evaluations that failed, by flag and error code "
            "(FLAG_NOT_FOUND, PARSE_ERROR, TARGETING_KEY_MISSING, GENERAL).", ["flag", "code"], registry=r,
        )

    def on_applied(self, applied: Applied, source: str) -> None:
        """Update gauges and the propagation histogram after a store apply."""
        snapshot = applied.snapshot
        now = self._clock()
        for change in applied.changes:
            if change.deleted:
                try:
                    self.version.remove(self.org_id, change.service, change.key)
                except KeyError:
                    pass
            else:
                self.version.labels(self.org_id, change.service, change.key).set(change.version)
            if source != "warmload" and change.committed_at is not None:
                self.propagation.observe(max(0.0, now - change.committed_at))
        if applied.changes:
            self.updates_by_source[source].inc(len(applied.changes))
        self.org_revision.set(snapshot.revision)
        self.stale.set(int(snapshot.stale))
        if snapshot.last_sync:
            self.last_sync.set(snapshot.last_sync)

    def set_versions(self, snapshot_entries: dict[tuple[str, str], int]) -> None:
        """Set every version gauge at once (after restoring a last-known-good snapshot)."""
        for (service, key), version in snapshot_entries.items():
            self.version.labels(self.org_id, service, key).set(version)
