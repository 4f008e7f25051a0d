"""`GET /v1/watch`: Server-Sent Events, one `change` event per applied change.

    id: 1043                  the revision; resume with `Last-Event-ID: 1043`
    event: change
    data: {"service":"ai","key":"threshold","version":6,"revision":1043,"value":0.8,"deleted":false}

A stream starts with one `snapshot` event (the full `GET /v1/configs` document,
id = its revision) unless the client resumes with `Last-Event-ID` and the store
still holds every change after it, in which case exactly those are replayed. An
`id:` line is written only after the last change of a revision, so a resumed
stream never skips the rest of a multi-entry transaction. `: ping` comments
keep idle connections (and the proxies between) alive.
"""

from __future__ import annotations

from collections import OrderedDict

import anyio

from agent.model import Change
from agent.sinks import render
from agent.sinks.responses import (
    MAX_INT,
    BadRequest,
    Receive,
    Scope,
    Send,
    header,
)
from agent.sinks.waiting import OpenRequests
from agent.store import Snapshot, Store

PING = b": ping\n\n"
# Tell EventSource clients to reconnect after one second.
PREAMBLE = b"retry: 1000\n\n"
# Encoded change events shared by all streams (a change is encoded once, not per client).
EVENT_CACHE_SIZE = 4096
STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    # Stop buffering reverse proxies (nginx) from holding events back.
    (b"x-accel-buffering", b"no"),
]


class WatchStream:
    """Serves `/v1/watch` for one store."""

    def __init__(self, store: Store, open_requests: OpenRequests, *, heartbeat: float) -> None:
        self._store = store
        self._open = open_requests
        self._heartbeat = heartbeat
        self._events: OrderedDict[tuple[str, str, int], bytes] = OrderedDict()

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer one watch request until the client leaves or the server closes."""
        last_event_id = _last_event_id(scope)
        if self._open.closing:
            raise BadRequest("shutting down", 503, [(b"retry-after", b"1")])
        if scope["method"] != "HEAD":
            self._open.check_room()
        await send({"type": "http.response.start", "status": 200, "headers": STREAM_HEADERS})
        if scope["method"] == "HEAD":
            await send({"type": "http.response.body", "body": b""})
            return
        await send({"type": "http.response.body", "body": PREAMBLE, "more_body": True})

        async def stream() -> None:
            await self._stream(send, last_event_id)

        await self._open.wait(receive, stream)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _stream(self, send: Send, last_event_id: int | None) -> None:
        store = self._store
        snapshot = store.snapshot
        while not snapshot.loaded:
            snapshot = await store.wait_newer(snapshot.generation)
        replay = store.changes_after(last_event_id) if last_event_id is not None else None
        if replay is None:
            last = snapshot.revision
            await _send_chunk(send, self._snapshot_event(snapshot))
        else:
            last = last_event_id if last_event_id is not None else 0
            if replay:
                last = replay[-1].revision
                await _send_chunk(send, self._change_events(replay))
        generation = snapshot.generation
        while True:
            with anyio.move_on_after(self._heartbeat) as idle:
                snapshot = await store.wait_newer(generation)
            if idle.cancelled_caught:
                await _send_chunk(send, PING)
                continue
            generation = snapshot.generation
            changes = store.changes_after(last)
            if changes is None:
                # We fell behind further than the store's history: start over from a snapshot.
                last = snapshot.revision
                await _send_chunk(send, self._snapshot_event(snapshot))
            elif changes:
                last = changes[-1].revision
                await _send_chunk(send, self._change_events(changes))

    def _snapshot_event(self, snapshot: Snapshot) -> bytes:
        data = render.configs_body(snapshot).rstrip(b"\n")
        return b"id: %d\nevent: snapshot\ndata: %s\n\n" % (snapshot.revision, data)

    def _change_events(self, changes: list[Change]) -> bytes:
        """All events of one batch as one write: a client sees whole batches or nothing."""
        parts = []
        for index, change in enumerate(changes):
            data = self._encoded(change)
            is_last = index + 1 == len(changes)
            if is_last or changes[index + 1].revision != change.revision:
                parts.append(b"id: %d\nevent: change\ndata: %s\n\n" % (change.revision, data))
            else:
                parts.append(b"event: change\ndata: %s\n\n" % data)
        return b"".join(parts)

    def _encoded(self, change: Change) -> bytes:
        ident = (change.service, change.key, change.version)
        data = self._events.get(ident)
        if data is None:
            data = render.dump_json(change.to_event())
            self._events[ident] = data
            if len(self._events) > EVENT_CACHE_SIZE:
                self._events.popitem(last=False)
        return data


def _last_event_id(scope: Scope) -> int | None:
    value = header(scope, b"last-event-id")
    if value is None or not value.strip():
        return None
    value = value.strip()
    if not value.isdigit() or len(value) > 19 or int(value) > MAX_INT:
        raise BadRequest("Last-Event-ID must be a revision (a non-negative integer)")
    return int(value)


async def _send_chunk(send: Send, body: bytes) -> None:
    await send({"type": "http.response.body", "body": body, "more_body": True})
