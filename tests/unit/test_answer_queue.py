"""AnswerQueue (server/transport/pump.py): the ordered hand-off between a stream's reader and its writer,
including the lent waiter that lets a lone step wake the writer once."""

from __future__ import annotations

import asyncio

import pytest

from rnnserve.server.transport.pump import AnswerQueue


def run(coro):
    return asyncio.run(coro)


async def _idle_writer(queue: AnswerQueue) -> asyncio.Task:
    writer = asyncio.get_running_loop().create_task(queue.get())
    await asyncio.sleep(0)  # the writer is now waiting for an item
    return writer


def test_items_come_out_in_order_and_the_reader_waits_for_room():
    async def main():
        queue = AnswerQueue(2)
        await queue.put(1)
        await queue.put(2)
        third = asyncio.get_running_loop().create_task(queue.put(3))
        await asyncio.sleep(0.01)
        assert not third.done()  # full: backpressure
        assert await queue.get() == 1
        await asyncio.wait_for(third, 1)
        assert [await queue.get(), await queue.get()] == [2, 3]

    run(main())


def test_a_lent_waiter_wakes_the_writer_only_when_its_step_completes():
    async def main():
        queue = AnswerQueue(8)
        writer = await _idle_writer(queue)
        waiter = queue.take_waiter()
        assert waiter is not None and queue.take_waiter() is None  # lent once
        await queue.put("step 1", waiter_used=True)
        await queue.put("step 2")  # pipelined behind it: must not complete step 1's future
        await asyncio.sleep(0.01)
        assert not writer.done() and not waiter.done()
        waiter.set_result(("outputs", 1))  # what the batcher does when step 1 is computed
        assert await asyncio.wait_for(writer, 1) == "step 1"
        assert await queue.get() == "step 2"

    run(main())


def test_a_lent_waiter_the_step_did_not_keep_still_wakes_the_writer():
    async def main():
        queue = AnswerQueue(8)
        writer = await _idle_writer(queue)
        assert queue.take_waiter() is not None
        await queue.put("refused step")  # the submission failed: its future was not queued
        assert await asyncio.wait_for(writer, 1) == "refused step"

    run(main())


def test_a_failed_step_behind_a_lent_waiter_is_still_handed_over():
    async def main():
        queue = AnswerQueue(8)
        writer = await _idle_writer(queue)
        waiter = queue.take_waiter()
        await queue.put("failing step", waiter_used=True)
        waiter.set_exception(ValueError("model failed"))
        assert await asyncio.wait_for(writer, 1) == "failing step"
        with pytest.raises(ValueError):
            await waiter  # the item's own future still holds the error for the writer to report

    run(main())


def test_drain_returns_what_was_never_answered():
    async def main():
        queue = AnswerQueue(8)
        for i in range(3):
            await queue.put(i)
        assert queue.drain() == [0, 1, 2]
        assert queue.take_waiter() is None  # no writer waiting

    run(main())
