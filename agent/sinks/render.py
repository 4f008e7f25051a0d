"""Bytes derived from one snapshot, prepared once and shared by every reader.

The HTTP API and the file set serve the same bytes (`configs.json` is exactly the
body of `GET /v1/configs`). A snapshot is immutable, so whatever we derive from it
is memoized in `Snapshot.cache` and dropped together with the snapshot.
"""

from __future__ import annotations

import json
from typing import Any

from agent.store import Snapshot


def dump_json(doc: Any) -> bytes:
    """Compact UTF-8 JSON, the wire form of every document we serve."""
    return json.dumps(doc, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def raw_value(value: Any) -> bytes:
    """A value as apps read it from `?format=raw` and `{service}/{key}` files.

    Strings are served as-is (a URL file holds just the URL); any other JSON value
    as its JSON text.
    """
    if isinstance(value, str):
        return value.encode()
    return dump_json(value)


def configs_body(snapshot: Snapshot) -> bytes:
    """The `GET /v1/configs` body and `configs.json` content (with a final newline)."""
    body = snapshot.cache.get("configs.json")
    if body is None:
        # A trailing newline keeps the file friendly to `cat` and text tools.
        body = dump_json(snapshot.document()) + b"\n"
        snapshot.cache["configs.json"] = body
    assert isinstance(body, bytes)
    return body


def service_bodies(snapshot: Snapshot) -> dict[str, bytes]:
    """`GET /v1/configs/{service}` bodies of every service, keyed by service name."""
    bodies = snapshot.cache.get("services")
    if bodies is None:
        configs = snapshot.document()["configs"]
        bodies = {service: dump_json(keys) + b"\n" for service, keys in configs.items()}
        snapshot.cache["services"] = bodies
    assert isinstance(bodies, dict)
    return bodies


def entry_body(snapshot: Snapshot, service: str, key: str) -> bytes | None:
    """`GET /v1/configs/{service}/{key}` body, or None when the entry does not exist."""
    entry = snapshot.entries.get((service, key))
    if entry is None:
        return None
    bodies: dict[tuple[str, str], bytes] = snapshot.cache.setdefault("entries", {})
    body = bodies.get((service, key))
    if body is None:
        doc = {"value": entry.value, "version": entry.version, "updated_at": entry.updated_at}
        body = dump_json(doc) + b"\n"
        bodies[(service, key)] = body
    return body


def raw_body(snapshot: Snapshot, service: str, key: str) -> bytes | None:
    """The bare value of one entry (`?format=raw`), or None when it does not exist."""
    entry = snapshot.entries.get((service, key))
    if entry is None:
        return None
    bodies: dict[tuple[str, str], bytes] = snapshot.cache.setdefault("raw", {})
    body = bodies.get((service, key))
    if body is None:
        body = raw_value(entry.value)
        bodies[(service, key)] = body
    return body
