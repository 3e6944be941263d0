"""The session store: where sessions' state lives beyond one server process (``--session-store``).

A :class:`SessionStore` maps a session's key to a :class:`SessionRecord`: the session's model, version, step
count, state and per-session parameters, its owner (the principal that opened it) and its exactly-once
replay cache. Two backends: :class:`~rnnserve.server.durability.store.memory.MemoryStore` (embedded, the default; it
lives and dies with the process) and :class:`~rnnserve.server.durability.store.redis.RedisStore` (a Redis server;
sessions survive a crash or restart of rnnserve), which keeps each record as byte fields (``encode_record``:
the body is a snapshot, server/durability/snapshot.py). Methods block: the server calls them off the event loop (see
server/durability/persistence.py), except an ``inline`` store's, which never wait on I/O.

A key is ``sessions.session_key``: the session id itself without authentication; with it, the id within its
principal's namespace, so two principals' sessions of one id are two records, and a restarted server or another
replica finds each under its own principal. (A server with authentication on therefore does not look up a
record under a plain id, as a server that kept every session under its plain id wrote them: such sessions are
not restored there and expire with their TTL.)

Records are written with a time to live equal to the session TTL, so the store forgets abandoned sessions
the way the server does.

Several replicas may share one store (behind the session-affinity gateway), and a session can move between
them. So every record carries a *revision*, which only grows along a session's history, and the id of its last
writer: a write or delete names the revision of the writer's copy, and the store applies it only if the stored
record is not newer (compare-and-set, atomic in the store). A replica whose copy of a session went stale (another
replica advanced it meanwhile) therefore cannot overwrite the newer state: its write is refused and it drops
its copy (server/durability/persistence.py). A stored record *older* than the writer's copy means the store lost
writes (it restarted from a snapshot, or a replica of it was promoted): the copy is the newest state there is, so
it is written back, with a revision above the copy's, never below it. Where a writer's last write failed midway (it
may or may not have landed), its copy's revision is ``Unsure``: the store holds that revision, written by this
writer, or an older one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from rnnserve.server.core.work import ReplayEntry
from rnnserve.server.errors import Unavailable


class StoreUnavailable(Unavailable):
    """The session store could not be reached or refused a command."""


class Unsure(int):
    """The revision a writer's copy has if its last write, which failed midway (a timeout, a dropped
    connection), landed: the store holds this revision, written by this writer, or an older one."""

    def __repr__(self) -> str:
        return f"Unsure({int(self)})"


@dataclass
class SessionRecord:
    key: str
    """Where the store keeps it: ``sessions.session_key`` of the session (the client's id, ``session_id_of``)."""
    model: str
    version: int
    steps: int
    state: dict[str, np.ndarray]
    """The session's states and per-session parameters by name, as in a snapshot."""
    owner: str = ""
    """``Session.owner``: the principal that opened the session ("" for none)."""
    replay: list[ReplayEntry] = field(default_factory=list)
    """The session's exactly-once replay cache, oldest first: a restored session answers a retry of a step
    whose response was lost with the server."""
    extra: dict[str, bytes] = field(default_factory=dict)
    """Further fields a layer may add; kept as they are."""
    revision: int = 0
    """The store's write count of this record when it was read (0: not from a store)."""


Expect = Sequence[int] | None
"""Per record: the revision of the writer's copy (0: it knows no record; ``Unsure`` after a write that failed
midway); see ``SessionStore.holds``. The whole argument None: unconditional (tools and tests)."""


def ahead(stored: int, known: int) -> bool:
    """Whether the store's revision of a record is newer than a copy at revision ``known``: another writer
    changed it since (for an ``Unsure`` copy, also: the write it was unsure of landed)."""
    return stored > known or (stored == known and isinstance(known, Unsure))


class SessionStore(ABC):
    """Blocking session store. ``put_many`` and ``get_many`` are one round trip however many records."""

    url: str = ""
    durable: bool = False
    """Whether records outlive this process (worth writing on shutdown)."""
    inline: bool = False
    """Whether calls never wait on I/O, so the event loop may make them itself."""

    def __init__(self, ttl: float):
        self.ttl = ttl

    @abstractmethod
    def put_many(self, records: Sequence[SessionRecord], expect: Expect = None, writer: str = "") -> list[int]:
        """Write (replace) each record whose condition holds (see ``Expect``) and give it the TTL. Returns each
        record's new revision, 0 where its condition failed and nothing was written for it."""

    @abstractmethod
    def get_many(self, keys: Sequence[str]) -> list[SessionRecord | None]:
        """The records of these keys in order; None where there is none (or it expired)."""

    @abstractmethod
    def delete_many(self, keys: Sequence[str], expect: Expect = None, writer: str = "") -> None:
        """Forget these sessions (missing ones are fine); with ``expect``, only those whose condition holds."""

    @abstractmethod
    def keys(self) -> list[str]:
        """The keys held (for tests and tools: it walks the whole store)."""

    def revisions(self, keys: Sequence[str]) -> list[int]:
        """Each session's stored revision (0: none), without reading the records."""
        return [r.revision if r is not None else 0 for r in self.get_many(keys)]

    def get(self, key: str) -> SessionRecord | None:
        return self.get_many([key])[0]

    def delete(self, key: str) -> None:
        self.delete_many([key])

    @staticmethod
    def holds(expect: int, writer: str, revision: int, last_writer: str) -> bool:
        """A conditional write's or delete's test against the stored (revision, last writer), for a copy at
        revision ``expect``. A missing record (revision 0: it expired, or the store lost it) or an older one
        (the store went back in time) gives way: the copy is the newest state left. The copy's own revision is
        the copy (an ``Unsure`` one only if this writer wrote it). A newer one: the copy is stale, refused."""
        if revision == expect:
            return not isinstance(expect, Unsure) or last_writer == writer
        return revision < expect

    @staticmethod
    def next_revision(revision: int, expect: int | None) -> int:
        """The revision a write gets: above both the stored one and the writer's copy's, so that revisions
        only grow along a session's history even through a store that went back in time."""
        return max(revision, expect or 0) + 1

    def ping(self) -> None:  # noqa: B027 - an embedded store is always there
        """Raise StoreUnavailable when the store cannot be reached."""

    def close(self) -> None:  # noqa: B027 - nothing to release unless a backend says so
        """Release connections."""


def open_store(url: str, *, ttl: float) -> SessionStore:
    """``memory`` or ``redis://HOST:PORT/DB`` (``rediss://`` for TLS, ``unix://PATH?db=N`` for a socket)."""
    if url == "memory":
        from rnnserve.server.durability.store.memory import MemoryStore

        return MemoryStore(ttl=ttl)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from rnnserve.server.durability.store.redis import RedisStore

        return RedisStore(url, ttl=ttl)
    raise ValueError(f"session store {url!r}: expected 'memory' or a redis://HOST:PORT/DB address")
