"""Command line: parse flags, build Settings, dispatch.

Exit codes: 0 ok, 1 runtime, 2 usage, 3 conflict, 4 `--wait` timed out, 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import anyio

from agent import __version__
from agent.errors import ConfigAgentError, DatabaseError, RedisError
from agent.logs import configure_logging
from agent.settings import Settings, load_settings, setting_names

T = TypeVar("T")

# Settings that hold paths: an OSError about one of them (or a path inside it) names it.
PATH_SETTINGS = ("output_dir", "state_dir", "socket_path", "signal_pidfile",
                 "database_password_file", "redis_password_file", "redis_ca_file")

# Flags shared by the commands that talk to PostgreSQL/Redis; each overrides CONFIG_AGENT_<NAME>.
CONNECTION_FLAGS = (
    ("--database-url", "PostgreSQL URL"),
    ("--database-password-file", "file holding the PostgreSQL password"),
    ("--redis-url", "redis://, rediss://, redis+sentinel://…/service or redis+cluster://… URL"),
    ("--redis-password-file", "file holding the Redis password"),
    ("--redis-ca-file", "CA bundle for rediss://"),
    ("--database-pool-mode", "session (direct, default) or transaction (behind a transaction-pooling PgBouncer)"),
    ("--redis-channels", "auto, classic, sharded or both (publishers, while migrating to a cluster)"),
)
AGENT_FLAGS = (
    ("--database-read-url", "PostgreSQL URL to read from (a replica)"),
    ("--org-id", "the tenant"),
    ("--services", "comma-separated service filter (default: all)"),
    ("--flag-services", "comma-separated services whose entries are OpenFeature flags (default features)"),
    ("--http-host", "local API address (default 127.0.0.1)"),
    ("--http-port", "local API port (default 8790)"),
    ("--http-max-connections", "open connections to the local API, TCP and socket (default 4096)"),
    ("--http-max-watchers", "long-polls and SSE streams open at once (default 3072)"),
    ("--http-max-connections-per-client", "connections one client may hold: a uid on the socket, an "
                                          "address on TCP (default 0 = no bound)"),
    ("--http-header-timeout", "seconds a connection has to send a complete request head (default 10)"),
    ("--http-idle-timeout", "seconds an idle keep-alive connection is kept open (default 75)"),
    ("--socket-path", "also serve the API on this Unix socket"),
    ("--socket-mode", "Unix socket mode (default 0660)"),
    ("--output-dir", "write configs.json, configs.env and {service}/{key} here"),
    ("--file-mode", "mode of written files (default 0644)"),
    ("--dir-mode", "mode of written directories (default 0755)"),
    ("--env-prefix", "put before every variable name in configs.env (default none)"),
    ("--state-dir", "keep the last-known-good snapshot here"),
    ("--metrics-host", "metrics address (default 0.0.0.0)"),
    ("--metrics-port", "metrics port, also /healthz and /readyz (default 9790, 0 = off)"),
    ("--reconcile-interval", "seconds between full revision checks (default 300)"),
    ("--drift-grace", "seconds a change reconcile found may still arrive by pub/sub before it "
                      "counts as drift (default 5)"),
    ("--heartbeat-interval", "seconds between the relay's heartbeats; nothing heard for 3x this "
                             "means resubscribe (default 5, 0 = off)"),
    ("--lag-chase-timeout", "seconds to chase an announced version the read database does not "
                            "show yet (default 15)"),
    ("--fetch-jitter", "a fetch after an announcement waits a random 0..this many seconds (default 0)"),
    ("--agent-name", "this agent in `status` and `set --wait` (default: hostname-pid; the chart: the pod)"),
    ("--agent-namespace", "the pod's namespace, shown beside the name"),
    ("--fleet-report-interval", "seconds between idle reports of the applied revision to Redis "
                                "(default 10, 0 = off)"),
    ("--fallback-poll-interval", "seconds between revision polls while Redis is down (default 5)"),
    ("--stale-after", "seconds without a successful sync before stale (default 600)"),
    ("--db-idle-timeout", "close the idle read connection after this many seconds (default 60, 0 = never)"),
    ("--on-change-exec", "shell command run after the files changed"),
    ("--on-change-signal", "signal (e.g. HUP) sent after the files changed"),
    ("--signal-pidfile", "file holding the pid to signal"),
    ("--on-change-webhook", "local URL POSTed a JSON summary after the files changed"),
    ("--hook-debounce", "seconds to wait for a burst to end before hooks (default 0.2)"),
    ("--hook-timeout", "seconds a hook may run (default 10)"),
)


def _add_flags(parser: argparse.ArgumentParser, flags: Sequence[tuple[str, str]]) -> None:
    for flag, help_text in flags:
        env = "CONFIG_AGENT_" + flag[2:].upper().replace("-", "_")
        parser.add_argument(flag, default=None, help=f"{help_text} [env {env}]")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-format", choices=["text", "json"], default=None,
                        help="log format [env CONFIG_AGENT_LOG_FORMAT]")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None,
                        help="log level [env CONFIG_AGENT_LOG_LEVEL]")


def _writer_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--actor", default=None, help="who makes the change (default: the OS user)")
    parser.add_argument("--reason", default=None, help="why (stored in the history)")
    parser.add_argument("--expect-version", type=int, default=None,
                        help="fail with exit 3 unless the entry is at this version (0 = must not exist)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.add_argument("--wait", nargs="?", type=_percent, const=100.0, default=None, metavar="PERCENT",
                        help="after the commit, wait until PERCENT (default 100) of the org's live agents "
                             "that serve the service report the change's revision; exit 4 on --timeout")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                        help="how long --wait waits (default 30)")


def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage in (0, 100]")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used to keep the README's CLI reference honest)."""
    parser = argparse.ArgumentParser(
        prog="config-agent",
        description="Keeps runtime settings in sync with PostgreSQL in every pod, within milliseconds.",
    )
    parser.add_argument("--version", action="version", version=f"config-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, *, agent: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _common(p)
        _add_flags(p, CONNECTION_FLAGS)
        if agent:
            _add_flags(p, AGENT_FLAGS)
            p.add_argument("--http-allow-remote", action="store_true", default=None,
                           help="permit a non-loopback --http-host [env CONFIG_AGENT_HTTP_ALLOW_REMOTE]")
        return p

    command("run", "run the agent: warm-load, subscribe, serve HTTP/socket/files", agent=True)
    command("once", "load once, write the files and the last-known-good snapshot, exit", agent=True)
    command("migrate", "create or upgrade the database schema")
    p = command("relay", "bridge PostgreSQL notifications to Redis")
    _add_flags(p, (("--metrics-port", "metrics port with /healthz and /readyz (default 9790, 0 = off)"),
                   ("--metrics-host", "metrics address (default 0.0.0.0)"),
                   ("--heartbeat-interval", "seconds between heartbeats to every org's agents, and "
                                            "between LISTEN proofs (default 5, 0 = no heartbeats)")))

    p = command("set", "create or update an entry")
    p.add_argument("org"), p.add_argument("service"), p.add_argument("key")
    p.add_argument("value", help="a JSON value (0.9, true, '\"text\"', '{\"a\": 1}'); - reads stdin")
    p.add_argument("--string", action="store_true", help="store VALUE as a string, not JSON")
    _writer_flags(p)

    p = command("get", "show one entry")
    p.add_argument("org"), p.add_argument("service"), p.add_argument("key")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = command("list", "list the entries of an org")
    p.add_argument("org"), p.add_argument("service", nargs="?")
    p.add_argument("--deleted", action="store_true", help="include deleted entries")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = command("history", "show the change history (newest first)")
    p.add_argument("org"), p.add_argument("service", nargs="?"), p.add_argument("key", nargs="?")
    p.add_argument("--limit", type=int, default=50, help="at most this many rows (default 50)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = command("rollback", "set an entry back to the value of an earlier version")
    p.add_argument("org"), p.add_argument("service"), p.add_argument("key")
    p.add_argument("--to-version", type=int, required=True, help="the version whose value to restore")
    _writer_flags(p)

    p = command("delete", "delete an entry (kept as a tombstone in the history)")
    p.add_argument("org"), p.add_argument("service"), p.add_argument("key")
    _writer_flags(p)

    p = command("status", "list the org's live agents, laggards first: revision, lag, stale, connections")
    p.add_argument("org")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = command("grant-reader", "create/update a tenant's read-only database role and print its Redis ACL")
    p.add_argument("--org", required=True, help="the tenant the role may read")
    p.add_argument("--role", required=True, help="the LOGIN role (also the Redis ACL user name)")
    p.add_argument("--password-file", type=Path, default=None,
                   help="file holding the role's password (used for PostgreSQL and Redis)")
    p.add_argument("--connection-limit", type=int, default=None,
                   help="at most this many sessions of the role (CONNECTION LIMIT; -1 = none): leaves "
                        "the server's other slots to other clients when agents outnumber them")
    p.add_argument("--redis-apply", action="store_true",
                   help="apply the ACL SETUSER on --redis-url instead of only printing it")

    p = command("demo", "start embedded PostgreSQL and Redis, seed org acme, run relay and agent")
    _add_flags(p, (("--http-port", "local API port (default 8790)"),))

    from agent.inject.commands import add_parsers

    add_parsers(sub, _common)
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the environment with the parsed flags laid over them."""
    fields = set(setting_names())
    overrides = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    return load_settings(**overrides)


def run_async(fn: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine function on asyncio (uvloop when available)."""
    try:
        import uvloop  # noqa: F401

        options: dict[str, Any] = {"use_uvloop": True}
    except ImportError:
        options = {}
    return anyio.run(fn, backend="asyncio", backend_options=options)


def emit(args: argparse.Namespace, doc: Any, table: Callable[[], str]) -> None:
    """Print JSON (--json) or a readable table."""
    if getattr(args, "json", False):
        print(json.dumps(doc, ensure_ascii=False, indent=None, default=str))
    else:
        print(table())


def default_actor() -> str:
    """The OS user, as the default --actor."""
    try:
        return getpass.getuser()
    except Exception:  # no user name in a container without /etc/passwd entry
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `config-agent` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    settings: Settings | None = None
    try:
        settings = settings_from_args(args)
        configure_logging(settings.log_format, settings.log_level)
        from agent.commands import dispatch

        return dispatch(args, settings)
    except BaseException as exc:
        failure = describe_failure(exc, settings, args.command)
        if failure is None:
            raise  # not one of ours: a bug, whose traceback is worth seeing
        line, code = failure
        if line:
            print(f"config-agent: error: {line}", file=sys.stderr)
        return code


def describe_failure(exc: BaseException, settings: Settings | None,
                     command: str) -> tuple[str | None, int] | None:
    """The one line and exit code `main` reports for `exc`; None if it is not ours to report.

    anyio task groups deliver what a component raised wrapped in (nested) exception
    groups. When every exception inside is one of ours (ConfigAgentError), an OSError
    about a file, or Ctrl-C, the first of ours is reported as one line naming its
    setting, with its exit code; anything else is a bug and keeps its traceback.
    """
    leaves = list(_leaves(exc))
    if not all(isinstance(leaf, ConfigAgentError | KeyboardInterrupt)
               or (isinstance(leaf, OSError) and isinstance(leaf.filename, str | bytes))
               for leaf in leaves):
        return None
    ours = [leaf for leaf in leaves if isinstance(leaf, ConfigAgentError)]
    if ours:
        return _naming_setting(ours[0], settings, command), ours[0].exit_code
    errors = [leaf for leaf in leaves if isinstance(leaf, OSError)]
    if errors:
        return _naming_path(errors[0], settings), 1
    return None, 130  # Ctrl-C


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _naming_setting(exc: ConfigAgentError, settings: Settings | None, command: str) -> str:
    """The error's line, naming the setting: of the path it is about (first mention), or
    of the PostgreSQL or Redis that failed."""
    text = str(exc)
    if settings is None or "CONFIG_AGENT_" in text:
        return text
    for name in PATH_SETTINGS:
        value = getattr(settings, name)
        if value is not None:
            # The path itself, not a longer path that starts with it.
            mention = re.search(re.escape(str(value)) + r"(?![\w/.-])", text)
            if mention:
                end = mention.end()
                return f"{text[:end]} (CONFIG_AGENT_{name.upper()}){text[end:]}"
    if isinstance(exc, DatabaseError):
        reads = command in ("run", "once") and settings.database_read_url
        return f"{text} (CONFIG_AGENT_{'DATABASE_READ_URL' if reads else 'DATABASE_URL'})"
    if isinstance(exc, RedisError):
        return f"{text} (CONFIG_AGENT_REDIS_URL)"
    return text


def _naming_path(exc: OSError, settings: Settings | None) -> str:
    """`cannot use PATH (CONFIG_AGENT_SETTING): reason` for an OSError about a file."""
    path = Path(os.fsdecode(exc.filename))
    reason = exc.strerror or str(exc)
    reason = reason[:1].lower() + reason[1:]
    for name in PATH_SETTINGS if settings is not None else ():
        value = getattr(settings, name)
        if value is not None and (path.is_relative_to(value) or Path(value).is_relative_to(path)):
            return f"cannot use {path} (CONFIG_AGENT_{name.upper()}): {reason}"
    return f"cannot use {path}: {reason}"

