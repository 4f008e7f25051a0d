"""The last-known-good snapshot in the state directory: written atomically, read at start.

A save writes a fresh temporary file, fsyncs it and renames it over the old one, so
a crash, a full disk or a short write leaves the previous snapshot whole. A load
checks everything as the database's constraints would (names, positive versions
and revisions, the org, value sizes): the file may have been tampered with, and
its names become paths in the file set. A snapshot that fails any check is
ignored with one line, and the agent loads afresh from PostgreSQL.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from agent.errors import UsageError
from agent.model import MAX_VERSION, NAME_RE, Entry, encode_value
from agent.store import Snapshot

log = logging.getLogger("agent.state")
FILENAME = "last-known-good.json"
FORMAT = 1
ENTRY_FIELDS = {"service", "key", "value", "version", "revision", "updated_at"}


class InvalidSnapshot(ValueError):
    """A saved snapshot that cannot be trusted (unreadable, truncated, tampered with)."""


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write `data` to `path` so a reader (or a crash) sees the old or the new file, never half.

    On any failure the temporary file is removed and `path` is untouched.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:  # a nearly full disk writes short before it fails: never stop early
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(Path(tmp))
        raise
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
    """The saved entries and revision, or None when absent or not to be trusted."""
    path = state_dir / FILENAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("ignoring the last-known-good snapshot %s: cannot read it: %s", path, exc)
        return None
    try:
        return parse_snapshot(raw, org_id)
    except InvalidSnapshot as exc:
        log.warning("ignoring the last-known-good snapshot %s: %s; the next load from "
                    "PostgreSQL replaces it", path, exc)
        return None


def remove_temporary_files(state_dir: Path) -> None:
    """Delete the temporary files of saves a crash interrupted (call before the first save)."""
    try:
        names = os.listdir(state_dir)
    except OSError:
        return
    for name in names:
        if name.startswith(f".{FILENAME}.") and name.endswith(".tmp"):
            _unlink_quietly(state_dir / name)


def parse_snapshot(raw: bytes, org_id: str) -> tuple[list[Entry], int]:
    """Entries and revision of a saved snapshot of `org_id`; InvalidSnapshot if anything is off."""
    try:
        doc: Any = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise InvalidSnapshot(f"not valid JSON (truncated or corrupt): {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise InvalidSnapshot(f"not a format-{FORMAT} snapshot")
    if doc.get("org_id") != org_id:
        raise InvalidSnapshot(f"it belongs to another org, not {org_id}")
    revision = _number(doc.get("revision"), "revision", minimum=0)
    if not isinstance(doc.get("entries"), list):
        raise InvalidSnapshot("no list of entries")
    entries = [_entry(item, n, revision) for n, item in enumerate(doc["entries"])]
    if len({(e.service, e.key) for e in entries}) != len(entries):
        raise InvalidSnapshot("an entry appears twice")
    return entries, revision


def _entry(item: Any, n: int, revision: int) -> Entry:
    """One saved entry, checked like a database row."""
    if not isinstance(item, dict) or set(item) != ENTRY_FIELDS:
        raise InvalidSnapshot(f"entry {n} does not have exactly the fields {sorted(ENTRY_FIELDS)}")
    for field in ("service", "key"):
        if not isinstance(item[field], str) or not NAME_RE.fullmatch(item[field]):
            raise InvalidSnapshot(f"entry {n} has an invalid {field} name")
    entry_revision = _number(item["revision"], f"entry {n} revision", minimum=1)
    if entry_revision > revision:
        raise InvalidSnapshot(f"entry {n} is newer than the snapshot's revision")
    if not isinstance(item["updated_at"], str) or len(item["updated_at"]) > 64:
        raise InvalidSnapshot(f"entry {n} has an invalid updated_at")
    try:
        encode_value(item["value"])
        if _has_nul(item["value"]):  # PostgreSQL's jsonb refuses \u0000 anywhere; so do we
            raise UsageError("a NUL character")
    except UsageError as exc:  # its message names a size or a type, never the value
        raise InvalidSnapshot(f"entry {n} has an invalid value: {exc}") from None
    except (UnicodeEncodeError, RecursionError):
        raise InvalidSnapshot(f"entry {n} has a value that is not UTF-8 JSON") from None
    return Entry(service=item["service"], key=item["key"], value=item["value"],
                 version=_number(item["version"], f"entry {n} version", minimum=1),
                 revision=entry_revision, updated_at=item["updated_at"])


def _number(value: Any, what: str, *, minimum: int) -> int:
    """An integer in minimum..MAX_VERSION (bool and float are not integers here)."""
    if type(value) is not int or not minimum <= value <= MAX_VERSION:
        raise InvalidSnapshot(f"{what} is not an integer in {minimum}..{MAX_VERSION}")
    return value


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\0" in value
    if isinstance(value, list):
        return any(_has_nul(item) for item in value)
    if isinstance(value, dict):
        return any("\0" in key or _has_nul(item) for key, item in value.items())
    return False


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
