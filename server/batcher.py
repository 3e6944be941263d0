"""Cross-session dynamic batching for one model version.

Every session owns a FIFO of jobs. A session with work is *ready* and sits in the batcher's ready queue at
most once; the batcher takes up to ``max_batch_size`` ready sessions (waiting at most ``max_queue_delay_us``
for more to arrive), runs one timestep of each in a single model call on a worker thread, scatters the new
states into the slab and requeues the sessions that still have work. So a batch never holds two steps of one
session, and a session's steps run strictly in arrival order. Up to ``concurrency`` batches (over disjoint
sessions) compute at once; the next batch forms while the current one computes.

Control jobs (read, write or reset a session's state) wait in the same FIFO, so they apply at a definite
point between steps.

Exactly-once (server/exactly_once.py admits indexed steps): a step carrying a ``step_index`` is checked again
when it reaches the head of its session's FIFO, since a step queued before it may have failed meanwhile; an
applied indexed step's outputs go into ``session.replay`` for retries; a failed or dropped job recounts
``session.next_index`` from what is still queued.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from rnnserve.server.errors import FailedPrecondition, Internal, RnnServeError, SessionMoved

if TYPE_CHECKING:
    from rnnserve.server.model import LoadedModel
    from rnnserve.server.sessions import Session

log = logging.getLogger(__name__)


class JobGroup:
    """The steps of one StepBatch message: answered together through one future and a countdown, rather
    than a future per step (the columnar fast path)."""

    __slots__ = ("errors", "future", "outputs", "remaining", "stacked", "steps")

    def __init__(self, size: int, future: asyncio.Future):
        self.future = future
        self.remaining = size
        self.outputs: list[list[np.ndarray] | None] = [None] * size
        self.steps = [0] * size
        self.errors: dict[int, BaseException] = {}
        # Set when the whole group ran as one batch, rows in order: each output as the model returned it,
        # batch axis first, so the response encodes it as is (``outputs`` then stays unset).
        self.stacked: list[np.ndarray] | None = None

    def finish(self, index: int, outputs: list[np.ndarray] | None, steps: int, error: BaseException | None) -> None:
        if error is not None:
            self.errors[index] = error
        else:
            self.outputs[index] = outputs
            self.steps[index] = steps
        self.remaining -= 1
        if self.remaining == 0:
            _resolve(self.future, self)


# Called with a finished job's per-step outputs, the session's step count and its error (None on success).
Follower = Callable[[list[list[np.ndarray]], int, BaseException | None], None]


class StepJob:
    """One timestep, or a chunk of ``num_steps`` consecutive timesteps, of one session."""

    __slots__ = (
        "done",
        "fingerprint",
        "followers",
        "future",
        "group",
        "index",
        "inputs",
        "keep",
        "num_steps",
        "outputs",
        "session",
        "start_state",
        "step_index",
    )

    def __init__(
        self,
        session: Session,
        inputs: dict[str, np.ndarray],
        num_steps: int,
        future: asyncio.Future | None,
        group: JobGroup | None = None,
        index: int = 0,
        step_index: int = 0,
        fingerprint: int = 0,
        keep: bool = False,
    ):
        self.session = session
        self.inputs = inputs
        self.num_steps = num_steps  # 0: a single step without a time axis
        self.done = 0
        self.outputs: list[list[np.ndarray]] = []
        self.future = future  # None when the job belongs to a group
        self.group = group
        self.index = index
        self.start_state: list[np.ndarray] | None = None  # for rolling a failed chunk back
        self.step_index = step_index  # exactly-once index of the (first) step; 0: unchecked
        self.fingerprint = fingerprint  # of the inputs: tells a retry from another step reusing the index
        # Retries of this step that arrived while it was queued: each gets this job's result.
        self.followers: list[Follower] | None = None
        # Applies even if its caller stops waiting (a stream's step: the steps queued behind it still apply,
        # so dropping this one would leave a gap); otherwise a step whose caller left before it started is
        # dropped, like a step never sent.
        self.keep = keep

    def finish(self, steps: int = 0, error: BaseException | None = None) -> None:
        if self.group is not None:
            self.group.finish(self.index, self.outputs[0] if error is None else None, steps, error)
        else:
            _resolve(self.future, None if error is not None else (self.outputs, steps), error)
        if self.followers:
            for follow in self.followers:
                follow(self.outputs, steps, error)

    @property
    def total(self) -> int:
        return self.num_steps or 1

    def step_input(self, name: str) -> np.ndarray:
        arr = self.inputs[name]
        if self.group is not None:
            return arr[self.index]  # a StepBatch row: the inputs are the message's stacked tensors
        return arr[self.done] if self.num_steps else arr


class ControlJob:
    """A state operation that must run between two steps of the session (on the event loop)."""

    __slots__ = ("fn", "future", "steps")

    def __init__(self, fn: Callable[[], Any], future: asyncio.Future, steps: int | None = None):
        self.fn = fn
        self.future = future
        self.steps = steps  # the session's step count once it ran (a reset: 0); None: unchanged


SPLIT_MIN = 32
"""The smallest batch that ready sessions are split into for concurrent batches (smaller ones lose more to
per-call overhead than they gain from overlapping)."""

INLINE_MAX = 4
"""Batches of at most this many sessions, with no other batch of the model computing, run on the event loop
instead of a worker thread (see Batcher._run), while such batches take under INLINE_BUDGET_NS; 0: never."""
INLINE_BUSY = 0.5
"""... and while the model computes less than this share of the time (a light load)."""
INLINE_BUDGET_NS = 1_000_000
"""A model whose small batches take longer than this runs them on a worker thread: the event loop must not
stall for long (other streams, health checks and the other models wait on it). --inline-budget-us sets it."""

# Upper bounds of the batch-size histogram's buckets (sizes 1, 2-3, 4-7, ...; the last one open), and of the
# per-step queue-delay and latency buckets (50 us .. 10 s) that server/metrics.py exports.
BATCH_SIZE_BOUNDS = [2 ** (i + 1) - 1 for i in range(11)]
LATENCY_BOUNDS_NS = [
    int(s * 1e9) for s in (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
]


@dataclass
class BatchStats:
    """One model's batching counters, updated once per batch on the event loop. Every counter only grows.

    Besides the native stats (GetStats, /metrics), these hold Triton's statistics (server/grpc/kserve_models.py):
    a step is one request, and its compute time is its batch's, split in three: ``input`` (from the batch being
    taken to the model call: the hop to a worker thread, gathering states and stacking inputs), ``infer`` (the
    model call) and ``output`` (checking and scattering states, the durable write, the hop back)."""

    steps: int = 0  # computed by successful batches
    batches: int = 0
    max_batch: int = 0
    histogram: list[int] = field(default_factory=lambda: [0] * 12)
    compute_ns: int = 0  # per batch
    queue_ns: int = 0  # per step
    # Per step, bucketed once per batch at the batch's mean (each batch adds its size to one bucket).
    queue_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_NS) + 1))
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_NS) + 1))
    latency_ns: int = 0
    inline: int = 0  # of ``batches``: those run on the event loop (Batcher._run)
    # Triton's per-request counts: steps answered, and their queue and compute time (each its batch's).
    success: int = 0
    success_queue_ns: int = 0
    input_ns: int = 0
    infer_ns: int = 0
    output_ns: int = 0
    # Steps the batcher took that did not apply: their batch failed, or the durable store refused them.
    fail: int = 0
    fail_ns: int = 0
    # Exact batch size -> [executions, input ns, infer ns, output ns] (per execution).
    sizes: dict[int, list[int]] = field(default_factory=dict)
    last_ns: int = 0  # perf_counter_ns at the end of the last successful batch; 0: none yet

    def record(
        self, size: int, queue_ns: int, input_ns: int, infer_ns: int, output_ns: int, end_ns: int, refused: int = 0
    ) -> None:
        """A batch of ``size`` steps computed; ``queue_ns``: their waits summed; ``refused``: of them, rows the
        durable store refused (they did not apply)."""
        compute_ns = input_ns + infer_ns + output_ns
        self.steps += size
        self.batches += 1
        self.max_batch = max(self.max_batch, size)
        self.histogram[min(size.bit_length() - 1, len(self.histogram) - 1)] += 1
        self.compute_ns += compute_ns
        self.queue_ns += queue_ns
        mean_queue = queue_ns // size
        self.queue_buckets[bisect.bisect_left(LATENCY_BOUNDS_NS, mean_queue)] += size
        self.latency_buckets[bisect.bisect_left(LATENCY_BOUNDS_NS, mean_queue + compute_ns)] += size
        self.latency_ns += queue_ns + compute_ns * size
        per_size = self.sizes.get(size)
        if per_size is None:
            per_size = self.sizes[size] = [0, 0, 0, 0]
        per_size[0] += 1
        per_size[1] += input_ns
        per_size[2] += infer_ns
        per_size[3] += output_ns
        self.last_ns = end_ns
        ok = size - refused
        if refused:
            ok_queue_ns = queue_ns * ok // size
            self.failed(refused, queue_ns - ok_queue_ns + compute_ns * refused)
            queue_ns = ok_queue_ns
        self.success += ok
        self.success_queue_ns += queue_ns
        self.input_ns += input_ns * ok
        self.infer_ns += infer_ns * ok
        self.output_ns += output_ns * ok

    def failed(self, steps: int, ns: int) -> None:
        """``steps`` taken by the batcher did not apply; ``ns``: their time in the server, summed."""
        self.fail += steps
        self.fail_ns += ns

    def last_inference_ms(self) -> int:
        """When the last successful batch ended, in ms since the epoch (0: none yet)."""
        if not self.last_ns:
            return 0
        return (time.time_ns() - (time.perf_counter_ns() - self.last_ns)) // 1_000_000


def _abandoned(job: StepJob | ControlJob) -> bool:
    """A step not started whose own future is cancelled: its RPC ended (deadline, cancel) while it queued."""
    return (
        type(job) is StepJob
        and not job.keep
        and job.done == 0
        and job.future is not None
        and job.future.cancelled()
        and not job.followers  # a retry of it waits for its result
    )


def recount(session: Session) -> None:
    """Set ``session.next_index`` from the applied steps and what is still queued (after a job left the queue
    without applying)."""
    steps = session.steps
    for job in session.pending:
        if type(job) is ControlJob:
            if job.steps is not None:
                steps = job.steps
        else:
            steps += job.total - job.done
    session.next_index = steps + 1


def _resolve(future: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
    # The caller may have gone away (cancelled RPC); its job still ran, only nobody reads the result.
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class Batcher:
    def __init__(
        self,
        model: LoadedModel,
        *,
        max_batch_size: int,
        max_queue_delay_us: int,
        concurrency: int = 1,
        inline_max: int = INLINE_MAX,
        inline_budget_ns: int = INLINE_BUDGET_NS,
    ):
        self.model = model
        self.inline_max = inline_max
        self.inline_budget_ns = inline_budget_ns
        self.max_batch_size = max_batch_size
        self.max_queue_delay = max_queue_delay_us / 1e6
        self.concurrency = concurrency
        self.ready: deque[Session] = deque()
        # Inputs with a free dimension besides the batch axis (a length each session picks per step): only
        # steps whose shapes agree stack into one model call, so batches form per shape (``_take_batch``).
        self._free_inputs = [s.name for s in model.manifest.inputs if -1 in s.session_shape]
        self._apart = False  # the last batch left ready sessions of other shapes behind: they go next
        self.stats = BatchStats()
        # Steps queued or computing across all sessions (a chunk counts num_steps until it leaves the queue):
        # the data plane refuses new ones past --max-queued-steps.
        self.queued_steps = 0
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"model-{model.key}")
        self._task: asyncio.Task | None = None
        self._inflight: set[asyncio.Task] = set()
        self._computing = 0  # batches dispatched and not yet completed
        # Moving average of small batches' compute time (ns); 0 until one ran on a worker thread.
        self._small_ns = 0
        # Moving average of the share of time the model spends computing (per batch: its model time over the
        # time since the previous batch ended), and when the last batch ended.
        self._busy = 0.0
        self._last_end_ns = 0

    # ---- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.model.key}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        self._executor.shutdown(wait=True)

    # ---- submission (event loop) ----------------------------------------------------------------------
    def enqueue_rows(self, sessions: Sequence[Session], jobs: Sequence[StepJob]) -> None:
        """``enqueue`` for the single-step jobs of one message, with one clock read and one wakeup."""
        now = time.perf_counter_ns()
        ready = self.ready
        for session, job in zip(sessions, jobs, strict=True):
            session.pending.append(job)
            if not session.scheduled:
                session.scheduled = True
                session.ready_since = now
                ready.append(session)
        self.queued_steps += len(jobs)
        self._wakeup.set()

    def enqueue(self, session: Session, job: StepJob | ControlJob) -> None:
        session.pending.append(job)
        if type(job) is StepJob:
            self.queued_steps += job.total
        if not session.scheduled:
            session.scheduled = True
            session.ready_since = time.perf_counter_ns()
            self.ready.append(session)
            self._wakeup.set()

    # ---- the loop -------------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            while not self.ready:
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._slots.acquire()
            # Sessions left behind by the last batch for their shapes waited their turn already: they go now.
            apart, self._apart = self._apart, False
            # Another batch while one computes only for a crowd (a full batch, for a model whose batches are
            # smaller than SPLIT_MIN): a few ready sessions wait for the running batch instead, so that a trickle
            # forms fewer, larger batches (cheaper per step) rather than many small ones side by side.
            while not apart and self._computing and len(self.ready) < min(SPLIT_MIN, self.max_batch_size):
                self._wakeup.clear()
                await self._wakeup.wait()
            if not apart and self.max_queue_delay and len(self.ready) < self.max_batch_size:
                # Give other sessions a moment to join; a full batch goes at once.
                deadline = time.perf_counter() + self.max_queue_delay
                while len(self.ready) < self.max_batch_size and (left := deadline - time.perf_counter()) > 0:
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), left)
                    except TimeoutError:
                        break
            batch = self._take_batch()
            if not batch:
                self._slots.release()
                continue
            self._computing += 1
            if self._computing == 1 and len(batch) <= self.inline_max and self._may_inline():
                # A small batch with nothing else computing runs right here on the event loop: its model call
                # is shorter than the two cross-thread wakeups (to a worker and back) it would otherwise pay,
                # which is most of a lone session's step latency. Steps arriving meanwhile form the next batch.
                self._execute_inline(batch)
                continue
            task = asyncio.get_running_loop().create_task(self._execute(batch))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    def _batch_limit(self) -> int:
        """How many sessions the next batch may take: ``max_batch_size``, or with several batches allowed at
        once, an even share of the ready sessions per free slot (at least SPLIT_MIN), so that they compute
        side by side instead of one full batch leaving the other slots idle."""
        if self.concurrency == 1:
            return self.max_batch_size
        free = self.concurrency - self._computing
        share = -(-len(self.ready) // max(free, 1))
        return min(self.max_batch_size, max(SPLIT_MIN, share))

    def _take_batch(self) -> list[Session]:
        batch: list[Session] = []
        limit = self._batch_limit()
        shapes: tuple | None = None  # with free dimensions: the input shapes of this batch's steps
        apart: list[Session] = []  # ready sessions whose next step has other shapes, in ready order
        while self.ready and len(batch) < limit:
            session = self.ready.popleft()
            # Control jobs at the head run now: the session is not in flight, so its state is settled.
            # A unary Step whose caller has gone (deadline passed, cancelled) before it started is dropped: it
            # never applies, like a step never sent. One already computing (a chunk midway) runs to the end.
            while session.pending:
                head = session.pending[0]
                if isinstance(head, ControlJob):
                    session.pending.popleft()
                    try:
                        _resolve(head.future, head.fn())
                    except Exception as exc:
                        _resolve(head.future, error=exc)
                elif _abandoned(head):
                    session.pending.popleft()
                    self.queued_steps -= head.total
                    recount(session)
                elif head.step_index and not head.done and head.step_index != session.steps + 1:
                    # Admitted behind a step that failed or was dropped since: applying it would skip that step.
                    session.pending.popleft()
                    self.queued_steps -= head.total
                    head.finish(
                        error=FailedPrecondition(
                            f"session '{session.id}' expects step_index {session.steps + 1} (got "
                            f"{head.step_index}): a step queued before it did not apply"
                        )
                    )
                    recount(session)
                else:
                    break
            if session.closed or not session.pending:
                self._settle(session)
                continue
            if self._free_inputs:
                head = session.pending[0]
                key = tuple(head.step_input(name).shape for name in self._free_inputs)
                if shapes is None:
                    shapes = key
                elif key != shapes:
                    apart.append(session)  # stays ready, ahead of the rest: the next batch starts with it
                    continue
            batch.append(session)
        if apart:
            self.ready.extendleft(reversed(apart))
            self._apart = True
        return batch

    def _may_inline(self) -> bool:
        # Only for a model whose small batches are quick, and not when the batch waits on the store: an every-step
        # write is a network round trip, which must not stall the event loop.
        model = self.model
        return (
            0 < self._small_ns < self.inline_budget_ns
            # A model busy most of the time has steps arriving while it computes: on a worker thread they queue
            # up meanwhile and form the next batch, where inline calls would keep every batch at one step.
            and self._busy < INLINE_BUSY
            and model.runtime.device == "cpu"  # a GPU's small batches are kernel launches: not measured here
            and (model.persistence is None or model.durability.mode != "every-step")
        )

    def _begin(self, batch: list[Session]) -> tuple[list[StepJob], bool, int]:
        jobs: list[StepJob] = [s.pending[0] for s in batch]  # type: ignore[misc]
        for job in jobs:
            if job.num_steps > 1 and job.done == 0 and job.start_state is None:
                # A chunk about to start: remember where it began so a failure midway can roll back.
                job.start_state = self.model.slab.read(job.session.slot)
        return jobs, self._whole_group(jobs), time.perf_counter_ns()

    def _failure(self, exc: Exception, size: int) -> RnnServeError:
        if isinstance(exc, RnnServeError):
            return exc
        log.exception("model %s failed on a batch of %d", self.model.key, size)
        return Internal(f"model {self.model.key} failed: {exc}")

    def _end(
        self,
        batch: list[Session],
        jobs: list[StepJob],
        whole: bool,
        t0: int,
        per_output: list[np.ndarray],
        refused: set[int],
        error: BaseException | None,
        model_ns: int = 0,
        inline: bool = False,
        run: tuple[int, int] = (0, 0),
    ) -> None:
        """``run``: when the model call began and ended (perf_counter_ns), for the statistics' compute split."""
        end = time.perf_counter_ns()
        if self._last_end_ns and model_ns:
            busy = min(1.0, model_ns / max(end - self._last_end_ns, 1))
            self._busy += (busy - self._busy) / 8
        self._last_end_ns = end
        if error is None:
            run_start, run_end = run
            queue_ns = sum(t0 - s.ready_since for s in batch)
            self.stats.record(
                len(batch), queue_ns, run_start - t0, run_end - run_start, end - run_end, end, len(refused)
            )
            self.stats.inline += inline
            if len(batch) <= self.inline_max:
                # The call itself, without the thread hops around it: what running it inline would cost.
                self._small_ns = model_ns if not self._small_ns else (7 * self._small_ns + model_ns) // 8
        else:
            self.stats.failed(len(batch), sum(end - s.ready_since for s in batch))
        if whole and error is None and not refused:
            self._complete_group(batch, jobs, per_output, time.monotonic())
        else:
            self._complete(batch, jobs, per_output, error, refused)

    def _execute_inline(self, batch: list[Session]) -> None:
        try:
            jobs, whole, t0 = self._begin(batch)
            try:
                per_output, refused, model_ns, run = self._timed_compute(jobs, whole)
            except Exception as exc:
                self._end(batch, jobs, whole, t0, [], set(), self._failure(exc, len(batch)))
            else:
                self._end(batch, jobs, whole, t0, per_output, refused, None, model_ns, inline=True, run=run)
        finally:
            self._computing -= 1
            self._slots.release()

    async def _execute(self, batch: list[Session]) -> None:
        try:
            jobs, whole, t0 = self._begin(batch)
            loop = asyncio.get_running_loop()
            try:
                per_output, refused, model_ns, run = await loop.run_in_executor(
                    self._executor, self._timed_compute, jobs, whole
                )
            except Exception as exc:
                self._end(batch, jobs, whole, t0, [], set(), self._failure(exc, len(batch)))
            else:
                self._end(batch, jobs, whole, t0, per_output, refused, None, model_ns, run=run)
        finally:
            self._computing -= 1
            self._slots.release()
            self._wakeup.set()

    def _timed_compute(
        self, jobs: Sequence[StepJob], whole: bool
    ) -> tuple[list[np.ndarray], set[int], int, tuple[int, int]]:
        t0 = time.perf_counter_ns()
        per_output, refused, run = self._compute(jobs, whole)
        return per_output, refused, time.perf_counter_ns() - t0, run

    def _compute(
        self, jobs: Sequence[StepJob], whole: bool = False
    ) -> tuple[list[np.ndarray], set[int], tuple[int, int]]:
        """Worker thread: gather, run, scatter. Returns each data output with the batch axis first, the rows
        whose session another replica changed (durable store refused the write: not applied), and when the
        model call began and ended (perf_counter_ns). ``whole``:
        the batch is one StepBatch message, rows in order, whose stacked inputs are fed as they are."""
        model = self.model
        n = len(jobs)
        slots = np.fromiter((j.session.slot for j in jobs), dtype=np.intp, count=n)
        feeds: dict[str, np.ndarray] = {}
        for spec in model.manifest.inputs:
            if whole:
                stacked = jobs[0].inputs[spec.name]  # rows first
                feeds[spec.name] = np.moveaxis(stacked, 0, spec.batch_axis) if spec.batch_axis else stacked
            else:
                feeds[spec.name] = np.stack([j.step_input(spec.name) for j in jobs], axis=spec.batch_axis)
        # States and per-session parameters share the slab; constants are fed as configured.
        for spec, value in zip(model.slab.specs, model.slab.gather(slots), strict=True):
            feeds[spec.name] = value
        feeds.update(model.constants)
        run_start = time.perf_counter_ns()
        out = model.runtime.run(feeds)
        run_end = time.perf_counter_ns()
        new_states = []
        for spec, dtype in zip(model.manifest.states, model.slab.dtypes, strict=False):
            value = out[spec.output]
            if value.shape[spec.batch_axis] != n or value.dtype != dtype:
                raise Internal(
                    f"model {model.key} returned state '{spec.output}' of shape {list(value.shape)} {value.dtype}"
                    f" for a batch of {n}; the manifest declares {spec.shape} {spec.dtype}"
                )
            new_states.append(value)
        result = []
        for spec in model.manifest.outputs:
            value = out[spec.name]
            if value.shape[spec.batch_axis] != n:
                raise Internal(
                    f"model {model.key} returned output '{spec.name}' with a batch of "
                    f"{value.shape[spec.batch_axis]} for {n} sessions"
                )
            result.append(np.moveaxis(value, spec.batch_axis, 0) if spec.batch_axis else value)
        persistence = model.persistence
        refused: set[int] = set()
        if persistence is not None and model.durability.mode != "none":
            # Before the scatter: a failed every-step write fails the batch with every state as it was.
            refused = persistence.after_batch(model, jobs, feeds, new_states, result)
        # Only a fully successful call touches the slab: a failed batch leaves every state as it was. Refused
        # rows are scattered too, harmlessly: their sessions are dropped, slots and all.
        model.slab.scatter(slots, new_states)
        return result, refused, (run_start, run_end)

    def _complete(
        self,
        batch: list[Session],
        jobs: list[StepJob],
        per_output: list[np.ndarray],
        error: BaseException | None,
        refused: set[int],
    ) -> None:
        now = time.monotonic()
        for i, (session, job) in enumerate(zip(batch, jobs, strict=True)):
            if i in refused:
                # Another replica advanced this session: nothing of this step applies here; the session's stale
                # copy goes, and its queued steps fail with it (_settle), so every one is retried from the store.
                session.pending.popleft()
                self.queued_steps -= job.total
                job.finish(error=SessionMoved(session.id))
                self.model.persistence.moved(session)  # type: ignore[union-attr]
            elif error is not None:
                session.pending.popleft()
                self.queued_steps -= job.total
                if job.done and job.start_state is not None:
                    # A chunk failed midway: put the session back where the chunk began.
                    self.model.slab.write(session.slot, job.start_state)
                    session.steps -= job.done
                job.finish(error=error)
                recount(session)
            else:
                job.outputs.append([o[i] for o in per_output])
                job.done += 1
                session.steps += 1
                if job.done == job.total:
                    session.pending.popleft()
                    self.queued_steps -= job.total
                    if job.step_index and session.replay is not None:
                        # Copies: views would keep the whole batch's output arrays alive.
                        outputs = [[a.copy() for a in step] for step in job.outputs]
                        session.replay.append((job.step_index, job.num_steps, job.fingerprint, outputs))
                    job.finish(session.steps)
            session.last_used = now
            self._settle(session)

    @staticmethod
    def _whole_group(jobs: list[StepJob]) -> bool:
        """Whether the batch is exactly one StepBatch message, rows in order (the columnar fast path)."""
        group = jobs[0].group
        if group is None or len(jobs) != len(group.outputs):
            return False
        return all(job.group is group and job.index == i for i, job in enumerate(jobs))

    def _complete_group(
        self, batch: list[Session], jobs: list[StepJob], per_output: list[np.ndarray], now: float
    ) -> None:
        """``_complete`` for a batch that is one whole StepBatch: the outputs go to the response as the model
        returned them, and each row only books its step (no per-row output slices)."""
        group = jobs[0].group
        assert group is not None
        group.stacked = per_output
        ready_since = time.perf_counter_ns()
        ready = self.ready
        for i, (session, job) in enumerate(zip(batch, jobs, strict=True)):
            session.pending.popleft()
            self.queued_steps -= 1
            job.done = 1
            session.steps += 1
            group.steps[i] = session.steps
            if job.step_index and session.replay is not None:
                session.replay.append((job.step_index, 0, job.fingerprint, [[o[i].copy() for o in per_output]]))
            if job.followers:
                job.outputs.append([o[i] for o in per_output])
                for follow in job.followers:
                    follow(job.outputs, session.steps, None)
            session.last_used = now
            # _settle, inlined for the common cases (this loop runs once per row of every columnar message).
            if session.closed:
                self._settle(session)
            elif session.pending:
                session.ready_since = ready_since
                ready.append(session)
            else:
                session.scheduled = False
        group.remaining = 0
        _resolve(group.future, group)

    def _settle(self, session: Session) -> None:
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
                    _resolve(job.future, error=error)
            session.scheduled = False
            self.model.release(session)
        elif session.pending:
            session.ready_since = time.perf_counter_ns()
            self.ready.append(session)
        else:
            session.scheduled = False
