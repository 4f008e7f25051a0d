#!/usr/bin/env python3
"""Reload configs.json whenever config-agent swaps the shared directory.

    pip install watchfiles
    python3 watch_files.py /etc/app-config            # the agent's CONFIG_AGENT_OUTPUT_DIR

The agent writes a whole new generation of files, then switches the `..data`
symlink with one rename (like Kubernetes projected volumes). The file
`configs.json` itself is never modified in place — its inode does not change
and a watch on the file would miss the swap — so we watch the directory and
re-read whenever `..data` moves. Prints `revision R: service.key = value` for
each value that changed (the current values first).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from watchfiles import watch


def load(directory: Path) -> dict[str, Any]:
    """configs.json, read through the `..data` link (always one complete generation)."""
    doc: dict[str, Any] = json.loads((directory / "configs.json").read_text())
    return doc


def values(doc: dict[str, Any]) -> dict[str, Any]:
    """{"ai.threshold": 0.9, …}"""
    return {
        f"{service}.{key}": entry["value"]
        for service, keys in doc["configs"].items()
        for key, entry in keys.items()
    }


def show(doc: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """Print the values that differ from `before`; return the new values."""
    now = values(doc)
    for name in sorted(now):
        if name not in before or before[name] != now[name]:
            print(f"revision {doc['revision']}: {name} = {json.dumps(now[name])}", flush=True)
    for name in sorted(before.keys() - now.keys()):
        print(f"revision {doc['revision']}: {name} deleted", flush=True)
    return now


def main(directory: Path) -> None:
    doc = load(directory)
    current = show(doc, {})
    revision = doc["revision"]
    print(f"# watching {directory}", flush=True)
    # yield_on_timeout: an empty batch every second, a cheap safety net for a swap
    # that happened before the watch was set up.
    for changes in watch(directory, recursive=False, debounce=50, step=20,
                         rust_timeout=1000, yield_on_timeout=True):
        # Only the rename of `..data` marks a complete new generation.
        if changes and not any(Path(path).name == "..data" for _, path in changes):
            continue
        try:
            doc = load(directory)
        except (OSError, ValueError) as exc:  # e.g. the directory was just removed
            print(f"# cannot read configs.json: {exc}", file=sys.stderr, flush=True)
            continue
        if doc["revision"] != revision:
            revision = doc["revision"]
            current = show(doc, current)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: watch_files.py OUTPUT_DIR")
    try:
        main(Path(sys.argv[1]))
    except KeyboardInterrupt:
        pass
