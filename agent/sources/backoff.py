"""Exponential backoff with jitter: 1, 2, 4 … cap seconds, each ±jitter.

With `full_jitter` each delay is a random 0..step instead (step = 1, 2, 4 … cap):
a fleet that failed together spreads its retries over the whole step.
"""

from __future__ import annotations

import random
from collections.abc import Callable

# Doublings counted at most: the step stays finite however long the loop retries.
MAX_DOUBLINGS = 64


class Backoff:
    """Delays for reconnect loops; `reset()` after a success."""

    def __init__(
        self,
        initial: float = 1.0,
        cap: float = 60.0,
        jitter: float = 0.2,
        rand: Callable[[float, float], float] = random.uniform,
        *,
        full_jitter: bool = False,
    ) -> None:
        self.initial = initial
        self.cap = cap
        self.jitter = jitter
        self.full_jitter = full_jitter
        self._rand = rand
        self._attempt = 0

    def next(self) -> float:
        """The next delay in seconds (grows until `cap`)."""
        base: float = min(self.cap, self.initial * (2.0 ** min(self._attempt, MAX_DOUBLINGS)))
        self._attempt += 1
        if self.full_jitter:
            return max(0.0, min(base, float(self._rand(0.0, base))))
        return max(0.0, base * float(self._rand(1 - self.jitter, 1 + self.jitter)))

    def reset(self) -> None:
        """Start again from `initial`."""
        self._attempt = 0


def jittered(interval: float, spread: float = 0.1, rand: Callable[[float, float], float] = random.uniform) -> float:
    """`interval` ± `spread` (a fraction), so that many pods don't act in lockstep."""
    return interval * float(rand(1 - spread, 1 + spread))
