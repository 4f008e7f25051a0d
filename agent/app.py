"""Composition root: builds every component from Settings and runs them in one task group."""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
from anyio import CancelScope
from anyio.abc import TaskStatus
from prometheus_client import CollectorRegistry

from agent.credentials import watch_credentials
from agent.errors import OrgNotReadableError, SourceError, UsageError
from agent.metrics import Metrics
from agent.redis_client import parse_redis_url
from agent.settings import Settings
from agent.sources.postgres import PgSource
from agent.sources.redis_events import RedisEvents
from agent.sources.sync import Syncer
from agent.state import load_snapshot, remove_temporary_files, save_snapshot
from agent.status import SyncStatus
from agent.store import Snapshot, Store

if TYPE_CHECKING:  # the servers (uvicorn) are imported only when `run` starts them
    from agent.sinks.server import Listening

log = logging.getLogger("agent")
# A failed save of the last-known-good snapshot is retried after this long, doubling
# up to the maximum while it keeps failing.
STATE_RETRY_SECONDS = 0.5
STATE_RETRY_MAX_SECONDS = 5.0


class Agent:
    """One tenant agent: store, sync engine, Redis subscription, sinks."""

    def __init__(self, settings: Settings, *, registry: CollectorRegistry | None = None) -> None:
        settings.require("org_id", "database_url")
        if not settings.redis_url:
            log.warning("no Redis URL: changes arrive by polling every %.0fs",
                        settings.fallback_poll_interval)
        self.settings = settings
        org_id = settings.org_id or ""
        self.metrics = Metrics(org_id, registry)
        self.status = SyncStatus(metrics=self.metrics)
        self.store = Store(org_id, on_applied=self.metrics.on_applied)
        self.source = PgSource(settings.read_url or "", org_id, settings.services,
                               password_file=settings.database_password_file,
                               pool_mode=settings.database_pool_mode)
        self.syncer = Syncer(
            self.store, self.status, self.source, org_id=org_id, services=settings.services,
            reconcile_interval=settings.reconcile_interval,
            drift_grace=settings.drift_grace,
            fallback_poll_interval=settings.fallback_poll_interval,
            stale_after=settings.stale_after,
            db_idle_timeout=settings.db_idle_timeout,
            lag_chase_timeout=settings.lag_chase_timeout,
            fetch_jitter=settings.fetch_jitter,
        )
        self.events = None
        if settings.redis_url and settings.redis_channels == "sharded" \
                and parse_redis_url(settings.redis_url).kind != "cluster":
            raise UsageError("CONFIG_AGENT_REDIS_CHANNELS=sharded needs a redis+cluster:// "
                             "CONFIG_AGENT_REDIS_URL for agents (publishers may use it on one server)")
        if settings.redis_url:
            self.events = RedisEvents(
                settings.redis_url, org_id,
                on_message=self.syncer.on_message,
                on_connected=self.syncer.on_redis_connected,
                on_disconnected=self.syncer.on_redis_disconnected,
                on_heard=self.syncer.on_redis_heard,
                on_deaf=self.syncer.on_redis_deaf,
                password_file=settings.redis_password_file, ca_file=settings.redis_ca_file,
                channels=settings.redis_channels,
                heartbeat_interval=settings.heartbeat_interval,
                # The relay sends heartbeats to orgs it knows: those with an entry.
                expect_heartbeat=lambda: self.store.snapshot.revision > 0,
            )
        self.reporter = None
        if settings.redis_url and settings.fleet_report_interval > 0:
            from agent.fleet import FleetReporter, default_agent_name

            self.reporter = FleetReporter(
                settings.redis_url, settings.agent_name or default_agent_name(), settings.agent_namespace,
                settings.services, settings.fleet_report_interval, store=self.store, status=self.status,
                password_file=settings.redis_password_file, ca_file=settings.redis_ca_file,
            )
        self.listening: Listening | None = None  # where the API listens, once started
        self.file_sink = None
        if settings.output_dir is not None:
            from agent.sinks.files import FileSink

            self.file_sink = FileSink.from_settings(settings, self.status.files)
        self.status.state.enabled = settings.state_dir is not None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve, subscribe, warm-load, then keep in sync; `started` once ready."""
        async with anyio.create_task_group() as tg:
            await self._start_servers(tg)
            if self.reporter is not None:
                # From the start: an agent that cannot load shows up as unready, not absent.
                tg.start_soon(self.reporter.run)
            # Subscribe first, then load: no window in which a change can be missed.
            if self.events is not None:
                await tg.start(self.events.run)
            else:
                self.syncer.on_redis_disconnected("no Redis configured")
            await self._first_load(tg)
            # Ready means "written out": the outputs start with the first snapshot on disk.
            await tg.start(self._run_outputs)
            tg.start_soon(self.syncer.run_fetcher)
            tg.start_soon(self.syncer.run_lag_chaser)
            tg.start_soon(self.syncer.run_reconciler)
            tg.start_soon(self.syncer.run_drift_judge)
            tg.start_soon(self.syncer.run_fallback_poll)
            tg.start_soon(self.syncer.run_staleness)
            tg.start_soon(self.syncer.run_idle_closer)
            tg.start_soon(self._watch_credentials)
            self.status.set_ready(True)
            snap = self.store.snapshot
            log.info("ready: org %s at revision %d with %d entries%s", snap.org_id, snap.revision,
                     len(snap.entries), " (stale: PostgreSQL unreachable)" if snap.stale else "")
            task_status.started()

    async def load_once(self) -> None:
        """`once`: one full load from PostgreSQL, outputs written; raises SourceError."""
        await self.syncer.warm_load()
        await self._write_outputs()
        await self.source.close()

    async def _first_load(self, tg: anyio.abc.TaskGroup) -> None:
        try:
            await self.syncer.warm_load()
            return
        except OrgNotReadableError as exc:
            # Not an outage: a saved snapshot would hide it. Unready until the role is granted.
            self.status.set_db(False, str(exc))
            log.error("%s", exc)
            await self.syncer.warm_load_until_done()
            return
        except SourceError as exc:
            self.status.set_db(False, str(exc))
            log.warning("cannot warm-load from PostgreSQL: %s", exc)
        restored = None
        if self.settings.state_dir is not None:
            # Checked like database rows: a corrupt or tampered file is one line, then ignored.
            restored = await anyio.to_thread.run_sync(
                load_snapshot, self.settings.state_dir, self.store.snapshot.org_id)
        if restored is None:
            # Nothing to serve yet: stay unready until the database answers.
            await self.syncer.warm_load_until_done()
            return
        entries, revision = restored
        snapshot = self.store.restore(entries, revision=revision)
        self.metrics.set_versions({(e.service, e.key): e.version for e in entries})
        self.metrics.stale.set(1)
        log.warning("serving the last-known-good snapshot (revision %d), flagged stale",
                    snapshot.revision)
        tg.start_soon(self.syncer.warm_load_until_done)

    async def _start_servers(self, tg: anyio.abc.TaskGroup) -> None:
        from agent.sinks.server import serve_api

        # API (TCP + socket) and the metrics/probe port; /readyz says 503 until loaded.
        self.listening = await tg.start(serve_api, self.store, self.status, self.settings)

    async def _write_outputs(self) -> None:
        """`once`: the files and the last-known-good snapshot, written one time."""
        snapshot = self.store.snapshot
        if self.file_sink is not None:
            await anyio.to_thread.run_sync(self.file_sink.write, snapshot)
        if self.settings.state_dir is not None:
            await anyio.to_thread.run_sync(remove_temporary_files, self.settings.state_dir)
            await self._save_state(self.settings.state_dir, snapshot)

    async def _run_outputs(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Files, hooks and the last-known-good snapshot follow every new snapshot.

        `started` once the current snapshot is written (the file sink's first write).
        """
        from agent.sinks.hooks import ChangeHooks

        state_dir = self.settings.state_dir
        async with anyio.create_task_group() as tg:
            hooks = ChangeHooks.from_settings(self.settings, self.metrics)
            if hooks is not None:
                await tg.start(hooks.run)
            if self.file_sink is not None:
                on_swapped = hooks.notify if hooks is not None else None
                await tg.start(partial(self.file_sink.run, self.store, on_swapped=on_swapped))
            elif hooks is not None:
                await tg.start(hooks.follow, self.store)
            if state_dir is not None:
                await tg.start(self._persist_state, state_dir)
            task_status.started()

    async def _persist_state(self, state_dir: Path, *,
                             task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep the last-known-good snapshot current; `started` once the current one is saved.

        A failed save keeps the previous snapshot and is retried with the newest one.
        """
        await anyio.to_thread.run_sync(remove_temporary_files, state_dir)
        saved = self.store.snapshot
        await self._save_state(state_dir, saved)  # failing here stops the start, as it should
        task_status.started()
        retry = STATE_RETRY_SECONDS
        while True:
            snapshot = await self.store.wait_newer(saved.generation)
            try:
                await self._save_state(state_dir, snapshot)
            except OSError as exc:
                # One line when it starts failing; the metrics and /v1/status say it goes on.
                level = logging.ERROR if retry == STATE_RETRY_SECONDS else logging.DEBUG
                log.log(level, "cannot write the last-known-good snapshot in %s (keeping the "
                        "previous one, retrying): %s", state_dir, exc)
                await anyio.sleep(retry)  # then save whatever is newest
                retry = min(retry * 2, STATE_RETRY_MAX_SECONDS)
                continue
            retry = STATE_RETRY_SECONDS
            saved = snapshot

    async def _save_state(self, state_dir: Path, snapshot: Snapshot) -> None:
        """Save `snapshot` as the last-known-good one unless it is stale (off the event loop)."""
        if snapshot.stale:
            return
        try:
            await anyio.to_thread.run_sync(save_snapshot, state_dir, snapshot)
        except OSError as exc:
            self.status.state.failed(f"cannot write the last-known-good snapshot: {exc}")
            raise
        if self.status.state.succeeded(snapshot.revision):
            log.info("last-known-good snapshot saved again (revision %d)", snapshot.revision)

    async def _watch_credentials(self) -> None:
        files: dict[Path, Callable[[], Awaitable[None]]] = {}
        if self.settings.database_password_file is not None:
            files[self.settings.database_password_file] = self.source.reconnect
        await watch_credentials(files)



async def stop_on_signal(scope: CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s: stopping", signal.Signals(signum).name)
            scope.cancel()
            return


async def run_agent(settings: Settings) -> int:
    """`config-agent run` until SIGTERM/SIGINT; exit code 0 on a clean stop."""
    agent = Agent(settings)
    async with anyio.create_task_group() as tg:
        tg.start_soon(stop_on_signal, tg.cancel_scope)
        await tg.start(agent.run)
    await agent.source.close()
    return 0


async def run_once(settings: Settings) -> int:
    """`config-agent once`: exit 0 after writing everything, 1 if the source is unreachable."""
    if settings.output_dir is None and settings.state_dir is None:
        raise UsageError("once needs CONFIG_AGENT_OUTPUT_DIR or CONFIG_AGENT_STATE_DIR "
                         "(somewhere to write)")
    agent = Agent(settings)
    await agent.load_once()
    snap = agent.store.snapshot
    log.info("wrote org %s at revision %d (%d entries)", snap.org_id, snap.revision,
             len(snap.entries))
    return 0
