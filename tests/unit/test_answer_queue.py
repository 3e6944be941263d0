"""AnswerQueue (server/transport/pump.py): the ordered hand-off between a stream's reader and its writer."""

from __future__ import annotations

import asyncio

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


def test_an_idle_writer_wakes_when_an_item_arrives():
    async def main():
        queue = AnswerQueue(8)
        writer = await _idle_writer(queue)
        await queue.put("step 1")
        assert await asyncio.wait_for(writer, 1) == "step 1"

    run(main())


def test_drain_returns_what_was_never_answered():
    async def main():
        queue = AnswerQueue(8)
        for i in range(3):
            await queue.put(i)
        assert queue.drain() == [0, 1, 2]

    run(main())
