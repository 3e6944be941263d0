"""A session's exactly-once state machine (server/core/session.py), without a server: step indexes, retries of
pending and applied steps, the replay window, recounting after a step that did not apply, and renumbering."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from rnnserve.server.core.session import Session
from rnnserve.server.core.work import ControlJob, JobGroup, ReplayEntry, StepJob, answer, fingerprint
from rnnserve.server.errors import FailedPrecondition

WINDOW = 3


def _session(steps: int = 0) -> Session:
    # The model is only carried along by the session; its exactly-once state never looks at it.
    model: Any = object()
    return Session("s" * 16, model, slot=0, steps=steps)


def _queue(session: Session, x: float, index: int, num_steps: int = 0, future: Any = None) -> StepJob:
    """What the data plane does with a step it admitted: queue its job, then book it."""
    inputs = {"x": np.full((num_steps, 2) if num_steps else (2,), x, np.float32)}
    job = StepJob(inputs, num_steps, future, step_index=index, fingerprint=fingerprint(inputs))
    assert session.admit(index, num_steps, job.fingerprint) is None
    session.pending.append(job)
    session.queued(num_steps, index, WINDOW)
    return job


def _apply(session: Session, job: StepJob, y: float) -> None:
    """What the scheduler does once ``job`` applied: count its steps, keep its outputs for retries."""
    session.pending.remove(job)
    job.outputs = [[np.array([y + t], np.float32)] for t in range(job.total)]
    session.steps += job.total
    session.applied(job, job.outputs)


def _print(x: float, num_steps: int = 0) -> int:
    return fingerprint({"x": np.full((num_steps, 2) if num_steps else (2,), x, np.float32)})


def test_indexes_advance_as_steps_queue_not_as_they_apply() -> None:
    session = _session(steps=4)
    assert session.next_index == 5
    _queue(session, 1.0, 5)
    _queue(session, 2.0, 6, num_steps=3)  # a chunk covers three indexes
    assert session.next_index == 9 and session.steps == 4
    with pytest.raises(FailedPrecondition, match="expects step_index 9 \\(got 10\\)"):
        session.admit(10, 0, _print(3.0))  # a gap
    assert session.next_index == 9  # a refused step consumes no index


def test_a_retry_of_a_queued_step_gets_that_job_and_other_inputs_are_refused() -> None:
    session = _session()
    first = _queue(session, 1.0, 1)
    chunk = _queue(session, 2.0, 2, num_steps=2)
    assert session.admit(1, 0, _print(1.0)) is first
    assert session.admit(2, 2, _print(2.0, 2)) is chunk
    with pytest.raises(FailedPrecondition, match="step 1 was sent before with other inputs"):
        session.admit(1, 0, _print(9.0))
    with pytest.raises(FailedPrecondition, match="step 2 was sent before with other inputs"):
        session.admit(2, 0, _print(2.0, 2))  # same index, not a chunk this time


def test_applied_steps_are_answered_from_the_replay_window_until_they_fall_out_of_it() -> None:
    session = _session()
    for i in range(1, 6):
        _apply(session, _queue(session, float(i), i), 10.0 * i)
    assert session.next_index == 6 and session.steps == 5
    entry = session.admit(4, 0, _print(4.0))
    assert isinstance(entry, ReplayEntry)
    outputs, steps = entry.outcome()
    assert steps == 4 and outputs[0][0].tolist() == [40.0]
    with pytest.raises(FailedPrecondition, match="not among the 3 recent steps kept"):
        session.admit(2, 0, _print(2.0))  # applied, but the window holds steps 3..5 only
    with pytest.raises(FailedPrecondition, match="other inputs"):
        session.admit(5, 0, _print(0.5))


def test_a_chunk_replays_with_the_step_count_of_its_last_step() -> None:
    session = _session()
    _apply(session, _queue(session, 1.0, 1, num_steps=4), 0.0)
    entry = session.admit(1, 4, _print(1.0, 4))
    assert isinstance(entry, ReplayEntry)
    outputs, steps = entry.outcome()
    assert steps == 4 and len(outputs) == 4


def test_a_session_that_never_numbers_its_steps_keeps_no_replay_cache() -> None:
    session = _session()
    session.queued(0, 0, WINDOW)
    session.queued_step()
    assert session.next_index == 3 and session.replay is None and session.replay_entries() == []


def test_recount_after_a_step_left_the_queue_without_applying() -> None:
    session = _session()
    loop = asyncio.new_event_loop()
    try:
        _apply(session, _queue(session, 1.0, 1), 1.0)
        failed = _queue(session, 2.0, 2, num_steps=2)
        _queue(session, 3.0, 4)
        # The chunk failed midway through: its first step ran and was rolled back, it leaves the queue.
        failed.done = 1
        session.pending.remove(failed)
        session.recount()
        # Applied 1 step and one step still queued: the step queued behind the failed one now expects index 2
        # (the scheduler refuses it at the head of the queue, since it would skip the failed steps).
        assert session.next_index == 3
        # A reset queued behind the steps renumbers what follows it from 1.
        session.pending.append(ControlJob(lambda: None, loop.create_future(), steps=0))
        session.renumber(0)
        _queue(session, 4.0, 1)
        session.recount()
        assert session.next_index == 2
    finally:
        loop.close()


def test_a_reset_forgets_the_answers_of_the_old_numbering() -> None:
    session = _session()
    _apply(session, _queue(session, 1.0, 1), 1.0)
    session.renumber(0)
    session.forget_replay()
    assert session.next_index == 1 and session.replay_entries() == []
    assert session.admit(1, 0, _print(5.0)) is None  # index 1 is a new step now, not a retry


def test_the_replay_cache_round_trips_through_the_store_with_the_window() -> None:
    session = _session()
    for i in range(1, 4):
        _apply(session, _queue(session, float(i), i), float(i))
    upcoming = ReplayEntry(4, 0, _print(4.0), [[np.array([4.0], np.float32)]])
    written = session.replay_entries(upcoming)
    assert [e.step_index for e in written] == [2, 3, 4]  # as the cache will be once step 4 applied
    assert [e.step_index for e in session.replay_entries()] == [1, 2, 3]  # unchanged meanwhile
    restored = _session(steps=4)
    restored.restore_replay(written, WINDOW)
    assert restored.next_index == 5
    again = restored.admit(3, 0, _print(3.0))
    assert isinstance(again, ReplayEntry) and again.outcome()[1] == 3
    no_window = _session(steps=4)
    no_window.restore_replay(written, 0)
    assert no_window.replay is None


def test_answers_for_a_retry_follow_the_queued_job_or_the_cache() -> None:
    async def main() -> None:
        session = _session()
        loop = asyncio.get_running_loop()
        original = loop.create_future()
        job = _queue(session, 1.0, 1, future=original)
        retry = answer(job)
        assert not retry.done()
        job.outputs = [[np.array([7.0], np.float32)]]
        job.finish(steps=1)
        assert (await original)[1] == 1
        outputs, steps = await retry
        assert steps == 1 and outputs[0][0].tolist() == [7.0]

        failing = _queue(session, 2.0, 2, future=loop.create_future())
        retry = answer(failing)
        failing.finish(error=FailedPrecondition("boom"))
        with pytest.raises(FailedPrecondition, match="boom"):
            await retry
        with pytest.raises(FailedPrecondition, match="boom"):
            await failing.future  # type: ignore[misc]

        cached = answer(ReplayEntry(3, 2, 0, [[np.zeros(1)], [np.ones(1)]]))
        assert cached.done() and cached.result()[1] == 4

    asyncio.run(main())


def test_a_group_row_repeating_a_step_gets_its_result() -> None:
    async def main() -> None:
        session = _session()
        group_future = asyncio.get_running_loop().create_future()
        group = JobGroup(3, group_future)
        job = _queue(session, 1.0, 1, future=asyncio.get_running_loop().create_future())
        group.answer_row(0, job)
        group.answer_row(1, ReplayEntry(5, 0, 0, [[np.array([5.0])]]))
        group.finish(2, None, 0, FailedPrecondition("row 2 refused"))
        assert not group_future.done()  # row 0 waits for the queued job
        job.outputs = [[np.array([1.0])]]
        job.finish(steps=1)
        assert await group_future is group
        assert group.steps[:2] == [1, 5]
        assert group.outputs[0][0].tolist() == [1.0] and group.outputs[1][0].tolist() == [5.0]  # type: ignore[index]
        assert list(group.errors) == [2] and "row 2 refused" in str(group.errors[2])

    asyncio.run(main())


def test_the_fingerprint_of_inputs_with_an_empty_dimension() -> None:
    # A free dimension may be 0 (an empty step of a variable-length input): a retry of it is still told apart.
    empty = {"x": np.zeros((0, 3), np.float32)}
    assert fingerprint(empty) == fingerprint({"x": np.zeros((0, 3), np.float32)})
    assert fingerprint(empty) != fingerprint({"x": np.zeros((1, 3), np.float32)})
