"""Change hooks: run a command, signal a process, POST a summary — debounced, bounded.

After the file set changed (or, without files, after the snapshot changed) the
hooks run once per burst: the first notification starts a quiet period of
`debounce` seconds that every further notification extends (up to
MAX_DELAY_FACTOR × debounce, so a steady stream still fires). Notifications
arriving while hooks run are merged and cause exactly one more run afterwards.
Hooks run in their own task: a slow or failing hook never delays syncing. Each
is limited to `timeout` seconds (a hung command's whole process group is
killed), logged on failure and counted in `config_agent_hook_runs_total`.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
from anyio.abc import TaskStatus

from agent.metrics import Metrics
from agent.settings import Settings
from agent.sinks.changes import ChangeSummary, summarize
from agent.sinks.webhook import WebhookError, post_json
from agent.store import Store

log = logging.getLogger("agent.hooks")

# A steady stream of changes still fires the hooks at least this often (× debounce).
MAX_DELAY_FACTOR = 10


class ChangeHooks:
    """The configured change hooks of one agent and their debounce loop."""

    def __init__(
        self,
        org_id: str,
        *,
        exec_command: str | None = None,
        signal_name: str | None = None,
        pidfile: Path | None = None,
        webhook_url: str | None = None,
        debounce: float = 0.2,
        timeout: float = 10.0,
        metrics: Metrics | None = None,
    ) -> None:
        self._org_id = org_id
        self._exec_command = exec_command
        self._signal = signal.Signals[f"SIG{signal_name}"] if signal_name else None
        self._pidfile = pidfile
        self._webhook_url = webhook_url
        self._debounce = debounce
        self._timeout = timeout
        self._metrics = metrics
        self._pending: ChangeSummary | None = None
        self._wakeup = anyio.Event()
        self._last_notified = 0.0

    @classmethod
    def from_settings(
        cls, settings: Settings, metrics: Metrics | None = None
    ) -> ChangeHooks | None:
        """The hooks configured by `on_change_*`, or None when there are none."""
        if not (settings.on_change_exec or settings.on_change_signal or settings.on_change_webhook):
            return None
        return cls(
            settings.org_id or "",
            exec_command=settings.on_change_exec,
            signal_name=settings.on_change_signal,
            pidfile=settings.signal_pidfile,
            webhook_url=settings.on_change_webhook,
            debounce=settings.hook_debounce,
            timeout=settings.hook_timeout,
            metrics=metrics,
        )

    def notify(self, summary: ChangeSummary) -> None:
        """Record changes to report (never blocks; call from the event loop thread)."""
        if not summary.changes:
            return
        self._pending = summary if self._pending is None else self._pending.merge(summary)
        self._last_notified = anyio.current_time()
        self._wakeup.set()

    async def follow(
        self, store: Store, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Notify on every new snapshot (used when there is no file set to wait for)."""
        seen = store.snapshot
        task_status.started()
        while True:
            snapshot = await store.wait_newer(seen.generation)
            if seen.loaded:  # the first load is a start, not a change
                self.notify(summarize(store, seen, snapshot))
            seen = snapshot

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the hooks once per debounced burst of notifications, until cancelled."""
        task_status.started()
        while True:
            await self._wakeup.wait()
            await self._quiet_period()
            summary, self._pending = self._pending, None
            # A new event: notifications from now on mean one more run after this one.
            self._wakeup = anyio.Event()
            if summary is not None:
                await self.run_once(summary)

    async def run_once(self, summary: ChangeSummary) -> None:
        """Run every configured hook for `summary`, concurrently, each time-limited."""
        async with anyio.create_task_group() as tg:
            if self._exec_command:
                tg.start_soon(self._guarded, "exec", self._run_exec, summary)
            if self._signal is not None:
                tg.start_soon(self._guarded, "signal", self._send_signal, summary)
            if self._webhook_url:
                tg.start_soon(self._guarded, "webhook", self._post_webhook, summary)

    async def _quiet_period(self) -> None:
        first = anyio.current_time()
        latest = first + self._debounce * MAX_DELAY_FACTOR
        while True:
            until = min(self._last_notified + self._debounce, latest)
            now = anyio.current_time()
            if now >= until:
                return
            await anyio.sleep(until - now)

    async def _guarded(
        self,
        hook: str,
        runner: Callable[[ChangeSummary], Awaitable[None]],
        summary: ChangeSummary,
    ) -> None:
        result = "ok"
        try:
            with anyio.fail_after(self._timeout):
                await runner(summary)
        except TimeoutError:
            result = "timeout"
            log.warning(
                "%s hook timed out after %g s (revision %d)", hook, self._timeout, summary.revision
            )
        except HookFailed as exc:
            result = "failed"
            log.warning("%s hook failed (revision %d): %s", hook, summary.revision, exc)
        if self._metrics is not None:
            self._metrics.hook_runs.labels(hook=hook, result=result).inc()

    async def _run_exec(self, summary: ChangeSummary) -> None:
        assert self._exec_command is not None
        # The command inherits the agent's environment (that is what users expect of
        # a hook), plus what changed.
        env = {
            **os.environ,
            "CONFIG_AGENT_REVISION": str(summary.revision),
            "CONFIG_AGENT_ORG_ID": summary.org_id,
        }
        try:
            process = await anyio.open_process(
                ["/bin/sh", "-c", self._exec_command],
                stdin=subprocess.DEVNULL,
                stdout=None,
                stderr=None,
                env=env,
                start_new_session=True,  # its own process group, so a timeout kills it all
            )
        except OSError as exc:
            raise HookFailed(f"cannot start /bin/sh: {exc}") from exc
        try:
            code = await process.wait()
        finally:
            if process.returncode is None:
                _kill_group(process.pid)
                with anyio.CancelScope(shield=True):
                    await process.wait()
        if code != 0:
            raise HookFailed(f"command exited with status {code}")

    async def _send_signal(self, summary: ChangeSummary) -> None:
        assert self._signal is not None and self._pidfile is not None
        try:
            text = self._pidfile.read_text().strip()  # a few bytes: no need for a thread
            pid = int(text)
            if pid <= 0:
                raise ValueError(text)
            os.kill(pid, self._signal)
        except (OSError, ValueError) as exc:
            raise HookFailed(f"cannot signal the process in {self._pidfile}: {exc}") from exc

    async def _post_webhook(self, summary: ChangeSummary) -> None:
        assert self._webhook_url is not None
        try:
            status = await post_json(self._webhook_url, summary.to_json())
        except WebhookError as exc:
            raise HookFailed(str(exc)) from exc
        if not 200 <= status < 300:
            raise HookFailed(f"webhook answered {status}")


class HookFailed(Exception):
    """A hook ran but did not succeed (logged and counted, never raised further)."""


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
