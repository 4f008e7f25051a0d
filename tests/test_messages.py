"""Nothing an outsider publishes can crash the agent or change a value; order never goes backwards."""

from __future__ import annotations

import json
import random
from typing import Any

import anyio
import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.db.writer import ConfigWriter
from agent.model import Change, InvalidMessage, parse_announcement
from agent.redis_client import redis_client
from agent.store import Store
from tests.agent_harness import agent_state, eventually, metric, running_agent

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)


@given(channel=st.binary(max_size=80) | st.text(max_size=80), data=st.binary(max_size=2000))
@settings(max_examples=500, deadline=None)
def test_parse_never_raises_anything_but_invalid_message(channel: Any, data: bytes) -> None:
    try:
        ann = parse_announcement(channel, data)
    except InvalidMessage:
        return
    assert ann.version >= 1 and ann.revision >= 1


@given(doc=st.dictionaries(st.sampled_from(["org_id", "service", "key", "version", "revision", "ts", "x"]),
                           json_values, max_size=7))
@settings(max_examples=500, deadline=None)
def test_parse_accepts_only_well_typed_objects(doc: dict[str, Any]) -> None:
    channel = f"config:{doc.get('org_id')}:{doc.get('service')}:{doc.get('key')}"
    try:
        ann = parse_announcement(channel, json.dumps(doc))
    except InvalidMessage:
        return
    assert type(doc["version"]) is int and doc["version"] >= 1
    assert type(doc["revision"]) is int and doc["revision"] >= 1
    assert ann.channel == channel


def hostile_messages(org: str, rng: random.Random) -> list[tuple[str, bytes]]:
    """10,000 malformed, foreign, oversized and out-of-range messages for org's channels."""
    good = {"org_id": org, "service": "ai", "key": "t", "version": 1, "revision": 1, "ts": 1.0}
    channel = f"config:{org}:ai:t"
    kinds = [
        lambda: (channel, b"not json"),
        lambda: (channel, b"\xff\xfe\x00"),
        lambda: (channel, b"[1, 2, 3]"),
        lambda: (channel, json.dumps({**good, "version": "5"}).encode()),
        lambda: (channel, json.dumps({**good, "version": -rng.randint(1, 10**6)}).encode()),
        lambda: (channel, json.dumps({**good, "version": 10**30}).encode()),
        lambda: (channel, json.dumps({**good, "revision": 2**64}).encode()),
        lambda: (channel, json.dumps({**good, "version": 1.5}).encode()),
        lambda: (channel, json.dumps({**good, "ts": "now"}).encode()),
        lambda: (channel, json.dumps({**good, "key": "other"}).encode()),          # channel mismatch
        lambda: (f"config:{org}:ai:x", json.dumps({**good, "org_id": "evil"}).encode()),  # mismatch
        lambda: (channel, b"{" * 5000),
        lambda: (channel, json.dumps({**good, "pad": "x" * 4_000}).encode()),     # oversized
        lambda: (channel, json.dumps({k: v for k, v in good.items() if k != "version"}).encode()),
        lambda: (channel, json.dumps({**good, "version": True}).encode()),
        lambda: (channel, json.dumps({**good, "service": "../etc"}).encode()),
        lambda: (channel, b'{"version": NaN}'),
        lambda: (channel, json.dumps({**good, "version": 1, "revision": 1}).encode()),  # stale duplicate
    ]
    return [rng.choice(kinds)() for _ in range(10_000)]


@pytest.mark.anyio
async def test_10000_hostile_messages_change_nothing(db: asyncpg.Connection, db_url: str,
                                                     redis_url: str, org: str) -> None:
    writer = await ConfigWriter.open(db_url)
    await writer.set(org, "ai", "t", 0.5, actor="t")
    await writer.set(org, "ai", "t", 0.6, actor="t")
    await writer.close()
    messages = hostile_messages(org, random.Random(7))
    async with running_agent(org_id=org, database_url=db_url, redis_url=redis_url) as agent:
        before = agent_state(agent)
        client = redis_client(redis_url)
        pipe = client.pipeline(transaction=False)
        for channel, data in messages:
            pipe.publish(channel, data)
        await pipe.execute()
        await client.publish(f"config:{org}:ai:t", json.dumps(
            {"org_id": org, "service": "ai", "key": "t", "version": 2, "revision": 2, "ts": 0}))
        await client.aclose()
        results = ("applied", "duplicate", "invalid", "foreign")

        def total() -> float:
            return sum(metric(agent, "config_agent_messages_total", {"result": r}) for r in results)

        await eventually(lambda: total() == len(messages) + 1, 20, "every message counted")
        assert agent_state(agent) == before
        assert agent.status.ready and not agent.store.snapshot.stale
        assert metric(agent, "config_agent_messages_total", {"result": "invalid"}) > 8000
        assert metric(agent, "config_agent_messages_total", {"result": "duplicate"}) >= 1


def change(version: int, revision: int, value: Any) -> Change:
    return Change("ai", "t", value, version, revision, False, "2026-01-01T00:00:00+00:00")


def test_store_never_moves_backwards() -> None:
    store = Store("acme")
    store.apply([change(3, 3, "v3")], revision=3, source="warmload")
    result = store.apply([change(2, 2, "v2"), change(1, 1, "v1")], revision=2, source="pubsub")
    assert result.changes == [] and store.snapshot.revision == 3
    assert store.snapshot.entries[("ai", "t")].value == "v3"
    store.apply([change(5, 7, "v5"), change(4, 6, "v4")], revision=7, source="pubsub")
    assert store.snapshot.entries[("ai", "t")].value == "v5"
    tomb = Change("ai", "t", None, 6, 8, True, "x")
    store.apply([tomb], revision=8, source="pubsub")
    store.apply([change(5, 7, "v5")], revision=7, source="pubsub")
    assert ("ai", "t") not in store.snapshot.entries, "an old change must not resurrect a deleted entry"


@pytest.mark.anyio
async def test_out_of_order_and_duplicate_announcements(db: asyncpg.Connection, db_url: str,
                                                        redis_url: str, org: str) -> None:
    writer = await ConfigWriter.open(db_url)
    for v in range(1, 6):
        await writer.set(org, "ai", "t", v, actor="t")
    await writer.close()
    async with running_agent(org_id=org, database_url=db_url, redis_url=redis_url) as agent:
        assert agent_state(agent) == {("ai", "t"): (5, 5)}
        client = redis_client(redis_url)
        for version in (3, 1, 5, 4, 5, 2):
            await client.publish(f"config:{org}:ai:t", json.dumps(
                {"org_id": org, "service": "ai", "key": "t", "version": version, "revision": version, "ts": 0}))
        # An announcement ahead of the database (publish before commit visible): fetched, retried, not applied.
        await client.publish(f"config:{org}:ai:t", json.dumps(
            {"org_id": org, "service": "ai", "key": "t", "version": 9, "revision": 9, "ts": 0}))
        await client.aclose()
        await eventually(lambda: metric(agent, "config_agent_messages_total", {"result": "duplicate"}) == 6, 5)
        await anyio.sleep(0.5)
        assert agent_state(agent) == {("ai", "t"): (5, 5)}
        assert agent.store.snapshot.revision == 5


def test_a_name_with_a_trailing_newline_is_refused_everywhere() -> None:
    # Python's `$` matches before a final newline: every check must use fullmatch.
    from agent.errors import UsageError
    from agent.model import check_name
    from agent.settings import load_settings

    with pytest.raises(UsageError):
        check_name("service", "ai\n")
    with pytest.raises(UsageError, match="CONFIG_AGENT_ORG_ID"):
        load_settings(org_id="acme\n")
