"""Long-running requests (long-poll, SSE): ended by client disconnect, timeout or shutdown.

Each waiting request runs its wait inside a cancel scope. A small watcher task
cancels that scope when the client disconnects, so a thousand abandoned
long-polls do not pile up until their `wait` expires; `close()` cancels all of
them at shutdown so the server can stop within its grace period. At most `limit`
wait at once (`check_room`): the connections beyond stay free for plain reads.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

from agent.sinks.responses import BadRequest, Receive, read_disconnect

T = TypeVar("T")


class OpenRequests:
    """The set of waiting requests of one API app."""

    def __init__(self, limit: int = 2**31, on_full: Callable[[], None] | None = None) -> None:
        self._scopes: set[anyio.CancelScope] = set()
        self.closing = False
        self._limit = limit
        self._on_full = on_full

    def __len__(self) -> int:
        return len(self._scopes)

    def check_room(self) -> None:
        """Refuse (503, retry after a second) one more waiting request past `limit`."""
        if len(self._scopes) >= self._limit:
            if self._on_full is not None:
                self._on_full()
            raise BadRequest("too many long-polls and watches open; retry later", 503,
                             [(b"retry-after", b"1")])

    def close(self) -> None:
        """End every waiting request now, and make new ones return at once."""
        self.closing = True
        for scope in list(self._scopes):
            scope.cancel()

    async def wait(
        self, receive: Receive, body: Callable[[], Awaitable[T]], limit: float = math.inf
    ) -> T | None:
        """Run `body` until it returns; None if the client left, time ran out or we close."""
        if self.closing:
            return None
        result: list[T] = []
        with anyio.move_on_after(limit):
            async with anyio.create_task_group() as tg:
                scope = tg.cancel_scope
                self._scopes.add(scope)
                try:
                    tg.start_soon(_cancel_on_disconnect, receive, scope)
                    result.append(await body())
                finally:
                    self._scopes.discard(scope)
                    scope.cancel()
        return result[0] if result else None


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    await read_disconnect(receive)
    scope.cancel()
