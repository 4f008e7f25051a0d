"""The metrics port: `/metrics` for Prometheus plus `/healthz` and `/readyz` for the kubelet.

The API itself is loopback-only, so kubelet probes and Prometheus scrapes come
to this separate listener, which may bind all interfaces. It exposes no values.
"""

from __future__ import annotations

from typing import Protocol

import anyio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from agent.sinks.render import dump_json
from agent.sinks.responses import (
    ALLOW_READ,
    NO_CACHE,
    READ_METHODS,
    Receive,
    Scope,
    Send,
    send_body,
    send_error,
)

_OK = dump_json({"status": "ok"}) + b"\n"
_NOT_READY = dump_json({"status": "not ready"}) + b"\n"


class Readiness(Protocol):
    """Anything that knows whether it is ready (the agent's SyncStatus, the relay's state)."""

    @property
    def ready(self) -> bool: ...


class ProbesApp:
    """ASGI app of the metrics port."""

    def __init__(self, status: Readiness, registry: CollectorRegistry) -> None:
        self._status = status
        self._registry = registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path not in ("/metrics", "/healthz", "/readyz"):
            await send_error(send, 404, "no such path")
        elif scope["method"] not in READ_METHODS:
            allow = [(b"allow", ALLOW_READ)]
            await send_error(send, 405, f"method {scope['method']} not allowed", allow)
        elif path == "/metrics":
            # Collecting a thousand series takes milliseconds: keep it off the event loop.
            body = await anyio.to_thread.run_sync(generate_latest, self._registry)
            await send_body(send, 200, body, CONTENT_TYPE_LATEST.encode(), [NO_CACHE])
        elif path == "/readyz" and not self._status.ready:
            await send_body(send, 503, _NOT_READY, headers=[NO_CACHE])
        else:
            await send_body(send, 200, _OK, headers=[NO_CACHE])
