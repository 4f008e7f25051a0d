"""The shared file set under `output_dir`, swapped at once like Kubernetes' AtomicWriter.

    output_dir/
      ..2025_01_31_12_00_00.x1y2z3/      one generation: every file, complete, fsynced
        configs.json  configs.env  ai/threshold  ai/model  …
      ..data -> ..2025_01_31_12_00_00.x1y2z3    switched with one rename(2)
      configs.json -> ..data/configs.json
      configs.env  -> ..data/configs.env
      ai -> ..data/ai                              one link per service

A reader that resolves `..data` once sees one generation only; a reader of the
visible names never sees a partial file. `configs.json` holds exactly the bytes
of `GET /v1/configs`; `{service}/{key}` holds the raw value (strings as-is,
other JSON values as JSON); `configs.env` is described in envfile.py. A set
byte-identical to the current one is not rewritten.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import anyio
from anyio.abc import TaskStatus

from agent.errors import SinkError
from agent.settings import Settings
from agent.sinks.changes import ChangeSummary, summarize
from agent.sinks.envfile import render_env
from agent.sinks.render import configs_body, raw_value
from agent.store import Snapshot, Store

log = logging.getLogger("agent.files")

DATA = "..data"
DATA_TMP = "..data_tmp"
TOP_FILES = ("configs.json", "configs.env")
# After a failed write, try again (with the newest snapshot) this much later.
RETRY_SECONDS = 5.0
# A retired generation stays this long, so a reader that resolved `..data` just
# before a swap can finish reading it (Kubernetes deletes at once; a reader that
# lists directories could then see a half-deleted one).
RETIRE_AFTER_SECONDS = 1.0
RETIRED_PREFIX = "..retired_"

Payload = dict[str, bytes]


class FileSink:
    """Writes snapshots as an atomically swapped file set in one directory."""

    def __init__(
        self,
        output_dir: Path,
        *,
        file_mode: int = 0o644,
        dir_mode: int = 0o755,
        retire_after: float = RETIRE_AFTER_SECONDS,
    ) -> None:
        self.output_dir = output_dir
        self._file_mode = file_mode
        self._dir_mode = dir_mode
        self._retire_after = retire_after
        # Generations replaced by a swap, by name, with the monotonic time they were.
        self._retired: dict[str, float] = {}
        # Digests of the set on disk (None: not read yet), to skip identical rewrites.
        self._current: dict[str, bytes] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> FileSink | None:
        """The sink configured by `output_dir`, or None when files are off."""
        if settings.output_dir is None:
            return None
        return cls(settings.output_dir, file_mode=settings.file_mode, dir_mode=settings.dir_mode)

    def render(self, snapshot: Snapshot) -> Payload:
        """Every file of the set for `snapshot`, by path relative to a generation dir."""
        payload = {"configs.json": configs_body(snapshot), "configs.env": render_env(snapshot)}
        for (service, key), entry in snapshot.entries.items():
            if service in TOP_FILES:
                # Its directory would shadow our own file; the entry stays in the other two.
                log.warning("no per-key file for %s/%s: service name is reserved", service, key)
                continue
            payload[f"{service}/{key}"] = raw_value(entry.value)
        return payload

    def write(self, snapshot: Snapshot) -> bool:
        """Make the set show `snapshot` (blocking); False when it already did."""
        payload = self.render(snapshot)
        digests = {path: _digest(data) for path, data in payload.items()}
        if self._current is None:
            self._current = self._read_current()
        if digests == self._current:
            self.remove_retired()
            return False
        unchanged = {path for path, digest in digests.items() if self._current.get(path) == digest}
        try:
            self._swap(payload, unchanged)
        except OSError as exc:
            self._current = None  # unknown state: compare with the disk next time
            raise SinkError(f"cannot write the file set in {self.output_dir}: {exc}") from exc
        self._current = digests
        self.remove_retired()
        return True

    def remove_retired(self, *, now: float | None = None) -> bool:
        """Delete generations retired long enough ago; True when some must still wait."""
        now = time.monotonic() if now is None else now
        root = self.output_dir
        try:
            current = os.readlink(root / DATA)
            names = os.listdir(root)
        except OSError:
            return False
        for name in names:
            if not name.startswith("..") or name in (DATA, DATA_TMP, current):
                continue
            if name.startswith(RETIRED_PREFIX):
                continue  # a deletion interrupted earlier: finished below
            self._retired.setdefault(name, -math.inf)  # found at start: no reader of ours
        waiting = False
        for name, retired_at in list(self._retired.items()):
            if now - retired_at < self._retire_after:
                waiting = True
                continue
            del self._retired[name]
            # Rename first: a reader that looks it up from now on gets ENOENT and
            # retries, instead of listing a directory that is being emptied.
            doomed = root / f"{RETIRED_PREFIX}{name.lstrip('.')}"
            try:
                os.rename(root / name, doomed)
            except OSError:
                continue
        for name in os.listdir(root):
            if name.startswith(RETIRED_PREFIX):
                shutil.rmtree(root / name, ignore_errors=True)
        return waiting

    async def run(
        self,
        store: Store,
        *,
        on_swapped: Callable[[ChangeSummary], None] | None = None,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Write every new snapshot; `started` after the first loaded one is on disk.

        Writes run in a worker thread and always take the newest snapshot, so a
        burst of changes costs one swap per write, not one per change.
        `on_swapped` gets what changed after each later swap that moved an entry.
        """
        written = store.snapshot
        while not written.loaded:
            written = await store.wait_newer(written.generation)
        await anyio.to_thread.run_sync(self.write, written)
        task_status.started()
        seen = written.generation
        retired_waiting = await anyio.to_thread.run_sync(self.remove_retired)
        while True:
            snapshot: Snapshot | None = None
            with anyio.move_on_after(self._retire_after if retired_waiting else math.inf):
                snapshot = await store.wait_newer(seen)
            if snapshot is None:
                # Quiet since the last swap: delete the generations it retired.
                retired_waiting = await anyio.to_thread.run_sync(self.remove_retired)
                continue
            seen = snapshot.generation
            try:
                changed = await anyio.to_thread.run_sync(self.write, snapshot)
            except SinkError as exc:
                log.error("%s; retrying in %g s", exc, RETRY_SECONDS)
                seen = written.generation  # retry with whatever is newest then
                await anyio.sleep(RETRY_SECONDS)
                continue
            retired_waiting = bool(self._retired)
            if changed and on_swapped is not None:
                summary = summarize(store, written, snapshot)
                if summary.changes:
                    on_swapped(summary)
            written = snapshot

    def _read_current(self) -> dict[str, bytes]:
        root = self.output_dir / DATA
        digests: dict[str, bytes] = {}
        try:
            for dirpath, _, filenames in os.walk(root, followlinks=False):
                for name in filenames:
                    path = Path(dirpath, name)
                    relative = path.relative_to(root).as_posix()
                    digests[relative] = _digest(path.read_bytes())
        except OSError:
            return {}
        return digests

    def _swap(self, payload: Payload, unchanged: set[str]) -> None:
        root = self.output_dir
        if not root.is_dir():
            root.mkdir(parents=True)
            os.chmod(root, self._dir_mode)
        stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime())
        generation = Path(tempfile.mkdtemp(prefix=stamp, dir=root))
        try:
            previous = root / os.readlink(root / DATA) if (root / DATA).is_symlink() else None
            if previous is not None:
                self._retired[previous.name] = time.monotonic()
            self._write_generation(generation, payload, previous, unchanged)
            # The one atomic step: readers see the old generation or the new one.
            _replace_symlink(root / DATA_TMP, root / DATA, generation.name)
        except BaseException:
            shutil.rmtree(generation, ignore_errors=True)
            raise
        visible = {path.split("/", 1)[0] for path in payload}
        for name in sorted(visible):
            link = root / name
            target = f"{DATA}/{name}"
            if not (link.is_symlink() and os.readlink(link) == target):
                _replace_symlink(root / f"..{name}_tmp", link, target)
        for entry in os.scandir(root):
            if entry.name.startswith(".."):
                continue  # generations: see remove_retired
            if entry.name not in visible and entry.is_symlink():
                if os.readlink(entry.path).startswith(f"{DATA}/"):
                    os.unlink(entry.path)  # a service that is gone
        _fsync_dir(root)

    def _write_generation(
        self, generation: Path, payload: Payload, previous: Path | None, unchanged: set[str]
    ) -> None:
        os.chmod(generation, self._dir_mode)
        directories = {generation}
        for relative, data in sorted(payload.items()):
            path = generation / relative
            if path.parent not in directories:
                path.parent.mkdir()
                os.chmod(path.parent, self._dir_mode)
                directories.add(path.parent)
            if previous is not None and relative in unchanged:
                # Files of a generation never change: share the inode instead of
                # rewriting and fsyncing it (one change = one file written).
                try:
                    os.link(previous / relative, path)
                    continue
                except OSError:
                    pass  # gone or tampered with: write it afresh
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, self._file_mode)
            try:
                os.fchmod(fd, self._file_mode)  # the umask must not narrow it
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
        # No fsync of the generation's directories: readers share the page cache, and
        # after a crash the sink compares the set on disk with the snapshot and rewrites
        # whatever is missing. Fsyncing one directory per service made a swap cost
        # grow with the number of services (profiled: >70 % of a swap at 100 services).


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _replace_symlink(temporary: Path, final: Path, target: str) -> None:
    """Point `final` at `target` with one rename (a reader never finds it missing)."""
    try:
        os.unlink(temporary)
    except FileNotFoundError:
        pass
    os.symlink(target, temporary)
    os.rename(temporary, final)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
