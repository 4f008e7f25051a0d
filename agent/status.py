"""Sync state shared between the sync loop (writer) and the status/metrics readers."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

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

    def count_deaf(self) -> None:
        """Count one deaf subscription made again."""
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
            "redis_deaf": int(self.metrics.registry.get_sample_value("config_agent_redis_deaf_total") or 0),
        }
