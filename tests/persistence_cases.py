"""Persistence (server/durability/persistence.py) against a session store, one body per case, run against the in-memory
store (tests/unit/test_persistence.py) and a real redis-server (tests/system/test_persistence_redis.py), so the
two cannot drift.

Each case gets ``stores``: a callable returning a new handle onto one shared store (each ``Persistence`` made
from one is a replica with its own writer id). The model is an every-step durable accumulator, ``h' = h + x``,
so every stored state is known exactly. A step goes as the batch path takes it: the commit hook
(``after_batch``) first, then, unless it refused the row, the new state into the slab and the step counted."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest
from accumulator import Accumulator, accumulator_manifest

from rnnserve.server.core.session import Session
from rnnserve.server.core.sessions import SessionManager
from rnnserve.server.core.work import StepJob
from rnnserve.server.durability.persistence import MOVED, Persistence
from rnnserve.server.durability.store import SessionRecord, SessionStore, Unsure
from rnnserve.server.errors import SessionMoved
from rnnserve.server.models.model import LoadedModel
from rnnserve.server.models.repository import ModelRepository
from rnnserve.server.scheduling.execution import CommittedBatch

Stores = Callable[[], SessionStore]

MANIFEST = accumulator_manifest(durability={"mode": "every-step"})


def _model(tmp_path: Path) -> LoadedModel:
    return LoadedModel(MANIFEST, tmp_path, Accumulator(MANIFEST), max_queue_delay_us=0)


def _session(model: LoadedModel, sid: str = "session-0001") -> Session:
    return Session(sid, model, model.acquire())


def _step(p: Persistence, session: Session, x: float) -> bool:
    """One step of ``session`` through ``p``'s commit hook; whether it applied (not refused)."""
    model = session.model
    h = model.slab.read(session.slot)[0][None]
    xs = np.full((1, 2), x, np.float32)
    out = model.runtime.run({"x": xs, "h": h})
    job = StepJob({"x": xs[0]}, 0, None)
    refused = p.after_batch(CommittedBatch(model, [session], [job], {"x": xs, "h": h}, [out["h_out"]], [out["y"]]))
    if refused:
        return False
    model.slab.write(session.slot, [out["h_out"][0]])
    session.steps += 1
    return True


def _stored(store: SessionStore, session: Session) -> tuple[int, int, list[float]]:
    record = store.get(session.key)
    assert record is not None
    return record.revision, record.steps, record.state["h"].tolist()


def _run(case: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(case())


def writes_and_revisions(stores: Stores, tmp_path: Path) -> None:
    """OpenSession writes the session before answering; each every-step batch writes its new state; the copy
    keeps the revision the store gave each write, which only grows."""

    async def main() -> None:
        p = Persistence(stores())
        model = _model(tmp_path)
        session = _session(model)
        await p.opened(session)
        assert session.revision == 1 and _stored(p.store, session) == (1, 0, [0.0, 0.0])
        assert _step(p, session, 1.0) and _step(p, session, 2.0)
        assert session.revision == 3 and _stored(p.store, session) == (3, 2, [3.0, 3.0])
        assert not await p.stale(session)  # its own writes do not make a copy stale

    _run(main)


def a_stale_copy_is_refused(stores: Stores, tmp_path: Path) -> None:
    """Compare-and-set: a replica whose copy another replica advanced cannot overwrite the newer record; its
    batch row is refused, its write_now fails with SessionMoved, and once dropped it writes and deletes nothing."""

    async def main() -> None:
        a, b = Persistence(stores()), Persistence(stores())
        moved: list[Session] = []
        a.on_moved = moved.append
        model_a, model_b = _model(tmp_path / "a"), _model(tmp_path / "b")
        mine = _session(model_a)
        await a.opened(mine)
        theirs = _session(model_b)  # the same session, moved to b as it was stored
        theirs.revision = mine.revision
        assert _step(b, theirs, 5.0)
        assert await a.stale(mine)
        assert not _step(a, mine, 1.0)  # refused: nothing applied here
        assert mine.steps == 0 and model_a.slab.read(mine.slot)[0].tolist() == [0.0, 0.0]
        with pytest.raises(SessionMoved):
            await a.write_now(mine)
        assert _stored(a.store, mine) == (2, 1, [5.0, 5.0])  # b's, untouched
        a.moved(mine)
        assert mine.revision == MOVED and moved == [mine]
        mine.closed = "expired"
        a.forget(mine)  # a dropped copy deletes nothing either
        assert _stored(a.store, mine) == (2, 1, [5.0, 5.0])

    _run(main)


def unsure_writes(stores: Stores, tmp_path: Path) -> None:
    """A write that failed midway leaves the copy ``Unsure`` of the revision it would have given (as
    ``Persistence._put`` does on StoreUnavailable). If it did not land, the copy's next write goes through; if
    it landed, the store holds this copy (the copy reads as stale, and its own next write still goes
    through); if another writer wrote that revision meanwhile, the copy is refused."""

    async def main() -> None:
        p, other = Persistence(stores()), Persistence(stores())
        model = _model(tmp_path)
        session = _session(model)
        await p.opened(session)
        assert _step(p, session, 1.0)  # revision 2

        session.revision = Unsure(3)  # the write of revision 3 failed midway and did not land
        assert not await p.stale(session)
        # Written above both the stored revision and the one it was unsure of.
        assert _step(p, session, 1.0) and session.revision == 4
        assert _stored(p.store, session) == (4, 2, [2.0, 2.0])

        # It landed: the store holds revision 5 by this writer.
        landed = Persistence.record(session)
        assert p.store.put_many([landed], [4], p.writer) == [5]
        session.revision = Unsure(5)
        assert await p.stale(session)
        assert _step(p, session, 1.0) and session.revision == 6
        assert _stored(p.store, session) == (6, 3, [3.0, 3.0])

        # Another writer's revision 7 is not this copy's unsure one.
        assert other.store.put_many([Persistence.record(session)], [6], other.writer) == [7]
        session.revision = Unsure(7)
        assert not _step(p, session, 1.0)
        assert _stored(p.store, session) == (7, 3, [3.0, 3.0])

    _run(main)


def a_newer_copy_is_written_over_an_older_store(stores: Stores, tmp_path: Path) -> None:
    """A store that went back in time (it lost writes) holds an older record: the copy is the newest state
    there is, so it does not read as stale, and its next write puts it back with a revision above both."""

    async def main() -> None:
        p = Persistence(stores())
        model = _model(tmp_path)
        session = _session(model)
        await p.opened(session)
        old = p.store.get(session.key)
        assert old is not None
        for x in (1.0, 2.0, 3.0):
            assert _step(p, session, x)
        assert session.revision == 4
        # The store restarts from a snapshot holding the session as opened, at revision 1.
        p.store.delete_many([session.key])
        assert p.store.put_many([old]) == [1]
        assert not await p.stale(session)
        await p.write_now(session)
        assert session.revision == 5 and _stored(p.store, session) == (5, 3, [6.0, 6.0])
        # And a lost record (the store forgot it) is written back by the next step.
        p.store.delete_many([session.key])
        assert _step(p, session, 1.0) and _stored(p.store, session) == (6, 4, [7.0, 7.0])

    _run(main)


def a_newer_record_is_reloaded(stores: Stores, tmp_path: Path) -> None:
    """A copy the store holds a newer record of is stale: dropped here, and the next request naming the
    session restores the newer record (state, steps, owner, its revision), after which its writes go through."""

    async def main() -> None:
        p, other = Persistence(stores()), Persistence(stores())
        model = _model(tmp_path)
        repository = ModelRepository(tmp_path)
        repository.models[(model.name, model.version)] = model
        sessions = SessionManager(max_sessions=10, ttl=60)
        p.on_moved = sessions.drop
        # What Persistence.restore reads of the data plane: its session table, models and replay window.
        session = sessions.open(model, owner="alice", session_id="session-0002")
        await p.opened(session)
        newer = SessionRecord(session.key, model.name, model.version, 7, {"h": np.full(2, 9.0, np.float32)}, "alice")
        assert other.store.put_many([newer], [session.revision], other.writer) == [2]

        assert await p.stale(session)
        p.moved(session)
        assert session.closed == "moved" and not sessions.known(session.id)
        await p.restore([session.id], sessions, repository, 8)
        back = sessions.get(session.id)
        assert back is not session and back.steps == 7 and back.owner == "alice" and back.revision == 2
        assert model.slab.read(back.slot)[0].tolist() == [9.0, 9.0]
        assert not await p.stale(back)
        assert _step(p, back, 1.0) and _stored(p.store, back) == (3, 8, [10.0, 10.0])

    _run(main)


CASES = [
    writes_and_revisions,
    a_stale_copy_is_refused,
    unsure_writes,
    a_newer_copy_is_written_over_an_older_store,
    a_newer_record_is_reloaded,
]
