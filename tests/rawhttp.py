"""Raw HTTP/1.1 over TCP or a Unix socket, for tests that send what no client library would."""

from __future__ import annotations

import socket

# A TCP (host, port) or a Unix socket path.
Address = tuple[str, int] | str


def connect(address: Address, timeout: float = 10) -> socket.socket:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(address)
    return sock


def read_response(sock: socket.socket, *, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response from `sock` (Content-Length framed, or up to EOF)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed without a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = 0 if head_only else int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return int(lines[0].split(" ")[1]), headers, body


def exchange(address: Address, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read one response (within 10 s)."""
    with connect(address) as sock:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and stop reading before everything was sent
        return read_response(sock, head_only=request.startswith(b"HEAD "))
