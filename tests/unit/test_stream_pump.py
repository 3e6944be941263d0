"""The stream pump (server/transport/pump.py) both streaming services run, without sockets: a codec of numbers
whose work completes when the test says, and a stand-in for grpc's servicer context that records the status."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from rnnserve.server.errors import InvalidArgument, NotFound
from rnnserve.server.transport.pump import pump


class Context:
    """What the pump uses of grpc's ServicerContext: the status it ends a stream with."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


class Numbers:
    """A codec for a stream of decimal numbers: each one's work is a future the test completes (``done``);
    its answer is the number squared. ``b"bad"`` ends the stream; a negative number's answer fails."""

    def __init__(self) -> None:
        self.work: dict[int, asyncio.Future] = {}
        self.received: list[int] = []
        self.dropped: list[int] = []
        self.ended_with: list[grpc.StatusCode] = []

    def receive(self, raw: bytes) -> tuple[int, None]:
        if raw == b"bad":
            raise InvalidArgument("not a number")
        self.received.append(int(raw))
        return int(raw), None

    def submit(self, n: int) -> int:
        self.work[n] = asyncio.get_running_loop().create_future()
        return n

    async def answer(self, n: int) -> int:
        await self.work[n]
        if n < 0:
            raise NotFound(f"{n} is negative")
        return n * n

    def failed(self, n: int, exc: Exception) -> str:
        return f"{n}: {exc}"

    def drop(self, n: int) -> None:
        self.dropped.append(n)

    def ended(self, code: grpc.StatusCode) -> None:
        self.ended_with.append(code)

    def done(self, n: int) -> None:
        self.work[n].set_result(None)


class Requests:
    """A client's side of the stream: messages the test sends one at a time, then a half-close."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.read = 0

    def send(self, *messages: bytes | None) -> None:
        for m in messages:
            self.queue.put_nowait(m)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        item = await self.queue.get()
        if item is None:
            raise StopAsyncIteration
        self.read += 1
        return item


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def run(coro) -> None:
    asyncio.run(asyncio.wait_for(coro, 10))


async def started(codec: Numbers, *messages: bytes | None, limit: int = 8):
    """A stream of ``messages`` through the pump, its writer waiting for the first answer."""
    requests, context = Requests(), Context()
    requests.send(*messages)
    stream = pump(requests, context, lambda _: codec, limit)
    first = asyncio.ensure_future(anext(stream))
    await settle()
    return stream, context, first


def test_answers_come_in_arrival_order_whatever_order_the_work_finishes_in() -> None:
    async def main() -> None:
        codec = Numbers()
        stream, context, first = await started(codec, b"1", b"2", b"3", None)
        assert codec.received == [1, 2, 3]  # all queued while none is answered: they batch together
        codec.done(3)
        codec.done(2)
        await settle()
        assert not first.done()  # 1 is not done: nothing is written before it
        codec.done(1)
        assert [await first, await anext(stream), await anext(stream)] == [1, 4, 9]
        with pytest.raises(StopAsyncIteration):
            await anext(stream)
        assert context.code is None and codec.dropped == []

    run(main())


def test_past_the_limit_of_unanswered_messages_the_reader_stops_reading() -> None:
    async def main() -> None:
        codec = Numbers()
        stream, _, first = await started(codec, *(str(i).encode() for i in range(1, 8)), limit=2)
        # 1 is being answered, 2 and 3 wait in the queue (the limit), 4 is read and waits for room.
        assert codec.received == [1, 2, 3, 4]
        codec.done(1)
        assert await first == 1
        await settle()
        assert codec.received == [1, 2, 3, 4]  # nothing answered is taken off the queue until written
        second = asyncio.ensure_future(anext(stream))
        await settle()
        assert codec.received == [1, 2, 3, 4, 5]
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second

    run(main())


def test_a_message_refused_by_its_codec_ends_the_stream_with_its_status_after_the_answers_before_it() -> None:
    async def main() -> None:
        codec = Numbers()
        stream, context, first = await started(codec, b"2", b"bad", b"3")
        codec.done(2)
        assert await first == 4
        with pytest.raises(StopAsyncIteration):
            await anext(stream)
        assert context.code == grpc.StatusCode.INVALID_ARGUMENT and context.details == "not a number"
        assert codec.ended_with == [grpc.StatusCode.INVALID_ARGUMENT]
        assert codec.received == [2]  # nothing after the refused message is read

    run(main())


def test_a_failed_answer_is_answered_by_the_codec_and_the_stream_goes_on() -> None:
    async def main() -> None:
        codec = Numbers()
        stream, context, first = await started(codec, b"-2", b"3", None)
        codec.done(-2)
        codec.done(3)
        assert [await first] + [r async for r in stream] == ["-2: -2 is negative", 9]
        assert context.code is None

    run(main())


def test_when_the_client_leaves_every_unanswered_message_is_dropped_once() -> None:
    async def main() -> None:
        codec = Numbers()
        _, _, writer = await started(codec, b"1", b"2", b"3")
        writer.cancel()  # grpc cancels the handler when the client goes away
        with pytest.raises(asyncio.CancelledError):
            await writer
        await settle()
        # 1 was being answered, 2 and 3 were queued: each is the codec's to observe, once.
        assert sorted(codec.dropped) == [1, 2, 3]

    run(main())
