"""Exactly-once steps: admit a step by its ``step_index``, answer a retry without stepping twice.

A client numbers each session's steps 1, 2, 3, ... (a chunk's index is that of its first step and covers
``num_steps`` indexes) so that it can resend a step whose answer it lost (a dropped connection, a deadline).
The check is made against ``session.next_index``, the index the next *queued* step gets, not against the
applied ``session.steps``: a pipelining client has several steps queued before the first one is applied.

- ``step_index == next_index``: queued; ``next_index`` advances at once (server/batcher.py recounts it when a
  queued step leaves the queue without applying: a model error, a closed session, a dropped unary step).
- An earlier index whose step is still queued or computing: the retry waits for that job and gets its result
  (a retry racing its original is the common case after a reconnect, so it is answered, not refused).
- An earlier index among the session's last ``--replay-window`` applied indexed steps: answered from
  ``session.replay`` with the original outputs and step count, without a model call.
- Anything else: FAILED_PRECONDITION naming the index the session expects.

A repeat must carry the same inputs (compared by a CRC-32 fingerprint) and ``num_steps``; otherwise it is a
different step reusing an index (e.g. two callers numbering one session) and is refused rather than answered
with another step's outputs. A step refused before it is queued (bad input, over a limit) consumes no index.
"""

from __future__ import annotations

import asyncio
import zlib
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from rnnserve.server.batcher import JobGroup, StepJob
from rnnserve.server.errors import FailedPrecondition

if TYPE_CHECKING:
    from rnnserve.server.sessions import Session

# A replay entry: (first step index, num_steps as sent (0: one step without a time axis), inputs fingerprint,
# per-step outputs in manifest order).
ReplayEntry = tuple[int, int, int, list[list[np.ndarray]]]
Earlier = StepJob | ReplayEntry


def fingerprint(inputs: Mapping[str, np.ndarray]) -> int:
    """CRC-32 of the inputs' bytes in name order: cheap, and enough to tell a retry from another step."""
    crc = 0
    for name in sorted(inputs):
        crc = zlib.crc32(memoryview(np.ascontiguousarray(inputs[name])).cast("B"), crc)
    return crc


def admit(session: Session, step_index: int, num_steps: int, print_: int) -> Earlier | None:
    """None when the step is the next one (queue it); else the earlier step it repeats. Raises
    FailedPrecondition for a gap, a repeat with other inputs, or a repeat too old to answer."""
    expected = session.next_index
    if step_index == expected:
        return None
    if step_index < expected:
        for job in reversed(session.pending):
            if type(job) is StepJob and job.step_index == step_index:
                _same(session, step_index, num_steps, print_, job.num_steps, job.fingerprint)
                return job
        for entry in reversed(session.replay or ()):
            if entry[0] == step_index:
                _same(session, step_index, num_steps, print_, entry[1], entry[2])
                return entry
        kept = len(session.replay or ())
        raise FailedPrecondition(
            f"session '{session.id}' expects step_index {expected} (got {step_index}): step {step_index} was "
            f"applied already and is not among the {kept} recent steps kept for retries (--replay-window)"
        )
    raise FailedPrecondition(f"session '{session.id}' expects step_index {expected} (got {step_index})")


def _same(session: Session, index: int, num_steps: int, print_: int, was_steps: int, was_print: int) -> None:
    if num_steps != was_steps or print_ != was_print:
        raise FailedPrecondition(
            f"session '{session.id}' expects step_index {session.next_index} (got {index}): step {index} was "
            "sent before with other inputs; number each session's steps from one place"
        )


def queued(session: Session, num_steps: int, step_index: int, window: int) -> None:
    """Book a step just queued: advance ``next_index``; an indexed step gives the session its replay cache."""
    session.next_index += num_steps or 1
    if step_index and session.replay is None and window:
        # Only sessions that number their steps pay for the cache.
        session.replay = deque(maxlen=window)


def answer(earlier: Earlier) -> asyncio.Future:
    """A future for ``DataPlane.step_result``: the queued job's result when it finishes, or the cached one."""
    future = asyncio.get_running_loop().create_future()
    if isinstance(earlier, StepJob):

        def follow(outputs: list[list[np.ndarray]], steps: int, error: BaseException | None) -> None:
            if future.done():
                return  # this retry's caller has gone too
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result((outputs, steps))

        _follow(earlier, follow)
    else:
        index, num_steps, _, outputs = earlier
        future.set_result((outputs, index + (num_steps or 1) - 1))
    return future


def answer_row(earlier: Earlier, group: JobGroup, row: int) -> None:
    """Answer row ``row`` of a StepBatch that repeats an earlier step."""
    if isinstance(earlier, StepJob):

        def follow(outputs: list[list[np.ndarray]], steps: int, error: BaseException | None) -> None:
            group.finish(row, None if error is not None else outputs[0], steps, error)

        _follow(earlier, follow)
    else:
        index, num_steps, _, outputs = earlier
        group.finish(row, outputs[0], index + (num_steps or 1) - 1, None)


def _follow(job: StepJob, follow) -> None:
    if job.followers is None:
        job.followers = []
    job.followers.append(follow)


def reset(session: Session, steps: int) -> None:
    """A reset or a snapshot restore queued: steps after it are numbered from ``steps + 1``."""
    session.next_index = steps + 1


def forget(session: Session) -> None:
    """The reset or restore applied: answers cached for the old numbering must not answer the new one."""
    if session.replay:
        session.replay.clear()
