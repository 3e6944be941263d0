"""The asyncio shell: AsyncClient, AsyncSession and AsyncMultiStream perform, on a grpc.aio channel, the I/O that
the protocol core (``_protocol``, ``_stream``, ``_multi_stream``) asks for, awaiting each action."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Coroutine, Generator, Iterable, Sequence
from typing import Any, ParamSpec, Self, TypeVar

import grpc
import grpc.aio

from rnnserve.client import _convert
from rnnserve.client._convert import Arrays
from rnnserve.client._multi_stream import Cancel, Exchange, MultiStreamProtocol, Reopen
from rnnserve.client._plan import Action, Awaiting, Call, Operation, Plan, Runner, Sleep
from rnnserve.client._protocol import ClientProtocol, SessionProtocol
from rnnserve.client._stream import DEFAULT_WINDOW, END, WAIT, StepRetry, StreamResume, check_window
from rnnserve.proto import rnnserve_pb2 as pb
from rnnserve.proto import rnnserve_pb2_grpc as pb_grpc

_P = ParamSpec("_P")
_R = TypeVar("_R")


async def _run(plan: Plan[_R], perform: Callable[[Action], Awaitable[Any]]) -> _R:
    """Await each action ``plan`` asks for, feeding back its answer or its grpc error, until it returns."""
    runner = Runner(plan)
    while (action := runner.action) is not None:
        with runner:  # a grpc error goes back into the plan
            runner.resume(await perform(action))
    return runner.result


class _Shell(Awaiting):
    """Operations of the asyncio shell's objects return a coroutine that runs their plan."""

    __slots__ = ()

    def _bind(self, op: Operation[_P, _R]) -> Callable[_P, Coroutine[Any, Any, _R]]:
        async def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            return await self._run(op.plan(self, *args, **kwargs), op.turns)

        return run

    async def _run(self, plan: Plan[_R], turns: bool) -> _R:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncClient(ClientProtocol["AsyncSession"], _Shell):
    """An asyncio connection to an rnnserve server; the arguments are those of ``Client``.

    Create it inside a running event loop (grpc.aio channels bind to the loop)::

        async with AsyncClient("localhost:50051") as client, client.session("m") as s:
            y = await s.step(x)
    """

    def _connect(self, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]) -> None:
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(self.address, options=options)
        else:
            self._channel = grpc.aio.secure_channel(self.address, credentials, options=options)
        self._stub = pb_grpc.RnnServeStub(self._channel)

    def _new_session(self, response: pb.OpenSessionResponse) -> AsyncSession:
        return AsyncSession(self, response)

    async def _run(self, plan: Plan[_R], turns: bool = False) -> _R:
        return await _run(plan, self._perform)

    async def _perform(self, action: Action) -> Any:
        if isinstance(action, Sleep):
            return await asyncio.sleep(action.seconds)
        assert isinstance(action, Call)
        method = getattr(self._stub, action.method) if isinstance(action.method, str) else action.method
        return await method(action.request, timeout=action.timeout, metadata=action.metadata)

    @property
    def channel(self) -> grpc.aio.Channel:
        """The underlying grpc.aio channel."""
        return self._channel

    async def close(self) -> None:
        """Close the channel. Open sessions stay on the server until closed elsewhere or expired."""
        await self._channel.close()

    def session(
        self,
        model: str,
        version: int | None = None,
        initial_state: Arrays | None = None,
        parameters: Arrays | None = None,
    ) -> _SessionOpener:
        """``async with client.session("m") as s:`` (closes on exit), or ``s = await client.session("m")``."""
        return _SessionOpener(self.open_session(model, version, initial_state, parameters))

    def multi_stream(self) -> AsyncMultiStream:
        """A stream carrying steps of many sessions per message (``async with``)."""
        return AsyncMultiStream(self)


class _SessionOpener:
    """Awaitable, or an async context manager that closes the session on exit."""

    def __init__(self, opening: Awaitable[AsyncSession]) -> None:
        self._opening = opening
        self._session: AsyncSession | None = None

    def __await__(self) -> Generator[Any, None, AsyncSession]:
        return self._opening.__await__()

    async def __aenter__(self) -> AsyncSession:
        self._session = await self._opening
        return self._session

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()


class AsyncSession(SessionProtocol, _Shell):
    """The asyncio twin of ``Session``: the same methods, awaited."""

    _client: AsyncClient

    def __init__(self, client: AsyncClient, response: pb.OpenSessionResponse) -> None:
        super().__init__(client, response)
        self._stepping = asyncio.Lock()  # binds to the running loop on first contended use

    async def _run(self, plan: Plan[_R], turns: bool) -> _R:
        if not turns:
            return await self._client._run(plan)
        async with self._stepping:
            return await self._client._run(plan)

    def stream(
        self,
        xs: Iterable[_convert.Inputs] | AsyncIterable[_convert.Inputs],
        *,
        window: int = DEFAULT_WINDOW,
        outputs: Sequence[str] | None = None,
    ) -> AsyncIterator[_convert.Outputs]:
        """Stream timesteps (a plain or async iterable) and ``async for`` their outputs in order.

        Same windowing and error rules as ``Session.stream``. Leaving the loop early cancels the call
        when the generator is closed (``contextlib.aclosing`` makes that immediate).
        """
        check_window(window)
        return self._stream(_aiter(xs), window, outputs)

    async def _stream(
        self, xs: AsyncIterator[Any], window: int, outputs: Sequence[str] | None
    ) -> AsyncIterator[_convert.Outputs]:
        # One task pulls xs for the whole stream (cancelling it mid-pull would break the caller's generator);
        # each attempt has its sender task; this generator reads. ``changed`` wakes whoever waits on the core.
        core = StreamResume(self, window, outputs)
        changed = asyncio.Event()
        puller = asyncio.create_task(_pull(core, xs, changed))
        try:
            while True:
                call = self._client._stub.StreamStep(metadata=self._metadata)
                sender = asyncio.create_task(_send(core, core.open_attempt(), call, changed))
                failure: grpc.aio.AioRpcError | StepRetry | None = None
                try:
                    while (response := await call.read()) is not grpc.aio.EOF:
                        for result in response.results:
                            yield core.answer(result)
                            core.consumed()
                            changed.set()
                except (grpc.aio.AioRpcError, StepRetry) as exc:
                    failure = exc
                finally:
                    sender.cancel()
                    call.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await sender
                if failure is None and core.finished():
                    break
                await asyncio.sleep(core.retry_after(failure))
        finally:
            core.close()
            puller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await puller
        core.raise_input_error()


async def _pull(core: StreamResume, xs: AsyncIterator[Any], changed: asyncio.Event) -> None:
    try:
        while True:
            while not core.claim_input():
                changed.clear()
                await changed.wait()
            try:
                x = await anext(xs)
            except StopAsyncIteration:
                core.end_input()
                return
            core.add_input(core.build(x))
            changed.set()
    except Exception as exc:
        core.end_input(exc)
    finally:
        changed.set()


async def _send(core: StreamResume, attempt: int, call: Any, changed: asyncio.Event) -> None:
    try:
        while (request := core.next_request(attempt)) is not END:
            if request is WAIT:
                changed.clear()
                await changed.wait()
            else:
                await call.write(request)
        await call.done_writing()
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        return  # the call ended; the reader reports why


async def _aiter(xs: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if isinstance(xs, AsyncIterable):
        async for x in xs:
            yield x
    else:
        for x in xs:
            yield x


class AsyncMultiStream(MultiStreamProtocol, _Shell):
    """The asyncio twin of ``MultiStream``: ``async with client.multi_stream() as ms``."""

    _client: AsyncClient

    def __init__(self, client: AsyncClient) -> None:
        super().__init__(client)
        self._call = client._stub.StreamStep(metadata=client._metadata)
        self._lock = asyncio.Lock()

    async def _run(self, plan: Plan[_R], turns: bool) -> _R:
        async with self._lock:  # every operation uses the one call
            return await _run(plan, self._perform)

    async def _perform(self, action: Action) -> Any:
        if isinstance(action, Exchange):
            with contextlib.suppress(asyncio.InvalidStateError):  # the call ended: read() says why
                await self._call.write(action.request)
            response = await self._call.read()
            return None if response is grpc.aio.EOF else response
        if isinstance(action, Cancel):
            return self._call.cancel()
        if isinstance(action, Reopen):
            self._call = self._client._stub.StreamStep(metadata=self._client._metadata)
            return None
        assert isinstance(action, Sleep)
        return await asyncio.sleep(action.seconds)

    async def close(self) -> None:
        """Half-close the stream and wait for the server to end it."""
        async with self._lock:
            if self._closing():
                self._call.cancel()
                return
            try:
                await self._call.done_writing()
                while await self._call.read() is not grpc.aio.EOF:
                    pass
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass  # the stream already failed; step() reported it
