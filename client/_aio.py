"""The asyncio client: AsyncClient, AsyncSession and AsyncMultiStream over a grpc.aio channel."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Generator, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio
import numpy as np
from numpy.typing import ArrayLike

from rnnserve.client import _base, _convert, _predict
from rnnserve.client._errors import RnnServeError, from_rpc_error
from rnnserve.client._predict import PredictResult
from rnnserve.client._retry import RetryPolicy, Unacknowledged, retry_code
from rnnserve.client._types import BatchResult, ModelInfo, Stats, UnloadResult
from rnnserve.proto import rnnserve_pb2 as pb
from rnnserve.proto import rnnserve_pb2_grpc as pb_grpc
from rnnserve.tensors import decode_map

_R = TypeVar("_R")
_DEFAULT: Any = object()  # "use the client's timeout", distinct from an explicit None (no deadline)


class AsyncClient:
    """An asyncio connection to an rnnserve server; the arguments are those of ``Client``.

    Create it inside a running event loop (grpc.aio channels bind to the loop)::

        async with AsyncClient("localhost:50051") as client, client.session("m") as s:
            y = await s.step(x)
    """

    def __init__(
        self,
        address: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = None,
        max_message_bytes: int | None = _base.DEFAULT_MAX_MESSAGE_BYTES,
        options: Sequence[tuple[str, Any]] | None = None,
        metadata: _base.Metadata | None = None,
        token: str | None = None,
        retries: int = 5,
        backoff: float = 0.05,
        max_backoff: float = 2.0,
    ) -> None:
        self.retry = RetryPolicy(retries, backoff, max_backoff)
        opts = _base.channel_options(max_message_bytes, options)
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(address, options=opts)
        else:
            self._channel = grpc.aio.secure_channel(address, credentials, options=opts)
        self.address = address
        self.timeout = timeout
        self._metadata = _base.normalize_metadata(metadata, token)
        self._stub = pb_grpc.RnnServeStub(self._channel)

    async def _call(
        self,
        method: Any,
        request: Any,
        timeout: float | None = _DEFAULT,
        *,
        retry: bool = True,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> Any:
        """One unary call; UNAVAILABLE and DEADLINE_EXCEEDED are retried (``timeout`` is per attempt)."""
        failures = 0
        while True:
            try:
                return await method(
                    request,
                    timeout=self.timeout if timeout is _DEFAULT else timeout,
                    metadata=self._metadata if metadata is None else metadata,
                )
            except grpc.aio.AioRpcError as err:
                if not (retry and self.retry.should_retry(retry_code(err), failures)):
                    raise from_rpc_error(err) from None
            await asyncio.sleep(self.retry.delay(failures))
            failures += 1

    @property
    def channel(self) -> grpc.aio.Channel:
        """The underlying grpc.aio channel."""
        return self._channel

    async def close(self) -> None:
        """Close the channel. Open sessions stay on the server until closed elsewhere or expired."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def list_models(self, name: str = "") -> list[ModelInfo]:
        """Every model version the server knows (ready or not), optionally only those called ``name``."""
        resp = await self._call(self._stub.ListModels, pb.ListModelsRequest(name=name))
        return [_convert.model_info(m) for m in resp.models]

    async def model(self, name: str, version: int | None = None) -> ModelInfo:
        """One model version; None means the newest ready one."""
        req = pb.GetModelRequest(name=name, version=version or 0)
        return _convert.model_info(await self._call(self._stub.GetModel, req))

    async def stats(self, model: str = "") -> Stats:
        """Server statistics, optionally for one model only."""
        return _convert.stats(await self._call(self._stub.GetStats, pb.StatsRequest(model=model)))

    async def load_model(
        self, name: str, version: int | None = None, timeout: float | None = _DEFAULT
    ) -> list[ModelInfo]:
        """Load (or reload) a version folder of the server's repository (see ``Client.load_model``)."""
        req = pb.LoadModelRequest(name=name, version=version or 0)
        response = await self._call(self._stub.LoadModel, req, timeout, retry=False)  # see Client.load_model
        return [_convert.model_info(m) for m in response.models]

    async def unload_model(
        self, name: str, version: int | None = None, force: bool = False, timeout: float | None = _DEFAULT
    ) -> UnloadResult:
        """Unload a version, or every version of ``name`` (see ``Client.unload_model``)."""
        req = pb.UnloadModelRequest(name=name, version=version or 0, force=force)
        return _convert.unload_result(await self._call(self._stub.UnloadModel, req, timeout, retry=False))

    async def health(self, service: str = "", timeout: float | None = _DEFAULT) -> str:
        """The standard grpc health status of ``service`` ("" is the whole server), e.g. ``"SERVING"``."""
        check, request = _base.health_call(self._channel, service)
        return _base.health_status(await self._call(check, request, timeout, retry=False))

    async def open_session(
        self,
        model: str,
        version: int | None = None,
        initial_state: Mapping[str, ArrayLike] | None = None,
        parameters: Mapping[str, ArrayLike] | None = None,
    ) -> AsyncSession:
        """Open a session on ``model`` (newest ready version unless ``version``); close it when done.

        ``parameters`` gives the model's per-session parameters (see ``ModelInfo.parameters``)."""
        req = pb.OpenSessionRequest(model=model, version=version or 0)
        if initial_state or parameters:
            info = await self.model(model, version)
            _convert.state_map(initial_state, info, req.initial_state)
            _convert.state_map(parameters, info, req.parameters, parameters=True)
        return await self._open(req)

    def session(
        self,
        model: str,
        version: int | None = None,
        initial_state: Mapping[str, ArrayLike] | None = None,
        parameters: Mapping[str, ArrayLike] | None = None,
    ) -> _SessionOpener:
        """``async with client.session("m") as s:`` (closes on exit), or ``s = await client.session("m")``."""
        return _SessionOpener(self.open_session(model, version, initial_state, parameters))

    async def restore(self, snapshot: bytes, model: str = "", *, allow_other_version: bool = False) -> AsyncSession:
        """Open a new session from a snapshot (``AsyncSession.snapshot()``, possibly from another replica); see
        ``Client.restore``."""
        return await self._open(
            pb.OpenSessionRequest(model=model, snapshot=snapshot, allow_other_version=allow_other_version)
        )

    async def _open(self, req: pb.OpenSessionRequest) -> AsyncSession:
        """OpenSession with an id of our choosing, sent as the routing header too (see Client._open)."""
        req.session_id = _base.new_session_id()
        metadata = _base.with_session(self._metadata, req.session_id)
        try:
            response = await self._call(self._stub.OpenSession, req, metadata=metadata)
        except RnnServeError as err:
            if err.code != grpc.StatusCode.ALREADY_EXISTS:
                raise
            state = await self._call(
                self._stub.GetState, pb.SessionRequest(session_id=req.session_id), metadata=metadata
            )
            info = await self._call(self._stub.GetModel, pb.GetModelRequest(name=state.model, version=state.version))
            response = _base.reopened(req.session_id, state, info)
        return AsyncSession(self, response)

    def multi_stream(self) -> AsyncMultiStream:
        """A stream carrying steps of many sessions per message (``async with``)."""
        return AsyncMultiStream(self)

    # -- whole sequences -----------------------------------------------------------------------------

    async def predict(
        self,
        model: str,
        inputs: _convert.Inputs,
        lengths: ArrayLike,
        *,
        version: int | None = None,
        initial_state: Mapping[str, ArrayLike] | None = None,
        parameters: Mapping[str, ArrayLike] | None = None,
        outputs: Sequence[str] | None = None,
    ) -> PredictResult:
        """Run a batch of whole sequences with their lengths (no session): see ``Client.predict``."""
        info = await self.model(model, version)
        request = _predict.predict_request(
            model,
            info,
            inputs,
            lengths,
            version=info.version,
            initial_state=initial_state,
            parameters=parameters,
            outputs=outputs,
        )
        return _predict.predict_result(await self._call(self._stub.Predict, request))


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


class AsyncSession(_base.SessionBase):
    """The asyncio twin of ``Session``: the same methods, awaited."""

    def __init__(self, client: AsyncClient, response: pb.OpenSessionResponse) -> None:
        super().__init__(response, client._metadata)
        self._client = client
        self._stepping: asyncio.Lock | None = None  # made on first use, inside the running loop

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session on the server (an already expired or closed session is fine)."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._client._call(
                self._client._stub.CloseSession, pb.SessionRequest(session_id=self.id), metadata=self._metadata
            )
        except RnnServeError as err:
            if err.code != grpc.StatusCode.NOT_FOUND:
                raise

    async def step(
        self,
        x: _convert.Inputs | _convert.Chunk,
        *,
        chunk: bool = False,
        outputs: Sequence[str] | None = None,
        timeout: float | None = _DEFAULT,
    ) -> _convert.Outputs:
        """Apply one timestep (or, with ``chunk=True``, several); see ``Session.step``."""
        if self._stepping is None:
            self._stepping = asyncio.Lock()
        async with self._stepping:  # unary steps take turns: each is numbered from those acknowledged before
            req = self._step_request(x, chunk=chunk, outputs=outputs, step_index=self.steps + 1)
            resp = await self._client._call(self._client._stub.Step, req, timeout, metadata=self._metadata)
            self.steps = resp.steps
        return _convert.outputs(resp.outputs)

    async def step_chunk(
        self,
        xs: _convert.Chunk,
        *,
        outputs: Sequence[str] | None = None,
        timeout: float | None = _DEFAULT,
    ) -> _convert.Outputs:
        """Apply several consecutive timesteps in one message; outputs get a leading time axis."""
        return await self.step(xs, chunk=True, outputs=outputs, timeout=timeout)

    def stream(
        self,
        xs: Iterable[_convert.Inputs] | AsyncIterable[_convert.Inputs],
        *,
        window: int = _base.DEFAULT_WINDOW,
        outputs: Sequence[str] | None = None,
    ) -> AsyncIterator[_convert.Outputs]:
        """Stream timesteps (a plain or async iterable) and ``async for`` their outputs in order.

        Same windowing and error rules as ``Session.stream``. Leaving the loop early cancels the call
        when the generator is closed (``contextlib.aclosing`` makes that immediate).
        """
        _base.check_window(window)
        return self._stream(_aiter(xs), window, outputs)

    async def _stream(
        self, xs: AsyncIterator[Any], window: int, outputs: Sequence[str] | None
    ) -> AsyncIterator[_convert.Outputs]:
        # One producer pulls xs for the whole stream (never cancelled mid-pull, which would break the caller's
        # generator); each attempt's sender resends the unanswered steps, then sends new ones as they come.
        client = self._client
        slots = asyncio.Semaphore(window)
        unacked = Unacknowledged()
        more = asyncio.Event()
        failure: list[BaseException] = []
        exhausted = False

        async def produce() -> None:
            nonlocal exhausted
            index = self.steps + 1
            try:
                while True:
                    await slots.acquire()  # before pulling, so window=1 is lock-step with the caller
                    try:
                        x = await anext(xs)
                    except StopAsyncIteration:
                        break
                    unacked.steps.append(
                        self._step_request(x, chunk=False, outputs=outputs, step_index=index, request_id=str(index))
                    )
                    index += 1
                    more.set()
            except Exception as exc:
                failure.append(exc)  # re-raised by the reader after the steps already sent
            finally:
                exhausted = True
                more.set()

        async def send(call: Any) -> None:
            position = unacked.acked
            try:
                while True:
                    more.clear()
                    while position < unacked.built:
                        await call.write(pb.StreamStepRequest(steps=[unacked.at(position)]))
                        position += 1
                    if exhausted:
                        await call.done_writing()
                        return
                    await more.wait()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                return  # the call ended; the reader reports why

        producer = asyncio.create_task(produce())
        failures = 0
        try:
            while True:
                call = client._stub.StreamStep(metadata=self._metadata)
                sender = asyncio.create_task(send(call))
                try:
                    while (response := await call.read()) is not grpc.aio.EOF:
                        for result in response.results:
                            _base.check_resumable(result)
                            out = self._stream_result(result, unacked.ack())
                            failures = 0
                            yield out
                            slots.release()
                    if exhausted and not unacked.steps:
                        break
                    code = grpc.StatusCode.UNAVAILABLE  # the server ended the stream before answering every step
                    error: RnnServeError = RnnServeError(code, "the server ended the stream", session_id=self.id)
                except grpc.aio.AioRpcError as err:
                    code, error = retry_code(err), from_rpc_error(err)
                except _base.StepRetry as failed:
                    code, error = failed.error.code, failed.error
                finally:
                    sender.cancel()
                    call.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await sender
                if not client.retry.should_retry(code, failures):
                    raise error
                await asyncio.sleep(client.retry.delay(failures))
                failures += 1
        finally:
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer
        if failure:
            raise failure[0]

    async def reset(self, state: Mapping[str, ArrayLike] | None = None) -> None:
        """Reset the recurrent state to the model's initial value, or to ``state``."""
        req = pb.ResetSessionRequest(session_id=self.id)
        self._state_request(state, req.state)
        await self._client._call(self._client._stub.ResetSession, req, metadata=self._metadata)
        self.steps = 0  # the next step is numbered 1 again

    async def _get_state(self) -> pb.SessionState:
        req = pb.SessionRequest(session_id=self.id)
        resp = await self._client._call(self._client._stub.GetState, req, metadata=self._metadata)
        self.steps = resp.steps
        return resp

    async def get_state(self) -> dict[str, np.ndarray]:
        """The current recurrent state, by state name (per-session shapes)."""
        return decode_map((await self._get_state()).state)

    async def set_state(self, state: Mapping[str, ArrayLike]) -> None:
        """Replace the recurrent state (all or some of the states, by name)."""
        req = pb.SetStateRequest(session_id=self.id)
        self._state_request(state, req.state)
        await self._client._call(self._client._stub.SetState, req, metadata=self._metadata)

    async def snapshot(self) -> bytes:
        """An opaque snapshot of the whole session."""
        return (await self._get_state()).snapshot

    async def restore(self, snapshot: bytes, *, allow_other_version: bool = False) -> None:
        """Put this session back to a snapshot taken earlier; see ``Session.restore``."""
        req = pb.SetStateRequest(session_id=self.id, snapshot=snapshot, allow_other_version=allow_other_version)
        await self._client._call(self._client._stub.SetState, req, metadata=self._metadata)
        await self._get_state()  # the snapshot carries its step count


async def _aiter(xs: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if isinstance(xs, AsyncIterable):
        async for x in xs:
            yield x
    else:
        for x in xs:
            yield x


class AsyncMultiStream:
    """The asyncio twin of ``MultiStream``: ``async with client.multi_stream() as ms``."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self._call = client._stub.StreamStep(metadata=client._metadata)
        self._lock = asyncio.Lock()
        self._closed = False

    async def __aenter__(self) -> AsyncMultiStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def step(
        self,
        batch: Mapping[Any, _convert.Inputs],
        *,
        outputs: Sequence[str] | None = None,
        return_exceptions: bool = False,
    ) -> dict[Any, Any]:
        """Apply one timestep to each session of ``batch`` in one message; see ``MultiStream.step``."""
        request, keys = _base.multi_request(batch, outputs)
        return _base.multi_results(await self._exchange(request), keys, return_exceptions=return_exceptions)

    async def step_batch(
        self,
        sessions: Sequence[Any],
        inputs: Any,
        *,
        outputs: Sequence[str] | None = None,
        return_exceptions: bool = False,
    ) -> BatchResult:
        """One timestep of each of ``sessions`` in columnar form; see ``MultiStream.step_batch``."""
        request, keys = _base.batch_request(sessions, inputs, outputs)
        return _base.batch_results(await self._exchange(request), keys, return_exceptions=return_exceptions)

    async def _exchange(self, request: pb.StreamStepRequest) -> pb.StreamStepResponse:
        """Send one message and read its response; see ``MultiStream._exchange`` for the retries."""
        retry = self._client.retry
        async with self._lock:
            if self._closed:
                raise RuntimeError("this multi-stream is closed")
            failures = 0
            while True:
                try:
                    with contextlib.suppress(asyncio.InvalidStateError):  # the call ended: read() says why
                        await self._call.write(request)
                    response = await self._call.read()
                    if response is not grpc.aio.EOF:
                        return response
                    code = grpc.StatusCode.UNAVAILABLE
                    error = RnnServeError(code, "the server ended the stream")
                except grpc.aio.AioRpcError as err:
                    code, error = retry_code(err), from_rpc_error(err)
                self._call.cancel()
                if not (_base.all_indexed(request) and retry.should_retry(code, failures)):
                    self._closed = True
                    raise error
                await asyncio.sleep(retry.delay(failures))
                failures += 1
                self._call = self._client._stub.StreamStep(metadata=self._client._metadata)

    async def close(self) -> None:
        """Half-close the stream and wait for the server to end it."""
        async with self._lock:
            failed = self._closed
            self._closed = True
            if failed:
                self._call.cancel()
                return
            try:
                await self._call.done_writing()
                while await self._call.read() is not grpc.aio.EOF:
                    pass
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass  # the stream already failed; step() reported it
