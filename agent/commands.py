"""What each CLI command does, given parsed flags and Settings."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from agent.cli import default_actor, emit, run_async
from agent.errors import RedisError, UsageError
from agent.settings import Settings

# Each command imports what it uses: `run` (every pod) must not load the writer, the
# fleet reader, the injector or YAML (issue #21: RSS and start time).
if TYPE_CHECKING:
    from agent.db.writer import ConfigWriter, WriteResult
    from agent.fleet import FleetProgress

log = logging.getLogger("agent.cli")


def dispatch(args: argparse.Namespace, settings: Settings) -> int:
    """Run the command named in `args`; return the exit code."""
    handlers: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
        "migrate": cmd_migrate,
        "set": cmd_write,
        "delete": cmd_write,
        "rollback": cmd_write,
        "get": cmd_read,
        "list": cmd_read,
        "history": cmd_read,
        "status": cmd_status,
        "grant-reader": cmd_grant_reader,
        "run": cmd_run,
        "once": cmd_once,
        "relay": cmd_relay,
        "demo": cmd_demo,
        "inject": cmd_inject,
        "helm-values": cmd_helm_values,
    }
    return handlers[args.command](args, settings)


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    """`config-agent migrate`."""
    from agent.db.connect import connect
    from agent.db.migrate import migrate

    settings.require("database_url")

    async def go() -> list[str]:
        conn = await connect(settings.database_url or "", password_file=settings.database_password_file,
                             pool_mode=settings.database_pool_mode)
        try:
            return [f"{m.version:03d}_{m.name}" for m in await migrate(conn)]
        finally:
            await conn.close()

    applied = run_async(go)
    print("applied: " + ", ".join(applied) if applied else "schema is up to date")
    return 0


async def _writer(settings: Settings) -> ConfigWriter:
    from agent.db.writer import ConfigWriter

    settings.require("database_url")
    return await ConfigWriter.open(
        settings.database_url or "",
        password_file=settings.database_password_file,
        redis_url=settings.redis_url,
        redis_password_file=settings.redis_password_file,
        redis_ca_file=settings.redis_ca_file,
        redis_channels=settings.redis_channels,
        pool_mode=settings.database_pool_mode,
    )


def cmd_write(args: argparse.Namespace, settings: Settings) -> int:
    """`set`, `delete`, `rollback`."""
    from agent.fleet import describe_agent
    from agent.model import parse_value

    actor = args.actor or default_actor()
    value = None
    if args.command == "set":
        text = sys.stdin.read() if args.value == "-" else args.value
        if args.value == "-" and not args.string:
            text = text.strip()
        value = parse_value(text, as_string=args.string)

    if args.wait is not None:
        settings.require("redis_url")  # before the write: --wait must be able to read the reports
        if args.timeout <= 0:
            raise UsageError("--timeout must be a positive number of seconds")

    async def go() -> tuple[WriteResult, FleetProgress | None]:
        writer = await _writer(settings)
        async with writer:
            if args.command == "set":
                result = await writer.set(args.org, args.service, args.key, value, actor=actor,
                                          reason=args.reason, expect_version=args.expect_version,
                                          flag_services=settings.flag_services)
            elif args.command == "delete":
                result = await writer.delete(args.org, args.service, args.key, actor=actor,
                                             reason=args.reason, expect_version=args.expect_version)
            else:
                result = await writer.rollback(args.org, args.service, args.key,
                                               to_version=args.to_version, actor=actor,
                                               reason=args.reason, expect_version=args.expect_version)
            if args.wait is None:
                return result, None
            if not args.json:
                print(_written(args.command, result), flush=True)
            shown = ProgressLine(sys.stderr)
            try:
                return result, await writer.wait_for_agents(result, percent=args.wait, wait_at_most=args.timeout,
                                                            on_progress=shown.update)
            finally:
                shown.end()

    result, fleet = run_async(go)
    if fleet is None:
        emit(args, result.to_dict(), lambda: _written(args.command, result))
        return 0
    if args.json:
        print(json.dumps(result.to_dict() | {"wait": fleet.to_dict()}, ensure_ascii=False))
    if fleet.reached:
        if not args.json:
            print(f"served: {fleet.line()}" if fleet.total else
                  f"no live agent of org {result.org_id} serves {result.service}: nothing to wait for")
        return 0
    now = time.time()
    print(f"config-agent: error: --wait timed out: {fleet.line()}; {len(fleet.lagging)} lagging:",
          file=sys.stderr)
    for report in fleet.lagging:
        print(f"  {describe_agent(report, now)}", file=sys.stderr)
    return 4


def _written(command: str, result: WriteResult) -> str:
    what = {"set": "set", "delete": "deleted", "rollback": "rolled back"}[command]
    if result.changed:
        return (f"{what} {result.org_id}/{result.service}/{result.key}: version {result.version}, "
                f"revision {result.revision}")
    return f"unchanged {result.org_id}/{result.service}/{result.key}: still version {result.version}"


class ProgressLine:
    """`set --wait` progress: one line redrawn in place on a terminal, a plain line per change otherwise."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._last: tuple[int, int] | None = None

    def update(self, state: FleetProgress) -> None:
        counts = (len(state.served), state.total)
        if counts == self._last:
            return
        self._last = counts
        if self._tty:
            self._stream.write(f"\r\x1b[Kwaiting: {state.line()}")
        else:
            self._stream.write(f"waiting: {state.line()}\n")
        self._stream.flush()

    def end(self) -> None:
        if self._tty and self._last is not None:
            self._stream.write("\n")
            self._stream.flush()


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    """`status ORG`: the org's live agents, laggards first."""
    from agent.fleet import fleet_counts, fleet_rows

    settings.require("redis_url")

    async def go() -> tuple[int, list[dict[str, Any]]]:
        writer = await _writer(settings)
        async with writer:
            org_revision, services = await writer.revisions(args.org)
            reports = await writer.fleet.agents(args.org)
        return org_revision, fleet_rows(reports, org_revision, services, time.time())

    org_revision, rows = run_async(go)
    if args.json:
        print(json.dumps({"org_id": args.org, "revision": org_revision, "agents": rows}, ensure_ascii=False))
        return 0
    shown = [r | {"agent": f"{r['namespace']}/{r['agent']}" if r["namespace"] else r["agent"],
                  "redis": "up" if r["redis_connected"] else "down", "db": "up" if r["db_connected"] else "down",
                  "reported": f"{r['report_age_s']:.1f}s ago", "services": ",".join(r["services"]) or "*"}
             for r in rows]
    print(table(shown, ("agent", "revision", "behind", "stale", "ready", "redis", "db", "reported", "services")))
    agents, behind, stale, _ = fleet_counts(rows)
    print(f"org {args.org} at revision {org_revision}: {agents} live agent(s), {behind} behind, {stale} stale")
    return 0


def cmd_read(args: argparse.Namespace, settings: Settings) -> int:
    """`get`, `list`, `history`."""

    async def go() -> Any:
        writer = await _writer(settings)
        async with writer:
            if args.command == "get":
                return await writer.get(args.org, args.service, args.key)
            if args.command == "list":
                return await writer.list(args.org, args.service, include_deleted=args.deleted)
            if args.limit < 1:
                raise UsageError("--limit must be at least 1")
            return await writer.history(args.org, args.service, args.key, limit=args.limit)

    doc = run_async(go)
    if args.command == "get":
        emit(args, doc, lambda: table([doc], ("service", "key", "value", "version", "updated_at", "updated_by")))
    elif args.command == "list":
        emit(args, doc, lambda: table(doc, ("service", "key", "value", "version", "revision", "updated_at")))
    else:
        emit(args, doc, lambda: table(doc, ("revision", "service", "key", "version", "action",
                                            "new_value", "changed_by", "changed_at", "reason")))
    return 0


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain aligned text table; values shown as compact JSON, long ones cut."""
    def cell(value: Any, column: str) -> str:
        if column in ("value", "new_value", "old_value"):
            text = json.dumps(value, ensure_ascii=False)
        else:
            text = "" if value is None else str(value)
        return text if len(text) <= 60 else text[:57] + "..."

    grid = [list(columns)] + [[cell(row.get(c), c) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in grid) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in grid]
    if not rows:
        lines.append("(none)")
    return "\n".join(lines)


def cmd_grant_reader(args: argparse.Namespace, settings: Settings) -> int:
    """`grant-reader`: PostgreSQL role plus the Redis ACL for one tenant."""
    from agent.db.connect import connect, read_secret
    from agent.db.roles import grant_reader, redis_acl_command
    from agent.redis_client import channel_form, parse_redis_url

    settings.require("database_url")
    password = read_secret(args.password_file)
    url = settings.redis_url
    acl = redis_acl_command(args.org, args.role, password,
                            sharded=bool(url) and channel_form(url or "", settings.redis_channels) == "sharded",
                            cluster=bool(url) and parse_redis_url(url or "").kind == "cluster")

    async def go() -> int:
        conn = await connect(settings.database_url or "", password_file=settings.database_password_file,
                             pool_mode=settings.database_pool_mode)
        try:
            await grant_reader(conn, args.org, args.role, password, args.connection_limit)
        finally:
            await conn.close()
        if args.redis_apply:
            return await _apply_acl(settings, acl)
        return 0

    nodes = run_async(go)
    print(f"granted: role {args.role} reads org {args.org} only")
    if args.redis_apply:
        print(f"applied Redis ACL for user {args.role} on {nodes} node(s)")
    else:
        shown = " ".join(
            "'>'\"$(cat PASSWORD_FILE)\"" if p.startswith(">") else shlex.quote(p) for p in acl
        )
        print("Redis ACL (apply with redis-cli, or rerun with --redis-apply):")
        print(f"  redis-cli {shown}")
    return 0


async def _apply_acl(settings: Settings, acl: list[str]) -> int:
    """ACLs are not replicated: apply on every primary and replica; the number of nodes."""
    from agent.redis_client import run_on_every_node

    settings.require("redis_url")
    try:
        return await run_on_every_node(settings.redis_url or "", acl,
                                       password_file=settings.redis_password_file,
                                       ca_file=settings.redis_ca_file)
    except RedisError as exc:
        raise RedisError(f"cannot apply the Redis ACL: {exc}") from exc


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    """`run`: the long-lived agent."""
    from agent.app import run_agent

    return run_async(lambda: run_agent(settings))


def cmd_once(args: argparse.Namespace, settings: Settings) -> int:
    """`once`: load, write outputs and snapshot, exit."""
    from agent.app import run_once

    return run_async(lambda: run_once(settings))


def cmd_relay(args: argparse.Namespace, settings: Settings) -> int:
    """`relay`: pg LISTEN → Redis PUBLISH."""
    from agent.relay import run_relay

    return run_async(lambda: run_relay(settings))


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    """`demo`: everything on embedded servers."""
    from agent.demo import run_demo

    return run_demo(settings, sys.argv[0])


def cmd_inject(args: argparse.Namespace, settings: Settings) -> int:
    """`inject`: the admission webhook."""
    from agent.inject import commands

    return commands.cmd_inject(args)


def cmd_helm_values(args: argparse.Namespace, settings: Settings) -> int:
    """`helm-values`: print Helm values that inject the agent."""
    from agent.inject import commands

    return commands.cmd_helm_values(args)
