#!/usr/bin/env python3
"""Follow config changes by long-polling the local config-agent (standard library only).

    python3 longpoll.py                      # every entry
    python3 longpoll.py ai threshold         # one entry
    CONFIG_AGENT_URL=http://127.0.0.1:8790 python3 longpoll.py

Prints `service.key = value (version N)` once for the current values, then again
whenever a value changes. `GET /v1/configs?after=R&wait=30` answers as soon as
the org revision passes R (200 with the whole document), or 304 after 30 s.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

BASE_URL = os.environ.get("CONFIG_AGENT_URL", "http://127.0.0.1:8790").rstrip("/")
WAIT_SECONDS = 30


def fetch(after: int | None) -> dict[str, Any] | None:
    """The configs document, or None when nothing changed within the wait (304)."""
    url = f"{BASE_URL}/v1/configs"
    if after is not None:
        url += f"?after={after}&wait={WAIT_SECONDS}"
    try:
        # The client timeout must outlast the server-side wait.
        with urllib.request.urlopen(url, timeout=WAIT_SECONDS + 10) as response:
            doc: dict[str, Any] = json.load(response)
            return doc
    except urllib.error.HTTPError as exc:
        if exc.code == 304:
            return None
        raise


def flatten(doc: dict[str, Any]) -> dict[str, tuple[Any, int]]:
    """{"ai.threshold": (0.9, 5), …}"""
    return {
        f"{service}.{key}": (entry["value"], entry["version"])
        for service, keys in doc["configs"].items()
        for key, entry in keys.items()
    }


def main(argv: list[str]) -> None:
    wanted = ".".join(argv[:2]) if len(argv) >= 2 else None
    seen: dict[str, tuple[Any, int]] = {}
    revision: int | None = None
    while True:
        try:
            doc = fetch(revision)
        except (OSError, ValueError) as exc:  # agent restarting: keep the old values, retry
            print(f"# agent unreachable ({exc}); retrying", file=sys.stderr, flush=True)
            time.sleep(1)
            continue
        if doc is None:
            continue
        revision = doc["revision"]
        current = flatten(doc)
        for name, (value, version) in sorted(current.items()):
            if seen.get(name) != (value, version) and wanted in (None, name):
                print(f"{name} = {json.dumps(value)} (version {version})", flush=True)
        for name in sorted(seen.keys() - current.keys()):
            if wanted in (None, name):
                print(f"{name} deleted", flush=True)
        seen = current


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:
        pass
