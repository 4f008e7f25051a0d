"""uvicorn's httptools protocol, hardened for an API that any local process can reach.

Stock uvicorn (0.30–0.55 with httptools) falls short in four ways, each fixed here:

- a malformed request gets a text/plain 400 and a log warning → a JSON 400, no log
  line (a neighbour must not be able to flood our log);
- a request head (request line plus headers) may grow without limit → 431 past
  `MAX_HEAD_BYTES`, delivered before the connection closes (lingering close);
- the keep-alive timer is armed only after a response, and any byte disarms it: a
  connection that never sends a request, or sends its head a byte at a time
  (slowloris), is kept forever → a deadline for every request head
  (`header_timeout`, from accept or from the head's first byte) and for every idle
  spell between requests (`idle_timeout`);
- `limit_concurrency` counts only requests whose head is complete, so idle and
  slowloris connections could hold every file descriptor → `ConnectionGuard` bounds
  open connections (in total, and per client when asked) and, at the bound, closes
  the oldest connection that has no request in progress to admit the new one. Only
  when every connection is busy (long-polls, streams) is a new one refused with 503.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from agent.sinks.listeners import ConnectionGuard
from agent.sinks.responses import error_body

# Like nginx's default large_client_header_buffers (4 × 8 KiB) and then some.
MAX_HEAD_BYTES = 64 * 1024
# After an error answer, input is read and dropped this long at most before closing, so
# that the client reads our answer instead of a reset (nginx's lingering close).
LINGER_SECONDS = 2.0
_PEERCRED = getattr(socket, "SO_PEERCRED", None)  # Linux


class GuardedConfig(uvicorn.Config):
    """uvicorn's Config carrying the guard that the server's protocol instances share."""

    def __init__(self, app: Any, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(app, http=GuardedProtocol, timeout_keep_alive=int(guard.limits.idle_timeout) + 1,
                         **kwargs)
        self.connection_guard = guard


class GuardedProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with JSON errors, bounded heads, deadlines and a connection guard."""

    def __init__(self, config: uvicorn.Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        if not isinstance(config, GuardedConfig):
            raise TypeError("GuardedProtocol needs a GuardedConfig")
        self._guard = config.connection_guard
        self.client_id = ""
        self._admitted = False
        self._in_head = True
        self._head_bytes = 0
        self._busy = False  # a request's head is complete and its response is not
        self._discarding = False  # answered an error: drop input until closed
        self._deadline: asyncio.TimerHandle | None = None
        self._deadline_is_head = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Admit the connection (or refuse it with 503) and start the head deadline."""
        super().connection_made(transport)
        if self._guard.limits.max_per_client:
            self.client_id = _client_id(transport)
        if not self._guard.admit(self):
            transport.write(_bare_error(503, "too many connections", b"retry-after: 1\r\n"))
            transport.close()
            return
        self._admitted = True
        self._arm(self._guard.limits.header_timeout, head=True)

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the deadline and give the connection's place back."""
        self._disarm()
        if self._admitted:
            self._admitted = False
            self._guard.release(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Feed the parser; bound the head; answer a parser error with a JSON 400."""
        if self._discarding:
            return
        self._unset_keepalive_if_required()
        if self._in_head:
            if not self._busy and not self._deadline_is_head:
                self._arm(self._guard.limits.header_timeout, head=True)  # a new request begins
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._answer_error(431, "request header fields too large")
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # We serve no upgrades: the request was answered as plain HTTP; bytes after
            # it belong to the other protocol, so the connection ends with the response.
            if self.cycle is not None:
                self.cycle.keep_alive = False
        except httptools.HttpParserError:
            self._answer_error(400, "invalid HTTP request")

    def on_headers_complete(self) -> None:
        """The head is complete: no deadline while the request runs; body bytes do not count."""
        self._in_head = False
        self._head_bytes = 0
        self._disarm()
        super().on_headers_complete()  # may raise (a URL it cannot parse): then we are not busy
        self._busy = True
        if self._admitted:
            self._guard.set_busy(self)

    def on_message_complete(self) -> None:
        """The next bytes belong to the next request's head."""
        self._in_head = True
        self._head_bytes = 0
        super().on_message_complete()

    def on_response_complete(self) -> None:
        """Back to idle (unless a pipelined request is next): the idle or head deadline runs."""
        pipelined = bool(self.pipeline)
        super().on_response_complete()
        if self.transport.is_closing() or pipelined or self._discarding or not self._admitted:
            return
        self._busy = False
        self._guard.set_idle(self)
        limits = self._guard.limits
        if self._in_head and self._head_bytes:
            self._arm(limits.header_timeout, head=True)  # the next head began meanwhile
        else:
            self._arm(limits.idle_timeout, head=False)

    def send_400_response(self, msg: str) -> None:
        """Answer a request the parser refused with a JSON 400 (uvicorn's hook)."""
        self._answer_error(400, "invalid HTTP request")

    def close_evicted(self) -> None:
        """Close this idle connection now to make room for a new one."""
        self._disarm()
        if self._admitted:
            self._admitted = False
            self._guard.release(self)
        self.transport.close()

    def _answer_error(self, status: int, message: str) -> None:
        """Answer `status` with a JSON error, then close once the client has read it."""
        if self.transport.is_closing() or self._discarding:
            return
        self._discarding = True
        if self._busy:
            # A response is being written: end the connection after it, answer nothing more.
            if self.cycle is not None:
                self.cycle.keep_alive = False
            return
        self.transport.write(_bare_error(status, message))
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        # Half-close: the client sees our answer and EOF; what it still sends is dropped
        # until it closes (eof_received) or LINGER_SECONDS pass.
        self.transport.write_eof()
        self._arm(LINGER_SECONDS, head=False)

    def _arm(self, seconds: float, *, head: bool) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(seconds, self._expired)
        self._deadline_is_head = head

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._deadline_is_head = False

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._deadline_is_head and not self._discarding:
            self._guard.count("header_timeout")
            if self._head_bytes:  # a client that sent nothing gets nothing
                self.transport.write(_bare_error(408, "request head not received in time"))
        self.transport.close()


def _bare_error(status: int, message: str, extra_headers: bytes = b"") -> bytes:
    """A whole `connection: close` JSON error response, written outside the ASGI app."""
    body = error_body(message)
    return (STATUS_LINE[status] + b"content-type: application/json\r\ncontent-length: %d\r\n%s"
            b"connection: close\r\n\r\n%s" % (len(body), extra_headers, body))


def _client_id(transport: asyncio.Transport) -> str:
    """Who is connected: the peer's address, or on a Unix socket its uid."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        if _PEERCRED is None:
            return "unix"
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, _PEERCRED, struct.calcsize("iII"))
            _pid, uid, _gid = struct.unpack("iII", creds)
        except OSError:
            return "unix"
        return f"uid {uid}"
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if peer else "unknown"
