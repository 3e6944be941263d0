"""Progress lines on stderr (stdout carries the report)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.t0 = time.monotonic()

    def log(self, message: str) -> None:
        if self.enabled:
            print(f"[bench {time.monotonic() - self.t0:7.1f}s] {message}", file=sys.stderr, flush=True)
