"""What `config-agent demo` prints: the "try this" block and one line per applied change.

Lines are meant for people and for tests alike: every instruction starts with
`try: `, every fact with a fixed `name: ` prefix, and stdout is flushed after
each write so a pipe (a test, `| tee`) sees it at once.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

from agent.model import Change
from agent.store import Store

VALUE_WIDTH = 60


@dataclass(frozen=True)
class Where:
    """Everything the instructions point at."""

    org_id: str
    http_url: str
    socket_path: Path
    output_dir: Path
    temp_dir: Path
    database_url: str
    redis_url: str
    metrics_url: str | None
    # "embedded PostgreSQL 16 on 127.0.0.1:5433" or "PostgreSQL from CONFIG_AGENT_DATABASE_URL"
    database_label: str
    redis_label: str


def cli_command(argv0: str) -> str:
    """How the user runs config-agent, for a paste-able command line."""
    path = Path(argv0)
    if path.name == "__main__.py" or not argv0:
        return f"{shlex.quote(sys.executable)} -m agent"
    on_path = shutil.which(path.name)
    if on_path and os.path.realpath(on_path) == os.path.realpath(argv0):
        return path.name
    return shlex.quote(str(path.resolve()))


def redact(url: str) -> str:
    """The URL with its password (if any) replaced by ****."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":****@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def instructions(where: Where, argv0: str) -> list[str]:
    """The block printed once the agent is ready."""
    cli = cli_command(argv0)
    env = (f"CONFIG_AGENT_DATABASE_URL={shlex.quote(redact(where.database_url))} "
           f"CONFIG_AGENT_REDIS_URL={shlex.quote(redact(where.redis_url))}")
    out = shlex.quote(str(where.output_dir))
    lines = [
        f"config-agent demo: org {where.org_id} is served by an agent, in sync with "
        f"{where.database_label} through {where.redis_label}",
        f"http: {where.http_url}",
        f"socket: {where.socket_path}",
        f"files: {where.output_dir}",
        f"temp dir: {where.temp_dir} (removed when the demo stops)",
    ]
    if where.metrics_url:
        lines.append(f"metrics: {where.metrics_url}")
    lines += [
        "",
        "Try, in another terminal:",
        f"try: curl -s {where.http_url}/v1/configs",
        f"try: curl -s --unix-socket {shlex.quote(str(where.socket_path))} "
        "http://localhost/v1/configs/ai/threshold",
        f"try: curl -sN {where.http_url}/v1/watch",
        f"try: {env} {cli} set {where.org_id} ai threshold 0.9",
        f"try: cat {out}/ai/threshold; cat {out}/configs.env",
        "",
        "Changes as the agent applies them (Ctrl-C stops everything):",
    ]
    return lines


def say(lines: Sequence[str], out: TextIO) -> None:
    """Print and flush (a test or a pager reads stdout through a pipe)."""
    for line in lines:
        print(line, file=out)
    out.flush()


def change_line(change: Change, applied_at: float) -> str:
    """`12:00:01.234  ai.threshold = 0.9  v2  (commit→applied 3.1 ms)`."""
    stamp = time.strftime("%H:%M:%S", time.localtime(applied_at)) + f".{int(applied_at * 1000) % 1000:03d}"
    value = "(deleted)" if change.deleted else _short(change.value)
    latency = ""
    if change.committed_at is not None:
        latency = f"  (commit→applied {max(0.0, applied_at - change.committed_at) * 1000:.1f} ms)"
    return f"{stamp}  {change.service}.{change.key} = {value}  v{change.version}{latency}"


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= VALUE_WIDTH else text[: VALUE_WIDTH - 3] + "..."


async def follow_changes(store: Store, out: TextIO) -> None:
    """Print a line for every change the store applies from now on, until cancelled."""
    snapshot = store.snapshot
    generation, revision = snapshot.generation, snapshot.revision
    while True:
        snapshot = await store.wait_newer(generation)
        # The store publishes during apply(): this is the moment the agent serves it.
        applied_at = time.time()
        generation = snapshot.generation
        changes = store.changes_after(revision) or []
        revision = max(revision, snapshot.revision)
        say([change_line(c, applied_at) for c in changes], out)
