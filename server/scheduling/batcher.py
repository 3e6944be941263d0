"""Cross-session dynamic batching for one model version: the loop that ties formation, dispatch and
execution together.

Sessions with work wait in the ``ReadyQueue`` (server/scheduling/formation.py), which also decides when the
next batch goes and which sessions it takes; the ``Execution`` (server/scheduling/execution.py) runs a batch
and completes its steps; the dispatch (server/scheduling/dispatch.py), chosen when the batcher is built, runs
it on a worker thread or, for a small quick batch, right on the event loop. Up to ``concurrency`` batches
(over disjoint sessions) compute at once; the next batch forms while the current one computes.

Control jobs (read, write or reset a session's state) wait in the same per-session FIFO as steps, so they
apply at a definite point between steps. Exactly-once bookkeeping is the session's own
(server/core/session.py): a failed or dropped step has it recount its next index, an applied indexed step is
kept in its replay cache.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from rnnserve.server.core.work import Job, StepJob
from rnnserve.server.scheduling.dispatch import INLINE_BUDGET_NS, INLINE_MAX, dispatch_for
from rnnserve.server.scheduling.execution import BatchedModel, Execution
from rnnserve.server.scheduling.formation import ReadyQueue
from rnnserve.server.scheduling.stats import BatchStats

if TYPE_CHECKING:
    from rnnserve.server.core.session import Session, SessionModel


class Batcher:
    # Submission (event loop) goes straight to the ready queue, which wakes the loop: no extra call per step.
    enqueue: Callable[[Session[SessionModel], Job], None]
    enqueue_rows: Callable[[Sequence[Session[SessionModel]], Sequence[StepJob]], None]

    def __init__(
        self,
        model: BatchedModel,
        *,
        max_batch_size: int,
        max_queue_delay_us: int,
        concurrency: int = 1,
        inline_max: int = INLINE_MAX,
        inline_budget_ns: int = INLINE_BUDGET_NS,
    ):
        self.model = model
        self.stats = BatchStats()
        self._wakeup = asyncio.Event()
        self.queue = ReadyQueue(
            max_batch_size=max_batch_size,
            max_queue_delay_us=max_queue_delay_us,
            concurrency=concurrency,
            free_inputs=[s.name for s in model.manifest.inputs if -1 in s.session_shape],
            settings=model.settings if any(not p.batched for p in model.manifest.parameters) else None,
            release=model.release,
            wake=self._wakeup.set,
        )
        self.enqueue = self.queue.enqueue
        self.enqueue_rows = self.queue.enqueue_rows
        persistence = model.persistence
        durable = persistence is not None and model.durability.mode != "none"
        self.execution = Execution(model, self.queue, self.stats, persistence if durable else None)
        self.dispatch = dispatch_for(
            concurrency,
            f"model-{model.key}",
            cpu=model.runtime.device == "cpu",
            store_round_trip=durable and model.durability.mode == "every-step",
            inline_max=inline_max,
            budget_ns=inline_budget_ns,
        )
        self._slots = asyncio.Semaphore(concurrency)
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._computing = 0  # batches dispatched and not yet completed

    @property
    def queued_steps(self) -> int:
        """Steps queued or computing across all sessions (the data plane's --max-queued-steps check)."""
        return self.queue.queued_steps

    # ---- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.model.key}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        self.dispatch.close()

    # ---- the loop -------------------------------------------------------------------------------------
    async def _run(self) -> None:
        queue = self.queue
        wakeup = self._wakeup
        while True:
            while not queue.ready:
                wakeup.clear()
                await wakeup.wait()
            await self._slots.acquire()
            while (left := queue.wait(self._computing)) != 0:
                wakeup.clear()
                if left is None:
                    await wakeup.wait()
                    continue
                try:
                    await asyncio.wait_for(wakeup.wait(), left)
                except TimeoutError:
                    break
            batch = queue.take(self._computing)
            if not batch:
                self._slots.release()
                continue
            self._computing += 1
            if self.dispatch.inline(len(batch), self._computing):
                # Right here, on the event loop: steps arriving meanwhile form the next batch (dispatch.py).
                self._execute_inline(batch)
                continue
            task = asyncio.get_running_loop().create_task(self._execute(batch))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    def _execute_inline(self, batch: list[Session[SessionModel]]) -> None:
        execution = self.execution
        try:
            jobs, group, t0 = execution.begin(batch)
            try:
                computed = execution.compute(batch, jobs, group)
            except Exception as exc:
                self.dispatch.measured(len(batch), 0, execution.failed(batch, jobs, exc))
            else:
                self.dispatch.measured(len(batch), computed[2], execution.done(batch, jobs, group, t0, computed, True))
        finally:
            self._computing -= 1
            self._slots.release()

    async def _execute(self, batch: list[Session[SessionModel]]) -> None:
        execution = self.execution
        try:
            jobs, group, t0 = execution.begin(batch)
            try:
                computed = await self.dispatch.call(execution.compute, batch, jobs, group)
            except Exception as exc:
                self.dispatch.measured(len(batch), 0, execution.failed(batch, jobs, exc))
            else:
                self.dispatch.measured(len(batch), computed[2], execution.done(batch, jobs, group, t0, computed))
        finally:
            self._computing -= 1
            self._slots.release()
            self._wakeup.set()
