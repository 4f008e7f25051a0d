"""Change hooks: exec, signal and webhook fire once per burst, bounded in time.

Real subprocesses, real signals, a real local HTTP server; no mocks.
"""

from __future__ import annotations

import json
import logging
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream

from agent.metrics import Metrics
from agent.model import Change
from agent.settings import Settings
from agent.sinks.changes import ChangedEntry, ChangeSummary
from agent.sinks.files import FileSink
from agent.sinks.hooks import ChangeHooks
from agent.store import Store

pytestmark = pytest.mark.anyio
ORG = "acme"



def summary(revision: int, key: str = "threshold", *, deleted: bool = False) -> ChangeSummary:
    """A one-entry change summary."""
    return ChangeSummary(ORG, revision, (ChangedEntry("ai", key, revision, deleted),))


def entry_change(revision: int) -> Change:
    """Entry ai/t moves to version = revision = value."""
    return Change("ai", "t", revision, revision, revision, False, "x")


def runs(metrics: Metrics, hook: str, result: str) -> float:
    """How often `hook` ended with `result`, read from the Prometheus registry."""
    value = metrics.registry.get_sample_value(
        "config_agent_hook_runs_total", {"hook": hook, "result": result}
    )
    return value or 0.0


async def wait_for(condition: Any, seconds: float = 5.0) -> None:
    """Poll `condition()` until true."""
    with anyio.fail_after(seconds):
        while not condition():  # noqa: ASYNC110 (polls state outside the loop)
            await anyio.sleep(0.01)


async def test_exec_fires_once_per_burst_with_the_revision(tmp_path: Path) -> None:
    log_file = tmp_path / "runs"
    metrics = Metrics(ORG)
    hooks = ChangeHooks(
        ORG, exec_command=f'echo "$CONFIG_AGENT_REVISION $CONFIG_AGENT_ORG_ID" >> {log_file}',
        debounce=0.1, metrics=metrics,
    )
    async with anyio.create_task_group() as tg:
        await tg.start(hooks.run)
        for revision in range(1, 51):  # a burst: faster than the debounce
            hooks.notify(summary(revision))
            await anyio.sleep(0.001)
        await wait_for(lambda: log_file.exists())
        await anyio.sleep(0.4)
        assert log_file.read_text() == "50 acme\n"
        hooks.notify(summary(51))  # a later, separate change
        await wait_for(lambda: log_file.read_text().count("\n") == 2)
        await anyio.sleep(0.3)
        tg.cancel_scope.cancel()
    assert log_file.read_text() == "50 acme\n51 acme\n"
    assert runs(metrics, "exec", "ok") == 2


async def test_a_burst_during_a_run_causes_exactly_one_more_run(tmp_path: Path) -> None:
    log_file = tmp_path / "runs"
    hooks = ChangeHooks(
        ORG, exec_command=f'echo "start $CONFIG_AGENT_REVISION" >> {log_file}; sleep 0.5', debounce=0.05
    )
    async with anyio.create_task_group() as tg:
        await tg.start(hooks.run)
        hooks.notify(summary(1))
        await wait_for(lambda: log_file.exists())
        for revision in range(2, 30):  # all while the first run is still going
            hooks.notify(summary(revision))
            await anyio.sleep(0.005)
        await wait_for(lambda: log_file.read_text().count("\n") == 2)
        await anyio.sleep(1.0)
        tg.cancel_scope.cancel()
    assert log_file.read_text() == "start 1\nstart 29\n"


SIGNAL_COUNTER = textwrap.dedent(
    """
    import os, signal, sys, time
    out = sys.argv[1]
    count = 0
    def on_hup(signum, frame):
        global count
        count += 1
        with open(out, "w") as f:
            f.write(str(count))
    signal.signal(signal.SIGHUP, on_hup)
    with open(out + ".ready", "w") as f:
        f.write(str(os.getpid()))
    while True:
        time.sleep(0.05)
    """
)


async def test_signal_fires_once_per_burst(tmp_path: Path) -> None:
    counter = tmp_path / "hups"
    process = await anyio.open_process([sys.executable, "-c", SIGNAL_COUNTER, str(counter)])
    try:
        await wait_for(lambda: Path(f"{counter}.ready").exists())
        pidfile = tmp_path / "app.pid"
        pidfile.write_text(f"{process.pid}\n")
        metrics = Metrics(ORG)
        settings = Settings(
            org_id=ORG, on_change_signal="hup", signal_pidfile=pidfile, hook_debounce=0.1
        )
        hooks = ChangeHooks.from_settings(settings, metrics)
        assert hooks is not None
        async with anyio.create_task_group() as tg:
            await tg.start(hooks.run)
            for revision in range(1, 41):
                hooks.notify(summary(revision))
                await anyio.sleep(0.001)
            await wait_for(lambda: counter.exists())
            await anyio.sleep(0.5)
            assert counter.read_text() == "1"
            hooks.notify(summary(41))
            await wait_for(lambda: counter.read_text() == "2")
            tg.cancel_scope.cancel()
        assert runs(metrics, "signal", "ok") == 2
    finally:
        process.kill()
        await process.wait()


async def serve_webhook(
    received: list[tuple[bytes, bytes]], status: int = 204, *, task_status: Any
) -> None:
    """A tiny HTTP server recording (head, body) of every POST."""

    async def handle(stream: SocketStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive()
            head, _, body = data.partition(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1]) for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            while len(body) < length:
                body += await stream.receive()
            received.append((head, body))
            await stream.send(b"HTTP/1.1 %d X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n" % status)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener:
        task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))
        await listener.serve(handle)


async def test_webhook_posts_one_summary_per_burst_without_values() -> None:
    received: list[tuple[bytes, bytes]] = []
    metrics = Metrics(ORG)
    async with anyio.create_task_group() as tg:
        port = await tg.start(serve_webhook, received)
        hooks = ChangeHooks(
            ORG, webhook_url=f"http://127.0.0.1:{port}/reload?x=1", debounce=0.1, metrics=metrics
        )
        await tg.start(hooks.run)
        hooks.notify(summary(5, "threshold"))
        hooks.notify(summary(6, "model", deleted=True))
        hooks.notify(summary(7, "threshold"))
        await wait_for(lambda: len(received) == 1)
        await anyio.sleep(0.4)
        tg.cancel_scope.cancel()
    assert len(received) == 1
    head, body = received[0]
    assert head.startswith(b"POST /reload?x=1 HTTP/1.1\r\n")
    assert b"\r\ncontent-type: application/json" in head.lower()
    assert json.loads(body) == {
        "org_id": "acme",
        "revision": 7,
        "changes": [
            {"service": "ai", "key": "model", "version": 6, "deleted": True},
            {"service": "ai", "key": "threshold", "version": 7, "deleted": False},
        ],
    }
    assert runs(metrics, "webhook", "ok") == 1


async def test_a_hanging_command_is_killed_with_its_process_group(tmp_path: Path) -> None:
    child_pid = tmp_path / "child.pid"
    metrics = Metrics(ORG)
    hooks = ChangeHooks(
        ORG, exec_command=f"sleep 60 & echo $! > {child_pid}; sleep 60", timeout=0.5, metrics=metrics
    )
    started = time.perf_counter()
    await hooks.run_once(summary(1))
    assert 0.5 <= time.perf_counter() - started < 2.0
    assert runs(metrics, "exec", "timeout") == 1
    pid = int(child_pid.read_text())
    await wait_for(lambda: not Path(f"/proc/{pid}").exists() or _is_zombie(pid), 2.0)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except OSError:
        return True


async def test_failures_are_logged_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    received: list[tuple[bytes, bytes]] = []
    metrics = Metrics(ORG)
    async with anyio.create_task_group() as tg:
        port = await tg.start(serve_webhook, received, 500)
        hooks = ChangeHooks(
            ORG,
            exec_command="exit 3",
            signal_name="HUP",
            pidfile=tmp_path / "missing.pid",
            webhook_url=f"http://127.0.0.1:{port}/",
            metrics=metrics,
        )
        with caplog.at_level(logging.WARNING, logger="agent.hooks"):
            await hooks.run_once(summary(9))
        tg.cancel_scope.cancel()
    assert runs(metrics, "exec", "failed") == 1
    assert runs(metrics, "signal", "failed") == 1
    assert runs(metrics, "webhook", "failed") == 1
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "exec hook failed (revision 9): command exited with status 3" in messages
    assert "signal hook failed" in messages and "missing.pid" in messages
    assert "webhook hook failed (revision 9): webhook answered 500" in messages
    # Nobody listening: also just a counted failure.
    hooks = ChangeHooks(ORG, webhook_url=f"http://127.0.0.1:{port}/", metrics=metrics)
    await hooks.run_once(summary(10))
    assert runs(metrics, "webhook", "failed") == 2


async def test_hooks_never_hold_up_syncing_and_fire_after_the_files_changed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    seen = tmp_path / "seen"
    store = Store(ORG)
    store.apply([Change("ai", "t", 0, 1, 1, False, "x")], revision=1, source="warmload")
    sink = FileSink(out)
    # The hook reads the files: it must see the revision it is told about.
    hooks = ChangeHooks(
        ORG,
        exec_command=(
            f"{sys.executable} -c \"import json,os; d=json.load(open('{out}/configs.json'));"
            f" open('{seen}','a').write(f\\\"{{os.environ['CONFIG_AGENT_REVISION']}} {{d['revision']}}\\\\n\\\");"
            " import time; time.sleep(1)\""
        ),
        debounce=0.05,
    )
    async with anyio.create_task_group() as tg:
        await tg.start(hooks.run)
        await tg.start(lambda *, task_status: sink.run(store, on_swapped=hooks.notify, task_status=task_status))
        for revision in range(2, 102):
            started = time.perf_counter()
            store.apply([entry_change(revision)], revision=revision, source="pubsub")
            assert time.perf_counter() - started < 0.05  # apply (and notify) never wait for a hook
            await anyio.sleep(0.002)
        await wait_for(lambda: seen.exists() and seen.read_text().endswith("101 101\n"), 10)
        tg.cancel_scope.cancel()
    lines = seen.read_text().splitlines()
    # The files a hook reads are at least as new as the revision it was told about
    # (they may have moved on while it ran), never older.
    assert all(int(b) >= int(a) for a, b in (line.split() for line in lines))
    assert len(lines) <= 4  # bursts were coalesced


async def test_follow_notifies_on_new_snapshots_without_files(tmp_path: Path) -> None:
    log_file = tmp_path / "runs"
    store = Store(ORG)
    hooks = ChangeHooks(ORG, exec_command=f'echo "$CONFIG_AGENT_REVISION" >> {log_file}', debounce=0.1)
    async with anyio.create_task_group() as tg:
        await tg.start(hooks.run)
        await tg.start(hooks.follow, store)
        store.apply([Change("ai", "t", 0, 1, 1, False, "x")], revision=1, source="warmload")
        await anyio.sleep(0.3)
        assert not log_file.exists()  # the first load is not a change
        for revision in range(2, 12):
            store.apply([entry_change(revision)], revision=revision, source="pubsub")
        store.set_stale(True)  # no entry moved: nothing to report
        await wait_for(lambda: log_file.exists())
        await anyio.sleep(0.4)
        tg.cancel_scope.cancel()
    assert log_file.read_text() == "11\n"
