"""The SPEC §4 HTTP API as a lean raw ASGI application (no framework).

    GET /v1/configs[?after=R&wait=S]      whole document; long-poll with after/wait
    GET /v1/configs/{service}             one service's entries
    GET /v1/configs/{service}/{key}       one entry; ?format=raw → bare value
    GET /v1/watch                         Server-Sent Events (see sse.py)
    GET /healthz, /readyz, /v1/status     probes and sync state
    GET /openapi.json                     this API described
    POST /ofrep/v1/evaluate/flags[/{key}] OpenFeature flag evaluation (agent/flags/ofrep.py)
    GET /ofrep/v1/configuration           what the OFREP service supports

Every read answers with bytes prepared once per snapshot (render.py). Every
error is a JSON document with a 4xx status; unknown paths are 404, other
methods 405 with `Allow`. The same app serves TCP and the Unix socket.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from agent.flags.definition import DEFAULT_FLAG_SERVICES
from agent.flags.ofrep import PREFIX as OFREP_PREFIX
from agent.flags.ofrep import OfrepRoutes
from agent.model import NAME_RE
from agent.sinks import render
from agent.sinks.responses import (
    JSON,
    NO_CACHE,
    RETRY_AFTER,
    TEXT,
    BadRequest,
    Receive,
    Scope,
    Send,
    check_read_method,
    etag_matches,
    header,
    int_param,
    loaded_snapshot,
    query_params,
    seconds_param,
    send_body,
    send_error,
    send_not_modified,
)
from agent.sinks.sse import WatchStream
from agent.sinks.waiting import OpenRequests
from agent.status import SyncStatus
from agent.store import Snapshot, Store

log = logging.getLogger("agent.api")

# Upper bound of `?wait=`: long enough to save requests, short enough that
# proxies and client timeouts along the way do not cut the connection first.
MAX_WAIT = 300.0
# `?after=` without `?wait=` waits this long (Consul-style blocking query default).
DEFAULT_WAIT = 30.0
HEARTBEAT = 15.0

_OK = render.dump_json({"status": "ok"}) + b"\n"
_NOT_READY = render.dump_json({"status": "not ready"}) + b"\n"


class ApiApp:
    """The local API of one agent; call `close()` at shutdown to end waiting requests."""

    def __init__(self, store: Store, status: SyncStatus, *, heartbeat: float = HEARTBEAT,
                 max_watchers: int = 2**31, flag_services: Collection[str] = DEFAULT_FLAG_SERVICES) -> None:
        self._store = store
        self._status = status
        refused = status.metrics.http_rejected.labels(reason="watch_limit")
        self.open_requests = OpenRequests(max_watchers, on_full=refused.inc)
        self._watch = WatchStream(store, self.open_requests, heartbeat=heartbeat)
        self._openapi: bytes | None = None  # built when first asked for: few ever ask
        self.ofrep = OfrepRoutes(store, status.metrics, flag_services)

    def close(self) -> None:
        """End long-polls and event streams now (server shutdown)."""
        self.open_requests.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        if scope["type"] != "http":
            return  # lifespan is off; nothing else reaches us
        try:
            await self._route(scope, receive, send)
        except BadRequest as exc:
            await send_error(send, exc.status, exc.message, exc.headers)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if path.startswith("/v1/configs/"):
            parts = path[len("/v1/configs/") :].split("/")
            if len(parts) > 2 or not all(NAME_RE.fullmatch(part) for part in parts):
                raise BadRequest("no such service or key", 404)
            check_read_method(scope)
            if len(parts) == 1:
                await self._service(scope, send, parts[0])
            else:
                await self._entry(scope, send, parts[0], parts[1])
            return
        if path.startswith(OFREP_PREFIX):
            await self.ofrep.serve(scope, receive, send)
            return
        handler = {
            "/v1/configs": self._configs,
            "/v1/watch": self._watch.serve,
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/v1/status": self._status_document,
            "/openapi.json": self._openapi_document,
        }.get(path)
        if handler is None:
            raise BadRequest("no such path", 404)
        check_read_method(scope)
        await handler(scope, receive, send)

    async def _configs(self, scope: Scope, receive: Receive, send: Send) -> None:
        params = query_params(scope)
        after = int_param(params, "after")
        wait = seconds_param(params, "wait", maximum=MAX_WAIT)
        if after is not None:
            snapshot = await self._long_poll(receive, after, DEFAULT_WAIT if wait is None else wait)
            if snapshot is None:
                if self.open_requests.closing:
                    raise BadRequest("shutting down", 503, [RETRY_AFTER])
                await send_not_modified(send, b'"%d"' % self._store.snapshot.revision)
                return
        else:
            snapshot = loaded_snapshot(self._store)
        await _send_cached(scope, send, snapshot, render.configs_body(snapshot), JSON)

    async def _long_poll(self, receive: Receive, after: int, wait: float) -> Snapshot | None:
        """The first snapshot with a revision above `after`, or None at `wait`."""
        store = self._store

        async def newer() -> Snapshot:
            snapshot = store.snapshot
            while not (snapshot.loaded and snapshot.revision > after):
                snapshot = await store.wait_newer(snapshot.generation)
            return snapshot

        current = store.snapshot
        if current.loaded and current.revision > after:
            return current  # no task group for the common "already newer" case
        self.open_requests.check_room()
        return await self.open_requests.wait(receive, newer, wait)

    async def _service(self, scope: Scope, send: Send, service: str) -> None:
        snapshot = loaded_snapshot(self._store)
        body = render.service_bodies(snapshot).get(service)
        if body is None:
            raise BadRequest(f"no such service {service!r}", 404)
        await _send_cached(scope, send, snapshot, body, JSON)

    async def _entry(self, scope: Scope, send: Send, service: str, key: str) -> None:
        snapshot = loaded_snapshot(self._store)
        fmt = query_params(scope).get("format", "json") if scope["query_string"] else "json"
        if fmt == "json":
            body, content_type = render.entry_body(snapshot, service, key), JSON
        elif fmt == "raw":
            body, content_type = render.raw_body(snapshot, service, key), TEXT
        else:
            raise BadRequest("query parameter 'format' must be 'json' or 'raw'")
        if body is None:
            raise BadRequest(f"no such entry {service}/{key}", 404)
        await _send_cached(scope, send, snapshot, body, content_type)

    async def _healthz(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_body(send, 200, _OK, JSON, [NO_CACHE])

    async def _readyz(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._status.ready:
            await send_body(send, 200, _OK, JSON, [NO_CACHE])
        else:
            await send_body(send, 503, _NOT_READY, JSON, [NO_CACHE])

    async def _status_document(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = render.dump_json(self._status.document(self._store.snapshot)) + b"\n"
        await send_body(send, 200, body, JSON, [NO_CACHE])

    async def _openapi_document(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._openapi is None:
            from agent.sinks.openapi import openapi_document

            self._openapi = render.dump_json(openapi_document()) + b"\n"
        await send_body(send, 200, self._openapi, JSON)


async def _send_cached(
    scope: Scope, send: Send, snapshot: Snapshot, body: bytes, content_type: bytes
) -> None:
    """Answer a read: 304 when the client holds this revision, else the prepared bytes."""
    etag = b'"%d"' % snapshot.revision
    if etag_matches(header(scope, b"if-none-match"), etag):
        await send_not_modified(send, etag)
        return
    stale = b"true" if snapshot.stale else b"false"
    await send_body(
        send, 200, body, content_type, [(b"etag", etag), NO_CACHE, (b"x-config-stale", stale)]
    )
