"""What changed between two snapshots, as told to change hooks (versions, never values)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from agent.store import Snapshot, Store


@dataclass(frozen=True, slots=True)
class ChangedEntry:
    """One entry that moved: its new version, or its tombstone."""

    service: str
    key: str
    version: int
    deleted: bool


@dataclass(frozen=True, slots=True)
class ChangeSummary:
    """The changes since the previous notification, newest version per entry."""

    org_id: str
    revision: int
    changes: tuple[ChangedEntry, ...]

    def merge(self, newer: ChangeSummary) -> ChangeSummary:
        """One summary covering this one and the `newer` one (a debounced burst)."""
        entries = {(c.service, c.key): c for c in self.changes}
        entries.update({(c.service, c.key): c for c in newer.changes})
        return ChangeSummary(
            newer.org_id, max(self.revision, newer.revision), tuple(sorted_entries(entries))
        )

    def to_json(self) -> bytes:
        """Webhook body: `{"org_id", "revision", "changes": […]}`."""
        return json.dumps(
            {
                "org_id": self.org_id,
                "revision": self.revision,
                "changes": [
                    {"service": c.service, "key": c.key, "version": c.version, "deleted": c.deleted}
                    for c in self.changes
                ],
            },
            separators=(",", ":"),
        ).encode()


def sorted_entries(entries: dict[tuple[str, str], ChangedEntry]) -> list[ChangedEntry]:
    """Entries in (service, key) order."""
    return [entries[ident] for ident in sorted(entries)]


def summarize(store: Store, old: Snapshot | None, new: Snapshot) -> ChangeSummary:
    """The entries that differ between `old` and `new` (everything when `old` is None).

    Uses the store's change log when it still covers the span (exact, includes
    tombstones), else compares the two snapshots.
    """
    entries: dict[tuple[str, str], ChangedEntry] = {}
    logged = store.changes_after(old.revision) if old is not None else None
    if logged is not None:
        for change in logged:
            if change.revision <= new.revision:
                entries[(change.service, change.key)] = ChangedEntry(
                    change.service, change.key, change.version, change.deleted
                )
    else:
        before = old.entries if old is not None else {}
        for ident, entry in new.entries.items():
            previous = before.get(ident)
            if previous is None or previous.version != entry.version:
                entries[ident] = ChangedEntry(entry.service, entry.key, entry.version, False)
        for ident in before.keys() - new.entries.keys():
            service, key = ident
            entries[ident] = ChangedEntry(service, key, store.version_of(service, key), True)
    return ChangeSummary(new.org_id, new.revision, tuple(sorted_entries(entries)))
