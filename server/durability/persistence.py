"""Durable sessions: when a model's sessions are written to the session store, and how a session that only
the store holds comes back.

Per model (``ModelManifest.durability``, or the server's ``--durability`` for a manifest without one):

- ``every-step``: a batch's new states are written, one pipelined round trip for the whole batch, after the
  model call and *before* the slab is updated and any response is released. A failed write fails the batch's
  steps with DEADLINE_EXCEEDED (``OutcomeUnknown``) and leaves this server's copies as they were: the write may
  still land (a hung Redis runs it when it wakes up), so the outcome is reported unknown, never "not applied";
  the retry with the same ``step_index`` settles it (computed again on the copy, whose next write replaces the
  late one, or answered from the replay cache of a copy reloaded from the store). A chunk is written once, at
  its last step (its response is released only then). So every acknowledged step is in the store; the store
  may be ahead of the client by the steps whose responses were lost with the server, or reported unknown.
- ``periodic``: a session is written at the end of a step that brings it ``every_steps`` past its last
  write, or ``every_ms`` after it; a session left idle with unwritten steps is written by a background task
  once ``every_ms`` passed. Writes do not hold responses back and a failed one is logged, not returned:
  steps after a session's last write are lost in a crash.
- ``none``: never written while serving.

All modes: OpenSession, ResetSession and SetState of a durable model write the session before answering;
a graceful shutdown writes every open session (a clean restart keeps them all, ``none`` included); closing
or expiry deletes the record. A request naming a session this server does not hold looks it up in the store
and, when found, restores it (same id, owner, state, parameters and step count) before going on: that is how a
restarted server picks its sessions up. A ``none`` session's record is deleted once restored, so it is
never resurrected at a stale step.

Ordering: every write and delete goes through one FIFO thread (an inline store is called directly), and a
session's writes are submitted in the order its state changed, so an older state never overwrites a newer.

Replicas sharing a store: each write and each expiry's delete is conditional on the record's revision as this
server last wrote or read it (``Session.revision``, touched only by that FIFO thread; server/store). When the
gateway moved a session to another replica that advanced it, this server's copy is stale and its write is
refused: the steps of that batch are not applied here, they fail with ABORTED (``SessionMoved``), the stale
copy is dropped (its record stays), and the client's retry, wherever it lands, resumes from the store. So no
replica ever overwrites a newer state with an older one, and with ``every-step`` no acknowledged step is lost.

A store that went back in time (Redis restarted from an RDB snapshot or an fsync-lagging AOF, or a replica
promoted) holds records older than the copies here. Those copies are the newest state left, acknowledged steps
included: their next write puts them back (the revision test lets a copy replace an older record), and a read
or a step numbered past a copy never swaps it for the older record (``stale``: only a *newer* stored revision
makes a copy stale). A stale copy of another replica stays stale against the rolled-back record whenever the
record is still newer than it; a step numbered past it is refused there, so it is never written.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import itertools
import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from rnnserve.manifest import Durability
from rnnserve.server.core.sessions import session_key
from rnnserve.server.core.work import ReplayEntry
from rnnserve.server.durability.store import SessionRecord, SessionStore, StoreUnavailable, Unsure, ahead
from rnnserve.server.errors import OutcomeUnknown, SessionIdUnavailable, SessionMoved

if TYPE_CHECKING:
    from rnnserve.server.core.session import Session
    from rnnserve.server.core.sessions import SessionManager
    from rnnserve.server.models.model import LoadedModel
    from rnnserve.server.models.repository import ModelRepository
    from rnnserve.server.scheduling.execution import CommittedBatch

log = logging.getLogger(__name__)

FLUSH_CHUNK = 1024  # records per round trip when writing every session at shutdown
_TICK = 0.01  # how often the periodic task looks for idle sessions due by time


def _host(value: Any) -> np.ndarray:
    """A batch tensor as a host array (the slab may be CUDA tensors)."""
    return value if isinstance(value, np.ndarray) else value.detach().cpu().numpy()


MOVED = -1
"""``Session.revision`` of a session dropped because another replica changed it: nothing of it is written or
deleted any more."""


class Persistence:
    def __init__(self, store: SessionStore, on_moved: Callable[[Session], None] | None = None):
        self.store = store
        # This process's writer id in the store: settles a write whose outcome it could not learn.
        self.writer = secrets.token_hex(8)
        # Called on the event loop with a session another replica changed (the data plane forgets it).
        self.on_moved = on_moved
        self._loop: asyncio.AbstractEventLoop | None = None
        # One thread, so store operations apply in submission order.
        self._io = None if store.inline else concurrent.futures.ThreadPoolExecutor(1, "session-store")
        self._restoring: dict[str, asyncio.Future[BaseException | None]] = {}
        # Sessions of time-periodic models with unwritten steps: a heap of (due time, seq, session).
        self._lock = threading.Lock()
        self._due: list[tuple[float, int, Session]] = []
        self._dirty: set[str] = set()
        self._seq = itertools.count()
        self._task: asyncio.Task | None = None
        # (model, version, operation) -> failed store operations, for the metrics ("" and 0: model unknown).
        # Bumped from the store thread too; each += is one dict update under the GIL.
        self.errors: Counter[tuple[str, int, str]] = Counter()

    def store_error(self, model: str, version: int, operation: str) -> None:
        """Count one failed session-store operation (``operation``: "save", "load", "delete")."""
        self.errors[(model, version, operation)] += 1

    def _on_failure(
        self, what: str, operation: str = "", models: Iterable[tuple[str, int]] = ()
    ) -> Callable[[concurrent.futures.Future], None]:
        """A done-callback for an operation nobody waits on: log its failure and count it."""
        keys = set(models)

        def done(future: concurrent.futures.Future) -> None:
            exc = future.exception()
            if exc is not None:
                log.warning("%s failed: %s", what, exc)
                for name, version in keys:
                    self.store_error(name, version, operation)

        return done

    def check(self, model: LoadedModel) -> None:
        """A model version built to serve through this store: warn when its durability outruns the store."""
        if model.durability.mode != "none" and not self.store.durable:
            log.warning(
                "model %s is %s durable, but the session store is %s: its sessions do not outlive this process "
                "(serve with --session-store redis://HOST:PORT/DB)",
                model.key,
                model.durability.mode,
                self.store.url,
            )

    # ---- plumbing ---------------------------------------------------------------------------------------
    def _submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        if self._io is not None:
            return self._io.submit(fn, *args)
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:
            future.set_exception(exc)
        return future

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.wrap_future(self._submit(fn, *args))

    def _put(self, sessions: Sequence[Session], records: list[SessionRecord]) -> list[Session]:
        """The FIFO thread: write ``records`` (of ``sessions``), each conditional on the session's revision;
        return the sessions whose write was refused (another replica changed them)."""
        live = [(s, r) for s, r in zip(sessions, records, strict=True) if s.revision != MOVED]
        if not live:
            return []
        try:
            revisions = self.store.put_many([r for _, r in live], [s.revision for s, _ in live], self.writer)
        except StoreUnavailable:
            for s, _ in live:
                # The write may land yet: the store holds the revision it would give, or an older one.
                s.revision = Unsure(s.revision + 1)
            raise
        refused = []
        for (s, _), revision in zip(live, revisions, strict=True):
            if revision:
                s.revision = revision
            else:
                refused.append(s)
        return refused

    def _write_later(self, sessions: list[Session], records: list[SessionRecord], why: str) -> None:
        """Fire and forget (periodic writes): a failure is logged and counted; a refused write drops the
        session's stale copy."""
        models = [(r.model, r.version) for r in records]
        future = self._submit(self._put, sessions, records)
        future.add_done_callback(self._on_failure(why, "save", models))

        def refused(done: concurrent.futures.Future) -> None:
            if not done.exception() and done.result() and self._loop is not None:
                self._loop.call_soon_threadsafe(self.moved_many, done.result())

        future.add_done_callback(refused)

    async def stale(self, session: Session) -> bool:
        """Whether the store holds a newer ``session`` than this copy: another replica changed it since this
        server last wrote or read it, or a write this server was unsure of landed (one store round trip, in
        order with its writes; a store that outlives no process is never shared: False). An older record (the
        store went back in time) leaves the copy as it is: the copy is the truth, and its next write says so."""
        if not self.store.durable or not self.durable(session) or session.revision == MOVED:
            return False

        def check() -> bool:
            try:
                (stored,) = self.store.revisions([session.key])
            except StoreUnavailable:
                return False  # a read is still served (from this copy) while the store is down
            return ahead(stored, session.revision)

        return await self._run(check)

    def moved_many(self, sessions: Iterable[Session]) -> None:
        for session in sessions:
            self.moved(session)

    @staticmethod
    def disown(session: Session) -> None:
        """``session``'s record in the store is another session's (its proposed id was taken there): nothing of
        this copy is written or deleted any more."""
        session.revision = MOVED

    def moved(self, session: Session) -> None:
        """Event loop: the store holds a newer ``session`` (``stale``, or a refused write); drop this server's
        copy and keep the record."""
        if session.revision == MOVED and session.closed:
            return
        session.revision = MOVED
        log.info("the session store holds a newer session %s: dropped the stale copy here", session.id)
        if self.on_moved is not None:
            self.on_moved(session)

    @staticmethod
    def record(session: Session) -> SessionRecord:
        """The session as it is now (event loop, session not in a batch)."""
        model = session.model
        row = model.slab.read(session.slot)
        state = {**model.state_dict(row), **model.parameter_dict(row)}
        return SessionRecord(
            session.key, model.name, model.version, session.steps, state, session.owner or "", session.replay_entries()
        )

    @staticmethod
    def _mark_written(session: Session, steps: int, now: float) -> None:
        session.stored_steps = steps
        session.stored_at = now

    # ---- the batch path (the batch's worker thread, between the model call and the scatter) --------------
    def after_batch(self, batch: CommittedBatch) -> set[int]:
        """Write the sessions of this batch that are due (the commit hook, server/scheduling/execution.py).
        every-step: blocks, raises StoreUnavailable (the caller then leaves the slab as it was), and returns the
        rows whose write was refused because another replica changed their session (the caller fails those
        steps; periodic: such a session is dropped later); periodic: submits and returns."""
        model, sessions, jobs, feeds, new_states, outputs = batch
        d = model.durability
        now = time.monotonic()
        due: list[int] = []
        for i, job in enumerate(jobs):
            if job.done + 1 < job.total:
                continue  # mid-chunk: the store keeps the chunk's start until its last step
            session = sessions[i]
            if d.mode == "every-step" or self._periodic_due(d, session, session.steps + 1, now):
                due.append(i)
            elif d.every_ms is not None:
                self._mark_dirty(session, session.stored_at + d.every_ms / 1000)
        if not due:
            return set()
        states = [_host(v) for v in new_states]
        params = [_host(feeds[p.name]) for p in model.manifest.parameters]
        records = []
        for i in due:
            job = jobs[i]
            session = sessions[i]
            state = {}
            specs = [*model.manifest.session_states, *model.manifest.parameters]
            for spec, a in zip(specs, [*states, *params], strict=True):
                # An unbatched parameter was fed once for the whole batch (all its rows have that value).
                state[spec.name] = np.take(a, i, axis=spec.batch_axis) if spec.has_batch_axis else a
            then = None
            if job.step_index and session.replay is not None:
                # The entry the batcher adds once this batch completes: a retry after a crash is answered.
                step_outputs = [*job.outputs, [_host(o)[i] for o in outputs]]
                then = ReplayEntry(job.step_index, job.num_steps, job.fingerprint, step_outputs)
            replay = session.replay_entries(then)
            records.append(
                SessionRecord(
                    session.key,
                    model.name,
                    model.version,
                    session.steps + 1,
                    state,
                    session.owner or "",
                    replay,
                )
            )
        written = [sessions[i] for i in due]
        refused: set[int] = set()
        if d.mode == "every-step":
            try:
                moved = self._submit(self._put, written, records).result()
            except StoreUnavailable as exc:
                self.store_error(model.name, model.version, "save")
                raise OutcomeUnknown(
                    f"{exc.message}; model {model.key} is every-step durable and the write of this batch's "
                    f"{len(jobs)} step(s) was not confirmed, so they may or may not have been applied (the write "
                    "may still land): resend them with the same step_index, which applies each at most once and "
                    "answers one that was applied with its outputs"
                ) from exc
            if moved:
                ids = {id(s) for s in moved}
                refused = {i for i in due if id(sessions[i]) in ids}
        else:
            self._write_later(written, records, f"periodic write of {len(records)} session(s) of {model.key}")
        for i in due:
            session = sessions[i]
            self._mark_written(session, session.steps + 1, now)
        return refused

    @staticmethod
    def _periodic_due(d: Durability, session: Session, steps: int, now: float) -> bool:
        if d.mode != "periodic":
            return False
        if d.every_steps is not None and steps - session.stored_steps >= d.every_steps:
            return True
        return d.every_ms is not None and (now - session.stored_at) * 1000 >= d.every_ms

    def _mark_dirty(self, session: Session, due_at: float) -> None:
        with self._lock:
            if session.key not in self._dirty:
                self._dirty.add(session.key)
                heapq.heappush(self._due, (due_at, next(self._seq), session))

    async def _write_due(self) -> None:
        """Periodic models' idle sessions whose unwritten steps are ``every_ms`` old (busy ones are written
        by their next batch)."""
        while True:
            # Idle while nothing is due (most servers have no time-periodic model): a late first tick costs
            # at most 0.1 s on top of every_ms.
            await asyncio.sleep(_TICK if self._due else 0.1)
            now = time.monotonic()
            popped = []
            with self._lock:
                while self._due and self._due[0][0] <= now:
                    session = heapq.heappop(self._due)[2]
                    self._dirty.discard(session.key)
                    popped.append(session)
            ready = [s for s in popped if not s.closed and not s.scheduled and s.steps != s.stored_steps]
            if ready:
                records = [self.record(s) for s in ready]
                for s in ready:
                    self._mark_written(s, s.steps, now)
                self._write_later(ready, records, f"periodic write of {len(records)} idle session(s)")

    # ---- session lifecycle (event loop) -----------------------------------------------------------------
    @staticmethod
    def durable(session: Session) -> bool:
        return session.model.durability.mode != "none"

    async def opened(self, session: Session) -> None:
        """Write a new session of a durable model before OpenSession answers (raises StoreUnavailable, and
        AlreadyExists when the store holds a session of that id: a client-chosen id in use on a replica)."""
        if self.durable(session):
            try:
                await self.write_now(session)
            except SessionMoved:
                raise SessionIdUnavailable(session.id) from None

    def write_now(self, session: Session) -> asyncio.Future:
        """Write the session as it is now, in order with its other writes; the future fails with
        StoreUnavailable, or SessionMoved when another replica changed the session (the caller drops it).
        Call between the session's steps (a control job, or before any step)."""
        record = self.record(session)
        self._mark_written(session, session.steps, time.monotonic())

        def put() -> None:
            if self._put([session], [record]):
                raise SessionMoved(session.id)

        future = self._submit(put)
        future.add_done_callback(
            self._on_failure(f"writing session {session.id}", "save", [(record.model, record.version)])
        )
        return asyncio.wrap_future(future)

    def forget(self, session: Session) -> None:
        """A durable session closed or expired: delete its record (after any write already submitted). A
        client's close deletes whatever the store holds; an expiry only the revision this server knows, since
        an idle copy here may be a stale one whose session lives on at another replica."""
        if not self.durable(session) or session.revision == MOVED:
            return

        def delete() -> None:
            if session.closed == "client":
                self.store.delete_many([session.key])
            elif session.revision != 0:
                self.store.delete_many([session.key], [session.revision], self.writer)

        self._submit(delete).add_done_callback(
            self._on_failure(f"deleting session {session.id}", "delete", [(session.model.name, session.model.version)])
        )

    async def restore(
        self, session_ids: Iterable[str], sessions: SessionManager, models: ModelRepository, replay_window: int
    ) -> None:
        """Bring the calling principal's sessions the store holds among ``session_ids`` (none of them here)
        into this server. Ids the store does not know stay unknown (the caller's lookup answers NOT_FOUND); a
        store failure raises StoreUnavailable."""
        loop = asyncio.get_running_loop()
        keys = {session_key(sid): sid for sid in session_ids}
        waiting = {self._restoring[key] for key in keys if key in self._restoring}
        fresh = [key for key, sid in keys.items() if key not in self._restoring and not sessions.known(sid)]
        if fresh:
            done: asyncio.Future[BaseException | None] = loop.create_future()
            for key in fresh:
                self._restoring[key] = done
            error: BaseException | None = None
            try:
                records = await self._run(self.store.get_many, fresh)
                for key, record in zip(fresh, records, strict=True):
                    if record is not None and not sessions.known(keys[key]):
                        self._adopt(record, keys[key], sessions, models, replay_window)
            except StoreUnavailable as exc:
                self.store_error("", 0, "load")  # which model the sessions are of is in the records it could not read
                error = exc
            finally:
                for key in fresh:
                    self._restoring.pop(key, None)
                done.set_result(error)
            if error is not None:
                raise error
        for future in waiting:
            error = await future
            if error is not None:
                raise error

    def _adopt(
        self,
        record: SessionRecord,
        session_id: str,
        sessions: SessionManager,
        models: ModelRepository,
        replay_window: int,
    ) -> None:
        """Open ``record``, the calling principal's session ``session_id``, here (its owner as it was)."""
        try:
            model = models.get(record.model, record.version)
            names = {p.name for p in model.manifest.parameters}
            state = model.check_state({k: v for k, v in record.state.items() if k not in names}, partial=False)
            params = model.check_parameters({k: v for k, v in record.state.items() if k in names})
        except Exception as exc:
            # Left unknown: the caller answers NOT_FOUND. Its model may load later; the record stays until then.
            log.warning("session %s is in the session store but cannot be restored here: %s", session_id, exc)
            return
        session = sessions.open(model, state, record.steps, params, record.owner or None, session_id=session_id)
        session.restore_replay(record.replay, replay_window)
        self._mark_written(session, record.steps, time.monotonic())
        session.revision = record.revision
        if not self.durable(session):
            # Consumed: a crash must not bring a `none` session back at a stale step.
            session.revision = 0
            self._submit(self.store.delete_many, [record.key], [record.revision], self.writer).add_done_callback(
                self._on_failure(f"deleting restored session {session.id}", "delete", [(model.name, model.version)])
            )
        log.debug("restored session %s of %s at step %d", session.id, model.key, session.steps)

    # ---- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._write_due(), name="session-store-periodic")
        log.info("session store: %s%s", self.store.url, "" if self.store.durable else " (this process only)")
        if self.store.durable:
            # Serve even while the store is down (requests that need it get UNAVAILABLE), but say so at once.
            self._submit(self.store.ping).add_done_callback(self._on_failure("reaching the session store"))

    async def stop(self, sessions: Iterable[Session]) -> None:
        """Write every open session (a durable store only), then close the store."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.store.durable:
            live = [s for s in sessions if not s.closed and s.slot >= 0 and s.revision != MOVED]
            written = stale = 0
            for start in range(0, len(live), FLUSH_CHUNK):
                part = live[start : start + FLUSH_CHUNK]
                chunk = [self.record(s) for s in part]
                try:
                    refused = await self._run(self._put, part, chunk)
                    # A refused one is a stale copy: the session lives on at another replica, newer.
                    stale += len(refused)
                    written += len(chunk) - len(refused)
                except StoreUnavailable as exc:
                    log.error("shutdown: %d session(s) not written to the session store: %s", len(chunk), exc)
                    for name, version in {(r.model, r.version) for r in chunk}:
                        self.store_error(name, version, "save")
            if live:
                log.info(
                    "shutdown: wrote %d of %d open session(s) to %s (%d stale copies left to the replica that "
                    "holds them)",
                    written,
                    len(live),
                    self.store.url,
                    stale,
                )
        if self._io is not None:
            self._io.shutdown(wait=True)
        self.store.close()
