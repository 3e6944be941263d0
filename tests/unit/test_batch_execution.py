"""A batch's one path (server/scheduling/execution.py) against a tiny numpy model, without a server: gather ->
run -> commit hook -> scatter -> complete, for single steps, chunks and a whole columnar group; a commit hook
that refuses rows or fails; a model that fails or returns a wrong state. The model is an accumulator:
``h' = h + x``, ``y = 2 h'``, so every result and state is known exactly."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
from accumulator import accumulator_manifest

from rnnserve.server.core.session import Session
from rnnserve.server.core.work import JobGroup, StepJob, fingerprint
from rnnserve.server.errors import FailedPrecondition, Internal, OutcomeUnknown, SessionMoved
from rnnserve.server.models.model import LoadedModel
from rnnserve.server.models.runtime import Runtime
from rnnserve.server.scheduling.execution import CommittedBatch, Execution
from rnnserve.server.scheduling.formation import ReadyQueue
from rnnserve.server.scheduling.stats import BatchStats

# The state's batch axis is not the first: gather and scatter move it.
MANIFEST = accumulator_manifest(state_shape=(2, -1), batch_axis=1)


class Accumulator(Runtime):
    """``h' = h + x``, ``y = 2 h'`` in numpy; ``fail``: raise instead; ``bad_state``: return h' of a batch too
    small."""

    def __init__(self) -> None:
        super().__init__(MANIFEST)
        self.fail = False
        self.bad_state = False
        self.calls = 0

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        if self.fail:
            raise RuntimeError("the model broke")
        h = feeds["h"] + feeds["x"].T
        return {"y": 2 * h.T, "h_out": h[:, :1] if self.bad_state else h}

    @property
    def device(self) -> str:
        return "cpu"


class Hook:
    """A commit hook (the interface server/durability/persistence.py implements): refuses ``refuse`` rows, or fails."""

    def __init__(self) -> None:
        self.refuse: set[int] = set()
        self.error: Exception | None = None
        self.committed: list[list[np.ndarray]] = []
        self.moved_sessions: list[Session] = []

    def after_batch(self, batch: CommittedBatch) -> set[int]:
        if self.error is not None:
            raise self.error
        self.committed.append([np.array(s) for s in batch.new_states])
        return set(self.refuse)

    def moved(self, session: Session) -> None:
        self.moved_sessions.append(session)
        session.closed = "moved"


class Bench:
    """A model, its ready queue and its execution, as a batcher holds them (without the loop)."""

    def __init__(self, tmp_path: Path, loop: asyncio.AbstractEventLoop, hook: Hook | None = None) -> None:
        self.runtime = Accumulator()
        self.model = LoadedModel(MANIFEST, tmp_path, self.runtime)
        self.released: list[Session] = []
        self.queue = ReadyQueue(max_batch_size=8, max_queue_delay_us=0, release=self.released.append)
        self.stats = BatchStats()
        self.execution = Execution(self.model, self.queue, self.stats, hook)
        self.loop = loop

    def session(self, n: int, h: float = 0.0) -> Session:
        state = [np.full((2,), h, np.float32)]
        return Session(f"session-{n:08d}", self.model, self.model.acquire(state))

    def step(self, session: Session, x: float, num_steps: int = 0, index: int = 0) -> StepJob:
        inputs = {"x": np.full((num_steps, 2) if num_steps else (2,), x, np.float32)}
        job = StepJob(inputs, num_steps, self.loop.create_future(), step_index=index, fingerprint=fingerprint(inputs))
        self.queue.enqueue(session, job)
        session.queued(num_steps, index, 4)
        return job

    def batch(self) -> list[Session]:
        """Form, compute and complete one batch, as the batcher's loop does; returns its sessions."""
        batch = self.queue.take(computing=0)
        if not batch:
            return batch  # only work settled while forming
        jobs, group, t0 = self.execution.begin(batch)
        try:
            computed = self.execution.compute(batch, jobs, group)
        except Exception as exc:
            self.execution.failed(batch, jobs, exc)
        else:
            self.execution.done(batch, jobs, group, t0, computed)
        return batch

    def h(self, session: Session) -> list[float]:
        return self.model.slab.read(session.slot)[0].tolist()


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_steps_of_several_sessions_run_as_one_call_and_each_gets_its_own_result(tmp_path, loop) -> None:
    bench = Bench(tmp_path, loop)
    sessions = [bench.session(i, h=float(i)) for i in range(3)]
    jobs = [bench.step(s, x=1.0) for s in sessions]
    assert bench.batch() == sessions
    assert bench.runtime.calls == 1
    for i, (session, job) in enumerate(zip(sessions, jobs, strict=True)):
        outputs, steps = job.future.result()  # type: ignore[union-attr]
        assert steps == 1 and outputs[0][0].tolist() == [2 * (i + 1)] * 2
        assert bench.h(session) == [i + 1.0] * 2 and session.steps == 1
        assert not session.pending and not session.scheduled
    assert bench.stats.steps == 3 and bench.stats.batches == 1 and bench.stats.success == 3
    assert bench.queue.queued_steps == 0


def test_a_chunk_runs_a_step_per_batch_and_answers_once_with_every_step(tmp_path, loop) -> None:
    bench = Bench(tmp_path, loop)
    session = bench.session(0)
    chunk = bench.step(session, x=1.0, num_steps=3, index=1)
    for done in (1, 2):
        bench.batch()
        assert chunk.done == done and not chunk.future.done()  # type: ignore[union-attr]
        assert list(bench.queue.ready) == [session]  # requeued for its next step
    bench.batch()
    outputs, steps = chunk.future.result()  # type: ignore[union-attr]
    assert steps == 3 and [o[0].tolist() for o in outputs] == [[2.0, 2.0], [4.0, 4.0], [6.0, 6.0]]
    assert bench.queue.queued_steps == 0
    # Kept for a retry, as copies of the outputs.
    entry = session.admit(1, 3, chunk.fingerprint)
    assert entry is not None and not isinstance(entry, StepJob) and entry.outcome()[1] == 3


def test_a_whole_columnar_message_is_fed_and_answered_as_the_stacked_tensors(tmp_path, loop) -> None:
    bench = Bench(tmp_path, loop)
    sessions = [bench.session(i) for i in range(4)]
    stacked = {"x": np.arange(8, dtype=np.float32).reshape(4, 2)}
    group = JobGroup(4, loop.create_future())
    jobs = [StepJob(stacked, 0, None, group, i) for i in range(len(sessions))]
    bench.queue.enqueue_rows(sessions, jobs)
    bench.batch()
    assert group.future.result() is group
    assert group.stacked is not None and np.array_equal(group.stacked[0], 2 * stacked["x"])
    assert group.steps == [1, 1, 1, 1] and all(o is None for o in group.outputs)  # no per-row slices
    assert [bench.h(s) for s in sessions] == stacked["x"].tolist()


def test_rows_of_a_message_split_over_batches_are_answered_per_row(tmp_path, loop) -> None:
    bench = Bench(tmp_path, loop)
    sessions = [bench.session(i) for i in range(2)]
    stacked = {"x": np.ones((2, 2), np.float32)}
    group = JobGroup(2, loop.create_future())
    jobs = [StepJob(stacked, 0, None, group, i) for i in range(len(sessions))]
    bench.queue.enqueue(sessions[1], jobs[1])  # row 1 first: not the message's rows in order
    bench.queue.enqueue(sessions[0], jobs[0])
    bench.batch()
    assert group.future.result() is group and group.stacked is None
    assert [row[0].tolist() for row in group.outputs] == [[2.0, 2.0], [2.0, 2.0]]  # type: ignore[index]
    assert group.steps == [1, 1] and not group.errors


def test_a_row_the_commit_hook_refuses_does_not_apply_and_its_session_is_dropped(tmp_path, loop) -> None:
    hook = Hook()
    bench = Bench(tmp_path, loop, hook)
    kept, moved = bench.session(0), bench.session(1)
    ok = bench.step(kept, x=1.0)
    refused = bench.step(moved, x=1.0)
    queued_behind = bench.step(moved, x=5.0)
    hook.refuse = {1}
    bench.batch()
    assert ok.future.result()[1] == 1  # type: ignore[union-attr]
    with pytest.raises(SessionMoved):
        refused.future.result()  # type: ignore[union-attr]
    with pytest.raises(SessionMoved):
        queued_behind.future.result()  # type: ignore[union-attr]  # retried from the store, like it
    assert hook.moved_sessions == [moved] and bench.released == [moved]
    assert moved.steps == 0 and kept.steps == 1
    assert bench.stats.success == 1 and bench.stats.fail == 1


def test_a_failed_commit_fails_the_batch_and_leaves_every_state_as_it_was(tmp_path, loop) -> None:
    hook = Hook()
    bench = Bench(tmp_path, loop, hook)
    session = bench.session(0, h=3.0)
    job = bench.step(session, x=1.0, index=1)
    hook.error = OutcomeUnknown("the write was not confirmed")
    bench.batch()
    with pytest.raises(OutcomeUnknown):
        job.future.result()  # type: ignore[union-attr]
    assert bench.h(session) == [3.0, 3.0] and session.steps == 0 and session.next_index == 1
    assert bench.stats.fail == 1 and bench.stats.success == 0
    hook.error = None
    retry = bench.step(session, x=1.0, index=1)  # the retry with the same index applies once
    bench.batch()
    assert retry.future.result()[1] == 1 and bench.h(session) == [4.0, 4.0]  # type: ignore[union-attr]
    assert len(hook.committed) == 1


def test_a_model_failure_midway_through_a_chunk_rolls_it_back(tmp_path, loop) -> None:
    bench = Bench(tmp_path, loop)
    session = bench.session(0, h=1.0)
    chunk = bench.step(session, x=1.0, num_steps=3, index=1)
    behind = bench.step(session, x=1.0, index=4)
    bench.batch()
    assert bench.h(session) == [2.0, 2.0] and session.steps == 1
    bench.runtime.fail = True
    bench.batch()
    with pytest.raises(Internal, match="model acc:1 failed: the model broke"):
        chunk.future.result()  # type: ignore[union-attr]
    assert bench.h(session) == [1.0, 1.0] and session.steps == 0  # back where the chunk began
    assert session.next_index == 2  # one step still queued (index 4, which now cannot apply)
    bench.runtime.fail = False
    bench.batch()
    with pytest.raises(FailedPrecondition, match="expects step_index 1 \\(got 4\\)"):
        behind.future.result()  # type: ignore[union-attr]
    assert session.next_index == 1 and bench.queue.queued_steps == 0


def test_a_state_of_the_wrong_shape_fails_the_batch_with_internal(tmp_path, loop) -> None:
    bench = Bench(tmp_path, loop)
    sessions = [bench.session(i) for i in range(2)]
    jobs = [bench.step(s, x=1.0) for s in sessions]
    bench.runtime.bad_state = True
    bench.batch()
    for job in jobs:
        with pytest.raises(Internal, match="returned state 'h_out' of shape \\[2, 1\\]"):
            job.future.result()  # type: ignore[union-attr]
    assert [bench.h(s) for s in sessions] == [[0.0, 0.0], [0.0, 0.0]]
