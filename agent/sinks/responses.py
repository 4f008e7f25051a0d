"""Raw ASGI plumbing shared by the API and the probe/metrics app: responses and request bits.

No framework: a request is answered with two `send()` calls of bytes prepared
beforehand, which keeps a plain read at a few microseconds of Python.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import anyio

from agent.sinks.render import dump_json

if TYPE_CHECKING:
    from agent.store import Snapshot, Store

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

JSON = b"application/json"
TEXT = b"text/plain; charset=utf-8"
ALLOW_READ = b"GET, HEAD"
READ_METHODS = frozenset({"GET", "HEAD"})
# Revisions and versions are PostgreSQL bigints.
MAX_INT = 2**63 - 1
# Values change at any moment: caches must revalidate (ETag makes that cheap).
NO_CACHE = (b"cache-control", b"no-cache")
# Client advice while we are not loaded yet or shutting down.
RETRY_AFTER = (b"retry-after", b"1")


class BadRequest(Exception):
    """A request we refuse with a 4xx JSON error; `status` is the HTTP status."""

    def __init__(self, message: str, status: int = 400, headers: Headers | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.headers = headers or []


def error_body(message: str) -> bytes:
    """The JSON error document every failing request gets."""
    return dump_json({"error": message}) + b"\n"


async def send_body(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes = JSON,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    """Send a complete response with a Content-Length."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", b"%d" % len(body)),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_error(
    send: Send, status: int, message: str, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    """Send `{"error": message}` with `status`."""
    await send_body(send, status, error_body(message), JSON, headers)


async def send_not_modified(send: Send, etag: bytes) -> None:
    """Send 304 (no body) carrying the current ETag."""
    await send(
        {"type": "http.response.start", "status": 304, "headers": [(b"etag", etag), NO_CACHE]}
    )
    await send({"type": "http.response.body", "body": b""})


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of request header `name` (lower-case), or None."""
    for key, value in scope["headers"]:
        if key == name:
            assert isinstance(value, bytes)
            return value
    return None


def etag_matches(if_none_match: bytes | None, etag: bytes) -> bool:
    """True when an If-None-Match header names `etag` (weak or strong) or is `*`."""
    if if_none_match is None:
        return False
    for candidate in if_none_match.split(b","):
        candidate = candidate.strip()
        if candidate == b"*" or candidate.removeprefix(b"W/") == etag:
            return True
    return False


def query_params(scope: Scope) -> dict[str, str]:
    """Query parameters (first occurrence wins); undecodable input is a 400."""
    raw: bytes = scope.get("query_string", b"")
    if not raw:
        return {}
    try:
        text = raw.decode("ascii")
        pairs = parse_qsl(text, keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest("query string is not valid URL-encoded UTF-8") from exc
    params: dict[str, str] = {}
    for name, value in pairs:
        params.setdefault(name, value)
    return params


def int_param(params: dict[str, str], name: str, *, minimum: int = 0) -> int | None:
    """A non-negative integer query parameter, None when absent, BadRequest when bad."""
    text = params.get(name)
    if text is None:
        return None
    if not (text.isascii() and text.isdigit() and len(text) <= 19 and minimum <= int(text) <= MAX_INT):
        raise BadRequest(f"query parameter {name!r} must be an integer >= {minimum}")
    return int(text)


def seconds_param(params: dict[str, str], name: str, *, maximum: float) -> float | None:
    """A duration in seconds, 0..maximum, None when absent, BadRequest when bad."""
    text = params.get(name)
    if text is None:
        return None
    try:
        value = float(text) if text.isascii() and len(text) <= 32 else -1.0
    except ValueError:
        value = -1.0
    # NaN fails both comparisons; "inf" fails the upper bound.
    if not 0.0 <= value <= maximum:
        raise BadRequest(f"query parameter {name!r} must be seconds from 0 to {maximum:g}")
    return value


async def read_disconnect(receive: Receive) -> None:
    """Return once the client has gone away (request body, if any, is discarded)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def check_read_method(scope: Scope) -> None:
    """BadRequest 405 (with Allow) unless the request is a GET or HEAD."""
    if scope["method"] not in READ_METHODS:
        raise BadRequest(f"method {scope['method']} not allowed", 405, [(b"allow", ALLOW_READ)])


def loaded_snapshot(store: Store) -> Snapshot:
    """The store's snapshot; BadRequest 503 (Retry-After) until the first load."""
    snapshot = store.snapshot
    if not snapshot.loaded:
        raise BadRequest("not loaded yet", 503, [RETRY_AFTER])
    return snapshot


async def read_body(receive: Receive, limit: int, within: float | None = None) -> bytes | None:
    """The request body, or None when the client went away; BadRequest 413 past `limit`
    bytes, 408 when it has not all arrived `within` seconds (None: no deadline)."""
    chunks: list[bytes] = []
    size = 0
    with anyio.move_on_after(within) as deadline:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BadRequest(f"the request body is larger than {limit // 1024} KiB", 413)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
    assert deadline.cancelled_caught
    raise BadRequest("request body not received in time", 408)

