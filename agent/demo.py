"""`config-agent demo`: the whole system on one machine, in one command.

    demo process ─┬─ embedded PostgreSQL (child, unless CONFIG_AGENT_DATABASE_URL is set)
                  ├─ embedded redis-server (child, unless CONFIG_AGENT_REDIS_URL is set)
                  └─ one event loop: relay (LISTEN → PUBLISH), agent (HTTP, Unix socket,
                     files) and the live view that prints every applied change

Everything lives in one temporary directory (database, socket, output files)
that is removed on exit. Ctrl-C or SIGTERM stops the loop, then the servers,
then removes the directory, and exits 0; a second demo can start at once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import FrameType
from typing import TextIO

import anyio
from anyio.abc import TaskStatus

from agent.demo_servers import EmbeddedPostgres, EmbeddedRedis, free_port, port_is_free
from agent.demo_view import Where, follow_changes, instructions, say
from agent.errors import ConfigAgentError
from agent.settings import Settings

log = logging.getLogger("agent.demo")

DEMO_ORG = "acme"
# The values a first-time user sees, one per kind of setting the product is for.
SEED: tuple[tuple[str, str, object], ...] = (
    ("ai", "threshold", 0.75),
    ("email", "max_retries", 3),
    ("webhook", "url", "https://old.example.com"),
    ("features", "dark_mode", False),
)


class _Stopped(BaseException):
    """SIGTERM arrived while the demo was starting (BaseException: nothing swallows it)."""


def run_demo(settings: Settings, argv0: str, out: TextIO | None = None) -> int:
    """Run the demo until Ctrl-C/SIGTERM; 0 on a clean stop. `argv0` names the CLI for hints."""
    out = out or sys.stdout
    if settings.log_level != "debug":
        # The live view is the demo's output; routine agent logs would drown it.
        logging.getLogger("agent").setLevel(logging.WARNING)
    http_port = _pick_port(settings.http_port, "HTTP", out)
    metrics_port = _pick_port(settings.metrics_port, "metrics", out) if settings.metrics_port else 0
    with _stop_signals_raise(), ExitStack() as cleanup:
        temp_dir = Path(tempfile.mkdtemp(prefix="config-agent-demo-", dir=_temp_parent()))
        cleanup.callback(_remove_tree, temp_dir, out)
        if os.geteuid() == 0:
            # PostgreSQL runs as a non-root account and must reach its data directory below.
            temp_dir.chmod(0o711)
        try:
            database = _database(settings, temp_dir, cleanup)
            redis = _redis(settings, temp_dir, cleanup)
            agent_settings, where = _configure(settings, temp_dir, database, redis,
                                               http_port, metrics_port)
            from agent.cli import run_async

            try:
                run_async(lambda: _serve(agent_settings, where, argv0, out))
            except BaseExceptionGroup as group:
                # Task groups wrap errors; the CLI prints a ConfigAgentError as one line.
                raise _our_error(group) from group
        except (_Stopped, KeyboardInterrupt):
            pass
        finally:
            # From here on a second Ctrl-C must not interrupt the cleanup half-way.
            _ignore_stop_signals()
    return 0


def _configure(settings: Settings, temp_dir: Path, database: tuple[str, str],
               redis: tuple[str, str], http_port: int, metrics_port: int) -> tuple[Settings, Where]:
    """The agent's settings (the user's, pointed at the demo's servers and paths)."""
    (database_url, database_label), (redis_url, redis_label) = database, redis
    org_id = settings.org_id or DEMO_ORG
    agent_settings = dataclasses.replace(
        settings,
        database_url=database_url,
        database_read_url=None,
        redis_url=redis_url,
        org_id=org_id,
        http_host="127.0.0.1",
        http_port=http_port,
        socket_path=temp_dir / "agent.sock",
        output_dir=temp_dir / "files",
        metrics_host="127.0.0.1",
        metrics_port=metrics_port,
        # Nothing outlives the demo: no last-known-good snapshot outside the temp dir.
        state_dir=None,
    )
    where = Where(
        org_id=org_id,
        http_url=f"http://127.0.0.1:{http_port}",
        socket_path=temp_dir / "agent.sock",
        output_dir=temp_dir / "files",
        temp_dir=temp_dir,
        database_url=database_url,
        redis_url=redis_url,
        metrics_url=f"http://127.0.0.1:{metrics_port}/metrics" if metrics_port else None,
        database_label=database_label,
        redis_label=redis_label,
    )
    return agent_settings, where


def _our_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first ConfigAgentError inside (nested) task-group errors, else the group."""
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        elif isinstance(exc, ConfigAgentError):
            return exc
    return group


def _temp_parent() -> str:
    """Where the temp dir goes: $TMPDIR, unless root's PostgreSQL account cannot enter it."""
    parent = Path(tempfile.gettempdir()).resolve()
    if os.geteuid() != 0:
        return str(parent)
    for folder in (parent, *parent.parents):
        if not folder.stat().st_mode & stat.S_IXOTH:
            # e.g. TMPDIR under /root: fall back rather than open up the user's folders.
            return "/tmp"
    return str(parent)


def _pick_port(port: int, what: str, out: TextIO) -> int:
    """`port`, or a free one (said out loud) when it is taken or 0."""
    if port and port_is_free(port):
        return port
    chosen = free_port()
    if port:
        say([f"note: {what} port {port} is in use; using {chosen} instead"], out)
    return chosen


def _database(settings: Settings, temp_dir: Path, cleanup: ExitStack) -> tuple[str, str]:
    """(URL, label) of the configured PostgreSQL, else of an embedded one started here."""
    if settings.database_url:
        return settings.database_url, "PostgreSQL from CONFIG_AGENT_DATABASE_URL"
    pg = EmbeddedPostgres(temp_dir / "pg")
    cleanup.callback(pg.stop)
    pg.start()
    return pg.url, f"embedded PostgreSQL {pg.version} on 127.0.0.1:{pg.port}"


def _redis(settings: Settings, temp_dir: Path, cleanup: ExitStack) -> tuple[str, str]:
    """(URL, label) of the configured Redis, else of an embedded one started here."""
    if settings.redis_url:
        return settings.redis_url, "Redis from CONFIG_AGENT_REDIS_URL"
    redis = EmbeddedRedis(temp_dir / "redis")
    cleanup.callback(redis.stop)
    redis.start()
    return redis.url, f"embedded Redis on 127.0.0.1:{redis.port}"


async def _serve(settings: Settings, where: Where, argv0: str, out: TextIO) -> None:
    """Migrate and seed, then run relay, agent and live view until a stop signal."""
    async with anyio.create_task_group() as tg:
        work = anyio.CancelScope()
        finished = anyio.Event()
        # Signals are ours before anything starts, and stay ours until the agent
        # has shut down: a second Ctrl-C must not kill the demo half-way.
        await tg.start(_cancel_on_signal, work, finished)
        try:
            with work:
                await _run_components(settings, where, argv0, out)
        finally:
            finished.set()


async def _run_components(settings: Settings, where: Where, argv0: str, out: TextIO) -> None:
    from agent.app import Agent
    from agent.relay import Relay

    relay: Relay | None = None
    agent: Agent | None = None
    try:
        async with anyio.create_task_group() as tg:
            await _migrate_and_seed(settings, where.org_id)
            relay = Relay(settings)
            await tg.start(relay.run)
            agent = Agent(settings)
            await tg.start(agent.run)
            say(instructions(where, argv0), out)
            await follow_changes(agent.store, out)
    finally:
        # After the task group: nothing uses these connections any more.
        with anyio.CancelScope(shield=True):
            if agent is not None:
                await agent.source.close()
            if relay is not None:
                await relay.close()


async def _cancel_on_signal(work: anyio.CancelScope, finished: anyio.Event, *,
                            task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    """Cancel `work` on SIGTERM/SIGINT; swallow further signals until `finished`."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async with anyio.create_task_group() as tg:

            async def stop_when_finished() -> None:
                await finished.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(stop_when_finished)
            async for _ in signals:
                work.cancel()


async def _migrate_and_seed(settings: Settings, org_id: str) -> None:
    """Bring the schema up to date; seed the org only when it has never had an entry."""
    from agent.db.connect import connect
    from agent.db.migrate import migrate
    from agent.db.writer import ConfigWriter

    conn = await connect(settings.database_url or "", password_file=settings.database_password_file)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    writer = await ConfigWriter.open(
        settings.database_url or "", password_file=settings.database_password_file,
        redis_url=settings.redis_url, redis_password_file=settings.redis_password_file,
        redis_ca_file=settings.redis_ca_file,
    )
    async with writer:
        if await writer.list(org_id, include_deleted=True):
            return
        for service, key, value in SEED:
            await writer.set(org_id, service, key, value, actor="demo", reason="demo seed")


@contextmanager
def _stop_signals_raise() -> Iterator[None]:
    """While starting and stopping, SIGTERM behaves like Ctrl-C: unwind and clean up."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise _Stopped

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _ignore_stop_signals() -> None:
    # A no-op handler rather than SIG_IGN: children would inherit SIG_IGN across exec.
    noop: Callable[[int, FrameType | None], None] = lambda signum, frame: None  # noqa: E731
    signal.signal(signal.SIGTERM, noop)
    signal.signal(signal.SIGINT, noop)


def _remove_tree(path: Path, out: TextIO) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        say([f"demo stopped; could not remove {path} completely"], out)
    else:
        say([f"demo stopped; removed {path}"], out)
