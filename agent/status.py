"""Sync state shared between the sync loop (writer) and the status/metrics readers."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter, Gauge

from agent.metrics import RESULTS, SOURCES, Metrics
from agent.store import Snapshot


@dataclass
class SyncStatus:
    """Mutable connection and counter state of one agent; updates metrics as it changes."""

    metrics: Metrics
    started_at: float = field(default_factory=time.time)
    redis_connected: bool = False
    db_connected: bool = False
    ready: bool = False
    last_error: str | None = None
    # The outputs on disk; their writers report every attempt here.
    files: OutputHealth = field(init=False)
    state: OutputHealth = field(init=False)

    def __post_init__(self) -> None:
        m = self.metrics
        self.files = OutputHealth(m.files_ok, m.files_write_failures, m.files_skipped)
        self.state = OutputHealth(m.state_ok, m.state_write_failures)

    def set_redis(self, connected: bool) -> None:
        """Record whether the Redis subscription is live."""
        self.redis_connected = connected
        self.metrics.redis_connected.set(int(connected))

    def set_db(self, connected: bool, error: str | None = None) -> None:
        """Record whether the last PostgreSQL contact succeeded."""
        self.db_connected = connected
        if error is not None:
            self.last_error = error
        self.metrics.db_connected.set(int(connected))

    def set_ready(self, ready: bool) -> None:
        """Record readiness (first full load applied and written out)."""
        self.ready = ready
        self.metrics.ready.set(int(ready))

    def count_message(self, result: str) -> None:
        """Count one Redis message by result (applied|duplicate|invalid|foreign)."""
        self.metrics.messages_by_result[result].inc()

    def count_db_refused(self) -> None:
        """Count one connection PostgreSQL refused because it was full."""
        self.metrics.db_refused.inc()

    def count_deaf(self) -> None:
        """Count one deaf spell (or a shard subscription the server dropped)."""
        self.metrics.redis_deaf.inc()

    def count_drift(self, changes: int) -> None:
        """Count changes that reconcile found but pub/sub had not delivered."""
        self.metrics.drift.inc(changes)

    def _counts(self, name: str, label: str, values: tuple[str, ...]) -> dict[str, int]:
        registry = self.metrics.registry
        counts = {v: int(registry.get_sample_value(name, {label: v}) or 0) for v in values}
        return {v: n for v, n in counts.items() if n}

    def document(self, snapshot: Snapshot) -> dict[str, Any]:
        """The `GET /v1/status` document (no values)."""
        return {
            "org_id": snapshot.org_id,
            "ready": self.ready,
            "revision": snapshot.revision,
            "stale": snapshot.stale,
            "entries": len(snapshot.entries),
            "redis_connected": self.redis_connected,
            "db_connected": self.db_connected,
            "last_sync": snapshot.last_sync or None,
            "started_at": self.started_at,
            "last_error": self.last_error,
            # Counters live in the metrics (one source of truth); only non-zero ones shown.
            "messages": self._counts("config_agent_messages_total", "result", RESULTS),
            "updates": self._counts("config_agent_updates_total", "source", SOURCES),
            "drift": int(self.metrics.registry.get_sample_value("config_agent_drift_total") or 0),
            "files": self.files.document(),
            "state": self.state.document(),
            "redis_deaf": int(self.metrics.registry.get_sample_value("config_agent_redis_deaf_total") or 0),
        }


@dataclass
class OutputHealth:
    """Whether one output on disk (the file set, the last-known-good snapshot) is written.

    A failed write keeps the previous complete output in place, so `ok: false` means
    "older than what HTTP serves", never "broken". Writers may report from a worker
    thread: every field is replaced whole.
    """

    ok_gauge: Gauge
    failures: Counter
    skipped_gauge: Gauge | None = None
    # False until the agent builds this output (its status field is then null).
    enabled: bool = False
    ok: bool = True
    # Revision of the last complete write.
    revision: int | None = None
    last_error: str | None = None
    failing_since: float | None = None
    skipped: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ok_gauge.set(1)

    def succeeded(self, revision: int) -> bool:
        """Record a complete write of `revision`; True when it ends a run of failures."""
        recovered = not self.ok
        self.ok, self.revision, self.failing_since = True, revision, None
        self.ok_gauge.set(1)
        return recovered

    def failed(self, error: str) -> bool:
        """Record a failed attempt; True when it starts a run of failures."""
        first = self.ok
        if first:
            self.failing_since = time.time()
        self.ok, self.last_error = False, error
        self.failures.inc()
        self.ok_gauge.set(0)
        return first

    def set_skipped(self, counts: dict[str, int], reasons: tuple[str, ...]) -> None:
        """Record how many entries are left out, by reason (every reason is exported)."""
        self.skipped = {reason: n for reason, n in counts.items() if n}
        if self.skipped_gauge is not None:
            for reason in reasons:
                self.skipped_gauge.labels(reason=reason).set(counts.get(reason, 0))

    def document(self) -> dict[str, Any] | None:
        """This output's part of `GET /v1/status` (None when the output is off)."""
        if not self.enabled:
            return None
        failures = sum(s.value for m in self.failures.collect() for s in m.samples
                       if s.name.endswith("_total"))
        return {
            "ok": self.ok,
            "revision": self.revision,
            "last_error": self.last_error,
            "failing_since": self.failing_since,
            "failures": int(failures),
            "skipped": dict(self.skipped),
        }
