"""Reading a subprocess's stdout line by line, with deadlines (demo and example tests)."""

from __future__ import annotations

import queue
import subprocess
import threading
import time
from collections.abc import Callable


class OutputLines:
    """Collects a process's stdout lines in a thread; `next_line` waits for one that matches."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def on_line(self, line: str) -> None:
        """Called for every line read (subclasses parse what they need)."""

    def next_line(self, predicate: Callable[[str], bool], timeout: float) -> str | None:
        """The next line for which `predicate` holds; None at the deadline or when stdout ends."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                return None
            if line is None:
                self.lines.put(None)  # stay at the end for later calls
                return None
            self.output.append(line)
            self.on_line(line)
            if predicate(line):
                return line
        return None
