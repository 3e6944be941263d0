"""The one stream pump both streaming services run (StreamStep and ModelStreamInfer): a reader task turns each
arriving message into queued work, and the handler writes the answers in arrival order.

The reader queues each message's work as soon as it arrives (so the steps of different messages batch
together) and appends it to an ``AnswerQueue``; the handler answers from its head, in order. Past ``limit``
unanswered messages the reader waits: the stream's backpressure. What a message means, how its work is
queued and how its answer reads is its service's codec's (``StreamCodec``).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc

from rnnserve.server.transport.status import end_with

Message = TypeVar("Message")
Item = TypeVar("Item")
Response = TypeVar("Response")
Response_co = TypeVar("Response_co", covariant=True)


class AnswerQueue:
    """An ordered, bounded hand-off from a stream's reader task to its writer (one of each)."""

    def __init__(self, limit: int):
        self._items: deque[Any] = deque()
        self._limit = max(1, limit)
        self._loop = asyncio.get_running_loop()
        self._writer: asyncio.Future | None = None  # the writer waits on it for an item
        self._reader: asyncio.Future | None = None  # the reader waits on it for room

    async def put(self, item: Any) -> None:
        """Append ``item`` (waiting while the queue is full) and wake the writer."""
        try:
            while len(self._items) >= self._limit:
                self._reader = self._loop.create_future()
                await self._reader
        except asyncio.CancelledError:
            self._items.append(item)  # the stream is ending (``close``): its work is handed over with the rest
            raise
        self._items.append(item)
        writer = self._writer
        if writer is not None and not writer.done():
            writer.set_result(None)

    async def get(self) -> Any:
        while not self._items:
            self._writer = self._loop.create_future()
            try:
                await self._writer
            finally:
                self._writer = None
        item = self._items.popleft()
        reader = self._reader
        if reader is not None and not reader.done():
            self._reader = None
            reader.set_result(None)
        return item

    def drain(self) -> list[Any]:
        """Everything not yet answered (the client left)."""
        items = list(self._items)
        self._items.clear()
        return items

    def close(self, reader: asyncio.Task, drop: Callable[[Any], None]) -> None:
        """The stream ended (the client left, or its status is out): stop ``reader`` and, once it has
        stopped, hand each unanswered item to ``drop``."""
        reader.cancel()

        def dropped(_: asyncio.Task) -> None:
            for item in self.drain():
                drop(item)

        reader.add_done_callback(dropped)


def observe(pending: Awaitable[Any] | None) -> None:
    """Read the outcome of a step nobody will answer (its stream's client left), once it is done: the step
    still applies, and asyncio would log an error left unread ("Future exception was never retrieved").
    A coroutine (a response still to build around a step's future) runs to its end for the same reason."""
    if pending is None:
        return
    if asyncio.iscoroutine(pending):
        if inspect.getcoroutinestate(pending) == inspect.CORO_CLOSED:  # its stream's writer was awaiting it
            return
        pending = asyncio.ensure_future(pending)
    if isinstance(pending, asyncio.Future):
        pending.add_done_callback(_read_outcome)


def _read_outcome(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


class StreamCodec(Protocol[Message, Item, Response_co]):
    """One streaming service's side of the pump: wire messages to queued work and back to responses."""

    def receive(self, raw: bytes) -> tuple[Message, Awaitable[Any] | None]:
        """Decode one message; what it raises ends the stream with its status. The awaitable, if any, runs
        before the message's work is queued (sessions to load from the session store first)."""
        ...

    def submit(self, message: Message) -> Item:
        """Queue the message's work now and return what the writer answers it from. Never raises: a refusal
        is answered in the item."""
        ...

    def answer(self, item: Item) -> Awaitable[Response_co]:
        """The message's response, once its work is done."""
        ...

    def failed(self, item: Item, exc: Exception) -> Response_co:
        """The response for a message whose ``answer`` raised (the stream goes on)."""
        ...

    def drop(self, item: Item) -> None:
        """Nobody will read this message's answer (the client left): its accepted work still applies; read its
        outcome once done (``observe``)."""
        ...

    def ended(self, code: grpc.StatusCode) -> None:
        """The stream ends with this status (for the refusal counts)."""
        ...


class _Ended:
    """The reader's last item when the stream must end with an error's status."""

    __slots__ = ("error",)

    def __init__(self, error: Exception):
        self.error = error


_DONE = object()  # the reader's last item when the client half-closed the stream


async def pump(
    requests: AsyncIterator[bytes],
    context: grpc.aio.ServicerContext,
    codec_for: Callable[[grpc.aio.ServicerContext], StreamCodec[Message, Item, Response]],
    limit: int,
) -> AsyncIterator[Response]:
    """Answer a bidirectional stream of ``requests`` in order through the stream's codec (``codec_for`` its
    context), at most ``limit`` messages unanswered."""
    codec = codec_for(context)
    queue = AnswerQueue(limit)
    reader = asyncio.get_running_loop().create_task(_read(requests, codec, queue))
    answering: Any = None  # the item whose answer the writer awaits
    try:
        while (item := await queue.get()) is not _DONE:
            if type(item) is _Ended:
                codec.ended(end_with(context, item.error))
                return
            answering = item
            try:
                response = await codec.answer(item)
            except Exception as exc:  # one message's failure does not end the stream
                response = codec.failed(item, exc)
            answering = None
            yield response
    finally:
        # The stream ended: what its client will never read still applies, and an error of it is nobody's to
        # report.
        if answering is not None:
            codec.drop(answering)
        queue.close(reader, functools.partial(_drop, codec))


def stream_handler(
    codec_for: Callable[[grpc.aio.ServicerContext], StreamCodec[Message, Item, Response]], limit: int
) -> Callable[[AsyncIterator[bytes], grpc.aio.ServicerContext], AsyncIterator[Response]]:
    """``pump`` as a grpc stream handler: a partial of the async generator function, which grpc takes for one
    (a generator wrapping ``pump`` would cost a hop per message)."""
    return functools.partial(pump, codec_for=codec_for, limit=limit)


def _drop(codec: StreamCodec, item: object) -> None:
    if item is not _DONE and type(item) is not _Ended:
        codec.drop(item)


async def _read(requests: AsyncIterator[bytes], codec: StreamCodec, queue: AnswerQueue) -> None:
    try:
        async for raw in requests:
            message, before = codec.receive(raw)
            if before is not None:  # (no await per message when there is nothing to wait for)
                await before
            await queue.put(codec.submit(message))
        await queue.put(_DONE)
    except Exception as exc:  # the message or the transport failed: the stream ends with its status
        await queue.put(_Ended(exc))
