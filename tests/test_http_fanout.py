"""1,000 long-polls and 300 SSE streams on a real `config-agent run`: one change reaches all.

The agent runs as a user runs it (a process, PostgreSQL, Redis, a change written by
ConfigWriter); the test holds 1,300 connections, checks that every one of them
gets the change, measures the agent's RSS (printed with -s), and stops the agent
with SIGTERM while they are still open: exit 0 within 5 s.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time
from pathlib import Path

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from agent.db.writer import ConfigWriter
from tests.agent_harness import wait_http_ready
from tests.servers import free_port

pytestmark = pytest.mark.anyio
LONG_POLLS = 1000
STREAMS = 300


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def read_response(reader: BufferedByteReceiveStream) -> tuple[int, bytes]:
    """One Content-Length framed response: status and body."""
    head = await reader.receive_until(b"\r\n\r\n", 65536)
    lines = head.decode("latin-1").split("\r\n")
    length = next((int(line.split(":", 1)[1]) for line in lines[1:]
                   if line.lower().startswith("content-length:")), 0)
    body = await reader.receive_exactly(length) if length else b""
    return int(lines[0].split(" ")[1]), body


@pytest.mark.slow
async def test_a_change_reaches_1000_long_polls_and_300_streams(
    db_url: str, redis_url: str, org: str, tmp_path: Path
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    async with await ConfigWriter.open(db_url, redis_url=redis_url) as writer:
        first = await writer.set(org, "ai", "threshold", 0.75, actor="test")
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIG_AGENT_")}
        env.update({"CONFIG_AGENT_DATABASE_URL": db_url, "CONFIG_AGENT_REDIS_URL": redis_url,
                    "CONFIG_AGENT_ORG_ID": org, "CONFIG_AGENT_HTTP_PORT": str(port),
                    "CONFIG_AGENT_METRICS_PORT": "0", "CONFIG_AGENT_LOG_LEVEL": "warning"})
        log = (tmp_path / "agent.log").open("wb")
        agent = await anyio.open_process([sys.executable, "-m", "agent", "run"], env=env,
                                         stdout=log, stderr=log)
        streams: list[anyio.abc.SocketStream] = []
        try:
            await wait_http_ready(f"http://127.0.0.1:{port}", 30)
            rss_ready = rss_bytes(agent.pid)
            readers: list[BufferedByteReceiveStream] = []
            with anyio.fail_after(30):
                for n in range(LONG_POLLS + STREAMS):
                    stream = await anyio.connect_tcp("127.0.0.1", port)
                    streams.append(stream)
                    readers.append(BufferedByteReceiveStream(stream))
                    if n < LONG_POLLS:
                        await stream.send(b"GET /v1/configs?after=%d&wait=120 HTTP/1.1\r\nHost: x\r\n\r\n"
                                          % first.revision)
                    else:
                        await stream.send(b"GET /v1/watch HTTP/1.1\r\nHost: x\r\nLast-Event-ID: %d\r\n\r\n"
                                          % first.revision)
                for reader in readers[LONG_POLLS:]:  # every stream is open
                    head = await reader.receive_until(b"\r\n\r\n", 65536)
                    assert head.startswith(b"HTTP/1.1 200")
                    assert (await reader.receive_until(b"\n\n", 64)).endswith(b"retry: 1000")  # chunked
            await anyio.sleep(1)
            rss_waiting = rss_bytes(agent.pid)

            second = await writer.set(org, "ai", "threshold", 0.5, actor="test")
            changed = time.perf_counter()
            arrivals: list[float] = []

            async def long_poll(reader: BufferedByteReceiveStream) -> None:
                status, body = await read_response(reader)
                assert status == 200 and json.loads(body)["revision"] == second.revision
                arrivals.append(time.perf_counter() - changed)

            async def sse(reader: BufferedByteReceiveStream) -> None:
                event = await reader.receive_until(b"\n\n", 65536)
                assert b"event: change" in event and b"id: %d" % second.revision in event
                assert json.loads(event.split(b"data: ", 1)[1])["value"] == 0.5
                arrivals.append(time.perf_counter() - changed)

            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    for n, reader in enumerate(readers):
                        tg.start_soon(long_poll if n < LONG_POLLS else sse, reader)
            rss_delivered = rss_bytes(agent.pid)
            arrivals.sort()

            # The long-polls wait again on their keep-alive connections; SIGTERM with all open.
            for stream in streams[:LONG_POLLS]:
                await stream.send(b"GET /v1/configs?after=%d&wait=120 HTTP/1.1\r\nHost: x\r\n\r\n"
                                  % second.revision)
            await anyio.sleep(1)
            stopping = time.perf_counter()
            agent.send_signal(signal.SIGTERM)
            with anyio.fail_after(10):
                code = await agent.wait()
            stop_seconds = time.perf_counter() - stopping
        finally:
            for stream in streams:
                await stream.aclose()
            if agent.returncode is None:
                agent.kill()
                await agent.wait()
            log.close()
    mib = 2**20
    print(f"{LONG_POLLS} long-polls + {STREAMS} SSE: RSS ready {rss_ready / mib:.1f} MiB, "
          f"waiting {rss_waiting / mib:.1f} MiB, after the change {rss_delivered / mib:.1f} MiB; "
          f"change reached all in {arrivals[-1] * 1e3:.0f} ms (median {arrivals[len(arrivals) // 2] * 1e3:.0f}); "
          f"SIGTERM -> exit {code} in {stop_seconds:.2f} s")  # shown with -s
    assert len(arrivals) == LONG_POLLS + STREAMS
    assert code == 0, (tmp_path / "agent.log").read_text()[-2000:]
    assert stop_seconds < 5
    assert rss_delivered - rss_ready < 64 * mib, (rss_ready, rss_waiting, rss_delivered)
