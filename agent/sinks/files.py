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

Every name we make besides the visible ones starts with `..`, which no entry
name can (they start with a letter or digit): generations (GENERATION_RE),
`..data`, and the temporary `..data_tmp`, `..link_tmp.{name}`, `..retired_*`.
What a crash leaves of those is removed at start. `..data` moves only after a
generation is complete, so a failed write (disk full, read-only) keeps the last
complete set in place; the next snapshot retries.

We replace only our own links (symlinks into `..data/`). A file, directory or
foreign link already holding a visible name is left alone and reported
(`occupied`): that service is readable only as `..data/{service}`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import anyio
from anyio.abc import TaskStatus

from agent.errors import SinkError
from agent.model import NAME_RE
from agent.settings import Settings
from agent.sinks.changes import ChangeSummary, summarize
from agent.sinks.envfile import Omitted, build_env
from agent.sinks.render import configs_body, raw_value
from agent.status import OutputHealth
from agent.store import Snapshot, Store

log = logging.getLogger("agent.files")

DATA = "..data"
DATA_TMP = "..data_tmp"
LINK_TMP = "..link_tmp."
RETIRED_PREFIX = "..retired_"
GENERATION_RE = re.compile(r"\.\.\d{4}_\d\d_\d\d_\d\d_\d\d_\d\d\.[A-Za-z0-9_]+")
TOP_FILES = ("configs.json", "configs.env")
# Why an entry is left out (the `reason` label; see also envfile.py).
SKIP_REASONS = (
    "invalid_name", "reserved_name", "occupied", "env_not_identifier", "env_denied",
    "env_collision", "env_nul", "env_too_large", "env_budget",
)
# After a failed write, try again (with the newest snapshot) after this long,
# doubling up to RETRY_MAX_SECONDS while it keeps failing.
RETRY_SECONDS = 0.5
RETRY_MAX_SECONDS = 5.0
# A retired generation stays this long, so a reader that resolved `..data` just
# before a swap can finish reading it (Kubernetes deletes at once; a reader that
# lists directories could then see a half-deleted one).
RETIRE_AFTER_SECONDS = 1.0

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
        env_prefix: str = "",
        health: OutputHealth | None = None,
    ) -> None:
        self.output_dir = output_dir
        self._file_mode = file_mode
        self._dir_mode = dir_mode
        self._retire_after = retire_after
        self._env_prefix = env_prefix
        self._health = health
        # Generations replaced by a swap, by name, with the monotonic time they were.
        self._retired: dict[str, float] = {}
        # Digests of the set on disk (None: not read yet), to skip identical rewrites.
        self._current: dict[str, bytes] | None = None
        self._cleaned = False  # leftovers of an earlier run removed
        self._reported: set[Omitted] = set()  # left-out entries already logged

    @classmethod
    def from_settings(cls, settings: Settings, health: OutputHealth | None = None) -> FileSink | None:
        """The sink configured by `output_dir`, or None when files are off."""
        if settings.output_dir is None:
            return None
        if health is not None:
            health.enabled = True
        return cls(settings.output_dir, file_mode=settings.file_mode, dir_mode=settings.dir_mode,
                   env_prefix=settings.env_prefix, health=health)

    def render(self, snapshot: Snapshot) -> tuple[Payload, list[Omitted]]:
        """Every file of the set for `snapshot` (by path in a generation), and what it leaves out."""
        env = build_env(snapshot, self._env_prefix)
        payload = {"configs.json": configs_body(snapshot), "configs.env": env.body}
        omitted = list(env.omitted)
        for (service, key), entry in snapshot.entries.items():
            if not (NAME_RE.fullmatch(service) and NAME_RE.fullmatch(key)):
                # Only a tampered source gets here; such a path could leave the generation.
                omitted.append(Omitted("invalid_name", service, key, "an invalid entry name"))
            elif service in TOP_FILES:
                # Its directory would shadow our own file; the entry stays in the other two.
                omitted.append(Omitted("reserved_name", service, key, f"{service}/{key}: "
                                       "the service name is one of our files"))
            else:
                payload[f"{service}/{key}"] = raw_value(entry.value)
        return payload, omitted

    def write(self, snapshot: Snapshot) -> bool:
        """Make the set show `snapshot` (blocking); False when it already did.

        Raises SinkError when the disk refuses; the previous set then stays whole.
        """
        payload, omitted = self.render(snapshot)
        try:
            if not self._cleaned:
                self.remove_leftovers()
                self._cleaned = True
            changed = self._write_payload(payload)
            occupied = self._sync_links({path.split("/", 1)[0] for path in payload})
        except OSError as exc:
            self._current = None  # unknown state: compare with the disk next time
            error = f"cannot write the file set in {self.output_dir}: {exc}"
            if self._health is not None:
                self._health.failed(error)
            raise SinkError(error) from exc
        self._report(omitted + occupied)
        if self._health is not None and self._health.succeeded(snapshot.revision):
            log.info("file set written again (revision %d)", snapshot.revision)
        self.remove_retired()
        return changed

    def remove_retired(self, *, now: float | None = None) -> bool:
        """Delete generations retired long enough ago; True when some must still wait."""
        now = time.monotonic() if now is None else now
        current = _generation_of(self.output_dir)
        waiting = False
        for name, retired_at in list(self._retired.items()):
            if name == current:
                del self._retired[name]  # never the live one
            elif now - retired_at < self._retire_after:
                waiting = True
            else:
                del self._retired[name]
                _delete_generation(self.output_dir, name)
        return waiting

    def remove_leftovers(self) -> None:
        """Delete what an earlier run left: temporary links, unfinished and old generations."""
        root = self.output_dir
        if not root.is_dir():
            return
        current = _generation_of(root)
        with os.scandir(root) as entries:
            ours = [(e.name, e.is_symlink()) for e in entries
                    if e.name.startswith("..") and e.name not in (DATA, current)]
        for name, is_link in ours:
            if is_link:
                # `..data_tmp`, `..link_tmp.*`; `..{service}_tmp` and `..retired_*` links
                # are what older versions left.
                if name.startswith((DATA_TMP, LINK_TMP, RETIRED_PREFIX)) or name.endswith("_tmp"):
                    _unlink_quietly(root / name)
            elif GENERATION_RE.fullmatch(name) or name.startswith(RETIRED_PREFIX):
                # No reader of ours can be inside: `..data` left it before the restart.
                _delete_generation(root, name)

    async def run(
        self,
        store: Store,
        *,
        on_swapped: Callable[[ChangeSummary], None] | None = None,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Write every new snapshot; `started` after the first loaded one is on disk.

        Writes run in a worker thread and always take the newest snapshot, so a
        burst of changes costs one swap per write, not one per change. A failed
        write is retried (with the newest snapshot) until the disk takes it.
        `on_swapped` gets what changed after each later swap that moved an entry.
        """
        written = store.snapshot
        while not written.loaded:
            written = await store.wait_newer(written.generation)
        await anyio.to_thread.run_sync(self.write, written)
        task_status.started()
        seen = written.generation
        retired_waiting = await anyio.to_thread.run_sync(self.remove_retired)
        retry = RETRY_SECONDS
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
                # One line when it starts failing; the metrics and /v1/status say it goes on.
                level = logging.ERROR if retry == RETRY_SECONDS else logging.DEBUG
                log.log(level, "%s; keeping the last complete set, retrying", exc)
                seen = written.generation  # retry with whatever is newest then
                await anyio.sleep(retry)
                retry = min(retry * 2, RETRY_MAX_SECONDS)
                continue
            retry = RETRY_SECONDS
            retired_waiting = bool(self._retired)
            if changed and on_swapped is not None:
                summary = summarize(store, written, snapshot)
                if summary.changes:
                    on_swapped(summary)
            written = snapshot

    def _report(self, omitted: list[Omitted]) -> None:
        """Log entries newly left out (one line per reason), and count all by reason."""
        current = set(omitted)
        new = sorted(current - self._reported, key=lambda o: (o.reason, o.service, o.key))
        self._reported = current
        by_reason: dict[str, list[Omitted]] = {}
        for item in new:
            by_reason.setdefault(item.reason, []).append(item)
        for reason, items in by_reason.items():
            details = list(dict.fromkeys(o.detail for o in items))  # a collision is one line
            shown = "; ".join(details[:10])
            more = f" (and {len(details) - 10} more)" if len(details) > 10 else ""
            log.warning("file set leaves out %d (%s): %s%s", len(items), reason, shown, more)
        if self._health is not None:
            self._health.set_skipped(dict(Counter(o.reason for o in current)), SKIP_REASONS)

    def _write_payload(self, payload: Payload) -> bool:
        """Swap in a generation holding `payload` unless the disk already shows it."""
        digests = {path: _digest(data) for path, data in payload.items()}
        if self._current is None:
            self._current = self._read_current()
        if digests == self._current:
            return False
        unchanged = {path for path, digest in digests.items() if self._current.get(path) == digest}
        self._swap(payload, unchanged)
        self._current = digests
        return True

    def _read_current(self) -> dict[str, bytes]:
        current = _generation_of(self.output_dir)
        if current is None:
            return {}
        root = self.output_dir / current
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
        """Write a complete generation, then point `..data` at it (the one atomic step)."""
        root = self.output_dir
        if not root.is_dir():
            root.mkdir(parents=True)
            os.chmod(root, self._dir_mode)
        previous = _generation_of(root)
        stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime())
        generation = Path(tempfile.mkdtemp(prefix=stamp, dir=root))
        try:
            before = None if previous is None else root / previous
            self._write_generation(generation, payload, before, unchanged)
            _replace_symlink(root / DATA_TMP, root / DATA, generation.name)
        except BaseException:
            # `..data` still names the previous, complete generation: keep it, drop ours.
            shutil.rmtree(generation, ignore_errors=True)
            _unlink_quietly(root / DATA_TMP)
            raise
        if previous is not None:
            # Retired only now: a failed swap must never mark the live generation.
            self._retired[previous] = time.monotonic()
        _fsync_dir(root)

    def _sync_links(self, names: set[str]) -> list[Omitted]:
        """Point each visible name at `..data/{name}`; report names held by something else."""
        root = self.output_dir
        occupied: list[Omitted] = []
        for name in sorted(names):
            target = f"{DATA}/{name}"
            current = _own_link(root / name)
            if current is None:
                occupied.append(Omitted("occupied", name, "", f"{root / name} is not our link"))
            elif current != target:
                _replace_symlink(root / f"{LINK_TMP}{name}", root / name, target)
        with os.scandir(root) as entries:
            others = [e.name for e in entries if e.name not in names and not e.name.startswith("..")]
        for name in others:
            if _own_link(root / name):
                os.unlink(root / name)  # a service that is gone
        return occupied

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
            _write_file(path, data, self._file_mode)
        # No fsync of the generation's directories: readers share the page cache, and
        # after a crash the sink compares the set on disk with the snapshot and rewrites
        # whatever is missing. Fsyncing one directory per service made a swap cost
        # grow with the number of services (profiled: >70 % of a swap at 100 services).


def _write_file(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # the umask must not narrow it
        view = memoryview(data)
        while view:  # a short write (disk nearly full) is followed by ENOSPC, never ignored
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _generation_of(root: Path) -> str | None:
    """The generation `..data` names, if it is one of ours (never a path elsewhere)."""
    try:
        target = os.readlink(root / DATA)
    except OSError:
        return None
    return target if GENERATION_RE.fullmatch(target) else None


def _own_link(path: Path) -> str | None:
    """The target of our link at `path`, "" when nothing is there, None for anything else."""
    try:
        target = os.readlink(path)
    except FileNotFoundError:
        return ""
    except OSError:  # EINVAL: a file or directory, not a link
        return None
    return target if target.startswith(f"{DATA}/") else None


def _delete_generation(root: Path, name: str) -> None:
    """Delete a generation directory; a reader that looks it up from now on gets ENOENT."""
    doomed = root / name
    if not name.startswith(RETIRED_PREFIX):
        # Rename first: a reader retries on ENOENT instead of listing a half-emptied directory.
        doomed = root / f"{RETIRED_PREFIX}{name.lstrip('.')}"
        try:
            os.rename(root / name, doomed)
        except OSError:
            return
    shutil.rmtree(doomed, ignore_errors=True)


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _replace_symlink(temporary: Path, final: Path, target: str) -> None:
    """Point `final` at `target` with one rename (a reader never finds it missing)."""
    _unlink_quietly(temporary)
    os.symlink(target, temporary)
    try:
        os.rename(temporary, final)
    except OSError:
        _unlink_quietly(temporary)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
