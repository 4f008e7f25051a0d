"""Redis connections for publishers and subscribers: one server, Sentinel or Cluster.

URL forms (each also with `rediss` for TLS and CONFIG_AGENT_REDIS_CA_FILE):

    redis://[user:pass@]host:port[/db]                       one server (or unix://path)
    redis+sentinel://[user:pass@]host:port[,host:port…]/service_name[/db]
    redis+cluster://[user:pass@]host:port[,host:port…]       seed nodes of a Redis Cluster

Agents run with an ACL user that may only subscribe to their org's channels and
PING (plus CLUSTER SLOTS and COMMAND in a cluster, which redis-py needs to learn the
topology), so nothing here sends CLIENT SETINFO/SETNAME, CONFIG or HELLO on connect.
Sentinel is asked for the master on every new connection, so a reconnect after a
failover reaches the new master.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlparse

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.credentials import CredentialProvider
from redis.exceptions import RedisError as _RedisLibError

from agent.db.connect import read_secret
from agent.errors import RedisError, UsageError
from agent.model import Announcement

log = logging.getLogger("agent.redis")

# What redis-py raises when the server or network fails (plus OSError for TLS/DNS).
REDIS_ERRORS: tuple[type[BaseException], ...] = (_RedisLibError, OSError, TimeoutError)

Kind = Literal["single", "sentinel", "cluster"]
# Which channel form carries announcements (README "Channels"): `classic` is SPEC §2's
# per-entry channel, `sharded` one hash-tagged channel per org for Redis Cluster.
ChannelForm = Literal["classic", "sharded"]
_SCHEMES = {
    "redis": ("single", False), "rediss": ("single", True), "unix": ("single", False),
    "redis+sentinel": ("sentinel", False), "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False), "rediss+cluster": ("cluster", True),
}


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """A parsed Redis URL: which topology, which nodes, which credentials."""

    kind: Kind
    tls: bool
    nodes: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None
    # Sentinel: the monitored master's name; db number for single/sentinel.
    service: str | None = None
    db: int = 0
    # single: the URL without credentials, for redis-py's from_url.
    plain_url: str = ""


def parse_redis_url(url: str) -> RedisTarget:
    """Parse any supported Redis URL; UsageError with one line naming what is wrong."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in _SCHEMES:
        raise UsageError("must start with redis://, rediss://, redis+sentinel://, "
                         "rediss+sentinel://, redis+cluster:// or rediss+cluster://")
    kind, tls = _SCHEMES[scheme]
    creds, _, location = rest.rpartition("@")
    username = password = None
    if creds:
        user, _, pw = creds.partition(":")
        username, password = unquote(user) or None, unquote(pw) if pw else None
    if kind == "single":
        parsed = urlparse(url)
        plain = parsed._replace(netloc=parsed.netloc.rpartition("@")[2]).geturl()
        return RedisTarget("single", tls, (), username, password, plain_url=plain)
    hosts, _, path = location.partition("/")
    nodes = tuple(_host_port(part) for part in hosts.split(",") if part)
    if not nodes:
        raise UsageError(f"{scheme}:// needs at least one host:port")
    parts = [p for p in path.split("/") if p]
    if kind == "cluster":
        if parts:
            raise UsageError("redis+cluster:// takes no path (a cluster has only db 0)")
        return RedisTarget("cluster", tls, nodes, username, password)
    if not parts or len(parts) > 2:
        raise UsageError(f"{scheme}:// needs /service_name[/db] after the sentinel addresses")
    db = 0
    if len(parts) == 2:
        if not parts[1].isdigit():
            raise UsageError(f"db {parts[1]!r} is not a number")
        db = int(parts[1])
    return RedisTarget("sentinel", tls, nodes, username, password, service=parts[0], db=db)


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{text!r} is not host:port")
    return host.strip("[]"), int(port)


def channel_form(url: str, setting: str = "auto") -> ChannelForm:
    """The channel form agents subscribe to: `sharded` for a cluster unless set."""
    if setting in ("classic", "sharded"):
        return setting  # type: ignore[return-value]
    return "sharded" if parse_redis_url(url).kind == "cluster" else "classic"


def publish_forms(url: str, setting: str = "auto") -> tuple[ChannelForm, ...]:
    """The channel forms a publisher (relay, CLI, library) uses: `both` during a migration."""
    if setting == "both":
        return ("classic", "sharded")
    return (channel_form(url, setting),)


class FileCredentials(CredentialProvider):
    """Username from the URL, password from a file re-read on every new connection."""

    def __init__(self, username: str | None, password: str | None, password_file: Path | None):
        self._username = username
        self._password = password
        self._password_file = password_file

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        password = self._password
        if self._password_file is not None:
            password = read_secret(self._password_file)
        if self._username and password is not None:
            return (self._username, password)
        if password is not None:
            return (password,)
        if self._username:
            return (self._username, "")
        return ("",)

    async def get_credentials_async(self) -> tuple[str] | tuple[str, str]:
        # redis-py's default logs a "backward compatibility" warning on every connection.
        return self.get_credentials()


def _connection_kwargs(target: RedisTarget, password_file: Path | None, ca_file: Path | None,
                       options: dict[str, Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "driver_info": None,
        "protocol": 2,
        "socket_connect_timeout": 5,
        # Our loops own reconnects: a silent internal reconnect would skip the replay.
        "retry": Retry(NoBackoff(), 0),
    }
    if target.username or target.password or password_file:
        kwargs["credential_provider"] = FileCredentials(target.username, target.password, password_file)
    if target.tls:
        kwargs["ssl_cert_reqs"] = "required"
        if ca_file is not None:
            kwargs["ssl_ca_certs"] = str(ca_file)
    kwargs.update(options)
    return kwargs


def redis_client(
    url: str,
    *,
    password_file: Path | None = None,
    ca_file: Path | None = None,
    **options: Any,
) -> Redis:
    """A client of one server, or of the current master behind Sentinel.

    For a cluster URL use `cluster_client`. Sends nothing an ACL may refuse.
    """
    target = parse_redis_url(url)
    kwargs = _connection_kwargs(target, password_file, ca_file, options)
    if target.kind == "cluster":
        raise UsageError("a redis+cluster:// URL needs a cluster client")
    if target.kind == "single":
        return Redis.from_url(target.plain_url, **kwargs)
    # Sentinels get the socket and TLS options but no credentials (their own auth is
    # separate from the data nodes' ACL users).
    sentinel_kwargs = {k: v for k, v in kwargs.items()
                       if k.startswith("socket_") or k.startswith("ssl") or k in ("protocol", "driver_info")}
    if target.tls:
        kwargs["ssl"] = True
        sentinel_kwargs["ssl"] = True
    sentinel = Sentinel(list(target.nodes), sentinel_kwargs=sentinel_kwargs,  # type: ignore[no-untyped-call]
                        db=target.db, **kwargs)
    client: SentinelMaster = sentinel.master_for(target.service or "", redis_class=SentinelMaster)
    client.sentinels_of_master = sentinel
    return client


class SentinelMaster(Redis):
    """The master behind Sentinel; closing it also closes the connections to the sentinels."""

    sentinels_of_master: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinels_of_master is not None:
            for node in self.sentinels_of_master.sentinels:
                await node.aclose()


def cluster_client(
    url: str,
    *,
    password_file: Path | None = None,
    ca_file: Path | None = None,
    **options: Any,
) -> RedisCluster:
    """A Redis Cluster client from the seed nodes of a redis+cluster:// URL."""
    target = parse_redis_url(url)
    if target.kind != "cluster":
        raise UsageError("a cluster client needs a redis+cluster:// URL")
    kwargs = _connection_kwargs(target, password_file, ca_file, options)
    kwargs.pop("driver_info")  # the cluster client sets no client info of its own
    kwargs.pop("retry")
    if target.tls:
        kwargs["ssl"] = True
    return RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
                        retry=Retry(NoBackoff(), 0), **kwargs)


def any_client(url: str, *, password_file: Path | None = None, ca_file: Path | None = None,
               **options: Any) -> Redis | RedisCluster:
    """A cluster client for a redis+cluster:// URL, else a one-server or Sentinel client."""
    if parse_redis_url(url).kind == "cluster":
        return cluster_client(url, password_file=password_file, ca_file=ca_file, **options)
    return redis_client(url, password_file=password_file, ca_file=ca_file, **options)


async def run_on_every_node(url: str, command: list[str], *, password_file: Path | None = None,
                            ca_file: Path | None = None) -> int:
    """Run an admin command (ACL SETUSER) on every node: a cluster's primaries and replicas,
    Sentinel's master and replicas, or the one server. Returns how many nodes ran it."""
    target = parse_redis_url(url)
    addresses: list[tuple[str, int]] = []
    try:
        if target.kind == "cluster":
            addresses = await _cluster_nodes(target, password_file, ca_file)
        elif target.kind == "sentinel":
            sentinel = redis_client(url, password_file=password_file, ca_file=ca_file)
            try:
                pool: Any = sentinel.connection_pool
                addresses = [await pool.get_master_address()]
                addresses += await pool.sentinel_manager.discover_slaves(target.service)
            finally:
                await sentinel.aclose()
        else:
            client = redis_client(url, password_file=password_file, ca_file=ca_file)
            try:
                await client.execute_command(*command)  # type: ignore[no-untyped-call]
            finally:
                await client.aclose()
            return 1
        for host, port in addresses:
            node = Redis(host=host, port=port, **_connection_kwargs(target, password_file, ca_file, {}))
            try:
                await node.execute_command(*command)  # type: ignore[no-untyped-call]
            finally:
                await node.aclose()
    except REDIS_ERRORS as exc:
        raise RedisError(f"{type(exc).__name__}: {exc}") from exc
    return len(addresses)


async def _cluster_nodes(target: RedisTarget, password_file: Path | None,
                         ca_file: Path | None) -> list[tuple[str, int]]:
    """Every live primary and replica, as the first answering seed node lists them."""
    last: BaseException | None = None
    for host, port in target.nodes:
        seed = Redis(host=host, port=port, **_connection_kwargs(target, password_file, ca_file, {}))
        try:
            text: Any = await seed.execute_command("CLUSTER NODES")  # type: ignore[no-untyped-call]
        except REDIS_ERRORS as exc:
            last = exc
            continue
        finally:
            await seed.aclose()
        # redis-py parses the reply into {"host:port": {"flags": "master,myself", …}, …}.
        nodes = []
        for address, info in dict(text).items():
            flags = str(info.get("flags", "")).split(",")
            if "fail" not in flags and "noaddr" not in flags:
                node_host, _, node_port = str(address).split("@")[0].rpartition(":")
                nodes.append((node_host or host, int(node_port)))
        return nodes
    raise last or RedisError("no seed node answered")


class RedisPublisher:
    """Publishes announcements in the configured channel forms; works on every topology.

    `forms` is ("classic",), ("sharded",) or both (during a migration to a cluster).
    """

    def __init__(self, url: str, *, password_file: Path | None = None, ca_file: Path | None = None,
                 forms: tuple[ChannelForm, ...] | None = None):
        self._cluster = parse_redis_url(url).kind == "cluster"
        self._stale_topology = True
        self.forms = forms or (channel_form(url),)
        self._client = any_client(url, password_file=password_file, ca_file=ca_file, socket_timeout=2)

    async def _send(self, classic: str, sharded: str, payload: str) -> None:
        if isinstance(self._client, RedisCluster) and self._stale_topology:
            # First use, or after an error: learn which node owns which slot (again).
            if self._client.nodes_manager.slots_cache:
                await self._client.nodes_manager.initialize()
            else:
                await self._client.initialize()
            self._stale_topology = False
        if "classic" in self.forms:
            if isinstance(self._client, RedisCluster):
                # PUBLISH in a cluster reaches every node's subscribers from any node.
                await self._client.execute_command("PUBLISH", classic, payload,
                                                   target_nodes=RedisCluster.RANDOM)
            else:
                await self._client.publish(classic, payload)
        if "sharded" in self.forms:
            if isinstance(self._client, RedisCluster):
                # Routed by the channel's hash slot, like a key (the org's {tag}).
                node = self._client.get_node_from_key(sharded)
                await self._client.execute_command("SPUBLISH", sharded, payload, target_nodes=node)
            else:
                await self._client.execute_command("SPUBLISH", sharded, payload)  # type: ignore[no-untyped-call]

    async def publish(self, announcement: Announcement) -> bool:
        """Publish one announcement; False when Redis could not take it (never raises)."""
        try:
            await self.publish_or_raise(announcement)
        except RedisError as exc:
            log.debug("publish failed: %s", exc)
            return False
        return True

    async def publish_or_raise(self, announcement: Announcement) -> None:
        """Publish one announcement, raising RedisError on failure (for the relay)."""
        await self._guarded(self._send(announcement.channel, announcement.sharded_channel,
                                       announcement.to_json()), "publish to")

    async def publish_heartbeat(self, org_id: str, ts: float) -> None:
        """Tell an org's agents the relay is alive (no value, no entry); raises RedisError."""
        from agent.model import heartbeat_channel, heartbeat_json, sharded_channel

        await self._guarded(self._send(heartbeat_channel(org_id), sharded_channel(org_id),
                                       heartbeat_json(org_id, ts)), "publish a heartbeat to")

    async def ping(self) -> None:
        """PING, raising RedisError when Redis does not answer."""
        await self._guarded(self._client.ping(), "reach")

    async def _guarded(self, call: Any, what: str) -> None:
        try:
            await call
        except REDIS_ERRORS as exc:
            self._stale_topology = True  # a failed node or a moved slot: look again next time
            raise RedisError(f"cannot {what} Redis: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        """Close the connections."""
        await self._client.aclose()
