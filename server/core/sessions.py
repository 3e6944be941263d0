"""Sessions: ids, ownership of a slab slot, idle expiry and the global cap.

With authentication on, each principal has its own space of session ids: a session is kept under
``session_key(id)``, its id within the calling principal's namespace, here and in the session store. Another
principal's session of the same id is then simply not there (a lookup answers as for an id never opened; a
proposed id it holds opens the caller's own session), so an id reveals nothing about other principals.
Without authentication the key is the id itself."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator
from typing import Generic, TypeVar

import numpy as np

from rnnserve.server.core.session import Session, SessionModel
from rnnserve.server.errors import ResourceExhausted, SessionEnded, SessionNotFound
from rnnserve.server.principal import PRINCIPAL

log = logging.getLogger(__name__)

M = TypeVar("M", bound=SessionModel)


def session_key(session_id: str) -> str:
    """The key of the calling principal's session ``session_id``, in the session table and the session store:
    the id itself without authentication. With it, the id prefixed by the principal and its length, so that no
    (principal, id) pair makes another pair's key whatever either holds (ids looked up are not checked), and
    no key of a principal equals a plain id (opened ids never hold ':'; ``session_id_of`` reads them back)."""
    principal = PRINCIPAL.get()
    return session_id if principal is None else f"{len(principal)}:{principal}:{session_id}"


def session_id_of(key: str) -> str:
    """The client's session id in a key of ``session_key`` (for a record read back from the session store)."""
    return key.rpartition(":")[2]


class SessionManager(Generic[M]):
    """The session table: every open session of one server, whatever its model (``M``: the model type)."""

    def __init__(self, *, max_sessions: int, ttl: float, max_sessions_per_client: int | None = None):
        self.max_sessions = max_sessions
        self.ttl = ttl
        # session_key -> session, ordered by last use, oldest first, so expiry only looks at the front.
        self._sessions: OrderedDict[str, Session[M]] = OrderedDict()
        self.expired = 0
        self._reaper: asyncio.Task[None] | None = None
        # Sessions the server ended itself (forced unload), by session_key -> (when, why): a call on one says
        # why instead of NOT_FOUND, for one TTL.
        self._ended: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self.max_sessions_per_client = max_sessions_per_client
        self._per_client: Counter[str] = Counter()
        # (model, version, reason) -> sessions the server closed itself: "expired" (TTL) or "forced" (unload).
        self.evictions: Counter[tuple[str, int, str]] = Counter()

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session[M]]:
        return iter(list(self._sessions.values()))

    def known(self, session_id: str) -> bool:
        """The caller's session ``session_id`` is held here, or was ended by the server (not to be looked up in
        the session store)."""
        key = session_key(session_id)
        return key in self._sessions or key in self._ended

    def open(
        self,
        model: M,
        state: list[np.ndarray] | None = None,
        steps: int = 0,
        parameters: list[np.ndarray] | None = None,
        owner: str | None = None,
        session_id: str | None = None,
    ) -> Session[M]:
        """A new session of the calling principal; ``session_id``: keep this id (one the client proposed, or a
        session restored from the session store), which the caller checked is not ``known``."""
        limit = self.max_sessions_per_client
        if owner is not None and limit is not None and self._per_client[owner] >= limit:
            self.expire()
            if self._per_client[owner] >= limit:
                raise ResourceExhausted(
                    f"client {owner!r} holds its maximum of {limit} open sessions (--max-sessions-per-client); "
                    "close sessions it no longer uses"
                )
        if len(self._sessions) >= self.max_sessions:
            self.expire()
            if len(self._sessions) >= self.max_sessions:
                raise ResourceExhausted(
                    f"the server holds its maximum of {self.max_sessions} sessions; close idle sessions "
                    "or raise --max-sessions"
                )
        session_id = session_id or secrets.token_hex(16)  # 128 random bits: ids are capabilities, not counters
        key = session_key(session_id)
        session = Session(session_id, model, model.acquire(state, parameters), steps, owner, key)
        self._sessions[key] = session
        if owner is not None:
            self._per_client[owner] += 1
        return session

    def peek(self, session_id: str) -> Session[M] | None:
        """The caller's session if held here, without counting as a use (internal lookups)."""
        return self._sessions.get(session_key(session_id))

    def get(self, session_id: str) -> Session[M]:
        key = session_key(session_id)
        session = self._sessions.get(key)
        if session is None:
            # Another principal's session is not under this key: its id answers as one never opened.
            ended = self._ended.get(key)
            if ended is not None:
                raise SessionEnded(f"session '{session_id}' has ended: {ended[1]}")
            raise SessionNotFound(session_id)
        session.last_used = time.monotonic()
        self._sessions.move_to_end(key)
        return session

    def close(self, session_id: str) -> None:
        key = session_key(session_id)
        session = self._sessions.pop(key, None)
        if session is None:
            if self._ended.pop(key, None) is not None:
                return  # the client acknowledges a session the server ended: nothing left to free
            raise SessionNotFound(session_id)
        self._end(session, "client")

    def drop(self, session: Session[M]) -> None:
        """Forget a session another replica took over (server/durability/persistence.py): its state lives on
        there and in the session store; only this server's stale copy goes."""
        if self._sessions.get(session.key) is session:
            del self._sessions[session.key]
            self._end(session, "moved")

    def _end(self, session: Session[M], why: str) -> None:
        session.closed = why
        if session.owner is not None:
            left = self._per_client[session.owner] - 1
            if left > 0:
                self._per_client[session.owner] = left
            else:
                del self._per_client[session.owner]
        if not session.scheduled:
            # Not queued nor computing: free now. Otherwise the batcher frees it when its turn ends.
            session.model.release(session)

    def expire(self) -> int:
        """Close sessions idle longer than the TTL; return how many."""
        cutoff = time.monotonic() - self.ttl
        while self._ended and next(iter(self._ended.values()))[0] <= cutoff:
            self._ended.popitem(last=False)
        count = 0
        while self._sessions:
            session = next(iter(self._sessions.values()))
            if session.last_used > cutoff:
                break
            self._sessions.popitem(last=False)
            if session.pending:
                # Busy sessions are not idle: their steps keep them alive.
                session.last_used = time.monotonic()
                self._sessions[session.key] = session
                continue
            self._end(session, "expired")
            self.evictions[(session.model.name, session.model.version, "expired")] += 1
            count += 1
        self.expired += count
        return count

    def end_model_sessions(self, model: M, reason: str) -> int:
        """End every session of ``model`` (a forced unload); a later call on one gets FAILED_PRECONDITION
        with ``reason``. Steps already queued fail; a batch computing finishes first (the batcher frees those)."""
        doomed = [s for s in self._sessions.values() if s.model is model]
        now = time.monotonic()
        for s in doomed:
            del self._sessions[s.key]
            self._ended[s.key] = (now, reason)
            self._end(s, "unloaded")
            self.evictions[(model.name, model.version, "forced")] += 1
        return len(doomed)

    async def _reap(self) -> None:
        interval = min(max(self.ttl / 4, 0.05), 5.0)
        while True:
            await asyncio.sleep(interval)
            n = self.expire()
            if n:
                log.info("expired %d idle session(s)", n)

    def start(self) -> None:
        self._reaper = asyncio.get_running_loop().create_task(self._reap(), name="session-reaper")

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
