"""Redis abuse against a real agent and a real Redis (issue 14, item 6).

Anyone who may PUBLISH on an org's channels can send anything there. Whatever it is —
a 20 MB message, a flood of 10k messages/s, numbers out of range or of the wrong type,
a `ts` from the far future or NaN, junk on the heartbeat channel — it is dropped and
counted, nothing the agent serves changes, no query is sent for it, the propagation
histogram records nothing from it, and real changes still arrive in milliseconds.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from typing import Any

import anyio
import asyncpg
import pytest

from agent.app import Agent
from agent.db.writer import ConfigWriter
from agent.redis_client import redis_client
from tests.agent_harness import agent_state, eventually, metric, running_agent

pytestmark = pytest.mark.anyio

RESULTS = ("applied", "duplicate", "invalid", "foreign", "heartbeat")
# Real change → applied, during the flood. 100 ms is the target; see test_flood.
FLOOD_BOUND_SECONDS = 0.1


def counted(agent: Agent, *results: str) -> float:
    return sum(metric(agent, "config_agent_messages_total", {"result": r}) for r in results or RESULTS)


def observed(agent: Agent) -> float:
    """How many propagation times the histogram holds."""
    return metric(agent, "config_agent_propagation_seconds_count")


async def seed(db_url: str, org: str) -> None:
    async with await ConfigWriter.open(db_url) as w:
        await w.set(org, "ai", "threshold", 0.75, actor="test")
        await w.set(org, "email", "max_retries", 3, actor="test")


def hostile_announcements(org: str) -> list[tuple[str, bytes]]:
    """Announcements of a next version of ai.threshold, each wrong in one field."""
    channel = f"config:{org}:ai:threshold"
    now = time.time()
    good: dict[str, Any] = {"org_id": org, "service": "ai", "key": "threshold", "version": 2,
                            "revision": 3, "ts": now}
    docs: list[dict[str, Any]] = []
    for field in ("version", "revision"):
        for bad in (2**63, 2**64, 10**30, 2.0, 2.5, 1e300, True, False, "2", -2, 0, None, [2], {"v": 2}):
            docs.append({**good, field: bad})
    for bad_ts in (now + 10 * 365 * 86400, now + 2 * 86400, 1e300, -1, -1e300, True, "now", None):
        docs.append({**good, "ts": bad_ts})
    messages = [(channel, json.dumps(doc).encode()) for doc in docs]
    text = json.dumps(good)
    ts_token = f'"ts": {now}'
    assert ts_token in text
    # JSON tokens Python's json would accept by default, and a 400-digit integer.
    for token in ("NaN", "Infinity", "-Infinity", "1" + "0" * 400, "1e400", "-1e400"):
        messages.append((channel, text.replace(ts_token, f'"ts": {token}').encode()))
    messages.append((channel, text.replace('"version": 2', '"version": NaN').encode()))
    messages.append((channel, text.replace('"version": 2', '"version": 2' + "0" * 30).encode()))
    # A name with a trailing newline on its matching channel (`$` matches before "\n").
    messages.append((f"config:{org}:ai\n:threshold", json.dumps({**good, "service": "ai\n"}).encode()))
    return messages


async def test_hostile_numbers_and_times_are_dropped_counted_and_change_nothing(
        db: asyncpg.Connection, db_url: str, redis_url: str, org: str) -> None:
    await seed(db_url, org)
    async with running_agent(org_id=org, database_url=db_url, redis_url=redis_url) as agent:
        before, revision = agent_state(agent), agent.store.snapshot.revision
        queries, histogram = agent.source.queries, observed(agent)
        messages = hostile_announcements(org)
        client = redis_client(redis_url)
        try:
            pipe = client.pipeline(transaction=False)
            for channel, data in messages:
                pipe.publish(channel, data)
            assert all(n == 1 for n in await pipe.execute())  # the agent got every one
            await eventually(lambda: counted(agent) >= len(messages), 10, "every message counted")
            await anyio.sleep(0.3)  # a fetch or a lag chase would have started by now
            assert counted(agent, "invalid") == len(messages), {r: counted(agent, r) for r in RESULTS}
            assert agent_state(agent) == before
            assert agent.store.snapshot.revision == revision
            assert agent.source.queries == queries, "a hostile message made the agent query PostgreSQL"
            assert observed(agent) == histogram

            # Still alive and listening: a real change arrives, and is the one thing observed.
            start = time.monotonic()
            async with await ConfigWriter.open(db_url, redis_url=redis_url) as w:
                await w.set(org, "ai", "threshold", 0.9, actor="test")
            await eventually(lambda: agent_state(agent)[("ai", "threshold")] == (0.9, 2), 5,
                             "the real change applied")
            assert observed(agent) == histogram + 1
            total = metric(agent, "config_agent_propagation_seconds_sum")
            assert 0 <= total <= time.monotonic() - start + 0.05
        finally:
            await client.aclose()


async def test_20_mb_message_is_dropped_and_the_agent_keeps_listening(
        db: asyncpg.Connection, db_url: str, redis_url: str, org: str) -> None:
    await seed(db_url, org)
    async with running_agent(org_id=org, database_url=db_url, redis_url=redis_url) as agent:
        before, queries = agent_state(agent), agent.source.queries
        channel = f"config:{org}:ai:threshold"
        big = json.dumps({"org_id": org, "service": "ai", "key": "threshold", "version": 2,
                          "revision": 3, "ts": time.time(), "pad": "x" * (20 * 1024 * 1024)})
        client = redis_client(redis_url)
        try:
            # One at a time: two 20 MB messages queued at once would pass Redis's pub/sub
            # output buffer limit (32 MB) and get the subscriber disconnected.
            for data in (big.encode(), b"\xff" * (20 * 1024 * 1024)):
                seen = counted(agent, "invalid")
                assert await client.publish(channel, data) == 1
                await eventually(lambda seen=seen: counted(agent, "invalid") == seen + 1, 20,
                                 "the 20 MB message counted invalid")
            assert agent_state(agent) == before and agent.source.queries == queries
            assert agent.status.redis_connected
            async with await ConfigWriter.open(db_url, redis_url=redis_url) as w:
                await w.set(org, "ai", "threshold", 0.9, actor="test")
            await eventually(lambda: agent_state(agent)[("ai", "threshold")] == (0.9, 2), 5,
                             "a real change after the big messages")
            assert counted(agent, "applied") == 1
        finally:
            await client.aclose()


async def test_junk_and_fake_heartbeats_on_the_heartbeat_channel_change_nothing(
        db: asyncpg.Connection, db_url: str, redis_url: str, org: str) -> None:
    await seed(db_url, org)
    async with running_agent(org_id=org, database_url=db_url, redis_url=redis_url) as agent:
        before, revision = agent_state(agent), agent.store.snapshot.revision
        queries, histogram = agent.source.queries, observed(agent)
        channel = f"config:{org}:heartbeat"
        forged = {"org_id": org, "service": "ai", "key": "threshold", "version": 99, "revision": 99,
                  "ts": time.time()}
        messages = [
            b"junk", b"", b"\xff\xfe", b"{" * 5000, b"x" * 100_000,
            json.dumps({"org_id": org, "heartbeat": time.time()}).encode(),
            json.dumps({"org_id": org, "heartbeat": 1e300}).encode(),
            b'{"org_id": "%s", "heartbeat": NaN}' % org.encode(),
            json.dumps({"org_id": "other", "heartbeat": time.time()}).encode(),
            json.dumps(forged).encode(),  # an announcement on the heartbeat channel
            json.dumps({**forged, "heartbeat": time.time()}).encode(),
        ]
        client = redis_client(redis_url)
        try:
            seen = counted(agent)
            for data in messages:
                assert await client.publish(channel, data) == 1
            await eventually(lambda: counted(agent) >= seen + len(messages), 10, "every message counted")
            await anyio.sleep(0.3)
            assert agent_state(agent) == before
            assert agent.store.snapshot.revision == revision
            assert agent.source.queries == queries
            assert observed(agent) == histogram
            assert counted(agent, "applied") == 0
        finally:
            await client.aclose()


# A bounded publisher in its own process (as a hostile neighbour would be): pipelined
# PUBLISH of junk, invalid, foreign and duplicate messages on config:{org}:* channels,
# `rate` per second in batches every 10 ms, until `seconds` have passed.
FLOOD = r"""
import json, sys, time
import redis
url, org, seconds, rate = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
client = redis.Redis.from_url(url)
channel = f"config:{org}:ai:threshold"
dup = {"org_id": org, "service": "ai", "key": "threshold", "version": 1, "revision": 1, "ts": time.time()}
kinds = [
    (channel, b"junk"),
    (channel, json.dumps(dup)),                                          # duplicate
    (f"config:{org}:email:max_retries", json.dumps({**dup, "service": "email", "key": "max_retries"})),
    (channel, json.dumps({**dup, "version": 2**64})),                    # invalid
    (channel, json.dumps({**dup, "org_id": "evil"})),                    # foreign (channel mismatch)
    (channel, json.dumps({**dup, "version": 2, "ts": 1e300})),           # future ts
    (f"config:{org}:heartbeat", b"junk"),
    (f"config:{org}:nosuch:key", b"{" * 200),
]
batch = max(1, rate // 100)
print(json.dumps({"start": time.time()}), flush=True)
sent, start = 0, time.monotonic()
tick, deadline = start, start + seconds
while time.monotonic() < deadline:
    pipe = client.pipeline(transaction=False)
    for i in range(batch):
        pipe.publish(*kinds[(sent + i) % len(kinds)])
    pipe.execute()
    sent += batch
    tick += 0.01
    if tick > time.monotonic():
        time.sleep(tick - time.monotonic())
print(json.dumps({"sent": sent, "seconds": time.monotonic() - start}), flush=True)
"""


async def test_flood_of_10k_messages_per_second_does_not_delay_a_real_change(
        db: asyncpg.Connection, db_url: str, redis_url: str, org: str) -> None:
    """Real changes during a 5 s flood at 10k messages/s arrive in 100 ms, if the agent keeps up.

    Pub/sub is FIFO: a real announcement waits behind every flood message published
    before it. With a CPU of its own the agent keeps up (≈70 µs of CPU per message,
    about 14k/s) and the backlog stays empty; on a shared, loaded machine it may not,
    and then the bound is what draining the backlog ahead of the change takes at the
    rate the agent was measured to consume over the run: 100 ms + 2 × backlog / rate
    (2×: that rate swings with the machine's other load). Either way nothing is lost,
    nothing else delays the change, and the figures are printed.
    """
    await seed(db_url, org)
    async with running_agent(org_id=org, database_url=db_url, redis_url=redis_url) as agent:
        histogram = observed(agent)
        seconds, rate = 5.0, 10_000
        flood = subprocess.Popen([sys.executable, "-c", FLOOD, redis_url, org, str(seconds), str(rate)],
                                 stdout=subprocess.PIPE, text=True)
        assert flood.stdout is not None
        # (commit+publish → applied, flood messages published but not yet consumed at the start)
        changes: list[tuple[float, float]] = []
        try:
            flood_start = json.loads(await anyio.to_thread.run_sync(flood.stdout.readline))["start"]
            cpu_start = time.process_time()
            async with await ConfigWriter.open(db_url, redis_url=redis_url) as w:
                await eventually(lambda: counted(agent) > 2_000, 10, "the flood reaching the agent")
                value = 0.75
                # Real changes spread over the flood, each one while it still runs.
                while flood.poll() is None and time.time() - flood_start < seconds - 1:
                    value = round(value + 0.01, 2)
                    version = agent.store.version_of("ai", "threshold") + 1
                    backlog = max(0.0, rate * (time.time() - flood_start) - counted(agent))
                    start = time.perf_counter()
                    await w.set(org, "ai", "threshold", value, actor="test")  # commit, then PUBLISH
                    while agent.store.version_of("ai", "threshold") < version:
                        await agent.store.wait_newer(agent.store.snapshot.generation)
                    changes.append((time.perf_counter() - start, backlog))
                    await anyio.sleep(0.4)
            out, _ = await anyio.to_thread.run_sync(lambda: flood.communicate(timeout=30))
        finally:
            if flood.poll() is None:
                flood.kill()
                flood.wait()
        report = json.loads(out.splitlines()[-1])
        # Every message was for the agent's pattern: it must hear them all, none lost.
        await eventually(lambda: counted(agent) >= report["sent"] + len(changes), 30,
                         "every flood message counted")
        consumed = (report["sent"] + len(changes)) / (time.time() - flood_start)
        cpu_per_message = (time.process_time() - cpu_start) / report["sent"]
        achieved = report["sent"] / report["seconds"]
        delays = [delay for delay, _ in changes]
        print(f"\nflood: {report['sent']} messages in {report['seconds']:.2f}s ({achieved:,.0f}/s); "
              f"agent consumed {consumed:,.0f}/s at {cpu_per_message * 1e6:.0f} µs CPU/message; "
              f"real change commit+publish → applied: median {statistics.median(delays) * 1000:.1f} ms, "
              f"max {max(delays) * 1000:.1f} ms over {len(delays)} changes; backlog ahead of each: "
              f"{[round(b) for _, b in changes]}")
        assert len(changes) >= 3, "the real changes must happen while the flood runs"
        assert achieved >= 0.8 * rate, f"the publisher reached only {achieved:,.0f}/s"
        for delay, backlog in changes:
            assert delay < FLOOD_BOUND_SECONDS + 2 * backlog / consumed, (delay, backlog, consumed)
        assert agent_state(agent)[("ai", "threshold")] == (value, 1 + len(changes))
        assert agent_state(agent)[("email", "max_retries")] == (3, 1)
        assert counted(agent, "applied") == len(changes)
        # The histogram holds the real changes only, each a sane commit → applied time.
        assert observed(agent) == histogram + len(changes)
        assert metric(agent, "config_agent_propagation_seconds_sum") <= sum(delays) + 0.05 * len(changes)


async def test_announcements_of_made_up_entries_do_not_grow_memory_without_bound(
        db_url: str, redis_url: str, org: str) -> None:
    """Valid-looking announcements of entries that never exist: the agent remembers a
    bounded number of them (for the drift judgement), and still applies real changes."""
    await seed(db_url, org)
    publisher = redis_client(redis_url)
    remembered = []
    try:
        async with running_agent(org_id=org, database_url=db_url, redis_url=redis_url,
                                 heartbeat_interval=0) as agent:
            agent.syncer.heard_max = 1000
            pipe = publisher.pipeline(transaction=False)
            for i in range(5000):
                ann = {"org_id": org, "service": "made-up", "key": f"k{i}", "version": 1,
                       "revision": 10**6 + i, "ts": time.time()}
                pipe.publish(f"config:{org}:made-up:k{i}", json.dumps(ann))
            await pipe.execute()
            await eventually(lambda: counted(agent) >= 5000, 20, "the agent read every announcement")
            remembered = list(agent.syncer._heard)
            async with await ConfigWriter.open(db_url, redis_url=redis_url) as writer:
                await writer.set(org, "ai", "threshold", 0.5, actor="test")
            await eventually(lambda: agent_state(agent)[("ai", "threshold")][0] == 0.5, 10, "a real change")
    finally:
        await publisher.aclose()
    assert len(remembered) <= 1000, len(remembered)
    assert ("made-up", "k4999") in remembered  # the newest are kept
