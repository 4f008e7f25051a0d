"""The file set against a real agent under hostile names, squatters, leftovers, full and read-only disks.

Whatever happens, `..data` names one complete generation, HTTP keeps serving, and
what the set cannot hold or write is reported (log line, metric, /v1/status).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from agent.app import Agent
from agent.db.writer import ConfigWriter
from tests.agent_harness import eventually, metric, running_agent
from tests.disks import check_complete, fill, internal_names, raw, remount, tmpfs

pytestmark = pytest.mark.anyio

# Every kind of name the database accepts that could clash with the set's own names.
HOSTILE: dict[tuple[str, str], Any] = {
    ("configs.json", "x"): 1,
    ("configs.env", "y"): "z",
    ("data", "k"): "service named like ..data",
    ("data_tmp", "k"): "like ..data_tmp",
    ("retired_ai", "k"): "like ..retired_*",
    ("link_tmp.ai", "k"): "like ..link_tmp.*",
    ("2020_01_01_00_00_00.abcdef", "k"): "like a generation",
    ("a..b", "c..d"): "dots inside",
    ("ai", "configs.json"): "a key named like our file",
    ("ai", "threshold"): 0.5,
    ("x" * 63, "y" * 63): "longest names",
}


async def http_entry(agent: Agent, service: str, key: str) -> bytes:
    """The raw value the agent serves over HTTP."""
    port = agent.settings.http_port
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        response = await client.get(f"/v1/configs/{service}/{key}", params={"format": "raw"})
    assert response.status_code == 200, response.text
    return response.content


def check_links(out: Path, doc: dict[str, Any]) -> None:
    """Every visible name is our link into `..data`, one per representable service."""
    services = {s for s in doc["configs"] if s not in ("configs.json", "configs.env")}
    visible = {name for name in os.listdir(out) if not name.startswith("..")}
    assert visible == services | {"configs.json", "configs.env"}, visible
    for name in visible:
        assert os.readlink(out / name) == f"..data/{name}", name


async def quiet(out: Path, revision: int) -> dict[str, Any]:
    """Wait until the set shows `revision` and its retired generations are gone."""
    await eventually(lambda: json.loads((out / "configs.json").read_bytes())["revision"] >= revision,
                     10, f"files at revision {revision}")
    await eventually(lambda: not internal_names(out), 5, "only ..data and its generation left")
    return check_complete(out)


async def test_hostile_names_neither_crash_nor_mix_the_set(
        db_url: str, redis_url: str, org: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with await ConfigWriter.open(db_url, redis_url=redis_url) as writer:
        for (service, key), value in HOSTILE.items():
            await writer.set(org, service, key, value, actor="t")
        out = tmp_path / "out"
        caplog.set_level(logging.WARNING, logger="agent.files")
        async with running_agent(org_id=org, database_url=db_url, redis_url=redis_url,
                                 output_dir=out) as agent:
            for round_ in range(3):  # swaps that add, change and remove every hostile name
                for n, (service, key) in enumerate(HOSTILE):
                    if (n + round_) % 3 == 0:
                        done = await writer.delete(org, service, key, actor="t")
                    else:
                        done = await writer.set(org, service, key, f"r{round_}", actor="t")
                doc = await quiet(out, done.revision)
                check_links(out, doc)
                assert (out / "configs.json").read_bytes() == (out / "..data/configs.json").read_bytes()
                for service, keys in doc["configs"].items():
                    for key, entry in keys.items():
                        assert await http_entry(agent, service, key) == raw(entry["value"])
            for (service, key), value in HOSTILE.items():
                done = await writer.set(org, service, key, value, actor="t")
            doc = await quiet(out, done.revision)
            check_links(out, doc)
            assert doc["configs"]["configs.json"]["x"]["value"] == 1  # still served in configs.json
            assert await http_entry(agent, "configs.env", "y") == b"z"  # and over HTTP
            assert (out / "ai/configs.json").read_bytes() == b"a key named like our file"
            assert metric(agent, "config_agent_files_skipped", {"reason": "reserved_name"}) == 2
            skipped = agent.status.document(agent.store.snapshot)["files"]["skipped"]
            assert skipped == {"reserved_name": 2, "env_not_identifier": 1}
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "file set leaves out 2 (reserved_name): configs.env/y: " in logged


def squat(out: Path) -> None:
    """What a neighbour or an earlier crash left in the output directory."""
    out.mkdir()
    old = out / "..2020_01_01_00_00_00.oldgen"  # the generation of a previous run
    (old / "ai").mkdir(parents=True)
    (old / "ai/threshold").write_bytes(b"0.1")
    (old / "configs.json").write_text('{"org_id":"x","revision":1,"stale":false,"configs":{}}\n')
    (old / "configs.env").write_text("# config-agent: org x, revision 1\n")
    os.symlink(old.name, out / "..data")
    (out / "ai").mkdir()  # a directory named like a service
    (out / "ai/mine").write_text("not the agent's")
    (out / "webhook").write_text("a file named like a service")
    os.symlink("/etc", out / "email")  # a foreign link
    os.symlink("..data/gone", out / "gone")  # our own link to a service that is gone
    # Leftovers of an interrupted run: temporary links and unfinished generations.
    for name in ("..data_tmp", "..ai_tmp", "..retired_ai_tmp", "..link_tmp.ai"):
        os.symlink("..data/ai", out / name)
    (out / "..2021_02_02_02_02_02.partial/ai").mkdir(parents=True)
    (out / "..retired_2019_01_01_00_00_00.half/ai").mkdir(parents=True)


async def test_squatters_are_left_alone_and_leftovers_cleaned(
        db_url: str, redis_url: str, org: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    squat(out)
    async with await ConfigWriter.open(db_url, redis_url=redis_url) as writer:
        for service in ("ai", "webhook", "email", "sms"):
            await writer.set(org, service, "k", f"{service}-value", actor="t")
        caplog.set_level(logging.WARNING, logger="agent.files")
        async with running_agent(org_id=org, database_url=db_url, redis_url=redis_url,
                                 output_dir=out) as agent:
            check_complete(out)
            # Leftovers go at start; the previous run's generation a second after the swap.
            assert internal_names(out) == {"..2020_01_01_00_00_00.oldgen"}
            await eventually(lambda: not internal_names(out), 5, "the previous generation retired")
            # The squatters are untouched; their services are readable under ..data.
            assert (out / "ai/mine").read_text() == "not the agent's"
            assert (out / "webhook").read_text() == "a file named like a service"
            assert os.readlink(out / "email") == "/etc"
            assert "gone" not in os.listdir(out)
            assert (out / "..data/ai/k").read_bytes() == b"ai-value"
            assert (out / "sms/k").read_bytes() == b"sms-value"
            assert metric(agent, "config_agent_files_skipped", {"reason": "occupied"}) == 3
            assert await http_entry(agent, "ai", "k") == b"ai-value"
            # Once the squatter is gone, the next change links the service.
            (out / "ai/mine").unlink()
            (out / "ai").rmdir()
            await writer.set(org, "sms", "k", "again", actor="t")
            await eventually(lambda: os.path.islink(out / "ai"), 5, "ai linked")
            assert (out / "ai/k").read_bytes() == b"ai-value"
            assert metric(agent, "config_agent_files_skipped", {"reason": "occupied"}) == 2
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"file set leaves out 3 (occupied): {out / 'ai'} is not our link" in logged


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs for the output directory."""
    with tmpfs(tmp_path / "small") as path:
        yield path


async def hold_complete(out: Path, seconds: float, until: Callable[[], bool] | None = None) -> None:
    """For `seconds` (or until `until()`, which must come), assert all along that the set is complete."""
    with anyio.move_on_after(seconds):
        while until is None or not until():
            check_complete(out)
            await anyio.sleep(0.02)
        return
    assert until is None, f"the awaited condition did not hold within {seconds}s"


async def test_full_and_read_only_disk_keep_the_last_complete_set(
        db_url: str, redis_url: str, org: str, small_disk: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = small_disk / "out"
    async with await ConfigWriter.open(db_url, redis_url=redis_url) as writer:
        for key, value in (("threshold", 0.5), ("model", "m"), ("url", "https://x")):
            await writer.set(org, "ai", key, value, actor="t")
        caplog.set_level(logging.INFO, logger="agent.files")
        async with running_agent(org_id=org, database_url=db_url, redis_url=redis_url,
                                 output_dir=out) as agent:
            def health() -> dict[str, Any]:
                return agent.status.document(agent.store.snapshot)["files"]  # type: ignore[no-any-return]

            def failures() -> float:
                return metric(agent, "config_agent_files_write_failures_total")

            def ok() -> bool:
                return metric(agent, "config_agent_files_ok") == 1

            first = check_complete(out)
            filler = fill(small_disk)
            # The stale flag flips while the disk is full (configs.json cannot be written),
            # then flips back: the content is again what the disk holds.
            agent.store.set_stale(True)
            await hold_complete(out, 1.0)
            agent.store.set_stale(False)
            await hold_complete(out, 8.0, until=lambda: failures() >= 1 and ok())
            assert check_complete(out) == first
            # A real change while the disk is full: HTTP has it, the files keep the last set.
            await writer.set(org, "ai", "threshold", 0.9, actor="t")
            await writer.set(org, "ai", "big", "b" * 20_000, actor="t")
            await hold_complete(out, 5.0, until=lambda: not ok() and agent.store.snapshot.revision == 5)
            assert await http_entry(agent, "ai", "threshold") == b"0.9"
            await hold_complete(out, 2.0)  # retries go on, the set stays whole, nothing piles up
            assert check_complete(out)["revision"] == first["revision"]
            assert internal_names(out) == set()
            status = health()
            assert status["ok"] is False and "No space left on device" in status["last_error"]
            assert status["revision"] == first["revision"] and status["failures"] >= 2
            # Space comes back: the agent catches up by itself.
            filler.unlink()
            await hold_complete(out, 10.0, until=ok)
            assert (await quiet(out, 5))["configs"]["ai"]["big"]["value"] == "b" * 20_000
            assert health()["ok"] is True and health()["revision"] == 5
            # Read-only: the same.
            remount(small_disk, "ro")
            try:
                await writer.set(org, "ai", "threshold", 0.1, actor="t")
                await hold_complete(out, 5.0, until=lambda: not ok())
                assert "Read-only file system" in health()["last_error"]
                assert await http_entry(agent, "ai", "threshold") == b"0.1"
                assert check_complete(out)["revision"] == 5
            finally:
                remount(small_disk, "rw")
            await hold_complete(out, 10.0, until=ok)
            assert (await quiet(out, 6))["configs"]["ai"]["threshold"]["value"] == 0.1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 3, errors  # one line per run of failures, not one per retry
    assert all("keeping the last complete set, retrying" in line for line in errors)
    recovered = [r.getMessage() for r in caplog.records if "file set written again" in r.getMessage()]
    assert len(recovered) == 3, recovered
