"""Batch formation: which ready sessions go into the next batch, and when it goes.

Every session owns a FIFO of work units (server/core/work.py). A session with work is *ready* and sits in the
ready queue at most once, in the order it became ready; a batch takes the next step of up to
``max_batch_size`` ready sessions, so it never holds two steps of one session, and a session's steps run
strictly in arrival order. When it goes (``wait``):

- at once when it is full, or when it starts with sessions the last batch left behind for their shapes;
- with another batch computing, only for a crowd (``SPLIT_MIN`` ready sessions, or a full batch for a model
  whose batches are smaller): a few ready sessions wait for the running batch instead, so a trickle forms
  fewer, larger batches (cheaper per step) rather than many small ones side by side;
- else after at most ``max_queue_delay`` for other sessions to join.

How many sessions it takes (``take``): ``max_batch_size``, or with several batches allowed at once an even
share of the ready sessions per free slot. For inputs with a free dimension (a length each session picks per
step) only steps of equal shapes stack into one model call, and a model with per-session settings it takes
unbatched (``settings``: a sample rate, say) is fed one value per call; so a batch takes the sessions whose
next step has the shapes, and who have the settings, of the first one's; the others keep their place at the
front and form the next batch.

Work at the head of a session that is not a step to compute is settled while forming: control jobs run (the
session is not in flight, so its state is settled), a unary step whose caller has gone before it started is
dropped (it never applies, like a step never sent), and an indexed step admitted behind one that since failed
is refused (applying it would skip that step).

The clock is injected (``clock``: nanoseconds, ``time.perf_counter_ns`` when serving) so that formation is
tested with a fake one; nothing here awaits or touches a thread.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING

from rnnserve.server.core.work import ControlJob, Job, StepJob, resolve
from rnnserve.server.errors import FailedPrecondition, SessionMoved

if TYPE_CHECKING:
    from rnnserve.server.core.session import Session, SessionModel

SPLIT_MIN = 32
"""The smallest batch that ready sessions are split into for concurrent batches (smaller ones lose more to
per-call overhead than they gain from overlapping)."""

Clock = Callable[[], int]
"""Nanoseconds on a monotonic clock."""


def abandoned(job: Job) -> bool:
    """A step not started whose own future is cancelled: its RPC ended (deadline, cancel) while it queued."""
    return (
        type(job) is StepJob
        and not job.keep
        and job.done == 0
        and job.future is not None
        and job.future.cancelled()
        and not job.followers  # a retry of it waits for its result
    )


class ReadyQueue:
    """One model version's sessions with work, and the formation of its batches from them (event loop)."""

    def __init__(
        self,
        *,
        max_batch_size: int,
        max_queue_delay_us: int,
        concurrency: int = 1,
        free_inputs: Sequence[str] = (),
        settings: Callable[[int], Hashable] | None = None,
        release: Callable[[Session[SessionModel]], None],
        wake: Callable[[], None] = lambda: None,
        clock: Clock = time.perf_counter_ns,
    ):
        self.max_batch_size = max_batch_size
        self.max_queue_delay_ns = max_queue_delay_us * 1000
        self.concurrency = concurrency
        # Inputs with a free dimension besides the batch axis: batches form per shape of these.
        self.free_inputs = list(free_inputs)
        # A slot's values of the settings fed unbatched (None: the model has none): batches form per value too.
        self.settings = settings
        self.release = release  # frees a closed session's slot once its turn ended
        self.wake = wake  # tells the batcher's loop that sessions got ready
        self.clock = clock
        self.ready: deque[Session[SessionModel]] = deque()
        # Steps queued or computing across all sessions (a chunk counts num_steps until it leaves the queue):
        # the data plane refuses new ones past --max-queued-steps.
        self.queued_steps = 0
        self._apart = False  # the last batch left ready sessions of other shapes behind: they go next
        self._deadline: int | None = None  # when the batch forming now goes without more sessions

    # ---- submission ---------------------------------------------------------------------------------------
    def enqueue(self, session: Session[SessionModel], job: Job) -> None:
        """Queue ``job`` behind the session's others."""
        session.pending.append(job)
        if type(job) is StepJob:
            self.queued_steps += job.total
        if not session.scheduled:
            session.scheduled = True
            session.ready_since = self.clock()
            self.ready.append(session)
            self.wake()

    def enqueue_rows(self, sessions: Sequence[Session[SessionModel]], jobs: Sequence[StepJob]) -> None:
        """``enqueue`` for the single-step jobs of one message, with one clock read and one wakeup."""
        now = self.clock()
        ready = self.ready
        for session, job in zip(sessions, jobs, strict=True):
            session.pending.append(job)
            if not session.scheduled:
                session.scheduled = True
                session.ready_since = now
                ready.append(session)
        self.queued_steps += len(jobs)
        self.wake()

    # ---- formation ----------------------------------------------------------------------------------------
    def wait(self, computing: int) -> float | None:
        """How long to let more sessions get ready before ``take``, in seconds: 0 to take the batch now, None
        to wait for more work or a batch to complete. Call with sessions ready; ``computing``: batches of this
        model dispatched and not yet completed."""
        if self._apart:
            return 0  # sessions left behind for their shapes waited their turn already
        ready = len(self.ready)
        if self._deadline is None:
            if computing and ready < min(SPLIT_MIN, self.max_batch_size):
                return None
            if not self.max_queue_delay_ns or ready >= self.max_batch_size:
                return 0
            self._deadline = self.clock() + self.max_queue_delay_ns
        if ready >= self.max_batch_size:
            return 0
        left = self._deadline - self.clock()
        return left / 1e9 if left > 0 else 0

    def limit(self, computing: int) -> int:
        """How many sessions the next batch may take: ``max_batch_size``, or with several batches allowed at
        once, an even share of the ready sessions per free slot (at least SPLIT_MIN), so that they compute
        side by side instead of one full batch leaving the other slots idle."""
        if self.concurrency == 1:
            return self.max_batch_size
        free = self.concurrency - computing
        share = -(-len(self.ready) // max(free, 1))
        return min(self.max_batch_size, max(SPLIT_MIN, share))

    def take(self, computing: int) -> list[Session[SessionModel]]:
        """The sessions of the next batch, each with a step at the head of its queue (maybe none: the ready
        sessions had only work settled here)."""
        self._deadline = None
        self._apart = False
        batch: list[Session[SessionModel]] = []
        limit = self.limit(computing)
        free_inputs = self.free_inputs
        settings = self.settings
        grouped = bool(free_inputs) or settings is not None
        first: Hashable = None  # with free dimensions or settings: the shapes and settings of this batch's steps
        apart: list[Session[SessionModel]] = []  # ready sessions whose next step has other ones, in ready order
        while self.ready and len(batch) < limit:
            session = self.ready.popleft()
            self._settle_head(session)
            if session.closed or not session.pending:
                self.settle(session)
                continue
            if grouped:
                head = session.pending[0]
                assert type(head) is StepJob
                key = (
                    tuple(head.step_input(name).shape for name in free_inputs),
                    None if settings is None else settings(session.slot),
                )
                if not batch:
                    first = key
                elif key != first:
                    apart.append(session)  # stays ready, ahead of the rest: the next batch starts with it
                    continue
            batch.append(session)
        if apart:
            self.ready.extendleft(reversed(apart))
            self._apart = True
        return batch

    def _settle_head(self, session: Session[SessionModel]) -> None:
        """Run or drop the work at the head of ``session``'s queue until a step to compute is there. One
        already computing (a chunk midway) is never dropped: it runs to the end."""
        while session.pending:
            head = session.pending[0]
            if isinstance(head, ControlJob):
                session.pending.popleft()
                try:
                    resolve(head.future, head.fn())
                except Exception as exc:
                    resolve(head.future, error=exc)
            elif abandoned(head):
                session.pending.popleft()
                self.queued_steps -= head.total
                session.recount()
            elif head.step_index and not head.done and head.step_index != session.steps + 1:
                session.pending.popleft()
                self.queued_steps -= head.total
                head.finish(
                    error=FailedPrecondition(
                        f"session '{session.id}' expects step_index {session.steps + 1} (got "
                        f"{head.step_index}): a step queued before it did not apply"
                    )
                )
                session.recount()
            else:
                return

    # ---- after a session's turn ---------------------------------------------------------------------------
    def settle(self, session: Session[SessionModel]) -> None:
        """After a session's turn: requeue it if it has work, else mark it idle (and free it if closed)."""
        if session.closed:
            while session.pending:
                job = session.pending.popleft()
                error = (
                    SessionMoved(session.id)
                    if session.closed == "moved"
                    else FailedPrecondition(f"session '{session.id}' was closed")
                )
                if isinstance(job, StepJob):
                    self.queued_steps -= job.total
                    job.finish(error=error)
                else:
                    resolve(job.future, error=error)
            session.scheduled = False
            self.release(session)
        elif session.pending:
            session.ready_since = self.clock()
            self.ready.append(session)
        else:
            session.scheduled = False
