"""Small real filesystems for tests of full and read-only disks (tmpfs; needs root)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest


@contextmanager
def tmpfs(path: Path, size: str = "256k") -> Iterator[Path]:
    """Mount a tmpfs of `size` on `path` (skip the test where mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def remount(path: Path, mode: str) -> None:
    """Remount the tmpfs at `path` read-only (`ro`) or read-write (`rw`)."""
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)


def fill(directory: Path, leave: int = 0) -> Path:
    """Take every free byte but `leave` of the filesystem holding `directory`; return the filler."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            try:
                os.write(fd, b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
        os.ftruncate(fd, os.fstat(fd).st_size - leave)
        return filler
    finally:
        os.close(fd)


def raw(value: Any) -> bytes:
    """A value as its per-key file holds it."""
    return value.encode() if isinstance(value, str) else json.dumps(value, separators=(",", ":")).encode()


def check_complete(out: Path) -> dict[str, Any]:
    """Assert the generation `..data` names is one complete set; return its configs.json."""
    data = out / os.readlink(out / "..data")
    doc: dict[str, Any] = json.loads((data / "configs.json").read_bytes())
    env = (data / "configs.env").read_text()
    assert env.startswith(f"# config-agent: org {doc['org_id']}, revision {doc['revision']}\n"), env[:80]
    expected = {f"{s}/{k}": raw(e["value"]) for s, keys in doc["configs"].items() for k, e in keys.items()
                if s not in ("configs.json", "configs.env")}
    found = {}
    for dirpath, _, names in os.walk(data):
        for name in names:
            path = Path(dirpath, name)
            found[path.relative_to(data).as_posix()] = path.read_bytes()
    for top in ("configs.json", "configs.env"):
        assert found.pop(top, None) is not None, f"{top} missing from {data.name}"
    assert found == expected, sorted(set(found) ^ set(expected))
    return doc


def internal_names(out: Path) -> set[str]:
    """Every `..` name in `out` except `..data` and the generation it names."""
    return {name for name in os.listdir(out) if name.startswith("..")} - {"..data", os.readlink(out / "..data")}
