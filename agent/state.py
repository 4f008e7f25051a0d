"""The last-known-good snapshot in the state directory: written atomically, read at start."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from agent.model import Entry
from agent.store import Snapshot

log = logging.getLogger("agent.state")
FILENAME = "last-known-good.json"
FORMAT = 1


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write `data` to `path` so a reader (or a crash) sees the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_snapshot(state_dir: Path, snapshot: Snapshot) -> None:
    """Persist the snapshot (values included: the state dir is the pod's own volume)."""
    doc = {
        "format": FORMAT,
        "org_id": snapshot.org_id,
        "revision": snapshot.revision,
        "entries": [
            {"service": e.service, "key": e.key, "value": e.value, "version": e.version,
             "revision": e.revision, "updated_at": e.updated_at}
            for e in snapshot.entries.values()
        ],
    }
    state_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(state_dir / FILENAME, json.dumps(doc, separators=(",", ":")).encode())


def load_snapshot(state_dir: Path, org_id: str) -> tuple[list[Entry], int] | None:
    """The saved entries and revision, or None when absent, unreadable or another org's."""
    path = state_dir / FILENAME
    try:
        doc: Any = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable last-known-good snapshot %s: %s", path, exc)
        return None
    try:
        if doc["format"] != FORMAT or doc["org_id"] != org_id:
            log.warning("ignoring last-known-good snapshot of another org or format")
            return None
        entries = [
            Entry(service=str(e["service"]), key=str(e["key"]), value=e["value"],
                  version=int(e["version"]), revision=int(e["revision"]),
                  updated_at=str(e["updated_at"]))
            for e in doc["entries"]
        ]
        return entries, int(doc["revision"])
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("ignoring malformed last-known-good snapshot %s: %s", path, exc)
        return None
