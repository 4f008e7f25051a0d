"""The local HTTP API (SPEC §4) over real TCP and Unix-socket connections.

The server runs in the test's event loop (or, for the resource test, in a
subprocess); the store is fed Change objects directly, so any Store works.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from agent.metrics import Metrics
from agent.settings import Settings
from agent.sinks.render import configs_body
from agent.sinks.server import ApiServer, Listening
from agent.status import SyncStatus
from agent.store import Store
from bench.common import ROOT
from tests.agent_harness import Running, serving_api
from tests.builders import STAMP, change
from tests.rawhttp import exchange

pytestmark = pytest.mark.anyio
ORG = "acme"




def loaded_store(history: int = 10_000) -> Store:
    """A store after a warm-load of a few entries at revision 10."""
    store = Store(ORG, history=history)
    store.apply(
        [
            change("ai", "threshold", 0.9, 5, 7),
            change("ai", "model", "gpt", 1, 8),
            change("email", "max_retries", 3, 2, 9),
            change("features", "dark_mode", {"on": True, "pct": [1, 2]}, 1, 10),
        ],
        revision=10,
        source="warmload",
    )
    return store


@pytest.fixture
def store() -> Store:
    """The store the server reads; tests replace it by parametrizing this fixture."""
    return loaded_store()


@pytest.fixture
async def running(store: Store, tmp_path: Path) -> AsyncIterator[Running]:
    """An ApiServer on 127.0.0.1:<free port> and <tmp>/api.sock, heartbeat 0.2 s."""
    async with serving_api(store, tmp_path, heartbeat=0.2) as running:
        yield running


async def test_reads_serve_the_snapshot_with_etag(running: Running) -> None:
    snapshot = running.store.snapshot
    r = await running.tcp.get("/v1/configs")
    assert r.status_code == 200
    assert r.content == configs_body(snapshot)
    assert r.headers["content-type"] == "application/json"
    assert r.headers["etag"] == '"10"'
    doc = r.json()
    assert doc["org_id"] == ORG and doc["revision"] == 10 and doc["stale"] is False
    assert doc["configs"]["ai"]["threshold"] == {"value": 0.9, "version": 5, "updated_at": STAMP}

    r = await running.tcp.get("/v1/configs", headers={"If-None-Match": '"10"'})
    assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == '"10"'
    r = await running.tcp.get("/v1/configs", headers={"If-None-Match": 'W/"9", "10"'})
    assert r.status_code == 304
    r = await running.tcp.get("/v1/configs", headers={"If-None-Match": '"9"'})
    assert r.status_code == 200

    r = await running.tcp.get("/v1/configs/ai")
    assert r.json() == {
        "model": {"value": "gpt", "version": 1, "updated_at": STAMP},
        "threshold": {"value": 0.9, "version": 5, "updated_at": STAMP},
    }
    r = await running.tcp.get("/v1/configs/ai/threshold")
    assert r.json() == {"value": 0.9, "version": 5, "updated_at": STAMP}
    assert r.headers["etag"] == '"10"'
    raw = {
        "ai/threshold": b"0.9",
        "ai/model": b"gpt",
        "features/dark_mode": b'{"on":true,"pct":[1,2]}',
    }
    for path, expected in raw.items():
        r = await running.tcp.get(f"/v1/configs/{path}?format=raw")
        assert (r.status_code, r.content) == (200, expected)
        assert r.headers["content-type"].startswith("text/plain")

    for path in ("/v1/configs/nope", "/v1/configs/ai/nope", "/v1/configs/nope/threshold"):
        r = await running.tcp.get(path)
        assert r.status_code == 404
        assert "error" in r.json()


async def test_reads_follow_changes_and_deletions(running: Running) -> None:
    running.store.apply(
        [change("ai", "threshold", 0.5, 6, 11), change("ai", "model", None, 2, 11, deleted=True)],
        revision=11,
        source="pubsub",
    )
    assert (await running.tcp.get("/v1/configs/ai/threshold?format=raw")).content == b"0.5"
    assert (await running.tcp.get("/v1/configs/ai/model")).status_code == 404
    doc = (await running.tcp.get("/v1/configs")).json()
    assert doc["revision"] == 11 and "model" not in doc["configs"]["ai"]
    running.store.set_stale(True)
    r = await running.tcp.get("/v1/configs")
    assert r.json()["stale"] is True and r.headers["x-config-stale"] == "true"


async def test_probes_and_status(running: Running) -> None:
    assert (await running.tcp.get("/healthz")).status_code == 200
    assert (await running.tcp.get("/readyz")).status_code == 200
    running.status.set_ready(False)
    r = await running.tcp.get("/readyz")
    assert r.status_code == 503 and r.json() == {"status": "not ready"}
    status = (await running.tcp.get("/v1/status")).json()
    assert status["revision"] == 10 and status["entries"] == 4 and status["ready"] is False
    spec = (await running.tcp.get("/openapi.json")).json()
    assert "/v1/configs/{service}/{key}" in spec["paths"]


@pytest.mark.parametrize("store", [Store(ORG)], ids=["unloaded"])
async def test_reads_before_the_first_load_are_503(running: Running) -> None:
    r = await running.tcp.get("/v1/configs")
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json() == {"error": "not loaded yet"}


async def test_same_answers_over_the_unix_socket(running: Running, tmp_path: Path) -> None:
    mode = stat.S_IMODE(os.stat(tmp_path / "api.sock").st_mode)
    assert mode == 0o660
    requests: list[tuple[str, str, dict[str, str]]] = [
        ("GET", "/v1/configs", {}),
        ("GET", "/v1/configs", {"If-None-Match": '"10"'}),
        ("GET", "/v1/configs?after=9", {}),
        ("GET", "/v1/configs?after=10&wait=0.05", {}),
        ("GET", "/v1/configs/ai", {}),
        ("GET", "/v1/configs/ai/threshold", {}),
        ("GET", "/v1/configs/ai/model?format=raw", {}),
        ("GET", "/v1/configs/ai/nope", {}),
        ("GET", "/v1/configs?wait=x&after=1", {}),
        ("HEAD", "/v1/configs", {}),
        ("POST", "/v1/configs", {}),
        ("GET", "/healthz", {}),
        ("GET", "/readyz", {}),
        ("GET", "/nope", {}),
    ]
    for method, path, headers in requests:
        a = await running.tcp.request(method, path, headers=headers)
        b = await running.uds.request(method, path, headers=headers)
        assert (a.status_code, a.content) == (b.status_code, b.content), path
        for name in ("content-type", "etag", "content-length", "allow"):
            assert a.headers.get(name) == b.headers.get(name), (path, name)
    a = (await running.tcp.get("/v1/status")).json()
    b = (await running.uds.get("/v1/status")).json()
    assert a == b


async def test_long_poll_answers_within_50ms_of_a_change(running: Running) -> None:
    for client in (running.tcp, running.uds):
        revision = running.store.snapshot.revision
        answered: list[tuple[float, httpx.Response]] = []

        async def poll(
            client: httpx.AsyncClient = client,
            revision: int = revision,
            answered: list[tuple[float, httpx.Response]] = answered,
        ) -> None:
            r = await client.get(f"/v1/configs?after={revision}&wait=30")
            answered.append((time.perf_counter(), r))

        async with anyio.create_task_group() as tg:
            tg.start_soon(poll)
            await anyio.sleep(0.3)  # the poll is parked on the server by now
            assert not answered
            applied_at = time.perf_counter()
            running.store.apply(
                [change("ai", "threshold", revision, revision, revision + 1)],
                revision=revision + 1,
                source="pubsub",
            )
        done_at, r = answered[0]
        assert r.status_code == 200 and r.json()["revision"] == revision + 1
        assert r.headers["etag"] == f'"{revision + 1}"'
        assert done_at - applied_at < 0.05


async def test_idle_long_poll_is_304_at_wait(running: Running) -> None:
    started = time.perf_counter()
    r = await running.tcp.get("/v1/configs?after=10&wait=0.4")
    elapsed = time.perf_counter() - started
    assert r.status_code == 304 and r.headers["etag"] == '"10"'
    assert 0.4 <= elapsed < 1.0
    # Already newer: answers at once, whatever the wait.
    started = time.perf_counter()
    r = await running.tcp.get("/v1/configs?after=3&wait=300")
    assert r.status_code == 200 and time.perf_counter() - started < 0.5


async def test_abandoned_long_polls_are_released(running: Running) -> None:
    """A long-poll whose client went away stops waiting at once (no pile-up until `wait`)."""
    host, port = running.listening.api[0]
    open_requests = running.server.app.open_requests
    clients = [socket.create_connection((host, port)) for _ in range(20)]
    try:
        for sock in clients:
            sock.sendall(b"GET /v1/configs?after=10&wait=300 HTTP/1.1\r\nHost: x\r\n\r\n")
        with anyio.fail_after(5):
            while len(open_requests) < 20:  # noqa: ASYNC110 (polls state outside the loop)
                await anyio.sleep(0.01)
    finally:
        for sock in clients:
            sock.close()
    with anyio.fail_after(5):
        while len(open_requests) > 0:  # noqa: ASYNC110 (polls state outside the loop)
            await anyio.sleep(0.01)


# A watcher in its own process, killed with SIGKILL mid-stream: it prints one line
# per event it has processed, so what it printed is exactly what it consumed.
SSE_CLIENT = textwrap.dedent(
    """
    import http.client, sys
    conn = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]))
    conn.request("GET", "/v1/watch")
    resp = conn.getresponse()
    assert resp.status == 200, resp.status
    event = {}
    while True:
        line = resp.fp.readline().decode().rstrip("\\n")
        if line == "":
            if "data" in event:
                print(event.get("event"), event.get("id", "-"), event["data"], flush=True)
            event = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            event[name] = value
    """
)


@dataclass
class Event:
    """One parsed SSE event."""

    event: str
    id: str | None
    data: Any


async def read_events(
    lines: AsyncIterator[str], until: Callable[[list[Event]], bool], pings: list[str] | None = None
) -> list[Event]:
    """Parse SSE events from `lines` (one `aiter_lines()` per stream) until `until(events)`."""
    events: list[Event] = []
    fields: dict[str, str] = {}
    async for line in lines:
        if line == "":
            if "data" in fields:
                events.append(Event(fields.get("event", "message"), fields.get("id"), json.loads(fields["data"])))
                if until(events):
                    return events
            fields = {}
        elif line.startswith(":"):
            if pings is not None:
                pings.append(line)
        else:
            name, _, value = line.partition(": ")
            fields[name] = value
    raise AssertionError("stream ended")


async def test_sse_delivers_every_change_in_order_and_resumes_without_gap(
    running: Running,
) -> None:
    store = running.store
    total = 400
    first = store.snapshot.revision + 1
    last = first + total - 1

    async def produce() -> None:
        for revision in range(first, last + 1):
            store.apply(
                [change("ai", f"k{revision % 7}", revision, revision, revision)],
                revision=revision,
                source="pubsub",
            )
            await anyio.sleep(0.002)

    host, port = running.listening.api[0]
    client = await anyio.open_process(
        [sys.executable, "-c", SSE_CLIENT, host, str(port)], stderr=subprocess.STDOUT
    )
    seen: list[str] = []
    async with anyio.create_task_group() as tg:
        assert client.stdout is not None
        buffer = b""
        with anyio.fail_after(10):
            while len(seen) < 1:  # the initial snapshot event
                buffer += await client.stdout.receive()
                *lines, rest = buffer.split(b"\n")
                buffer = rest
                seen += [line.decode() for line in lines]
        tg.start_soon(produce)
        with anyio.fail_after(10):
            while len(seen) < 1 + total // 4:
                buffer += await client.stdout.receive()
                *lines, rest = buffer.split(b"\n")
                buffer = rest
                seen += [line.decode() for line in lines]
        client.kill()  # SIGKILL mid-stream; whatever it did not print, it did not process
        await client.wait()
        assert seen[0].startswith("snapshot 10 ")
        killed_changes = [json.loads(line.split(" ", 2)[2]) for line in seen[1:]]
        assert all(line.startswith("change ") for line in seen[1:])
        resume_from = seen[-1].split(" ")[1]

        async with running.tcp.stream(
            "GET", "/v1/watch", headers={"Last-Event-ID": resume_from}
        ) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            resumed = await read_events(stream.aiter_lines(), lambda ev: ev[-1].data["revision"] == last)
    assert all(e.event == "change" for e in resumed)
    revisions = [c["revision"] for c in killed_changes] + [e.data["revision"] for e in resumed]
    assert revisions == list(range(first, last + 1))  # every change, in order, once
    assert all(e.id == str(e.data["revision"]) for e in resumed)
    assert resumed[-1].data == {
        "service": "ai", "key": f"k{last % 7}", "version": last, "revision": last,
        "value": last, "deleted": False,
    }


async def test_sse_starts_with_a_snapshot_and_pings_when_idle(running: Running) -> None:
    pings: list[str] = []
    async with running.tcp.stream("GET", "/v1/watch") as stream:
        lines = stream.aiter_lines()
        events = await read_events(lines, lambda ev: True)
        assert (events[0].event, events[0].id) == ("snapshot", "10")
        assert events[0].data == (await running.uds.get("/v1/configs")).json()
        running.store.apply(
            [change("ai", "threshold", None, 6, 11, deleted=True)], revision=11, source="pubsub"
        )
        events = await read_events(lines, lambda ev: True)
        assert events[0].data == {
            "service": "ai", "key": "threshold", "version": 6, "revision": 11,
            "value": None, "deleted": True,
        }
        with anyio.fail_after(2):
            async for line in lines:
                if line.startswith(":"):
                    pings.append(line)
                    if len(pings) == 2:
                        break
    assert pings == [": ping", ": ping"]


@pytest.mark.parametrize("store", [loaded_store(history=5)], ids=["short-history"])
async def test_sse_resume_beyond_history_sends_a_snapshot_first(running: Running) -> None:
    for revision in range(11, 31):
        running.store.apply(
            [change("ai", "threshold", revision, revision, revision)], revision=revision, source="pubsub"
        )
    async with running.tcp.stream("GET", "/v1/watch", headers={"Last-Event-ID": "12"}) as stream:
        lines = stream.aiter_lines()
        events = await read_events(lines, lambda ev: True)
        assert (events[0].event, events[0].id) == ("snapshot", "30")
        assert events[0].data["configs"]["ai"]["threshold"]["value"] == 30
        running.store.apply([change("ai", "threshold", 31, 31, 31)], revision=31, source="pubsub")
        events = await read_events(lines, lambda ev: True)
        assert (events[0].event, events[0].id, events[0].data["value"]) == ("change", "31", 31)
    # Within the history: exactly the changes after the given id.
    async with running.tcp.stream("GET", "/v1/watch", headers={"Last-Event-ID": "28"}) as stream:
        events = await read_events(stream.aiter_lines(), lambda ev: len(ev) == 3)
        assert [e.id for e in events] == ["29", "30", "31"]


async def test_changes_of_one_revision_share_one_resumable_id(running: Running) -> None:
    async with running.tcp.stream("GET", "/v1/watch", headers={"Last-Event-ID": "10"}) as stream:
        lines = stream.aiter_lines()
        running.store.apply(
            [change("ai", "a", 1, 1, 11), change("ai", "b", 2, 1, 11), change("ai", "c", 3, 1, 12)],
            revision=12,
            source="pubsub",
        )
        events = await read_events(lines, lambda ev: len(ev) == 3)
    # No id inside revision 11, so a client cut off after "a" resumes from 10 and gets "b".
    assert [(e.data["key"], e.id) for e in events] == [("a", None), ("b", "11"), ("c", "12")]


BAD_REQUESTS: list[tuple[bytes, int]] = [
    (b"GET /v1/configs/../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    (b"GET /v1/configs/%2e%2e/%2e%2e/etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    (b"GET /v1/configs/ai/..%2f..%2fetc HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    (b"GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    (b"GET /v1/configs/ai/threshold/extra HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    (b"GET /v1/configs/AI HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    (b"GET /v1/configs/ai%00/threshold HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    (b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    (b"GET /v1/configs?after=-1 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET /v1/configs?after=abc HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET /v1/configs?after=1e3 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET /v1/configs?after=99999999999999999999999 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET /v1/configs?after=1&wait=-1 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET /v1/configs?after=1&wait=301 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET /v1/configs?after=1&wait=nan HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET /v1/configs?after=1&wait=inf HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET /v1/configs?after=%ff HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET /v1/configs/ai/threshold?format=xml HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET /v1/watch HTTP/1.1\r\nHost: x\r\nLast-Event-ID: abc\r\n\r\n", 400),
    (b"POST /v1/configs HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", 405),
    (b"DELETE /v1/configs/ai/threshold HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    (b"PUT /v1/configs/ai/threshold HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n1", 405),
    (b"PATCH /v1/watch HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    (b"OPTIONS /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /v1/configs HTTP/9.9\r\n\r\n", 400),
    (b"GET /v1/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET /v1/configs HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n", 431),
    (b"GET /v1/configs HTTP/1.1\r\n" + b"X-Many: 0123456789\r\n" * 5000 + b"\r\n", 431),
    (b"GET /v1/configs?x=" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431),
]


@pytest.mark.parametrize(("request_bytes", "expected"), BAD_REQUESTS, ids=lambda v: repr(v)[:40])
async def test_bad_requests_get_json_4xx(
    running: Running, request_bytes: bytes, expected: int
) -> None:
    for address in running.listening.api:
        status, headers, body = await anyio.to_thread.run_sync(exchange, address, request_bytes)
        assert status == expected, body
        assert headers["content-type"] == "application/json"
        assert isinstance(json.loads(body)["error"], str)
        if status == 405:
            assert headers["allow"] == "GET, HEAD"
    # The server still answers normally afterwards.
    assert (await running.tcp.get("/healthz")).status_code == 200


async def test_metrics_port_serves_prometheus_and_probes(tmp_path: Path) -> None:
    store = loaded_store()
    metrics = Metrics(ORG)
    status = SyncStatus(metrics)
    settings = Settings(org_id=ORG, http_port=0, metrics_host="127.0.0.1", metrics_port=free_port())
    metrics.revision.labels(org_id=ORG).set(10)
    async with anyio.create_task_group() as tg:
        listening: Listening = await tg.start(ApiServer(store, status, settings).run)
        host, port = listening.metrics[0]
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as client:
            r = await client.get("/metrics")
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/plain; version=")
            assert 'config_agent_revision{org_id="acme"} 10.0' in r.text
            assert (await client.get("/healthz")).status_code == 200
            assert (await client.get("/readyz")).status_code == 503
            status.set_ready(True)
            assert (await client.get("/readyz")).status_code == 200
            r = await client.get("/v1/configs")  # values are never on this port
            assert r.status_code == 404 and r.json() == {"error": "no such path"}
            r = await client.post("/metrics")
            assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"
        tg.cancel_scope.cancel()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_stale_socket_file_is_replaced_and_removed_at_exit(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on, as a crashed agent leaves it
    settings = Settings(org_id=ORG, http_port=0, metrics_port=0, socket_path=path, socket_mode=0o600)
    status = SyncStatus(Metrics(ORG))
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(ApiServer(loaded_store(), status, settings).run)
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            transport = httpx.AsyncHTTPTransport(uds=str(path))
            async with httpx.AsyncClient(transport=transport, base_url="http://agent") as client:
                assert (await client.get("/healthz")).status_code == 200
                # Shutdown ends open streams and long-polls promptly.
                async with anyio.create_task_group() as clients:
                    clients.start_soon(client.get, "/v1/configs?after=10&wait=300")
                    await anyio.sleep(0.2)
                    started = time.perf_counter()
                    tg.cancel_scope.cancel()
    assert time.perf_counter() - started < 3
    assert not path.exists()


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def timed_reads(port: int, count: int) -> float:
    """Median seconds of `count` sequential keep-alive reads of one entry."""
    durations = []
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        for n in range(count):
            started = time.perf_counter()
            r = await client.get(f"/v1/configs/svc{n % 20}/key{n - n % 20 + n % 20}")
            durations.append(time.perf_counter() - started)
            assert r.status_code == 200
    durations.sort()
    return durations[len(durations) // 2]


@pytest.mark.slow
async def test_a_thousand_idle_watchers_cost_little(tmp_path: Path) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    # The agent's API alone in a process, with 1,000 entries, so its RSS is measurable.
    server = await anyio.open_process([sys.executable, "-m", "bench.api_process", "--org", "acme",
                                       "--entries", "1000"], cwd=ROOT)
    streams: list[anyio.abc.SocketStream] = []
    try:
        assert server.stdout is not None
        with anyio.fail_after(20):
            port = int((await server.stdout.receive()).decode().split()[1])
        await timed_reads(port, 300)  # warm up: caches, allocator
        before_latency = await timed_reads(port, 1000)
        before_rss = rss_bytes(server.pid)
        with anyio.fail_after(60):
            for n in range(1000):
                stream = await anyio.connect_tcp("127.0.0.1", port)
                streams.append(stream)
                if n % 2:
                    await stream.send(b"GET /v1/watch HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 1000\r\n\r\n")
                else:
                    await stream.send(b"GET /v1/configs?after=1000&wait=120 HTTP/1.1\r\nHost: x\r\n\r\n")
            for stream in streams[1::2]:  # every stream answered its headers
                assert (await stream.receive()).startswith(b"HTTP/1.1 200")
        await anyio.sleep(0.5)
        after_latency = await timed_reads(port, 1000)
        after_rss = rss_bytes(server.pid)
    finally:
        for stream in streams:
            await stream.aclose()
        server.kill()
        await server.wait()
    print(f"1000 idle watchers: read median {before_latency * 1e3:.3f} -> {after_latency * 1e3:.3f} ms, "
          f"RSS {before_rss / 2**20:.1f} -> {after_rss / 2**20:.1f} MiB")  # shown with -s
    assert after_latency <= 2 * before_latency, (before_latency, after_latency)
    assert after_rss - before_rss <= 30 * 2**20, (before_rss, after_rss)
