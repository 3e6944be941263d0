"""A bidirectional stream's answers in arrival order: what both streaming servicers share.

The stream's reader task queues each message's work as soon as it arrives (so the steps of different messages
batch together) and appends it here; the handler writes the answers from the head, in order. Past ``limit``
unanswered entries the reader waits: the stream's backpressure.

A lock-step client (one message in flight, the usual case) costs one event-loop wakeup of the writer per
message, not two: while the writer waits for work, the reader may take the writer's own wait future
(``take_waiter``) and queue the step with it as the step's future, so the writer wakes when the step's result
is there rather than once when the step is queued and again when it is done.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any


class AnswerQueue:
    """An ordered, bounded hand-off from a stream's reader task to its writer (one of each)."""

    def __init__(self, limit: int):
        self._items: deque[Any] = deque()
        self._limit = max(1, limit)
        self._loop = asyncio.get_running_loop()
        self._writer: asyncio.Future | None = None  # the writer waits on it for an item
        self._lent = False  # take_waiter gave ``_writer`` out; the next put says whether a step kept it
        self._owned = False  # ``_writer`` is a queued step's future: only that step's completion sets it
        self._reader: asyncio.Future | None = None  # the reader waits on it for room

    def take_waiter(self) -> asyncio.Future | None:
        """The writer's wait future, for the next item's step to complete, when the writer is idle and the
        queue empty; else None. The next ``put`` must follow (it wakes the writer if the step is not queued)."""
        if self._items or self._lent or self._owned or self._writer is None or self._writer.done():
            return None
        self._lent = True
        return self._writer

    async def put(self, item: Any, *, waiter_used: bool = False) -> None:
        """Append ``item``; ``waiter_used``: its step got the future ``take_waiter`` gave, which wakes the writer
        when the step is done (so the writer is not woken now)."""
        try:
            while len(self._items) >= self._limit:
                self._reader = self._loop.create_future()
                await self._reader
        except asyncio.CancelledError:
            self._items.append(item)  # the stream is ending (``close``): its work is handed over with the rest
            raise
        self._items.append(item)
        if self._lent:
            self._lent = False
            self._owned = waiter_used  # then the step's completion wakes the writer
        writer = self._writer
        if writer is not None and not self._owned and not writer.done():
            writer.set_result(None)

    async def get(self) -> Any:
        while not self._items:
            self._writer = self._loop.create_future()
            try:
                await self._writer
            except Exception:  # the step behind a lent waiter failed: its item holds the error
                pass
            finally:
                self._writer = None
                self._lent = self._owned = False
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
        reader.add_done_callback(lambda _: [drop(item) for item in self.drain()])


def observe(pending: Awaitable[Any] | None) -> None:
    """Read the outcome of a step nobody will answer (its stream's client left), once it is done: the step
    still applies, and asyncio would log an error left unread ("Future exception was never retrieved").
    A coroutine (a response still to build around a step's future) runs to its end for the same reason."""
    if pending is None:
        return
    if asyncio.iscoroutine(pending):
        pending = asyncio.ensure_future(pending)
    if isinstance(pending, asyncio.Future):
        pending.add_done_callback(_read_outcome)


def _read_outcome(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()
