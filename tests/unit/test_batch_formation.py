"""Batch formation (server/scheduling/formation.py) with a fake clock: when a batch goes (full, queue delay,
a crowd while another computes), which sessions it takes (max size, concurrency share, equal shapes for free
dimensions), and the work settled at the head of a session's queue while forming (control jobs, abandoned
steps, indexed steps behind a failed one, closed sessions)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from rnnserve.server.core.session import Session
from rnnserve.server.core.work import ControlJob, StepJob
from rnnserve.server.errors import FailedPrecondition
from rnnserve.server.scheduling.formation import SPLIT_MIN, ReadyQueue


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000

    def __call__(self) -> int:
        return self.now

    def advance_us(self, us: int) -> None:
        self.now += us * 1000


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _queue(clock: FakeClock, released: list[Session] | None = None, **kw: Any) -> ReadyQueue:
    settings: dict[str, Any] = {"max_batch_size": 4, "max_queue_delay_us": 500, **kw}
    return ReadyQueue(**settings, release=(released if released is not None else []).append, clock=clock)


def _session(n: int) -> Session:
    model: Any = object()  # carried along only
    return Session(f"session-{n:08d}", model, slot=n)


def _step(loop: asyncio.AbstractEventLoop, session: Session, shape: tuple[int, ...] = (2,), **kw: Any) -> StepJob:
    return StepJob({"x": np.zeros(shape, np.float32)}, 0, loop.create_future(), **kw)


def _ready(queue: ReadyQueue, loop: asyncio.AbstractEventLoop, count: int, **kw: Any) -> list[Session]:
    sessions = [_session(i) for i in range(count)]
    for s in sessions:
        queue.enqueue(s, _step(loop, s, **kw))
    return sessions


def test_a_lone_step_waits_the_queue_delay_then_goes(loop) -> None:
    clock = FakeClock()
    queue = _queue(clock)
    (session,) = _ready(queue, loop, 1)
    assert session.scheduled and session.ready_since == clock.now and queue.queued_steps == 1
    assert queue.wait(computing=0) == pytest.approx(500e-6)
    clock.advance_us(200)
    assert queue.wait(computing=0) == pytest.approx(300e-6)  # the deadline was set once, not moved
    clock.advance_us(300)
    assert queue.wait(computing=0) == 0
    assert queue.take(computing=0) == [session]
    # Its step still at the head (nothing computed it here), the session is ready again after its turn, and
    # the next batch gets a full delay of its own.
    queue.settle(session)
    assert list(queue.ready) == [session]
    assert queue.wait(computing=0) == pytest.approx(500e-6)
    session.pending.clear()
    queue.take(computing=0)
    assert not session.scheduled  # no work left: idle


def test_a_full_batch_goes_at_once_and_takes_at_most_max_batch_size_in_ready_order(loop) -> None:
    clock = FakeClock()
    queue = _queue(clock)
    sessions = _ready(queue, loop, 6)
    assert queue.wait(computing=0) == 0
    assert queue.take(computing=0) == sessions[:4]
    assert list(queue.ready) == sessions[4:]


def test_without_a_queue_delay_a_batch_goes_at_once(loop) -> None:
    queue = _queue(FakeClock(), max_queue_delay_us=0)
    _ready(queue, loop, 1)
    assert queue.wait(computing=0) == 0


def test_while_a_batch_computes_a_few_ready_sessions_wait_for_it(loop) -> None:
    clock = FakeClock()
    queue = _queue(clock, max_batch_size=64)
    _ready(queue, loop, 3)
    assert queue.wait(computing=1) is None  # no timeout: until a batch completes or more work arrives
    more = [_session(100 + i) for i in range(SPLIT_MIN - 3)]
    for s in more:
        queue.enqueue(s, _step(loop, s))
    # A crowd: it forms its own batch beside the computing one, after the queue delay.
    assert queue.wait(computing=1) == pytest.approx(500e-6)
    # A model whose whole batch is smaller than SPLIT_MIN counts a full batch as a crowd.
    small = _queue(clock, max_batch_size=2)
    _ready(small, loop, 2)
    assert small.wait(computing=1) == 0


def test_concurrent_batches_split_the_ready_sessions_evenly(loop) -> None:
    queue = _queue(FakeClock(), max_batch_size=64, concurrency=2)
    _ready(queue, loop, 100)
    assert queue.limit(computing=0) == 50  # two free slots: half each
    assert queue.limit(computing=1) == 64  # one free slot: a full batch
    few = _queue(FakeClock(), max_batch_size=64, concurrency=4)
    _ready(few, loop, 40)
    assert few.limit(computing=0) == SPLIT_MIN  # never smaller shares than SPLIT_MIN
    assert len(few.take(computing=0)) == SPLIT_MIN


def test_free_dimensions_batch_equal_shapes_and_the_others_go_next(loop) -> None:
    clock = FakeClock()
    queue = _queue(clock, free_inputs=["x"])
    sessions = [_session(i) for i in range(5)]
    lengths = [3, 5, 3, 5, 3]
    for s, n in zip(sessions, lengths, strict=True):
        queue.enqueue(s, _step(loop, s, shape=(n, 2)))
    first = queue.take(computing=0)
    assert first == [sessions[0], sessions[2], sessions[4]]
    assert list(queue.ready) == [sessions[1], sessions[3]]
    assert queue.wait(computing=1) == 0  # left behind for their shapes: they go next, without a delay
    assert queue.take(computing=1) == [sessions[1], sessions[3]]


def test_sessions_batch_only_with_equal_settings_and_shapes(loop) -> None:
    """A model's unbatched per-session settings (a sample rate) key batches like free input shapes do: each
    batch holds one value (and one shape); the others go next, in ready order, without another delay."""
    clock = FakeClock()
    rates = {0: 8000, 1: 16000, 2: 8000, 3: 16000, 4: 8000, 5: 8000}
    queue = _queue(clock, free_inputs=["x"], settings=rates.__getitem__, max_batch_size=8)
    sessions = [_session(i) for i in range(6)]
    lengths = [3, 3, 3, 3, 5, 3]
    for s, n in zip(sessions, lengths, strict=True):
        queue.enqueue(s, _step(loop, s, shape=(n, 2)))
    assert queue.take(computing=0) == [sessions[0], sessions[2], sessions[5]]  # 8000 Hz, length 3
    assert queue.wait(computing=1) == 0
    assert queue.take(computing=1) == [sessions[1], sessions[3]]  # 16000 Hz
    assert queue.take(computing=2) == [sessions[4]]  # 8000 Hz, length 5
    assert not queue.ready


def test_control_jobs_at_the_head_run_while_forming(loop) -> None:
    queue = _queue(FakeClock())
    stepping, controlled = _session(1), _session(2)
    calls: list[str] = []
    read = ControlJob(lambda: calls.append("read") or "state", loop.create_future())
    queue.enqueue(stepping, read)
    step = _step(loop, stepping)
    queue.enqueue(stepping, step)
    reset = ControlJob(lambda: calls.append("reset"), loop.create_future(), steps=0)
    queue.enqueue(controlled, reset)
    failing = ControlJob(lambda: 1 / 0, loop.create_future())
    queue.enqueue(controlled, failing)
    assert queue.queued_steps == 1  # control jobs are no steps
    assert queue.take(computing=0) == [stepping]
    assert calls == ["read", "reset"]
    assert read.future.result() == "state" and reset.future.done()
    with pytest.raises(ZeroDivisionError):
        failing.future.result()
    assert list(stepping.pending) == [step]
    assert not controlled.scheduled and not queue.ready  # only control work: idle again


def test_a_unary_step_whose_caller_left_is_dropped_a_stream_step_is_kept(loop) -> None:
    queue = _queue(FakeClock())
    left, streamed = _session(1), _session(2)
    gone = _step(loop, left, step_index=1)
    left.queued(0, 1, 8)
    queue.enqueue(left, gone)
    gone.future.cancel()  # type: ignore[union-attr]
    kept = _step(loop, streamed, keep=True)
    queue.enqueue(streamed, kept)
    kept.future.cancel()  # type: ignore[union-attr]
    assert queue.take(computing=0) == [streamed]
    assert not left.pending and queue.queued_steps == 1
    assert left.next_index == 1  # index 1 is free again: the dropped step never applied


def test_an_indexed_step_behind_one_that_did_not_apply_is_refused(loop) -> None:
    queue = _queue(FakeClock())
    session = _session(1)
    behind = _step(loop, session, step_index=2)  # admitted while step 1 was queued; step 1 failed since
    session.queued(0, 2, 8)
    queue.enqueue(session, behind)
    assert queue.take(computing=0) == []
    with pytest.raises(FailedPrecondition, match="expects step_index 1 \\(got 2\\): a step queued before it"):
        behind.future.result()  # type: ignore[union-attr]
    assert session.next_index == 1 and queue.queued_steps == 0 and not session.scheduled


def test_a_closed_session_fails_its_queued_work_and_is_released(loop) -> None:
    released: list[Session] = []
    queue = _queue(FakeClock(), released)
    session = _session(1)
    step = _step(loop, session)
    control = ControlJob(lambda: None, loop.create_future())
    queue.enqueue(session, step)
    queue.enqueue(session, control)
    session.closed = "client"
    assert queue.take(computing=0) == []
    with pytest.raises(FailedPrecondition, match="was closed"):
        step.future.result()  # type: ignore[union-attr]
    with pytest.raises(FailedPrecondition, match="was closed"):
        control.future.result()
    assert released == [session] and queue.queued_steps == 0 and not session.scheduled
