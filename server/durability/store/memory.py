"""The embedded session store: records in a dict of this process. It does not survive the process, so it
keeps the record objects as they are (their arrays are the server's own copies) rather than encoding them."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence

from rnnserve.server.durability.store import Expect, SessionRecord, SessionStore


class MemoryStore(SessionStore):
    url = "memory"
    durable = False
    inline = True

    def __init__(self, ttl: float):
        super().__init__(ttl)
        # key -> (expires at, writer, record); the record's revision is the stored one.
        self._records: dict[str, tuple[float, str, SessionRecord]] = {}
        # Batch worker threads write while the event loop reads and deletes.
        self._lock = threading.Lock()
        self._next_sweep = time.monotonic() + ttl

    def _current(self, key: str, now: float) -> tuple[int, str]:
        item = self._records.get(key)
        if item is None or item[0] <= now:
            return 0, ""
        return item[2].revision, item[1]

    def put_many(self, records: Sequence[SessionRecord], expect: Expect = None, writer: str = "") -> list[int]:
        now = time.monotonic()
        written = []
        with self._lock:
            for i, record in enumerate(records):
                revision, last = self._current(record.key, now)
                known = expect[i] if expect is not None else None
                if known is not None and not self.holds(known, writer, revision, last):
                    written.append(0)
                    continue
                # A copy: the caller keeps its record object; the stored one carries the stored revision.
                stored = dataclasses.replace(record, revision=self.next_revision(revision, known))
                self._records[record.key] = (now + self.ttl, writer, stored)
                written.append(stored.revision)
            if now >= self._next_sweep:
                # Expired records are dropped as they are read; this catches those nobody reads again.
                self._sweep(now)
                self._next_sweep = now + self.ttl
        return written

    def _sweep(self, now: float) -> None:
        for key in [key for key, (expires, _, _) in self._records.items() if expires <= now]:
            del self._records[key]

    def get_many(self, keys: Sequence[str]) -> list[SessionRecord | None]:
        now = time.monotonic()
        with self._lock:
            found = [self._records.get(key) for key in keys]
        return [item[2] if item is not None and item[0] > now else None for item in found]

    def delete_many(self, keys: Sequence[str], expect: Expect = None, writer: str = "") -> None:
        now = time.monotonic()
        with self._lock:
            for i, key in enumerate(keys):
                if expect is None or self.holds(expect[i], writer, *self._current(key, now)):
                    self._records.pop(key, None)

    def keys(self) -> list[str]:
        with self._lock:
            self._sweep(time.monotonic())
            return list(self._records)
