"""Progress lines on stderr (stdout carries the report)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


class Progress:
    def __init__(self, enabled: bool = True, every: float = 5.0):
        self.enabled = enabled
        self.every = every
        self.t0 = time.monotonic()

    def log(self, message: str) -> None:
        if self.enabled:
            print(f"[bench {time.monotonic() - self.t0:7.1f}s] {message}", file=sys.stderr, flush=True)

    def ticker(self, label: str, total: int, unit: str = "steps") -> Callable[[int], None]:
        """A callback for ``LoadPool.run(tick=...)``: a line every ``every`` seconds while a phase runs."""
        last = [time.monotonic()]

        def tick(done: int) -> None:
            now = time.monotonic()
            if now - last[0] >= self.every:
                last[0] = now
                self.log(f"  {label}: {done}/{total} {unit}")

        return tick
