"""Work units between the data plane and the scheduler, and the shape their results come back in.

A *work unit* is one session's next piece of work: a ``StepJob`` (one timestep, or a chunk of consecutive
timesteps) or a ``ControlJob`` (read, write or reset the session's state between two steps). Every wire form
becomes these: a native Step or list-form stream step is one ``StepJob``; a StepBatch message (or a list-form
message grouped into one) is a ``StepJob`` per row sharing a ``JobGroup``; a KServe sequence step is one
``StepJob`` fed already-checked inputs.

The result of a ``StepJob`` is one shape, ``StepOutcome``: ``(per-step outputs in manifest order, the
session's step count)``, whether the step ran, was answered from the replay cache (``ReplayEntry``) or
followed an earlier copy of itself still queued. A group is answered once, for all its rows: each row's step
count and error, and its outputs either per row (``JobGroup.outputs``) or, when the whole message ran as one
batch, as the model returned them for all rows (``JobGroup.stacked``), so a codec encodes them as they are.

No grpc and no protobuf here: the transport's codecs build these, the scheduler runs them.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

StepOutcome = tuple[list[list[np.ndarray]], int]
"""A finished step's result: its outputs per timestep (one entry for a single step), each in manifest order,
and the session's step count after it. A plain tuple: one is built per step on the hot path."""


class StepResult(NamedTuple):
    """A finished step's outputs by name (stacked over time for a chunk) and the session's step count."""

    outputs: dict[str, np.ndarray]
    steps: int

    @classmethod
    def of(cls, names: list[str], done: StepOutcome, num_steps: int) -> StepResult:
        """Name a step's outcome (its future's value, or a group row's ``JobGroup.outcome``); ``names``: the
        model's outputs in manifest order; ``num_steps``: as the step was sent (0: no time axis)."""
        per_step, steps = done
        if num_steps:
            return cls({n: np.stack([s[i] for s in per_step]) for i, n in enumerate(names)}, steps)
        return cls(dict(zip(names, per_step[0], strict=True)), steps)


class ReplayEntry(NamedTuple):
    """An applied indexed step, kept to answer its retries (the session's replay window, and the store)."""

    step_index: int  # the (first) step index
    num_steps: int  # as sent: 0 for one step without a time axis
    fingerprint: int  # of its inputs (``fingerprint``)
    outputs: list[list[np.ndarray]]  # per step, in manifest order

    def outcome(self) -> StepOutcome:
        return self.outputs, self.step_index + (self.num_steps or 1) - 1


def fingerprint(inputs: Mapping[str, np.ndarray]) -> int:
    """CRC-32 of the inputs' bytes in name order: cheap, and enough to tell a retry from another step."""
    crc = 0
    for name in sorted(inputs):
        arr = np.ascontiguousarray(inputs[name])
        if arr.size:  # an empty one has no bytes (and a view of it cannot be cast to bytes)
            crc = zlib.crc32(arr.data.cast("B"), crc)
    return crc


def resolve(future: asyncio.Future[Any], result: Any = None, error: BaseException | None = None) -> None:
    """Complete ``future`` unless its caller has gone (a cancelled RPC): the work still ran, nobody reads it."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class JobGroup:
    """The rows of one message (a StepBatch, or a list-form message run as one): answered together through
    one future and a countdown, rather than a future per row (the columnar fast path)."""

    __slots__ = ("errors", "future", "outputs", "remaining", "stacked", "steps")

    def __init__(self, size: int, future: asyncio.Future[Any]):
        self.future = future
        self.remaining = size
        self.outputs: list[list[np.ndarray] | None] = [None] * size
        self.steps = [0] * size
        self.errors: dict[int, BaseException] = {}
        # Set when the whole group ran as one batch, rows in order: each output as the model returned it,
        # batch axis first, so a codec encodes it as is (``outputs`` then stays unset).
        self.stacked: list[np.ndarray] | None = None

    def finish(self, index: int, outputs: list[np.ndarray] | None, steps: int, error: BaseException | None) -> None:
        if error is not None:
            self.errors[index] = error
        else:
            self.outputs[index] = outputs
            self.steps[index] = steps
        self.remaining -= 1
        if self.remaining == 0:
            resolve(self.future, self)

    def answer_row(self, index: int, earlier: StepJob | ReplayEntry) -> None:
        """Answer row ``index``, which repeats an earlier step, with that step's result."""
        if isinstance(earlier, StepJob):

            def follow(outputs: list[list[np.ndarray]], steps: int, error: BaseException | None) -> None:
                self.finish(index, None if error is not None else outputs[0], steps, error)

            earlier.follow(follow)
        else:
            outputs, steps = earlier.outcome()
            self.finish(index, outputs[0], steps, None)


Follower = Callable[[list[list[np.ndarray]], int, BaseException | None], None]
"""Called with a finished job's per-step outputs, the session's step count and its error (None on success)."""


class StepJob:
    """One timestep, or a chunk of ``num_steps`` consecutive timesteps, of one session. The job sits in its
    session's queue (``Session.pending``) and holds no reference back: whoever takes it knows the session."""

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
        "start_state",
        "step_index",
    )

    # A control job's is 0 too: code walking a session's queue by index needs no type test.
    step_index: int

    def __init__(
        self,
        inputs: Mapping[str, np.ndarray],
        num_steps: int,
        future: asyncio.Future[Any] | None,
        group: JobGroup | None = None,
        index: int = 0,
        step_index: int = 0,
        fingerprint: int = 0,
        keep: bool = False,
    ):
        self.inputs = inputs
        self.num_steps = num_steps  # 0: a single step without a time axis
        self.done = 0
        self.outputs: list[list[np.ndarray]] = []
        self.future = future  # None when the job belongs to a group
        self.group = group
        self.index = index
        self.start_state: list[Any] | None = None  # for rolling a failed chunk back
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
            assert self.future is not None
            resolve(self.future, None if error is not None else (self.outputs, steps), error)
        if self.followers:
            for follow in self.followers:
                follow(self.outputs, steps, error)

    def follow(self, follower: Follower) -> None:
        """Give ``follower`` this job's result too (a retry of it, arriving while it is queued)."""
        if self.followers is None:
            self.followers = []
        self.followers.append(follower)

    def steps_after(self, steps: int) -> int:
        """The session's step count once this job applied, from ``steps`` before what is left of it."""
        return steps + self.total - self.done

    @property
    def total(self) -> int:
        return self.num_steps or 1

    def step_input(self, name: str) -> np.ndarray:
        arr = self.inputs[name]
        if self.group is not None:
            arr = arr[self.index]  # a group row: the inputs are the message's stacked tensors
        elif self.num_steps:
            arr = arr[self.done]
        return arr


class ControlJob:
    """A state operation that must run between two steps of the session (on the event loop)."""

    __slots__ = ("fn", "future", "steps")

    step_index = 0  # never an indexed step (see StepJob.step_index)

    def __init__(self, fn: Callable[[], Any], future: asyncio.Future[Any], steps: int | None = None):
        self.fn = fn
        self.future = future
        self.steps = steps  # the session's step count once it ran (a reset: 0); None: unchanged

    def steps_after(self, steps: int) -> int:
        return steps if self.steps is None else self.steps


Job = StepJob | ControlJob


def answer(earlier: StepJob | ReplayEntry) -> asyncio.Future[StepOutcome]:
    """A future with the ``StepOutcome`` of ``earlier``: the queued job's result once it finishes, or the one
    the replay cache kept."""
    future: asyncio.Future[StepOutcome] = asyncio.get_running_loop().create_future()
    if isinstance(earlier, StepJob):

        def follow(outputs: list[list[np.ndarray]], steps: int, error: BaseException | None) -> None:
            resolve(future, (outputs, steps), error)  # this retry's caller may have gone too

        earlier.follow(follow)
    else:
        future.set_result(earlier.outcome())
    return future
