"""Settings (SPEC §6): environment variables with prefix CONFIG_AGENT_, flags override.

Parsed once at start, frozen, and passed down; no other module reads the environment.

A frozen dataclass whose field types say how each value is parsed and checked
(setting_types.py), not a pydantic-settings model: pydantic cost every pod about
10 MiB of RSS and 100 ms of start (issue #21).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

from agent.errors import UsageError
from agent.model import NAME_RE, NAME_RULE
from agent.setting_types import After, Before, Range, field_parsers

ENV_PREFIX = "CONFIG_AGENT_"
_SIGNALS = {"HUP", "INT", "QUIT", "USR1", "USR2", "TERM", "WINCH", "CONT"}


def _octal_mode(value: Any) -> int:
    """Accept a file mode as an octal string ("0640") or an int."""
    if isinstance(value, int) and not isinstance(value, bool):
        mode = value
    else:
        text = str(value).strip()
        if not re.fullmatch(r"0?[0-7]{3,4}", text):
            raise ValueError("must be an octal mode such as 0640")
        mode = int(text, 8)
    if not 0 <= mode <= 0o7777:
        raise ValueError("must be an octal mode such as 0640")
    return mode


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError("must be a positive number of seconds")
    return value


def _env_prefix(value: str) -> str:
    # Upper case only: lower-case variables such as http_proxy mean something to curl.
    if value and not re.fullmatch(r"[A-Z_][A-Z0-9_]*", value):
        raise ValueError("must be empty or upper-case letters, digits and _ (not starting with a digit)")
    return value


def _split_services(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


def _check_services(value: tuple[str, ...]) -> tuple[str, ...]:
    for name in value:
        if not NAME_RE.fullmatch(name):
            raise ValueError(f"service {name!r} {NAME_RULE}")
    return value


def _check_agent_name(value: str | None) -> str | None:
    if value is not None:
        from agent.fleet import AGENT_NAME_RE, AGENT_NAME_RULE

        if not AGENT_NAME_RE.fullmatch(value):
            raise ValueError(AGENT_NAME_RULE)
    return value


def _check_org(value: str | None) -> str | None:
    if value is not None and not NAME_RE.fullmatch(value):
        raise ValueError(NAME_RULE)
    return value


def _check_redis_url(value: str | None) -> str | None:
    if value is not None:
        from agent.redis_client import parse_redis_url

        try:
            parse_redis_url(value)
        except UsageError as exc:
            raise ValueError(str(exc)) from exc
    return value


def _check_db_url(value: str | None) -> str | None:
    if value is not None and not value.startswith(("postgres://", "postgresql://")):
        raise ValueError("must start with postgresql://")
    return value


def _check_signal(value: str | None) -> str | None:
    if value is None:
        return None
    name = value.upper().removeprefix("SIG")
    if name not in _SIGNALS:
        raise ValueError(f"must be one of {', '.join(sorted(_SIGNALS))}")
    return name


def _check_webhook(value: str | None) -> str | None:
    if value is not None and not value.startswith(("http://", "https://")):
        raise ValueError("must be an http:// URL")
    return value


Seconds = Annotated[float, After(_positive)]
NonNegative = Annotated[float, Range(ge=0)]
Port = Annotated[int, Range(ge=0, le=65535)]
Mode = Annotated[int, Before(_octal_mode)]
Services = Annotated[tuple[str, ...], Before(_split_services), After(_check_services)]
DatabaseUrl = Annotated[str | None, After(_check_db_url)]
AgentName = Annotated[str | None, After(_check_agent_name)]


@dataclass(frozen=True)
class Settings:
    """Every setting of config-agent; see README "Settings" for the table."""

    # PostgreSQL: writers use an app role; agents use their tenant reader role.
    database_url: DatabaseUrl = None
    # Where the agent reads (a replica); defaults to database_url.
    database_read_url: DatabaseUrl = None
    # Password read from a file (a mounted Secret); re-read before every new connection.
    database_password_file: Path | None = None
    # `transaction` behind a transaction-pooling PgBouncer (or any pooler that may hand each
    # transaction another server connection): no named prepared statements, every query in
    # its own transaction. `session` for a direct connection or session pooling.
    database_pool_mode: Literal["session", "transaction"] = "session"
    # redis://, rediss://, redis+sentinel://…/service, redis+cluster://seed,seed (README "Scaling out")
    redis_url: Annotated[str | None, After(_check_redis_url)] = None
    # Announcement channels: classic (config:{org}:{service}:{key}, PSUBSCRIBE), sharded (one
    # config:{org} channel per org, SSUBSCRIBE, agents on a cluster URL only; the default for a cluster URL), or both
    # (publishers only: during a migration to a cluster). auto = sharded for a cluster URL.
    redis_channels: Literal["auto", "classic", "sharded", "both"] = "auto"
    # The relay publishes a heartbeat per org this often; an agent that hears nothing for
    # 3 × this long resubscribes and replays (0 = off, e.g. when no relay runs).
    heartbeat_interval: NonNegative = 5.0
    # Redis password read from a file, re-read before every new connection.
    redis_password_file: Path | None = None
    # CA bundle that signs the Redis server certificate (rediss://).
    redis_ca_file: Path | None = None
    # The tenant; required for `run` and `once`.
    org_id: Annotated[str | None, After(_check_org)] = None
    # Only these services (comma-separated); empty = all.
    services: Services = ()
    # Every entry of these services (comma-separated) is an OpenFeature flag, served over
    # OFREP under its key (the first service listed wins a key held twice); writers validate
    # flag definitions written to them (agent/flags/definition.py). Empty = no flags.
    flag_services: Services = ("features",)
    # Local API (loopback only unless http_allow_remote).
    http_host: str = "127.0.0.1"
    http_port: Port = 8790
    http_allow_remote: bool = False
    # Open connections to the local API (TCP and socket together; fewer when the open-file
    # limit is lower). At the limit the connection idle the longest is closed to admit a new
    # one; only when every one is busy is a new connection refused (503).
    http_max_connections: Annotated[int, Range(ge=1)] = 4096
    # Long-polls and SSE streams open at once (at most 3/4 of http_max_connections, so that
    # plain reads always find room); more are answered 503 with Retry-After.
    http_max_watchers: Annotated[int, Range(ge=1)] = 3072
    # Connections one client may hold (0 = no per-client bound). Unix-socket clients are told
    # apart by uid, TCP clients by address: every loopback client is the same one.
    http_max_connections_per_client: Annotated[int, Range(ge=0)] = 0
    # A connection must deliver a complete request head this long after it opens or after
    # the head's first byte (slowloris), else it is closed (408 if it sent part of a head).
    http_header_timeout: Seconds = 10.0
    # A connection with no request in progress is closed after this long (keep-alive).
    http_idle_timeout: Seconds = 75.0
    # Also serve the API on this Unix socket, with this mode.
    socket_path: Path | None = None
    socket_mode: Mode = 0o660
    # Shared file set (configs.json, configs.env, {service}/{key}) and its modes.
    output_dir: Path | None = None
    file_mode: Mode = 0o644
    dir_mode: Mode = 0o755
    # Put before every variable name in configs.env (APP_ → APP_AI_THRESHOLD); names on
    # the deny list (envfile.py) are left out, and a prefix keeps clear of all of them.
    env_prefix: Annotated[str, After(_env_prefix)] = ""
    # Last-known-good snapshot, served (stale) when PostgreSQL is down at start.
    state_dir: Path | None = None
    # Prometheus metrics plus /healthz and /readyz for kubelet probes (0 = off).
    metrics_host: str = "0.0.0.0"
    metrics_port: Port = 9790
    # Full revision check every this many seconds (±10 % jitter).
    reconcile_interval: Seconds = 300.0
    # A change reconcile found counts as drift only if pub/sub has not delivered it
    # this many seconds later (a busy agent may still be reading its announcement).
    drift_grace: NonNegative = 5.0
    # How long an announced version that the read database does not show yet (a replica
    # behind) is chased with backoff before reconcile is left to find it.
    lag_chase_timeout: NonNegative = 15.0
    # A fetch after an announcement waits a random 0..fetch_jitter seconds, so that a
    # fleet does not hit PostgreSQL with every pod's query in the same millisecond.
    # Off by default: measured, it only added its mean (bench_scale); while the server is
    # short of connection slots the agent spreads fetches over a second anyway.
    fetch_jitter: Annotated[float, Range(ge=0, le=60)] = 0.0
    # Who this agent is in `config-agent status` and `set --wait`: the pod name and
    # namespace (the chart sets both from the downward API); unset: hostname-pid.
    agent_name: AgentName = None
    agent_namespace: AgentName = None
    # The agent reports its applied revision to Redis on every new revision (at most
    # 10 a second) and this often when idle; a report lives 3 × this long (0 = no reports).
    fleet_report_interval: NonNegative = 10.0
    # Revision polling while Redis is down.
    fallback_poll_interval: Seconds = 5.0
    # No successful sync for this long → stale.
    stale_after: Seconds = 600.0
    # Close the read connection after this many idle seconds (0 = keep it open): a fleet
    # holds no PostgreSQL backends between changes; the next change pays one connect.
    db_idle_timeout: NonNegative = 60.0
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Change hooks, run after the file set (or snapshot) changed, debounced.
    on_change_exec: str | None = None
    on_change_signal: Annotated[str | None, After(_check_signal)] = None
    signal_pidfile: Path | None = None
    on_change_webhook: Annotated[str | None, After(_check_webhook)] = None
    hook_debounce: NonNegative = 0.2
    hook_timeout: Seconds = 10.0

    def __post_init__(self) -> None:
        # Field by field in declaration order: the first bad one is the one reported.
        for name, parse in _parsers(Settings):
            try:
                value = parse(getattr(self, name))
            except ValueError as exc:
                raise UsageError(f"invalid setting {ENV_PREFIX}{name.upper()}: {exc}") from exc
            object.__setattr__(self, name, value)
        try:
            self._check_combinations()
        except ValueError as exc:
            raise UsageError(f"invalid settings: {exc}") from exc

    def _check_combinations(self) -> None:
        if not self.http_allow_remote and not is_loopback(self.http_host):
            raise ValueError(
                f"http_host {self.http_host!r} is not a loopback address; "
                "set CONFIG_AGENT_HTTP_ALLOW_REMOTE=true to allow it"
            )
        if self.on_change_signal and not self.signal_pidfile:
            raise ValueError("on_change_signal needs signal_pidfile")

    @property
    def read_url(self) -> str | None:
        """Where the agent reads from: the replica URL if set, else the primary."""
        return self.database_read_url or self.database_url

    def require(self, *names: str) -> None:
        """Raise a one-line UsageError for the first required setting that is missing."""
        for name in names:
            if getattr(self, name) in (None, ""):
                raise UsageError(
                    f"setting {name} is required (CONFIG_AGENT_{name.upper()} or --{name.replace('_', '-')})"
                )


def setting_names() -> list[str]:
    """Every setting's name, in declaration order (CONFIG_AGENT_<NAME> upper-cased)."""
    return [field.name for field in dataclasses.fields(Settings)]


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback IP addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_settings(**overrides: Any) -> Settings:
    """Build Settings from the environment plus explicit overrides (flags).

    Raises UsageError with one line naming the first bad setting. Unknown
    CONFIG_AGENT_* variables and unknown overrides are ignored; None means "not given".
    """
    names = set(setting_names())
    given: dict[str, Any] = {}
    for variable, value in os.environ.items():  # names match in any case, as in a shell's env
        name = variable.lower().removeprefix(ENV_PREFIX.lower())
        if name != variable.lower() and name in names:
            given[name] = value
    given.update((k, v) for k, v in overrides.items() if k in names and v is not None)
    return Settings(**given)


# Built when the first Settings is (type hints resolved once per process).
_parsers = cache(field_parsers)
