"""A session: one client's stream of steps through one model version, and the exactly-once state it owns.

Exactly-once steps: a client numbers each session's steps 1, 2, 3, ... (a chunk's index is that of its first
step and covers ``num_steps`` indexes) so that it can resend a step whose answer it lost (a dropped
connection, a deadline). The check is made against ``next_index``, the index the next *queued* step gets, not
against the applied ``steps``: a pipelining client has several steps queued before the first one is applied.

- ``step_index == next_index``: queued; ``next_index`` advances at once (``recount`` sets it again when a
  queued step leaves the queue without applying: a model error, a closed session, a dropped unary step).
- An earlier index whose step is still queued or computing: the retry waits for that job and gets its result
  (a retry racing its original is the common case after a reconnect, so it is answered, not refused).
- An earlier index among the session's last ``--replay-window`` applied indexed steps: answered from the
  replay cache with the original outputs and step count, without a model call.
- Anything else: FAILED_PRECONDITION naming the index the session expects.

A repeat must carry the same inputs (compared by a CRC-32 fingerprint) and ``num_steps``; otherwise it is a
different step reusing an index (e.g. two callers numbering one session) and is refused rather than answered
with another step's outputs. A step refused before it is queued (bad input, over a limit) consumes no index.

Only this class's methods write ``next_index`` and ``replay``; the data plane admits and books steps, the
scheduler records applied ones and recounts, durability reads and restores the replay cache through them.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from rnnserve.server.core.work import Job, ReplayEntry, StepJob
from rnnserve.server.errors import FailedPrecondition


class SessionModel(Protocol):
    """What a session and the session table need of the model version a session runs on
    (server/models/model.py LoadedModel is one): its names, and a slab row to hold the session's state."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def key(self) -> str: ...  # "name:version"

    def acquire(self, state: list[np.ndarray] | None = None, parameters: list[np.ndarray] | None = None) -> int:
        """A slab row holding ``state`` (default: initial) and ``parameters`` (default: their defaults)."""
        ...

    def release(self, session: Session[Any]) -> None:
        """Free a closed session's row."""
        ...


M = TypeVar("M", bound=SessionModel, covariant=True)
"""The model type a session is of: its users above the core see the whole model, not just ``SessionModel``."""


class Session(Generic[M]):
    # Slots keep an idle session small: 100k of them must fit beside their state.
    __slots__ = (
        "closed",
        "id",
        "key",
        "last_used",
        "model",
        "next_index",
        "owner",
        "pending",
        "ready_since",
        "replay",
        "revision",
        "scheduled",
        "slot",
        "steps",
        "stored_at",
        "stored_steps",
    )

    def __init__(self, session_id: str, model: M, slot: int, steps: int = 0, owner: str | None = None, key: str = ""):
        self.id = session_id  # the client's id: every message and response shows this one
        self.key = key or session_id  # sessions.session_key(id) of the principal that opened it
        # The principal that opened it (auth on: only it may use the session), else the peer's host (for
        # --max-sessions-per-client only). None: not counted per client.
        self.owner = owner
        self.model = model
        self.slot = slot
        self.steps = steps
        # Exactly-once: the step_index the next queued step must carry, and the last applied indexed steps,
        # oldest first; None until the session's first indexed step (only sessions that number steps pay).
        self.next_index = steps + 1
        self.replay: deque[ReplayEntry] | None = None
        self.last_used = time.monotonic()
        self.pending: deque[Job] = deque()
        self.scheduled = False  # queued in, or being computed by, the scheduler
        self.ready_since = 0
        # False while open; once ended, why: "client" (CloseSession), "expired", "unloaded" or "moved".
        self.closed: bool | str = False
        # Durability (server/durability/persistence.py): the step count and time of the last write to the session
        # store, and the store's revision of the record as this server last wrote or read it (0: none; a
        # store.Unsure after a failed write; -1: no longer this server's to write). Only that module writes them.
        self.stored_steps = steps
        self.stored_at = self.last_used
        self.revision = 0

    # ---- exactly-once: admitting and booking steps (the data plane) ----------------------------------------
    def admit(self, step_index: int, num_steps: int, print_: int) -> StepJob | ReplayEntry | None:
        """None when the step is the next one (queue it, then ``queued``); else the earlier step it repeats,
        still queued or replayable. Raises FailedPrecondition for a gap, a repeat with other inputs, or a
        repeat too old to answer."""
        expected = self.next_index
        if step_index == expected:
            return None
        if step_index < expected:
            for job in reversed(self.pending):
                if job.step_index == step_index:  # a control job's is 0, never a step's
                    assert isinstance(job, StepJob)
                    self._same(step_index, num_steps, print_, job.num_steps, job.fingerprint)
                    return job
            if self.replay:
                entry: ReplayEntry  # (mypy reads deque.__reversed__ of a NamedTuple as Any)
                for entry in reversed(self.replay):
                    if entry.step_index == step_index:
                        self._same(step_index, num_steps, print_, entry.num_steps, entry.fingerprint)
                        return entry
            kept = len(self.replay or ())
            raise FailedPrecondition(
                f"session '{self.id}' expects step_index {expected} (got {step_index}): step {step_index} was "
                f"applied already and is not among the {kept} recent steps kept for retries (--replay-window)"
            )
        raise FailedPrecondition(f"session '{self.id}' expects step_index {expected} (got {step_index})")

    def _same(self, index: int, num_steps: int, print_: int, was_steps: int, was_print: int) -> None:
        if num_steps != was_steps or print_ != was_print:
            raise FailedPrecondition(
                f"session '{self.id}' expects step_index {self.next_index} (got {index}): step {index} was "
                "sent before with other inputs; number each session's steps from one place"
            )

    def queued(self, num_steps: int, step_index: int, window: int) -> None:
        """Book a step just queued: advance ``next_index``; an indexed step gives the session its replay cache
        of ``window`` entries."""
        self.next_index += num_steps or 1
        if step_index and self.replay is None and window:
            self.replay = deque(maxlen=window)

    def queued_step(self) -> None:
        """``queued`` for one unnumbered single step (a row of a columnar message)."""
        self.next_index += 1

    def renumber(self, steps: int) -> None:
        """A reset or a snapshot restore queued: steps after it are numbered from ``steps + 1``."""
        self.next_index = steps + 1

    def forget_replay(self) -> None:
        """The reset or restore applied: answers cached for the old numbering must not answer the new one."""
        if self.replay:
            self.replay.clear()

    # ---- exactly-once: applied and dropped steps (the scheduler) -------------------------------------------
    def applied(self, job: StepJob, outputs: list[list[np.ndarray]]) -> None:
        """Indexed ``job`` applied with ``outputs`` (copies, not views of a batch): keep them for retries."""
        if self.replay is not None:
            self.replay.append(ReplayEntry(job.step_index, job.num_steps, job.fingerprint, outputs))

    def recount(self) -> None:
        """Set ``next_index`` from the applied steps and what is still queued (after a job left the queue
        without applying)."""
        steps = self.steps
        for job in self.pending:
            steps = job.steps_after(steps)
        self.next_index = steps + 1

    # ---- exactly-once: the replay cache in the session store (durability) ---------------------------------
    def replay_entries(self, then: ReplayEntry | None = None) -> list[ReplayEntry]:
        """The replay cache, oldest first; with ``then``, as it will be once that entry is added."""
        entries = list(self.replay or ())
        if then is not None and self.replay is not None:
            entries.append(then)
            entries = entries[-(self.replay.maxlen or len(entries)) :]
        return entries

    def restore_replay(self, entries: Iterable[ReplayEntry], window: int) -> None:
        """A session restored from the store: its cached answers keep answering retries."""
        entries = list(entries)
        if entries and window:
            self.replay = deque(entries, maxlen=window)
