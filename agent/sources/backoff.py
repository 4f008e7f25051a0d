"""Exponential backoff with jitter: 1, 2, 4 … cap seconds, each ±jitter."""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """Delays for reconnect loops; `reset()` after a success."""

    def __init__(
        self,
        initial: float = 1.0,
        cap: float = 60.0,
        jitter: float = 0.2,
        rand: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.initial = initial
        self.cap = cap
        self.jitter = jitter
        self._rand = rand
        self._attempt = 0

    def next(self) -> float:
        """The next delay in seconds (grows until `cap`)."""
        base: float = min(self.cap, self.initial * (2.0 ** self._attempt))
        self._attempt += 1
        return max(0.0, base * float(self._rand(1 - self.jitter, 1 + self.jitter)))

    def reset(self) -> None:
        """Start again from `initial`."""
        self._attempt = 0


def jittered(interval: float, spread: float = 0.1, rand: Callable[[float, float], float] = random.uniform) -> float:
    """`interval` ± `spread` (a fraction), so that many pods don't act in lockstep."""
    return interval * float(rand(1 - spread, 1 + spread))
