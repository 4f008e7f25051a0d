"""The agent's local API alone in a process, over a store of made-up entries.

    python -m bench.api_process [--port 0] [--org bench] [--entries 1000]
                                [--entry SERVICE KEY JSON]... [--nofile N]

For the HTTP benchmarks and the tests that measure one process (RSS, open files):
`--entries` entries `svc{i % 20}/key{i}` holding `{"n": i, "note": "xx…"}`, then each
`--entry` in order, one revision each. `--nofile` sets the open-file limit first (a
container default, say). Prints `ready PORT` once it listens; runs until killed.
"""

from __future__ import annotations

import argparse
import json
import resource
from typing import Any

import anyio

from agent.metrics import Metrics
from agent.model import Change
from agent.settings import Settings
from agent.sinks.server import ApiServer
from agent.status import SyncStatus
from agent.store import Store

STAMP = "2025-01-01T00:00:00+00:00"


def changes(entries: int, extra: list[list[str]]) -> list[Change]:
    """The made-up entries, then the named ones; revisions 1, 2, …"""
    made_up = [Change(f"svc{i % 20}", f"key{i}", {"n": i, "note": "x" * 40}, 1, i + 1, False, STAMP)
               for i in range(entries)]
    named = [Change(service, key, json.loads(value), 1, entries + n, False, STAMP)
             for n, (service, key, value) in enumerate(extra, start=1)]
    return made_up + named


async def serve(args: argparse.Namespace) -> None:
    store = Store(args.org)
    applied = changes(args.entries, args.entry)
    store.apply(applied, revision=len(applied), source="warmload")
    status = SyncStatus(Metrics(args.org))
    status.set_ready(True)
    settings = Settings(org_id=args.org, http_port=args.port, metrics_port=0)
    async with anyio.create_task_group() as tg:
        listening: Any = await tg.start(ApiServer(store, status, settings).run)
        print(f"ready {listening.api[0][1]}", flush=True)
        await anyio.sleep_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--org", default="bench")
    parser.add_argument("--entries", type=int, default=1000)
    parser.add_argument("--entry", nargs=3, action="append", default=[], metavar=("SERVICE", "KEY", "JSON"))
    parser.add_argument("--nofile", type=int, default=None, help="open-file limit (soft and hard)")
    args = parser.parse_args()
    if args.nofile is not None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, args.nofile))
    anyio.run(serve, args, backend_options={"use_uvloop": True})


if __name__ == "__main__":
    main()
