"""Issue #21.3 and #21.5: a silent relay is not a storm, and "connected" means "heard".

While nothing is heard, deaf detection says so at once (status, metric, one warning
per spell) but resubscribes only after a random wait, full jitter doubling up to a cap,
per agent; meanwhile the subscription keeps listening, so a direct publish still
arrives and ends the spell. After any resubscribe, `redis_connected` waits for
something heard while heartbeats are due. Real Redis (and PostgreSQL for the agents);
randomness is injected, and nothing asserts on wall-clock time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import pytest

from agent.app import Agent
from agent.db.writer import ConfigWriter
from agent.model import heartbeat_channel, heartbeat_json
from agent.redis_client import redis_client
from agent.sources.backoff import Backoff
from agent.sources.redis_events import RedisEvents
from tests.agent_harness import eventually, metric, running_agent
from tests.servers import PrivateRedis

pytestmark = pytest.mark.anyio


# -- Backoff with full jitter (no server) ----------------------------------------------


class Rand:
    """An injectable `rand(lo, hi)`: records each range and answers `pick(lo, hi)`."""

    def __init__(self, pick: Callable[[float, float], float]) -> None:
        self.pick = pick
        self.ranges: list[tuple[float, float]] = []

    def __call__(self, lo: float, hi: float) -> float:
        self.ranges.append((lo, hi))
        return self.pick(lo, hi)


def test_full_jitter_draws_from_zero_to_a_doubling_step_up_to_the_cap_and_resets() -> None:
    rand = Rand(lambda lo, hi: hi)
    backoff = Backoff(initial=15.0, cap=60.0, rand=rand, full_jitter=True)
    assert [backoff.next() for _ in range(5)] == [15.0, 30.0, 60.0, 60.0, 60.0]
    assert rand.ranges == [(0.0, 15.0), (0.0, 30.0), (0.0, 60.0), (0.0, 60.0), (0.0, 60.0)]
    backoff.reset()
    assert backoff.next() == 15.0
    low = Backoff(initial=15.0, cap=60.0, rand=Rand(lambda lo, hi: lo), full_jitter=True)
    assert low.next() == 0.0  # full jitter: anywhere from at once to the whole step


def test_backoff_stays_finite_however_long_it_retries() -> None:
    # 2.0 ** 1024 overflows a float: a loop retrying for days must not crash on it.
    for full in (False, True):
        backoff = Backoff(initial=1.0, cap=60.0, rand=lambda lo, hi: hi, full_jitter=full)
        delays = [backoff.next() for _ in range(2000)]
        assert max(delays) <= 60.0 * (1.2 if not full else 1.0)


# -- RedisEvents against real Redis ------------------------------------------------------


@dataclass
class Recorder:
    """The callbacks of one RedisEvents, with an event per kind of call."""

    connected: list[bool] = field(default_factory=list)
    deaf: list[str] = field(default_factory=list)
    heard: list[bool] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)
    disconnected: list[str] = field(default_factory=list)
    changed: anyio.Event = field(default_factory=anyio.Event)

    def _poke(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    def on_connected(self, hearing: bool) -> None:
        self.connected.append(hearing)
        self._poke()

    def on_deaf(self, reason: str) -> None:
        self.deaf.append(reason)
        self._poke()

    def on_heard(self, heartbeat: bool) -> None:
        self.heard.append(heartbeat)
        self._poke()

    def on_message(self, _channel: bytes, data: bytes) -> None:
        self.messages.append(data)
        self._poke()

    def on_disconnected(self, reason: str) -> None:
        self.disconnected.append(reason)
        self._poke()

    async def until(self, check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
        """Wait (on events, not a poll) until `check()` holds."""
        with anyio.fail_after(timeout):
            while not check():
                await self.changed.wait()


@asynccontextmanager
async def listening(redis_url: str, org: str, rec: Recorder, deaf_backoff: Backoff,
                    heartbeat_interval: float) -> AsyncIterator[RedisEvents]:
    events = RedisEvents(redis_url, org, on_message=rec.on_message, on_connected=rec.on_connected,
                         on_disconnected=rec.on_disconnected, on_heard=rec.on_heard, on_deaf=rec.on_deaf,
                         deaf_backoff=deaf_backoff, heartbeat_interval=heartbeat_interval)
    async with anyio.create_task_group() as tg:
        await tg.start(events.run)
        try:
            yield events
        finally:
            tg.cancel_scope.cancel()


def _lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "agent.redis" and r.levelno >= logging.WARNING and text in r.getMessage()]


async def test_a_deaf_spell_is_said_once_and_its_resubscribes_back_off_with_full_jitter(
        redis_url: str, org: str, caplog: pytest.LogCaptureFixture) -> None:
    hb = 0.05  # deaf after 0.15 s of silence
    rand = Rand(lambda lo, hi: hi / 10)  # short waits, so that the test sees several resubscribes
    backoff = Backoff(initial=0.15, cap=0.6, rand=rand, full_jitter=True)
    rec = Recorder()
    async with listening(redis_url, org, rec, backoff, hb) as events:
        await rec.until(lambda: len(rec.connected) >= 5, "four resubscribes")
        assert events.deaf
    assert len(rec.deaf) == 1, rec.deaf  # one spell: said (and counted) once
    assert len(_lines(caplog, "deaf")) == 1
    assert not _lines(caplog, "lost")
    # The k-th resubscribe of the spell waits uniform(0, min(cap, base * 2^k)).
    assert rand.ranges[:4] == [(0.0, 0.15), (0.0, 0.3), (0.0, 0.6), (0.0, 0.6)]
    # Heartbeats are due (the default expectation): no (re)subscription counts as hearing.
    assert rec.connected[:5] == [False] * 5
    assert all(reason.startswith("deaf: ") for reason in rec.disconnected)


async def test_while_deaf_a_direct_publish_arrives_on_the_same_subscription_and_ends_the_spell(
        redis_url: str, org: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "agent.redis")
    rand = Rand(lambda lo, hi: hi)  # a resubscribe only after 30 s or more: never within this test
    backoff = Backoff(initial=30.0, cap=120.0, rand=rand, full_jitter=True)
    rec = Recorder()
    publisher = redis_client(redis_url)
    try:
        async with listening(redis_url, org, rec, backoff, 0.05) as events:
            await rec.until(lambda: len(rec.deaf) == 1, "deaf noticed")
            assert events.deaf
            await publisher.publish(f"config:{org}:ai:t", b"a direct publish")
            await rec.until(lambda: rec.messages == [b"a direct publish"], "delivered while deaf")
            assert not events.deaf and rec.heard == [False]
            assert len(rec.connected) == 1 and not rec.disconnected  # the same subscription heard it
            # Silent again: a new spell, whose backoff starts from the base again.
            await rec.until(lambda: len(rec.deaf) == 2, "the next spell")
            assert rand.ranges == [(0.0, 30.0), (0.0, 30.0)]
            assert len(rec.connected) == 1
    finally:
        await publisher.aclose()
    assert len(_lines(caplog, "deaf")) == 2  # one warning per spell
    assert any("hears again" in r.getMessage() for r in caplog.records)


async def test_a_subscription_that_hears_its_heartbeats_logs_no_deaf_or_lost_line(
        redis_url: str, org: str, caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder()
    publisher = redis_client(redis_url)
    try:
        # Deaf after 1.5 s; heartbeats every 50 ms, 30 of them: a 30× margin.
        async with listening(redis_url, org, rec, Backoff(initial=1.5, cap=6.0, full_jitter=True), 0.5):
            for _ in range(30):
                await publisher.publish(heartbeat_channel(org), heartbeat_json(org, time.time()))
                await anyio.sleep(0.05)
            await rec.until(lambda: len(rec.heard) == 30, "every heartbeat heard")
    finally:
        await publisher.aclose()
    assert rec.deaf == [] and len(rec.connected) == 1 and rec.heard == [True] * 30
    assert not _lines(caplog, "deaf") and not _lines(caplog, "lost")


# -- a whole agent: status, metrics, replays ------------------------------------------


def follow_connects(agent: Agent) -> list[bool]:
    """The agent's `redis_connected` right after each (re)subscription was confirmed."""
    assert agent.events is not None
    after: list[bool] = []
    confirm = agent.events._on_connected

    def recorded(hearing: bool) -> None:
        confirm(hearing)
        after.append(agent.status.redis_connected)

    agent.events._on_connected = recorded
    return after


async def publish_heartbeat(redis_url: str, org: str) -> None:
    client = redis_client(redis_url)
    try:
        await client.publish(heartbeat_channel(org), heartbeat_json(org, time.time()))
    finally:
        await client.aclose()


@pytest.mark.parametrize("heartbeat_interval", [5.0, 0.0])
async def test_after_redis_comes_back_connected_waits_for_something_heard_when_heartbeats_are_due(
        db_url: str, org: str, private_redis: PrivateRedis, heartbeat_interval: float) -> None:
    async with await ConfigWriter.open(db_url) as writer:
        await writer.set(org, "ai", "t", 0, actor="t")  # an org with entries: heartbeats are due
    async with running_agent(org_id=org, database_url=db_url, redis_url=private_redis.url,
                             heartbeat_interval=heartbeat_interval) as agent:
        after = follow_connects(agent)
        private_redis.kill()
        await eventually(lambda: metric(agent, "config_agent_redis_connected") == 0, 10, "redis down noticed")
        private_redis.start()
        await eventually(lambda: len(after) >= 1, 20, "subscribed again")
        if heartbeat_interval:
            # Subscribed, but nothing heard yet: not connected (before the fix: 1 at once).
            assert after[0] is False and metric(agent, "config_agent_redis_connected") == 0
            await publish_heartbeat(private_redis.url, org)
            await eventually(lambda: metric(agent, "config_agent_redis_connected") == 1, 10, "heard")
        else:
            # Heartbeats off: the server's confirmation is the only proof there is.
            assert after[0] is True and metric(agent, "config_agent_redis_connected") == 1


async def test_an_agent_deaf_spell_counts_once_replays_per_resubscribe_and_still_gets_direct_publishes(
        db_url: str, redis_url: str, org: str, caplog: pytest.LogCaptureFixture) -> None:
    async with await ConfigWriter.open(db_url) as writer:
        await writer.set(org, "ai", "t", 0, actor="t")
    publisher = await ConfigWriter.open(db_url, redis_url=redis_url)
    try:
        # No relay: nothing is heard. Deaf after 0.6 s; resubscribes within 0.6, 1.2, 2.4 s.
        async with running_agent(org_id=org, database_url=db_url, redis_url=redis_url,
                                 heartbeat_interval=0.2, reconcile_interval=300) as agent:
            assert agent.events is not None
            after = follow_connects(agent)
            queries = agent.source.queries
            await eventually(lambda: len(after) >= 3, 30, "three resubscribes")
            assert metric(agent, "config_agent_redis_deaf_total") == 1  # one spell
            assert after[:3] == [False] * 3  # never "connected" on a subscription alone
            await eventually(lambda: agent.source.queries >= queries + 3, 10, "a replay per resubscribe")
            assert agent.status.document(agent.store.snapshot)["redis_deaf"] == 1
            # A change published by the writer itself (the relay is down) arrives and ends the spell.
            await publisher.set(org, "ai", "t", 1, actor="t")
            await eventually(lambda: agent.store.version_of("ai", "t") == 2, 10, "direct publish applied")
            await eventually(lambda: metric(agent, "config_agent_redis_connected") == 1, 10, "hearing again")
    finally:
        await publisher.close()
    deaf_lines = _lines(caplog, "deaf")
    assert 1 <= len(deaf_lines) <= 2, deaf_lines  # one per spell (a second may begin after the change)
