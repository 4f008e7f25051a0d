"""Watching credential files (mounted Secrets) so a rotated password is used without restart."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import watchfiles

log = logging.getLogger("agent.credentials")


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


async def watch_credentials(
    files: dict[Path, Callable[[], Awaitable[None]]],
) -> None:
    """Call the callback of each file whose content changed.

    Watches the parent directories, because Kubernetes replaces a Secret's files by
    swapping a `..data` symlink, which an inode watch on the file would miss.
    """
    if not files:
        return
    digests = {path: _digest(path) for path in files}
    folders = {path.parent for path in files}
    async for _ in watchfiles.awatch(*folders, debounce=200, step=50, recursive=False):
        for path, callback in files.items():
            digest = _digest(path)
            if digest is not None and digest != digests[path]:
                digests[path] = digest
                log.info("credential file %s changed; reconnecting with the new credential", path)
                await callback()
