"""Small immutable values shared by every stage: names, entries, changes, announcements."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

from agent.errors import UsageError

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
NAME_RULE = "must match ^[a-z0-9][a-z0-9_.-]{0,62}$"
MAX_VALUE_BYTES = 256 * 1024
CHANNEL_PREFIX = "config"
# Largest announcement we accept from Redis; real ones are ~150 bytes.
MAX_MESSAGE_BYTES = 1024
MAX_VERSION = 2**63 - 1
# An announcement's `ts` is the commit time on the database server's clock. More than
# this far ahead of ours is no clock skew but a forgery or a bug: the message is dropped.
MAX_TS_AHEAD = 24 * 3600.0


def check_name(kind: str, name: str) -> str:
    """Return `name` if it is a valid org/service/key name, else raise UsageError."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise UsageError(f"invalid {kind} {name!r}: {NAME_RULE}")
    return name


def encode_value(value: Any) -> str:
    """Serialize a config value as compact JSON, enforcing the size limit."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise UsageError(f"value is not JSON-serializable: {exc}") from exc
    size = len(text.encode())
    if size > MAX_VALUE_BYTES:
        raise UsageError(f"value is {size} bytes serialized; the limit is {MAX_VALUE_BYTES}")
    return text


def parse_value(text: str, *, as_string: bool = False) -> Any:
    """Parse a command-line value as JSON (or keep it a string with `as_string`)."""
    if as_string:
        value: Any = text
    else:
        try:
            value = json.loads(text, parse_constant=_reject_constant)
        except ValueError as exc:
            raise UsageError(
                f"value is not valid JSON ({exc.args[0]}); use --string to store it as text"
            ) from exc
    encode_value(value)
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def channel_for(org_id: str, service: str, key: str) -> str:
    """The Redis channel announcing changes of one entry."""
    return f"{CHANNEL_PREFIX}:{org_id}:{service}:{key}"


def org_pattern(org_id: str) -> str:
    """The Redis pattern covering every entry of one org (and its heartbeat channel)."""
    return f"{CHANNEL_PREFIX}:{org_id}:*"


def heartbeat_channel(org_id: str) -> str:
    """The classic-form channel of the relay's heartbeat for one org (inside `org_pattern`)."""
    return f"{CHANNEL_PREFIX}:{org_id}:heartbeat"


def sharded_channel(org_id: str) -> str:
    """The one sharded channel of an org in a Redis Cluster: the org is the hash tag."""
    return f"{CHANNEL_PREFIX}:{{{org_id}}}"


def heartbeat_json(org_id: str, ts: float) -> str:
    """The heartbeat message: who it is for and when it was sent; no entry, no value."""
    return json.dumps({"org_id": org_id, "heartbeat": ts}, separators=(",", ":"))


def is_heartbeat(channel: str | bytes, data: str | bytes, org_id: str) -> bool:
    """True for a heartbeat of `org_id` (classic channel, or the sharded one with no entry)."""
    if isinstance(channel, bytes | bytearray):
        channel = channel.decode(errors="replace")
    if channel == heartbeat_channel(org_id):
        return True
    if channel != sharded_channel(org_id) or len(data) > MAX_MESSAGE_BYTES:
        return False
    # On the sharded channel, announcements carry a "service" field and heartbeats do not.
    text = data.decode(errors="replace") if isinstance(data, bytes | bytearray) else data
    return '"heartbeat":' in text and '"service":' not in text


@dataclass(frozen=True, slots=True)
class Entry:
    """One applied config entry as the agent holds it (deleted entries are not held)."""

    service: str
    key: str
    value: Any
    version: int
    revision: int
    updated_at: str


@dataclass(frozen=True, slots=True)
class Change:
    """One row of the change log as fetched from PostgreSQL (a tombstone when `deleted`)."""

    service: str
    key: str
    value: Any
    version: int
    revision: int
    deleted: bool
    updated_at: str
    # Commit time as Unix seconds, when known (for the propagation histogram).
    committed_at: float | None = None

    def to_event(self) -> dict[str, Any]:
        """The SSE / hook representation of this change."""
        return {
            "service": self.service,
            "key": self.key,
            "version": self.version,
            "revision": self.revision,
            "value": None if self.deleted else self.value,
            "deleted": self.deleted,
        }


@dataclass(frozen=True, slots=True)
class Announcement:
    """A validated "entry X is now at version N" message (SPEC §2). Never carries a value."""

    org_id: str
    service: str
    key: str
    version: int
    revision: int
    ts: float

    def to_json(self) -> str:
        """The wire form published on Redis and in pg_notify."""
        return json.dumps(
            {
                "org_id": self.org_id,
                "service": self.service,
                "key": self.key,
                "version": self.version,
                "revision": self.revision,
                "ts": self.ts,
            },
            separators=(",", ":"),
        )

    @property
    def channel(self) -> str:
        """The Redis channel this announcement belongs on."""
        return channel_for(self.org_id, self.service, self.key)

    @property
    def sharded_channel(self) -> str:
        """The org's sharded channel (Redis Cluster), which carries every entry of the org."""
        return sharded_channel(self.org_id)


class InvalidMessage(ValueError):
    """A Redis message that is not a well-formed announcement."""


# One decoder for every message (json.loads with an option builds a new one per call,
# a fifth of the parse time in a flood); NaN and ±Infinity are not JSON.
_STRICT_JSON = json.JSONDecoder(parse_constant=_reject_constant)


def parse_announcement(channel: str | bytes | None, data: str | bytes, *,
                       now: float | None = None) -> Announcement:
    """Validate a raw message strictly; raise InvalidMessage naming the problem.

    `channel` is the Redis channel it arrived on (it must match the fields), or None
    for a pg_notify payload, which has no per-entry channel. `now` (default: the
    clock) bounds `ts`. Anything a stranger can publish on the org's channels ends
    here as InvalidMessage, never as another exception.
    """
    if isinstance(data, bytes | bytearray):
        if len(data) > MAX_MESSAGE_BYTES:
            raise InvalidMessage("message too large")
        try:
            data = data.decode()
        except UnicodeDecodeError as exc:
            raise InvalidMessage("message is not UTF-8") from exc
    if isinstance(channel, bytes | bytearray):
        channel = channel.decode(errors="replace")
    if len(data) > MAX_MESSAGE_BYTES:
        raise InvalidMessage("message too large")
    try:
        doc = _STRICT_JSON.decode(data)
    except (ValueError, RecursionError) as exc:
        raise InvalidMessage("message is not JSON") from exc
    if not isinstance(doc, dict):
        raise InvalidMessage("message is not a JSON object")
    names = {}
    for field in ("org_id", "service", "key"):
        value = doc.get(field)
        # fullmatch: NAME_RE's `$` would also accept a trailing newline.
        if not isinstance(value, str) or not NAME_RE.fullmatch(value):
            raise InvalidMessage(f"field {field!r} missing or invalid")
        names[field] = value
    numbers = {}
    for field in ("version", "revision"):
        value = doc.get(field)
        if type(value) is not int or not 1 <= value <= MAX_VERSION:
            raise InvalidMessage(f"field {field!r} missing or not a positive integer")
        numbers[field] = value
    ann = Announcement(
        org_id=names["org_id"],
        service=names["service"],
        key=names["key"],
        version=numbers["version"],
        revision=numbers["revision"],
        ts=_checked_ts(doc.get("ts", 0.0), time.time() if now is None else now),
    )
    if channel is not None and channel not in (ann.channel, ann.sharded_channel):
        raise InvalidMessage("channel does not match the message fields")
    return ann


def _checked_ts(ts: object, now: float) -> float:
    """`ts` as Unix seconds: a finite number from 0 to MAX_TS_AHEAD past `now`.

    Compared before any float conversion: an integer of 400 digits is valid JSON
    (and would overflow float()); booleans are not numbers here.
    """
    if type(ts) is not int and type(ts) is not float:
        raise InvalidMessage("field 'ts' is not a number")
    assert isinstance(ts, int | float)
    if not (0 <= ts <= now + MAX_TS_AHEAD):  # false for NaN too
        raise InvalidMessage("field 'ts' is not a plausible time (negative or over a day ahead)")
    return float(ts)
