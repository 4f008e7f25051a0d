"""uvicorn's httptools protocol with JSON errors and a bound on the request head.

Stock uvicorn answers a malformed request with a text/plain 400 and lets a
request head (request line plus headers) grow without limit, re-concatenating
it on every chunk. The local API promises JSON errors everywhere and must not
let one client eat memory, so this subclass counts the head's bytes and answers
431 past `MAX_HEAD_BYTES`, and writes every protocol-level error as JSON.
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from agent.sinks.responses import error_body

# Like nginx's default large_client_header_buffers (4 × 8 KiB) and then some.
MAX_HEAD_BYTES = 64 * 1024


class JsonErrorsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol answering protocol errors with JSON and bounding request heads."""

    _in_head = True
    _head_bytes = 0

    def data_received(self, data: bytes) -> None:
        """Feed the parser, refusing a request head larger than MAX_HEAD_BYTES."""
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._unset_keepalive_if_required()
                self._send_error_and_close(431, "request header fields too large")
                return
        super().data_received(data)

    def on_headers_complete(self) -> None:
        """The head is complete: body bytes do not count toward the head limit."""
        self._in_head = False
        self._head_bytes = 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        """The next bytes belong to the next request's head."""
        self._in_head = True
        self._head_bytes = 0
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        """Answer a request the parser refused (uvicorn calls this) with a JSON 400."""
        self._send_error_and_close(400, "invalid HTTP request")

    def _send_error_and_close(self, status: int, message: str) -> None:
        if self.transport.is_closing():
            return
        body = error_body(message)
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head.extend([name, b": ", value, b"\r\n"])
        head.append(
            b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % len(body)
        )
        self.transport.write(b"".join(head) + body)
        self.transport.close()
