"""A minimal HTTP/1.1 JSON POST over anyio streams, for the change webhook.

The agent has no HTTP client dependency (httpx is a test-only dependency) and
needs exactly one thing: POST a small JSON body to a local URL and read the
status line. `Connection: close` keeps it to one request per connection.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import anyio
import anyio.abc

import agent

MAX_STATUS_LINE = 8192


class WebhookError(Exception):
    """The webhook could not be delivered (connection, protocol or URL problem)."""


async def post_json(url: str, body: bytes) -> int:
    """POST `body` as application/json to an http(s) URL; return the response status."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookError(f"not an http(s) URL: {url!r}")
    secure = parts.scheme == "https"
    try:
        port = parts.port or (443 if secure else 80)
    except ValueError as exc:
        raise WebhookError(f"bad port in {url!r}") from exc
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = parts.netloc.rpartition("@")[2]
    head = (
        f"POST {target} HTTP/1.1\r\n"
        f"Host: {host_header}\r\n"
        f"User-Agent: config-agent/{agent.__version__}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode("latin-1")
    try:
        stream: anyio.abc.ByteStream
        if secure:
            stream = await anyio.connect_tcp(parts.hostname, port, tls=True)
        else:
            stream = await anyio.connect_tcp(parts.hostname, port)
        async with stream:
            await stream.send(head + body)
            received = b""
            while b"\r\n" not in received:
                if len(received) > MAX_STATUS_LINE:
                    raise WebhookError("response status line too long")
                received += await stream.receive()
    except (OSError, anyio.EndOfStream, anyio.BrokenResourceError) as exc:
        raise WebhookError(f"POST {url} failed: {exc!r}") from exc
    version, _, rest = received.split(b"\r\n", 1)[0].partition(b" ")
    status = rest[:3]
    if not version.startswith(b"HTTP/") or not status.isdigit():
        raise WebhookError(f"POST {url}: not an HTTP response")
    return int(status)
