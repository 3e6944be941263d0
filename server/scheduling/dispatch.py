"""Dispatch: where a formed batch computes, chosen once per model version when its batcher is built.

- ``Threads``: every batch on a worker thread, up to ``concurrency`` of them at once (over disjoint sessions);
  the event loop forms the next batch while one computes.
- ``InlineSmall``: as ``Threads``, but a small batch (at most ``inline_max`` sessions) with no other batch of
  the model computing runs right on the event loop, while such batches take under ``budget_ns`` and the model
  is lightly loaded. Its model call is then shorter than the two cross-thread wakeups (to a worker and back) it
  would otherwise pay, which is most of a lone session's step latency; steps arriving meanwhile form the next
  batch. Only for a CPU model whose batches never wait on the session store (an every-step write is a network
  round trip, which must not stall the event loop; a GPU's small batches are kernel launches, not measured).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

INLINE_MAX = 4
"""Batches of at most this many sessions may run on the event loop (``InlineSmall``); 0: never."""
INLINE_BUSY = 0.5
"""... while the model computes less than this share of the time (a light load)."""
INLINE_BUDGET_NS = 1_000_000
"""A model whose small batches take longer than this runs them on a worker thread: the event loop must not
stall for long (other streams, health checks and the other models wait on it). --inline-budget-us sets it."""

T = TypeVar("T")


class Threads:
    """Every batch on a worker thread."""

    def __init__(self, concurrency: int, name: str):
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=name)

    def inline(self, size: int, computing: int) -> bool:
        """Whether a batch of ``size`` sessions runs on the event loop; ``computing``: batches of the model
        dispatched and not completed, this one included."""
        return False

    def measured(self, size: int, model_ns: int, end_ns: int) -> None:
        """A batch of ``size`` sessions ended at ``end_ns`` (perf_counter_ns), its model call having taken
        ``model_ns`` (0: it failed)."""

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn`` on a worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=True)


class InlineSmall(Threads):
    """Small batches on the event loop while they are quick and the model is lightly loaded; the rest on
    worker threads (see the module's docstring)."""

    def __init__(self, concurrency: int, name: str, *, inline_max: int = INLINE_MAX, budget_ns: int = INLINE_BUDGET_NS):
        super().__init__(concurrency, name)
        self.inline_max = inline_max
        self.budget_ns = budget_ns
        # Moving average of small batches' model call time (ns); 0 until one ran on a worker thread.
        self._small_ns = 0
        # Moving average of the share of time the model spends computing (per batch: its model time over the
        # time since the previous batch ended), and when the last batch ended.
        self._busy = 0.0
        self._last_end_ns = 0

    def inline(self, size: int, computing: int) -> bool:
        return (
            computing == 1
            and size <= self.inline_max
            and 0 < self._small_ns < self.budget_ns
            # A model busy most of the time has steps arriving while it computes: on a worker thread they queue
            # up meanwhile and form the next batch, where inline calls would keep every batch at one step.
            and self._busy < INLINE_BUSY
        )

    def measured(self, size: int, model_ns: int, end_ns: int) -> None:
        if self._last_end_ns and model_ns:
            busy = min(1.0, model_ns / max(end_ns - self._last_end_ns, 1))
            self._busy += (busy - self._busy) / 8
        self._last_end_ns = end_ns
        if model_ns and size <= self.inline_max:
            # The call itself, without the thread hops around it: what running it inline would cost.
            self._small_ns = model_ns if not self._small_ns else (7 * self._small_ns + model_ns) // 8


def dispatch_for(
    concurrency: int, name: str, *, cpu: bool, store_round_trip: bool, inline_max: int, budget_ns: int
) -> Threads:
    """The dispatch of a model version: ``cpu``: its runtime computes on the CPU; ``store_round_trip``: its
    batches wait on the session store (every-step durability)."""
    if cpu and not store_round_trip and inline_max > 0 and budget_ns > 0:
        return InlineSmall(concurrency, name, inline_max=inline_max, budget_ns=budget_ns)
    return Threads(concurrency, name)
