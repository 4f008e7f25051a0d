"""The in-memory snapshot: the only write path, monotonic versions, watchers.

Every source (warm-load, pub/sub delta, reconcile, fallback poll, last-known-good
restore) calls `Store.apply()`; every sink (HTTP, files, hooks, metrics) reads
immutable `Snapshot`s and waits for new ones with `Store.wait_newer()`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import anyio

from agent.model import Change, Entry

EntryKey = tuple[str, str]
# How many applied changes are kept for SSE resume (Last-Event-ID).
DEFAULT_HISTORY = 10_000


@dataclass(frozen=True)
class Snapshot:
    """An immutable view of everything the agent serves at one moment."""

    org_id: str
    revision: int
    entries: Mapping[EntryKey, Entry]
    stale: bool
    # True once a full load (database or last-known-good) has been applied.
    loaded: bool
    # Increases on every new snapshot (revision or staleness changed).
    generation: int
    # Wall-clock time of the last successful sync with PostgreSQL (0 = never).
    last_sync: float = 0.0
    # Sinks memoize what they derive from a snapshot here (bytes served per request).
    cache: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def document(self) -> dict[str, Any]:
        """The SPEC §4 document served as `GET /v1/configs` and `configs.json`."""
        configs: dict[str, dict[str, Any]] = {}
        for (service, key), entry in sorted(self.entries.items()):
            configs.setdefault(service, {})[key] = {
                "value": entry.value,
                "version": entry.version,
                "updated_at": entry.updated_at,
            }
        return {
            "org_id": self.org_id,
            "revision": self.revision,
            "stale": self.stale,
            "configs": configs,
        }


@dataclass(frozen=True, slots=True)
class Applied:
    """What one `apply()` changed: the changes in revision order and the new snapshot."""

    changes: list[Change]
    snapshot: Snapshot


class Store:
    """Holds the current snapshot; `apply()` is the only way to change it."""

    def __init__(
        self,
        org_id: str,
        *,
        on_applied: Callable[[Applied, str], None] | None = None,
        clock: Callable[[], float] = time.time,
        history: int = DEFAULT_HISTORY,
    ) -> None:
        self._on_applied = on_applied
        self._clock = clock
        self._versions: dict[EntryKey, int] = {}  # includes deleted entries (tombstones)
        self._recent: deque[Change] = deque(maxlen=history)
        # Revision before the oldest change in `_recent`: replay is complete after it.
        self._recent_floor = 0
        self._snapshot = Snapshot(
            org_id=org_id,
            revision=0,
            entries=MappingProxyType({}),
            stale=False,
            loaded=False,
            generation=0,
        )
        self._event = anyio.Event()

    @property
    def snapshot(self) -> Snapshot:
        """The current immutable snapshot."""
        return self._snapshot

    def apply(
        self, changes: Iterable[Change], *, revision: int, source: str, synced: bool = True
    ) -> Applied:
        """Apply fetched changes atomically; return those that moved an entry forward.

        `revision` is the org revision the fetch observed; the snapshot revision never
        moves backwards, nor does any entry's version. `synced` records a successful
        contact with PostgreSQL (clears staleness).
        """
        current = self._snapshot
        entries = dict(current.entries)
        applied: list[Change] = []
        for change in sorted(changes, key=lambda c: c.revision):
            ident = (change.service, change.key)
            if change.version <= self._versions.get(ident, 0):
                continue
            self._versions[ident] = change.version
            if change.deleted:
                entries.pop(ident, None)
            else:
                entries[ident] = Entry(
                    service=change.service,
                    key=change.key,
                    value=change.value,
                    version=change.version,
                    revision=change.revision,
                    updated_at=change.updated_at,
                )
            applied.append(change)
        new_revision = max(current.revision, revision, *(c.revision for c in applied))
        stale = False if synced else current.stale
        last_sync = self._clock() if synced else current.last_sync
        changed = applied or new_revision != current.revision or stale != current.stale
        if changed or not current.loaded:
            if current.loaded:
                # Only changes after the first full load are replayable history.
                self._recent.extend(applied)
                if len(self._recent) == self._recent.maxlen:
                    self._recent_floor = self._recent[0].revision - 1
            else:
                self._recent_floor = new_revision
            snapshot = replace(
                current,
                revision=new_revision,
                entries=MappingProxyType(entries) if applied else current.entries,
                stale=stale,
                loaded=True,
                generation=current.generation + 1,
                last_sync=last_sync,
                cache={},
            )
            self._publish(snapshot)
        elif synced:
            # Same content; only remember the sync time (no new generation for watchers).
            self._snapshot = replace(current, last_sync=last_sync)
        result = Applied(changes=applied, snapshot=self._snapshot)
        if self._on_applied is not None:
            self._on_applied(result, source)
        return result

    def restore(self, snapshot_entries: Sequence[Entry], *, revision: int) -> Snapshot:
        """Load a last-known-good snapshot at start (flagged stale until a real sync)."""
        if self._snapshot.loaded:
            return self._snapshot
        entries = {(e.service, e.key): e for e in snapshot_entries}
        self._versions = {ident: e.version for ident, e in entries.items()}
        self._recent_floor = revision
        snapshot = replace(
            self._snapshot,
            revision=revision,
            entries=MappingProxyType(entries),
            stale=True,
            loaded=True,
            generation=self._snapshot.generation + 1,
            cache={},
        )
        self._publish(snapshot)
        return snapshot

    def set_stale(self, stale: bool) -> None:
        """Flag (or clear) staleness; watchers see a new generation when it changes."""
        current = self._snapshot
        if current.stale != stale and current.loaded:
            self._publish(replace(current, stale=stale, generation=current.generation + 1, cache={}))

    def version_of(self, service: str, key: str) -> int:
        """The applied version of an entry (0 when unknown; tombstones count)."""
        return self._versions.get((service, key), 0)

    def changes_after(self, revision: int) -> list[Change] | None:
        """Applied changes with a revision above `revision`, or None if no longer held."""
        if revision < self._recent_floor:
            return None
        return [c for c in self._recent if c.revision > revision]

    async def wait_newer(self, generation: int) -> Snapshot:
        """Wait until the snapshot generation exceeds `generation`; return that snapshot."""
        while self._snapshot.generation <= generation:
            await self._event.wait()
        return self._snapshot

    def _publish(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        event, self._event = self._event, anyio.Event()
        event.set()
