"""`config-agent inject`: the mutating admission webhook over HTTPS (uvicorn with TLS).

POST /mutate takes an AdmissionReview and answers one (review.py); GET /healthz and
/readyz answer 200 for the kubelet. A body that is not an AdmissionReview gets a
400 with one line, never a 500. The certificate and key files are re-read when
they change (cert-manager renews them in the mounted Secret), without a restart.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import anyio
import uvicorn

from agent.errors import SinkError, UsageError
from agent.inject.review import BadReview, respond
from agent.inject.values import Values
from agent.sinks.responses import (
    NO_CACHE,
    READ_METHODS,
    BadRequest,
    Receive,
    Scope,
    Send,
    read_body,
    send_body,
    send_error,
)

log = logging.getLogger("agent.inject")

# An AdmissionReview carries the object (etcd's limit is 1.5 MiB) and, on UPDATE, the old one.
MAX_BODY = 4 * 1024 * 1024
CERT_CHECK_INTERVAL = 30.0


class WebhookApp:
    """ASGI app of the webhook: /mutate, /healthz, /readyz."""

    def __init__(self, values: Values) -> None:
        self._values = values

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path in ("/healthz", "/readyz") and method in READ_METHODS:
            await send_body(send, 200, b'{"status":"ok"}\n', headers=[NO_CACHE])
        elif path != "/mutate":
            await send_error(send, 404, "no such path")
        elif method != "POST":
            await send_error(send, 405, f"method {method} not allowed", [(b"allow", b"POST")])
        else:
            try:
                body = await read_body(receive, MAX_BODY)
                if body is None:
                    return  # the API server went away
                answer = respond(body, self._values)
            except BadRequest as exc:
                await send_error(send, exc.status, exc.message, exc.headers)
                return
            except BadReview as exc:
                await send_error(send, 400, str(exc))
                return
            await send_body(send, 200, json.dumps(answer).encode())


@dataclass(frozen=True)
class Tls:
    """The serving certificate (chain) and key, PEM files."""

    cert_file: Path
    key_file: Path

    def mtimes(self) -> tuple[float, float]:
        """Modification times, to notice a renewal."""
        return self.cert_file.stat().st_mtime, self.key_file.stat().st_mtime


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket; SinkError naming the address when it cannot bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise SinkError(f"cannot listen on {host}:{port} (--port): {exc.strerror or exc}") from exc
    return sock


def server_config(values: Values, tls: Tls) -> uvicorn.Config:
    """uvicorn's config with the TLS files loaded; UsageError naming a bad file."""
    config = uvicorn.Config(WebhookApp(values), ssl_certfile=str(tls.cert_file), ssl_keyfile=str(tls.key_file),
                            lifespan="off", access_log=False, log_config=None, server_header=False,
                            timeout_keep_alive=30)
    try:
        config.load()
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot use the TLS certificate {tls.cert_file} / key {tls.key_file} "
                         f"(--tls-cert-file/--tls-key-file): {exc}") from exc
    return config


async def serve(values: Values, tls: Tls, host: str, port: int, *, stop: anyio.Event | None = None,
                task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
    """Serve the webhook until SIGTERM/SIGINT (or `stop` is set, when run inside another
    program); reports the bound port once listening."""
    config = server_config(values, tls)
    sock = bind(host, port)
    server = uvicorn.Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(_reload_certificate, config, tls)
        if stop is not None:
            tg.start_soon(_exit_when_set, stop, server)
        log.info("admission webhook listening on https://%s:%d/mutate", host, sock.getsockname()[1])
        task_status.started(sock.getsockname()[1])
        await server.serve(sockets=[sock])
        tg.cancel_scope.cancel()


async def _exit_when_set(stop: anyio.Event, server: uvicorn.Server) -> None:
    await stop.wait()
    server.should_exit = True


async def _reload_certificate(config: uvicorn.Config, tls: Tls) -> None:
    """Load a renewed certificate into the running server's context (new handshakes use it)."""
    seen = tls.mtimes()
    while True:
        await anyio.sleep(CERT_CHECK_INTERVAL)
        try:
            now = tls.mtimes()
            if now != seen and config.ssl is not None:
                config.ssl.load_cert_chain(str(tls.cert_file), str(tls.key_file))
                seen = now
                log.info("reloaded the TLS certificate %s", tls.cert_file)
        except (OSError, ssl.SSLError) as exc:  # mid-rotation: the next check tries again
            log.warning("cannot reload the TLS certificate %s: %s", tls.cert_file, exc)
