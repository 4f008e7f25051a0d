"""Run a real agent (or only its API server) in the test's event loop, and wait for conditions on it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import asyncpg
import httpx

from agent.app import Agent
from agent.metrics import Metrics
from agent.settings import Settings, load_settings
from agent.sinks.server import ApiServer, Listening
from agent.status import SyncStatus
from agent.store import Store
from tests.servers import free_port


@asynccontextmanager
async def running_agent(*, wait_ready: bool = True, **overrides: Any) -> AsyncIterator[Agent]:
    """Start an agent with test-friendly defaults; stop it on exit.

    `wait_ready=False` yields at once, for an agent that may never become ready.
    """
    options: dict[str, Any] = {"http_port": free_port(), "metrics_port": free_port()}
    options.update(overrides)
    agent = Agent(load_settings(**options))
    try:
        async with anyio.create_task_group() as tg:
            if wait_ready:
                with anyio.fail_after(30):
                    await tg.start(agent.run)
            else:
                tg.start_soon(agent.run)
            try:
                yield agent
            finally:
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await agent.source.close()


async def eventually(check: Callable[[], bool], timeout: float, what: str = "condition") -> float:
    """Wait until `check()` holds; return the seconds it took (fail after `timeout`)."""
    start = anyio.current_time()
    while not check():
        if anyio.current_time() - start > timeout:
            raise AssertionError(f"{what} did not hold within {timeout}s")
        await anyio.sleep(0.005)
    return anyio.current_time() - start


async def db_state(db: asyncpg.Connection, org: str) -> dict[tuple[str, str], tuple[Any, int]]:
    """The live entries of an org in PostgreSQL: (service, key) → (value, version)."""
    import json

    rows = await db.fetch("SELECT service, key, value::text AS value, version FROM service_configs "
                          "WHERE org_id = $1 AND NOT deleted", org)
    return {(r["service"], r["key"]): (json.loads(r["value"]), r["version"]) for r in rows}


def agent_state(agent: Agent) -> dict[tuple[str, str], tuple[Any, int]]:
    """The agent's snapshot in the same shape as `db_state`."""
    return {k: (e.value, e.version) for k, e in agent.store.snapshot.entries.items()}


def metric(agent: Agent, name: str, labels: dict[str, str] | None = None) -> float:
    """A sample value from the agent's registry (0 when absent)."""
    value = agent.metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


async def wait_http_ready(base_url: str, timeout: float, path: str = "/readyz") -> None:
    """Poll `path` of a starting process until it answers 200 (fail after `timeout`)."""
    import httpx

    async with httpx.AsyncClient(base_url=base_url) as client:
        with anyio.fail_after(timeout):
            while True:
                try:
                    if (await client.get(path)).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await anyio.sleep(0.05)


@dataclass
class Running:
    """A running ApiServer (no agent around it) and clients for both of its listeners."""

    store: Store
    status: SyncStatus
    server: ApiServer
    listening: Listening
    tcp: httpx.AsyncClient
    uds: httpx.AsyncClient

    @property
    def base_url(self) -> str:
        host, port = self.listening.api[0]
        return f"http://{host}:{port}"


@asynccontextmanager
async def serving_api(store: Store, tmp_path: Path, **server_options: Any) -> AsyncIterator[Running]:
    """An ApiServer over `store` on 127.0.0.1:<free port> and <tmp>/api.sock, in this event loop."""
    settings = Settings(org_id=store.snapshot.org_id, http_port=0, metrics_port=0,
                        socket_path=tmp_path / "api.sock")
    status = SyncStatus(Metrics(store.snapshot.org_id))
    status.set_ready(True)
    server = ApiServer(store, status, settings, **server_options)
    async with anyio.create_task_group() as tg:
        listening: Listening = await tg.start(server.run)
        host, port = listening.api[0]
        uds = httpx.AsyncHTTPTransport(uds=str(tmp_path / "api.sock"))
        async with (
            httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=10) as tcp,
            httpx.AsyncClient(transport=uds, base_url="http://agent", timeout=10) as unix,
        ):
            yield Running(store, status, server, listening, tcp, unix)
        tg.cancel_scope.cancel()


@contextmanager
def api_in_thread(store: Store) -> Iterator[str]:
    """An ApiServer over `store` in a background thread (for synchronous clients); its base URL."""
    status = SyncStatus(Metrics(store.snapshot.org_id))
    status.set_ready(True)
    server = ApiServer(store, status, Settings(org_id=store.snapshot.org_id, http_port=0, metrics_port=0))
    with anyio.from_thread.start_blocking_portal("asyncio", {"use_uvloop": True}) as portal:
        future, listening = portal.start_task(server.run)
        assert isinstance(listening, Listening)
        host, port = listening.api[0]
        yield f"http://{host}:{port}"
        future.cancel()
