"""The embedded session store: records in a dict of this process. It does not survive the process, so it
keeps the record objects as they are (their arrays are the server's own copies) rather than encoding them."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from rnnserve.server.store import SessionRecord, SessionStore


class MemoryStore(SessionStore):
    url = "memory"
    durable = False
    inline = True

    def __init__(self, ttl: float):
        super().__init__(ttl)
        self._records: dict[str, tuple[float, SessionRecord]] = {}  # id -> (expires at, record)
        # Batch worker threads write while the event loop reads and deletes.
        self._lock = threading.Lock()
        self._next_sweep = time.monotonic() + ttl

    def put_many(self, records: Sequence[SessionRecord]) -> None:
        now = time.monotonic()
        with self._lock:
            for record in records:
                self._records[record.session_id] = (now + self.ttl, record)
            if now >= self._next_sweep:
                # Expired records are dropped as they are read; this catches those nobody reads again.
                self._sweep(now)
                self._next_sweep = now + self.ttl

    def _sweep(self, now: float) -> None:
        for sid in [sid for sid, (expires, _) in self._records.items() if expires <= now]:
            del self._records[sid]

    def get_many(self, session_ids: Sequence[str]) -> list[SessionRecord | None]:
        now = time.monotonic()
        with self._lock:
            found = [self._records.get(sid) for sid in session_ids]
        return [item[1] if item is not None and item[0] > now else None for item in found]

    def delete_many(self, session_ids: Sequence[str]) -> None:
        with self._lock:
            for sid in session_ids:
                self._records.pop(sid, None)

    def keys(self) -> list[str]:
        with self._lock:
            self._sweep(time.monotonic())
            return list(self._records)
