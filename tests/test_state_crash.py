"""Crashes and bad disks: kill -9 mid-stream, a nearly full state dir, corrupt or tampered snapshots.

After any crash the restarted agent shows one complete file set and removes what
the crash left; the last-known-good snapshot is never replaced by a partial one;
a snapshot that cannot be trusted is one log line, never a crash or a file
written outside the output directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from agent.app import Agent
from agent.db.writer import ConfigWriter
from agent.settings import load_settings
from tests.agent_harness import eventually, metric, running_agent
from tests.disks import check_complete, fill, internal_names, tmpfs
from tests.servers import free_port

pytestmark = pytest.mark.anyio
SNAPSHOT = "last-known-good.json"


def start_agent(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`config-agent run` as its own process (so that it can be killed with SIGKILL)."""
    with log.open("ab") as stderr:
        return subprocess.Popen([sys.executable, "-m", "agent", "run"], env=env,
                                stdout=subprocess.DEVNULL, stderr=stderr)


def tail(log: Path) -> str:
    """The end of an agent's log, to say why it died."""
    return log.read_text()[-2000:]


async def wait_ready(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        with anyio.fail_after(30):
            while True:
                assert proc.poll() is None, tail(log)
                try:
                    if (await client.get("/readyz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await anyio.sleep(0.02)


def check_snapshot(state: Path, org: str) -> int:
    """The saved snapshot is whole and plausible; return its revision."""
    doc = json.loads((state / SNAPSHOT).read_bytes())
    assert doc["org_id"] == org and doc["format"] == 1
    for entry in doc["entries"]:
        assert type(entry["version"]) is int and entry["version"] >= 1
    return int(doc["revision"])


def crash_leftovers(out: Path, state: Path) -> None:
    """What a kill at the rarer moments leaves (a random kill seldom lands there).

    The kill just before may have left one of these itself (it landed mid-swap): that one
    is replaced by ours, which is what the next start must clean up either way."""

    def leftover_link(target: str, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(out / name)
        os.symlink(target, out / name)

    leftover_link("..data/svc1", "..svc1_tmp")  # an older version's link, before its rename
    leftover_link("..data/svc1", "..link_tmp.svc1")  # ours, before its rename
    leftover_link("..2000_01_01_00_00_00.x", "..data_tmp")  # ..data's, before its rename
    (out / "..2000_01_01_00_00_00.x/svc1").mkdir(parents=True, exist_ok=True)  # a generation being written
    (out / "..2000_01_01_00_00_00.x/svc1/k").write_bytes(b"half")
    (out / "..retired_1999_01_01_00_00_00.y/svc2").mkdir(parents=True, exist_ok=True)  # one being deleted
    (state / f".{SNAPSHOT}.tmp").write_bytes(b'{"format":1,"org_')  # a save being written
    (state / f".{SNAPSHOT}.abc123.tmp").write_bytes(b"")


@pytest.mark.slow
async def test_kill_9_during_a_stream_of_changes(db_url: str, redis_url: str, org: str, tmp_path: Path) -> None:
    out, state = tmp_path / "out", tmp_path / "state"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIG_AGENT_")}
    env.update({"CONFIG_AGENT_ORG_ID": org, "CONFIG_AGENT_DATABASE_URL": db_url,
                "CONFIG_AGENT_REDIS_URL": redis_url, "CONFIG_AGENT_OUTPUT_DIR": str(out),
                "CONFIG_AGENT_STATE_DIR": str(state), "CONFIG_AGENT_HTTP_PORT": str(port),
                "CONFIG_AGENT_METRICS_PORT": "0"})
    rng = random.Random(14)
    async with await ConfigWriter.open(db_url, redis_url=redis_url) as writer:
        await writer.set(org, "svc0", "k", 0, actor="t")
        stop = anyio.Event()
        last = {"revision": 0}

        async def stream() -> None:
            n, live = 0, set()
            while not stop.is_set():
                n += 1
                service = f"tmp{n % 11}"
                if n % 5 == 0 and service in live:  # services come and go: links made and removed
                    done = await writer.delete(org, service, "k", actor="t")
                    live.discard(service)
                elif n % 5 == 0:
                    done = await writer.set(org, service, "k", n, actor="t")
                    live.add(service)
                else:
                    value = {"n": n, "pad": "x" * (n % 900)}
                    done = await writer.set(org, f"svc{n % 7}", f"k{n % 3}", value, actor="t")
                last["revision"] = done.revision
                await anyio.sleep(0.002)

        async with anyio.create_task_group() as tg:
            tg.start_soon(stream)
            for round_ in range(6):
                proc = start_agent(env, tmp_path / "agent.log")
                try:
                    await wait_ready(port, proc, tmp_path / "agent.log")
                    await anyio.sleep(rng.uniform(0.05, 0.6))
                finally:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(timeout=10)
                # At the moment of the kill: one complete set, one whole snapshot.
                check_complete(out)
                check_snapshot(state, org)
                if round_ >= 3:
                    crash_leftovers(out, state)
            stop.set()
        proc = start_agent(env, tmp_path / "agent.log")
        try:
            await wait_ready(port, proc, tmp_path / "agent.log")
            revision = last["revision"]
            await eventually(lambda: check_complete(out)["revision"] >= revision, 10, "caught up")
            with contextlib.suppress(AssertionError):
                await eventually(lambda: not internal_names(out), 5, "leftovers removed")
            assert internal_names(out) == set(), "left by the crashes"
            assert sorted(os.listdir(state)) == [SNAPSHOT]
            await eventually(lambda: check_snapshot(state, org) >= revision, 5, "snapshot saved")
            doc = check_complete(out)
            for name in os.listdir(out):
                if not name.startswith(".."):
                    assert os.readlink(out / name) == f"..data/{name}"
            assert {n for n in os.listdir(out) if not n.startswith("..")} == set(doc["configs"]) | {
                "configs.json", "configs.env"}
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0


@pytest.fixture
def small_state_disk(tmp_path: Path) -> Iterator[Path]:
    """A 128 KiB tmpfs for the state directory."""
    with tmpfs(tmp_path / "state", size="128k") as path:
        yield path


async def test_nearly_full_state_dir_keeps_the_previous_snapshot(
        db_url: str, redis_url: str, org: str, small_state_disk: Path, tmp_path: Path) -> None:
    state = small_state_disk
    async with await ConfigWriter.open(db_url, redis_url=redis_url) as writer:
        await writer.set(org, "ai", "threshold", 0.5, actor="t")
        async with running_agent(org_id=org, database_url=db_url, redis_url=redis_url,
                                 state_dir=state) as agent:
            saved = (state / SNAPSHOT).read_bytes()
            filler = fill(state, leave=40960)  # 40 KiB free: the save writes short, then fails
            await writer.set(org, "ai", "prompt", "p" * 100_000, actor="t")
            await eventually(lambda: metric(agent, "config_agent_state_write_failures_total") >= 1
                             or (state / SNAPSHOT).read_bytes() != saved, 5, "a save attempted")
            assert check_snapshot(state, org) == 1
            assert (state / SNAPSHOT).read_bytes() == saved  # the old one, whole
            assert sorted(os.listdir(state)) == sorted([SNAPSHOT, "filler"])  # no temporary file left
            assert metric(agent, "config_agent_state_ok") == 0
            status = agent.status.document(agent.store.snapshot)["state"]
            assert status["ok"] is False and "No space left on device" in status["last_error"]
            # Space comes back: the retry saves the newest snapshot.
            filler.unlink()
            await eventually(lambda: metric(agent, "config_agent_state_ok") == 1, 10, "saved again")
            assert check_snapshot(state, org) == 2
            assert agent.status.document(agent.store.snapshot)["state"]["revision"] == 2


def snapshot_doc(org: str, **entry: Any) -> dict[str, Any]:
    """A valid saved snapshot of one entry, with `entry` fields replaced."""
    item = {"service": "ai", "key": "threshold", "value": 0.5, "version": 1, "revision": 1,
            "updated_at": "2026-01-01T00:00:00+00:00"} | entry
    return {"format": 1, "org_id": org, "revision": 1, "entries": [item]}


def corruptions(org: str, base: Path) -> dict[str, bytes]:
    """Snapshots a crash, a full disk or a tamperer could leave."""
    def doc(**entry: Any) -> bytes:
        return json.dumps(snapshot_doc(org, **entry)).encode()

    valid = doc()
    return {
        "truncated": valid[: len(valid) // 2],
        "empty": b"",
        "not an object": b"[]",
        "deeply nested": valid.replace(b'"value": 0.5', b'"value": ' + b"[" * 100_000 + b"]" * 100_000),
        "traversal": doc(service="../../escaped"),
        "absolute": doc(service=str(base / "abs")),
        "newline": doc(service="ai\n"),
        "upper case": doc(key="Threshold"),
        "negative version": doc(version=-1),
        "boolean version": doc(version=True),
        "string revision": doc(revision="1"),
        "nan": valid.replace(b'"value": 0.5', b'"value": NaN'),
        "huge value": doc(value="v" * 300_000),
        "twice": json.dumps(snapshot_doc(org) | {"entries": snapshot_doc(org)["entries"] * 2}).encode(),
        "other org": json.dumps(snapshot_doc("someone-else")).encode(),
        "extra field": doc(deleted=True),
    }


CASES = list(corruptions("org", Path("/")))


@pytest.mark.parametrize("case", CASES)
async def test_untrusted_snapshot_is_one_line_and_never_served(
        case: str, org: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out, state = tmp_path / "out", tmp_path / "state"
    state.mkdir()
    (state / SNAPSHOT).write_bytes(corruptions(org, tmp_path)[case])
    # PostgreSQL is down: the snapshot is all there is, and it must not be used.
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    agent = Agent(load_settings(org_id=org, database_url=dead, output_dir=out, state_dir=state,
                                http_port=free_port(), metrics_port=0))
    caplog.set_level(logging.WARNING, logger="agent.state")
    async with anyio.create_task_group() as tg:
        tg.start_soon(agent.run)  # a crash here fails the test through the task group
        await anyio.sleep(1.0)
        assert not agent.status.ready and not agent.store.snapshot.loaded
        tg.cancel_scope.cancel()
    await agent.source.close()
    assert os.listdir(tmp_path) == ["state"]  # nothing written, nowhere
    lines = [r.getMessage() for r in caplog.records if r.name == "agent.state"]
    assert len(lines) == 1 and "ignoring" in lines[0] and str(state / SNAPSHOT) in lines[0], lines


async def test_valid_snapshot_is_served_and_a_corrupt_one_replaced_by_a_fresh_load(
        db_url: str, redis_url: str, org: str, tmp_path: Path) -> None:
    out, state = tmp_path / "out", tmp_path / "state"
    state.mkdir()
    (state / SNAPSHOT).write_bytes(json.dumps(snapshot_doc(org)).encode())
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    async with running_agent(org_id=org, database_url=dead, output_dir=out, state_dir=state) as agent:
        assert agent.store.snapshot.stale and (out / "ai/threshold").read_bytes() == b"0.5"
    (state / SNAPSHOT).write_bytes(corruptions(org, tmp_path)["truncated"])
    async with await ConfigWriter.open(db_url, redis_url=redis_url) as writer:
        await writer.set(org, "ai", "threshold", 0.7, actor="t")
    async with running_agent(org_id=org, database_url=db_url, redis_url=redis_url, output_dir=out,
                             state_dir=state) as agent:
        assert not agent.store.snapshot.stale
        assert check_snapshot(state, org) == 1
        assert json.loads((state / SNAPSHOT).read_bytes())["entries"][0]["value"] == 0.7
