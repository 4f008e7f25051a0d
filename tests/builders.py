"""Building changes as the database would deliver them (for tests that feed a Store directly)."""

from __future__ import annotations

from typing import Any

from agent.model import Change

STAMP = "2025-01-01T00:00:00+00:00"


def change(service: str, key: str, value: Any, version: int, revision: int, *, deleted: bool = False) -> Change:
    """A change as the database would deliver it."""
    return Change(service, key, value, version, revision, deleted, STAMP)
