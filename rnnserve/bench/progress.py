"""Progress lines on stderr (stdout carries the report), stamped with the seconds since the bench started; on a
terminal, a bar over the phases under them (rnnserve.progress)."""

from __future__ import annotations

import time

from rnnserve import progress


class Progress(progress.Progress):
    def __init__(self, enabled: bool = True):
        t0 = time.monotonic()
        super().__init__(lambda: f"[bench {time.monotonic() - t0:7.1f}s] ", enabled=enabled)
