"""A batch's one path: gather -> run -> commit hook -> scatter -> complete.

``compute`` (a worker thread, or the event loop for a small inline batch) gathers the sessions' states from
the slab and stacks their steps' inputs, calls the model, checks what it returned, hands the new states to the
commit hook (durability writes them here, before anything is visible: server/durability/persistence.py), and only then
scatters them into the slab. ``complete`` (the event loop) books each step on its session and answers it.

A batch that is exactly one columnar message (a ``JobGroup``'s rows, in order) is fed the message's stacked
inputs as they are, and its outputs go to the group as the model returned them (``JobGroup.stacked``): the
rows then need no per-row stacking or slicing. That is all that differs; failures, refusals, replay and
requeueing take the same path for every batch.

Failure leaves every state as it was: a model error, a state of the wrong shape, or a failed every-step write
raise before the scatter. A chunk (several timesteps of one session) failing midway is rolled back to where
it began. Rows the commit hook refuses (another replica changed their session) did not apply: their sessions'
stale copies are dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np

from rnnserve.server.core.session import Session, SessionModel
from rnnserve.server.core.work import JobGroup, StepJob, resolve
from rnnserve.server.errors import Internal, RnnServeError, SessionMoved
from rnnserve.server.scheduling.formation import Clock, ReadyQueue
from rnnserve.server.scheduling.stats import BatchStats

if TYPE_CHECKING:
    from rnnserve.manifest import Durability, ModelManifest, TensorSpec, WindowSpec

log = logging.getLogger(__name__)


class Runner(Protocol):
    """Calls the model on one batch (server/models/runtime: ONNX Runtime, TorchScript)."""

    @property
    def device(self) -> str: ...  # "cpu" or "cuda"

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]: ...


class Slab(Protocol):
    """The sessions' states and parameters, a row each (server/models/slab.py)."""

    @property
    def specs(self) -> list[TensorSpec]: ...
    @property
    def dtypes(self) -> list[Any]: ...

    def read(self, slot: int) -> list[np.ndarray]: ...
    def write(self, slot: int, state: Sequence[np.ndarray]) -> None: ...
    def gather(self, slots: np.ndarray) -> list[Any]: ...
    def scatter(self, slots: np.ndarray, values: Sequence[Any]) -> None: ...


class BatchedModel(SessionModel, Protocol):
    """What the scheduler needs of a model version (server/models/model.py's LoadedModel is one)."""

    @property
    def manifest(self) -> ModelManifest: ...
    @property
    def durability(self) -> Durability: ...
    @property
    def runtime(self) -> Runner: ...
    @property
    def slab(self) -> Slab: ...  # the sessions' states and parameters, a row each
    @property
    def constants(self) -> dict[str, np.ndarray]: ...  # fed to every call as configured
    @property
    def persistence(self) -> CommitHook | None: ...  # None: sessions are never written

    def settings(self, slot: int) -> Hashable:
        """The values of a session's unbatched parameters: only sessions with equal ones share a batch."""
        ...


class CommittedBatch(NamedTuple):
    """What the commit hook sees of a computed batch, row i being ``jobs[i]``, the step of ``sessions[i]``."""

    model: BatchedModel
    sessions: Sequence[Session[SessionModel]]
    jobs: Sequence[StepJob]
    feeds: dict[str, Any]  # everything the model was fed: inputs (windows in front), states, parameters, constants
    # The model's states as it returned them (batch axis where the manifest puts it), then the next context
    # windows (manifest.session_states' order).
    new_states: Sequence[Any]
    outputs: Sequence[np.ndarray]  # data outputs, batch axis first


class CommitHook(Protocol):
    """Makes a batch's new states durable before they are scattered (server/durability/persistence.py Persistence)."""

    def after_batch(self, batch: CommittedBatch) -> set[int]:
        """Worker thread, after the model call: commit the rows due. Returns the rows refused (their session
        changed elsewhere: not applied); raises to fail the whole batch with every state as it was."""
        ...

    def moved(self, session: Session[SessionModel]) -> None:
        """Event loop: ``session``'s copy here is stale (a refused row): drop it."""
        ...

    def forget(self, session: Session[SessionModel]) -> None:
        """Event loop: ``session`` ended (closed, expired): its stored copy goes too."""
        ...


Computed = tuple[list[np.ndarray], set[int], int, int, int]
"""What ``compute`` returns: each data output with the batch axis first, the rows the commit hook refused,
the time the call took in all (ns), and when the model call began and ended (perf_counter_ns)."""


def _host(value: Any) -> np.ndarray:
    """A slab column as a host array (a device slab's are torch tensors)."""
    return value if isinstance(value, np.ndarray) else value.cpu().numpy()


class Feeder:
    """How a batch's stacked inputs and its sessions' slab rows become the model's feeds, and which of the
    slab's columns the model's results replace. A row holds the model's states, its inputs' context windows,
    then the session's parameters (server/models/model.py). States and batched parameters are fed as
    gathered; a context window goes in front of its input's new chunk, and the tail of what was fed is the
    next window; an unbatched parameter is fed once, the value of the batch's first row (formation puts only
    sessions with equal values in a batch)."""

    def __init__(self, manifest: ModelManifest):
        self.states = manifest.states
        self.windows: list[WindowSpec] = manifest.windows
        self.parameters = manifest.parameters
        self.unbatched = [p.name for p in manifest.parameters if not p.batched]

    def feed(self, feeds: dict[str, Any], rows: Sequence[Any]) -> None:
        """Add ``rows`` (the slab's columns for the batch, batch axes in model order) to ``feeds``, which
        holds the batch's stacked inputs."""
        n, w = len(self.states), len(self.windows)
        for state, value in zip(self.states, rows[:n], strict=True):
            feeds[state.name] = value
        for window, value in zip(self.windows, rows[n : n + w], strict=True):
            feeds[window.name] = window.extend(_host(value), feeds[window.name])
        for parameter, value in zip(self.parameters, rows[n + w :], strict=True):
            # ``[0, ...]``: a 0-d array for a scalar, not a numpy scalar (the runtimes take arrays).
            feeds[parameter.name] = value if parameter.batched else value[0, ...]

    def next_windows(self, feeds: Mapping[str, Any]) -> list[np.ndarray]:
        """Each context window after the call: the tail of the input it was fed with."""
        return [window.tail(feeds[window.name]) for window in self.windows]


def whole_group(jobs: Sequence[StepJob]) -> JobGroup | None:
    """The group when the batch is exactly one columnar message, rows in order; else None."""
    group = jobs[0].group
    if group is None or len(jobs) != len(group.outputs):
        return None
    for i, job in enumerate(jobs):
        if job.group is not group or job.index != i:
            return None
    return group


class Execution:
    """Runs one model version's batches (``ReadyQueue`` formed them) and completes their work."""

    def __init__(
        self,
        model: BatchedModel,
        queue: ReadyQueue,
        stats: BatchStats,
        commit: CommitHook | None,
        clock: Clock = time.perf_counter_ns,
    ):
        self.model = model
        self.queue = queue
        self.stats = stats
        self.commit = commit  # None: the model's sessions are never written while serving
        self.clock = clock
        self.feeder = Feeder(model.manifest)

    # ---- event loop: before --------------------------------------------------------------------------------
    def begin(self, batch: list[Session[SessionModel]]) -> tuple[list[StepJob], JobGroup | None, int]:
        """The batch's jobs, its group when it is one whole columnar message, and when it was taken."""
        jobs: list[StepJob] = [s.pending[0] for s in batch]  # type: ignore[misc]  # formation left steps there
        for session, job in zip(batch, jobs, strict=True):
            if job.num_steps > 1 and job.done == 0 and job.start_state is None:
                # A chunk about to start: remember where it began so a failure midway can roll back.
                job.start_state = self.model.slab.read(session.slot)
        return jobs, whole_group(jobs), self.clock()

    # ---- worker thread (or the event loop, inline) ---------------------------------------------------------
    def compute(
        self, batch: Sequence[Session[SessionModel]], jobs: Sequence[StepJob], group: JobGroup | None
    ) -> Computed:
        """Gather, run, commit, scatter (see the module's docstring); ``jobs``: the head of each session's queue."""
        clock = self.clock
        t0 = clock()
        model = self.model
        n = len(jobs)
        slots = np.fromiter((s.slot for s in batch), dtype=np.intp, count=n)
        feeds: dict[str, Any] = {}
        for spec in model.manifest.inputs:
            if group is not None:
                stacked = jobs[0].inputs[spec.name]  # the message's rows, first axis
                feeds[spec.name] = np.moveaxis(stacked, 0, spec.batch_axis) if spec.batch_axis else stacked
            else:
                feeds[spec.name] = np.stack([j.step_input(spec.name) for j in jobs], axis=spec.batch_axis)
        # States, context windows and per-session parameters share the slab; constants are fed as configured.
        self.feeder.feed(feeds, model.slab.gather(slots))
        feeds.update(model.constants)
        run_start = clock()
        out = model.runtime.run(feeds)
        run_end = clock()
        new_states = []
        for spec, dtype in zip(model.manifest.states, model.slab.dtypes, strict=False):
            value = out[spec.output]
            if value.shape[spec.batch_axis] != n or value.dtype != dtype:
                raise Internal(
                    f"model {model.key} returned state '{spec.output}' of shape {list(value.shape)} {value.dtype}"
                    f" for a batch of {n}; the manifest declares {spec.shape} {spec.dtype}"
                )
            new_states.append(value)
        new_states += self.feeder.next_windows(feeds)
        result = []
        for spec in model.manifest.outputs:
            value = out[spec.name]
            if value.shape[spec.batch_axis] != n:
                raise Internal(
                    f"model {model.key} returned output '{spec.name}' with a batch of "
                    f"{value.shape[spec.batch_axis]} for {n} sessions"
                )
            result.append(np.moveaxis(value, spec.batch_axis, 0) if spec.batch_axis else value)
        refused: set[int] = set()
        if self.commit is not None:
            # Before the scatter: a failed every-step write fails the batch with every state as it was.
            refused = self.commit.after_batch(CommittedBatch(model, batch, jobs, feeds, new_states, result))
        # Only a fully successful call touches the slab. Refused rows are scattered too, harmlessly: their
        # sessions are dropped, slots and all.
        model.slab.scatter(slots, new_states)
        return result, refused, clock() - t0, run_start, run_end

    # ---- event loop: after ---------------------------------------------------------------------------------
    def done(
        self,
        batch: list[Session[SessionModel]],
        jobs: list[StepJob],
        group: JobGroup | None,
        t0: int,
        computed: Computed,
        inline: bool = False,
    ) -> int:
        """The batch computed: count it and complete its steps. Returns when it ended (perf_counter_ns)."""
        per_output, refused, _, run_start, run_end = computed
        end = self.clock()
        queue_ns = sum(t0 - s.ready_since for s in batch)
        self.stats.record(len(batch), queue_ns, run_start - t0, run_end - run_start, end - run_end, end, len(refused))
        self.stats.inline += inline
        self.complete(batch, jobs, group if not refused else None, per_output, None, refused)
        return end

    def failed(self, batch: list[Session[SessionModel]], jobs: list[StepJob], exc: Exception) -> int:
        """The batch failed (the model, its results, or the commit hook): nothing of it applied."""
        error: RnnServeError
        if isinstance(exc, RnnServeError):
            error = exc
        else:
            log.exception("model %s failed on a batch of %d", self.model.key, len(batch))
            error = Internal(f"model {self.model.key} failed: {exc}")
        end = self.clock()
        self.stats.failed(len(batch), sum(end - s.ready_since for s in batch))
        self.complete(batch, jobs, None, [], error, set())
        return end

    def complete(
        self,
        batch: list[Session[SessionModel]],
        jobs: list[StepJob],
        group: JobGroup | None,
        per_output: list[np.ndarray],
        error: BaseException | None,
        refused: set[int],
    ) -> None:
        """Book each row's step on its session, answer it, and requeue or idle the session. ``group``: the
        batch is that whole columnar message, answered once with the outputs as the model returned them."""
        if group is not None:
            group.stacked = per_output
        queue = self.queue
        ready = queue.ready
        now = time.monotonic()
        ready_since = self.clock()
        for i, (session, job) in enumerate(zip(batch, jobs, strict=True)):
            if error is None and i not in refused:
                session.steps += 1
                job.done += 1
                if group is None or job.followers or job.step_index:
                    job.outputs.append([o[i] for o in per_output])
                if job.done == (job.num_steps or 1):
                    session.pending.popleft()
                    queue.queued_steps -= job.done
                    if job.step_index and session.replay is not None:
                        # Copies: views would keep the whole batch's output arrays alive.
                        session.applied(job, [[a.copy() for a in step] for step in job.outputs])
                    if group is None:
                        job.finish(session.steps)
                    else:
                        group.steps[i] = session.steps
                        if job.followers:
                            for follow in job.followers:
                                follow(job.outputs, session.steps, None)
            else:
                session.pending.popleft()
                queue.queued_steps -= job.num_steps or 1
                if error is None:
                    # Another replica advanced this session: nothing of this step applies here; the stale copy
                    # goes, and its queued steps fail with it (settle), so every one is retried from the store.
                    job.finish(error=SessionMoved(session.id))
                    assert self.commit is not None
                    self.commit.moved(session)
                else:
                    if job.done and job.start_state is not None:
                        # A chunk failed midway: put the session back where the chunk began.
                        self.model.slab.write(session.slot, job.start_state)
                        session.steps -= job.done
                    job.finish(error=error)
                    session.recount()
            session.last_used = now
            # ReadyQueue.settle, inlined for the common cases (this runs once per row of every batch).
            if session.closed:
                queue.settle(session)
            elif session.pending:
                session.ready_since = ready_since
                ready.append(session)
            else:
                session.scheduled = False
        if group is not None:
            group.remaining = 0
            resolve(group.future, group)
