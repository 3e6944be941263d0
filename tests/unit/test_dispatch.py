"""Dispatch (server/scheduling/dispatch.py): which batches run on the event loop. Only small batches of a CPU
model whose batches never wait on the store, once measured quick on a worker thread, with nothing else of the
model computing and the model lightly loaded; everything else on worker threads."""

from __future__ import annotations

import asyncio
import threading

from rnnserve.server.scheduling.dispatch import INLINE_MAX, InlineSmall, Threads, dispatch_for

MS = 1_000_000  # ns


def _choose(**kw: object) -> Threads:
    settings: dict = {"cpu": True, "store_round_trip": False, "inline_max": INLINE_MAX, "budget_ns": MS, **kw}
    return dispatch_for(1, "test", **settings)


def test_the_dispatch_is_chosen_once_for_the_model() -> None:
    chosen = [
        _choose(),
        _choose(cpu=False),  # a GPU's small batches are kernel launches, not measured
        _choose(store_round_trip=True),  # every-step durability: a store round trip per batch
        _choose(budget_ns=0),  # --inline-budget-us 0
        _choose(inline_max=0),
    ]
    try:
        assert [type(d) for d in chosen] == [InlineSmall, Threads, Threads, Threads, Threads]
        assert not any(d.inline(1, 1) for d in chosen[1:])
    finally:
        for d in chosen:
            d.close()


def test_small_batches_go_inline_only_once_measured_quick_and_alone() -> None:
    d = InlineSmall(1, "test", inline_max=4, budget_ns=MS)
    try:
        assert not d.inline(1, 1)  # nothing measured yet: the first batches run on a worker thread
        d.measured(1, MS // 10, end_ns=10 * MS)
        d.measured(1, MS // 10, end_ns=20 * MS)  # computing 1% of the time
        assert d.inline(1, 1) and d.inline(4, 1)
        assert not d.inline(5, 1)  # larger than inline_max
        assert not d.inline(1, 2)  # another batch of the model computes
        d.measured(8, 50 * MS, end_ns=30 * MS)  # a large batch's time does not count as a small one's
        assert d.inline(1, 1)
    finally:
        d.close()


def test_slow_or_busy_models_keep_their_worker_threads() -> None:
    slow = InlineSmall(1, "test", inline_max=4, budget_ns=MS)
    busy = InlineSmall(1, "test", inline_max=4, budget_ns=MS)
    try:
        end = 0
        for _ in range(8):
            end += 3 * MS
            slow.measured(1, 2 * MS, end_ns=end)  # over the budget
        assert not slow.inline(1, 1)
        end = 0
        for _ in range(20):
            end += MS // 5
            busy.measured(1, MS // 5, end_ns=end)  # computing all of the time
        assert not busy.inline(1, 1)
        for _ in range(40):
            end += 10 * MS
            busy.measured(1, MS // 5, end_ns=end)  # the load went away
        assert busy.inline(1, 1)
    finally:
        slow.close()
        busy.close()


def test_a_batch_dispatched_to_threads_runs_off_the_event_loop() -> None:
    async def main() -> None:
        d = Threads(1, "test-model")
        try:
            name = await d.call(lambda: threading.current_thread().name)
            assert name.startswith("test-model") and name != threading.current_thread().name
        finally:
            d.close()

    asyncio.run(main())
