"""The blocking client: Client, Session and MultiStream over a grpc channel."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
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


class Client:
    """A blocking connection to an rnnserve server.

    Args:
        address: ``host:port`` of the server.
        credentials: ``grpc.ChannelCredentials`` for TLS; None for a plaintext channel.
        timeout: deadline in seconds for each unary call (streams have none); None waits forever.
        max_message_bytes: send and receive limit of the channel (chunks of many steps are large).
        options: extra grpc channel options, applied after the message limits.
        metadata: ``(key, value)`` pairs or a mapping sent with every call (e.g. an auth token).
        token: sent as ``authorization: Bearer TOKEN`` with every call (servers run with auth tokens).
        retries: how many times in a row a call (or a stream, from its last answered step) is retried after
            UNAVAILABLE or DEADLINE_EXCEEDED; 0 turns retries off. Steps carry their session's step index,
            so a retried step is applied once (README "Exactly-once steps and retries").
        backoff, max_backoff: the first wait before a retry in seconds, doubling up to ``max_backoff``
            (with jitter).
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
            self._channel = grpc.insecure_channel(address, options=opts)
        else:
            self._channel = grpc.secure_channel(address, credentials, options=opts)
        self.address = address
        self.timeout = timeout
        self._metadata = _base.normalize_metadata(metadata, token)
        self._stub = pb_grpc.RnnServeStub(self._channel)

    # -- plumbing ------------------------------------------------------------------------------------

    def _call(
        self,
        method: Callable[..., _R],
        request: Any,
        timeout: float | None = _DEFAULT,
        *,
        retry: bool = True,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> _R:
        """One unary call; UNAVAILABLE and DEADLINE_EXCEEDED are retried (``timeout`` is per attempt)."""
        failures = 0
        while True:
            try:
                return method(
                    request,
                    timeout=self.timeout if timeout is _DEFAULT else timeout,
                    metadata=self._metadata if metadata is None else metadata,
                )
            except grpc.RpcError as err:
                if not (retry and self.retry.should_retry(retry_code(err), failures)):
                    raise from_rpc_error(err) from None
            time.sleep(self.retry.delay(failures))
            failures += 1

    @property
    def channel(self) -> grpc.Channel:
        """The underlying grpc channel (shared by all sessions of this client)."""
        return self._channel

    def close(self) -> None:
        """Close the channel. Open sessions stay on the server until closed elsewhere or expired."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- models and server ---------------------------------------------------------------------------

    def list_models(self, name: str = "") -> list[ModelInfo]:
        """Every model version the server knows (ready or not), optionally only those called ``name``."""
        resp = self._call(self._stub.ListModels, pb.ListModelsRequest(name=name))
        return [_convert.model_info(m) for m in resp.models]

    def model(self, name: str, version: int | None = None) -> ModelInfo:
        """One model version; None means the newest ready one."""
        return _convert.model_info(self._call(self._stub.GetModel, pb.GetModelRequest(name=name, version=version or 0)))

    def stats(self, model: str = "") -> Stats:
        """Server statistics, optionally for one model only."""
        return _convert.stats(self._call(self._stub.GetStats, pb.StatsRequest(model=model)))

    def load_model(self, name: str, version: int | None = None, timeout: float | None = _DEFAULT) -> list[ModelInfo]:
        """Load (or reload) a version folder of the server's repository; None: every version of ``name``.

        Returns each version's outcome: READY, or FAILED with ``error`` (a version that was serving keeps
        serving when its reload fails).
        """
        req = pb.LoadModelRequest(name=name, version=version or 0)
        # Not retried: a load that timed out may still be building, and another would build it again.
        return [_convert.model_info(m) for m in self._call(self._stub.LoadModel, req, timeout, retry=False).models]

    def unload_model(
        self, name: str, version: int | None = None, force: bool = False, timeout: float | None = _DEFAULT
    ) -> UnloadResult:
        """Unload a version (None: every version of ``name``). A version with open sessions is refused
        (FAILED_PRECONDITION) unless ``force``, which ends those sessions."""
        req = pb.UnloadModelRequest(name=name, version=version or 0, force=force)
        return _convert.unload_result(self._call(self._stub.UnloadModel, req, timeout, retry=False))

    def health(self, service: str = "", timeout: float | None = _DEFAULT) -> str:
        """The standard grpc health status of ``service`` ("" is the whole server): e.g. ``"SERVING"``.

        Needs the ``grpcio-health-checking`` package (torch-free).
        """
        check, request = _base.health_call(self._channel, service)
        return _base.health_status(self._call(check, request, timeout, retry=False))  # the status now, not later

    # -- sessions ------------------------------------------------------------------------------------

    def open_session(
        self,
        model: str,
        version: int | None = None,
        initial_state: Mapping[str, ArrayLike] | None = None,
        parameters: Mapping[str, ArrayLike] | None = None,
    ) -> Session:
        """Open a session on ``model`` (newest ready version unless ``version``); close it when done.

        ``parameters`` gives the model's per-session parameters (see ``ModelInfo.parameters``)."""
        req = pb.OpenSessionRequest(model=model, version=version or 0)
        if initial_state or parameters:
            # Cast to the declared dtypes, which needs the model's signature first.
            info = self.model(model, version)
            _convert.state_map(initial_state, info, req.initial_state)
            _convert.state_map(parameters, info, req.parameters, parameters=True)
        return self._open(req)

    def session(
        self,
        model: str,
        version: int | None = None,
        initial_state: Mapping[str, ArrayLike] | None = None,
        parameters: Mapping[str, ArrayLike] | None = None,
    ) -> Session:
        """Same as open_session; reads best as ``with client.session("m") as s:``."""
        return self.open_session(model, version, initial_state, parameters)

    def restore(self, snapshot: bytes, model: str = "", *, allow_other_version: bool = False) -> Session:
        """Open a new session from a snapshot (``Session.snapshot()``, possibly from another replica), on the
        snapshot's own model and version; ``allow_other_version``: on the newest version of that model."""
        return self._open(
            pb.OpenSessionRequest(model=model, snapshot=snapshot, allow_other_version=allow_other_version)
        )

    def _open(self, req: pb.OpenSessionRequest) -> Session:
        """OpenSession with an id of our choosing, sent as the routing header too, so that behind a gateway
        the session is opened on the replica its later calls reach. A retry whose first attempt had landed
        gets ALREADY_EXISTS (nobody else can hold a random id): the session is then looked up instead."""
        req.session_id = _base.new_session_id()
        metadata = _base.with_session(self._metadata, req.session_id)
        try:
            response = self._call(self._stub.OpenSession, req, metadata=metadata)
        except RnnServeError as err:
            if err.code != grpc.StatusCode.ALREADY_EXISTS:
                raise
            state = self._call(self._stub.GetState, pb.SessionRequest(session_id=req.session_id), metadata=metadata)
            info = self._call(self._stub.GetModel, pb.GetModelRequest(name=state.model, version=state.version))
            response = _base.reopened(req.session_id, state, info)
        return Session(self, response)

    def multi_stream(self) -> MultiStream:
        """A stream carrying steps of many sessions per message (see MultiStream)."""
        return MultiStream(self)

    # -- whole sequences -----------------------------------------------------------------------------

    def predict(
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
        """Run a batch of whole sequences, padded batch first, with each one's length (no session).

        ``inputs`` is an array for a single-input model, else ``{name: array}``. A sequence model takes
        e.g. token ids ``(batch, max_length)``; a step model ``(batch, max_length, *input shape)``, run from
        its initial state or from ``initial_state`` (one per sequence, stacked on a leading axis), with
        ``parameters`` likewise. One GetModel call first (it pins the version and gives the dtypes to cast to).
        """
        info = self.model(model, version)
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
        return _predict.predict_result(self._call(self._stub.Predict, request))


class Session(_base.SessionBase):
    """One server-side session: the model's recurrent state lives on the server.

    Attributes:
        id: the server's session id.
        model: the model's signature (ModelInfo).
        steps: timesteps applied so far, as last reported by the server; the next step is numbered
            ``steps + 1`` (its ``step_index``), so a retried step is applied once.
    """

    def __init__(self, client: Client, response: pb.OpenSessionResponse) -> None:
        super().__init__(response, client._metadata)
        self._client = client
        # Unary steps of one session take turns: each is numbered from the steps acknowledged before it.
        self._stepping = threading.Lock()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the session on the server (an already expired or closed session is fine)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._client._call(
                self._client._stub.CloseSession, pb.SessionRequest(session_id=self.id), metadata=self._metadata
            )
        except RnnServeError as err:
            if err.code != grpc.StatusCode.NOT_FOUND:
                raise

    def step(
        self,
        x: _convert.Inputs | _convert.Chunk,
        *,
        chunk: bool = False,
        outputs: Sequence[str] | None = None,
        timeout: float | None = _DEFAULT,
    ) -> _convert.Outputs:
        """Apply one timestep and return its outputs.

        ``x`` is an array (single-input models) or a dict ``{input: array}``, per-session shapes (no batch
        axis). Returns an array when the result has one output, else a dict; ``outputs`` picks which.
        With ``chunk=True``, ``x`` holds several consecutive timesteps (see step_chunk). A call that fails
        with UNAVAILABLE or DEADLINE_EXCEEDED is retried with the same step index (``Client(retries=)``).
        """
        with self._stepping:
            req = self._step_request(x, chunk=chunk, outputs=outputs, step_index=self.steps + 1)
            resp = self._client._call(self._client._stub.Step, req, timeout, metadata=self._metadata)
            self.steps = resp.steps
        return _convert.outputs(resp.outputs)

    def step_chunk(
        self,
        xs: _convert.Chunk,
        *,
        outputs: Sequence[str] | None = None,
        timeout: float | None = _DEFAULT,
    ) -> _convert.Outputs:
        """Apply several consecutive timesteps in one message; outputs get a leading time axis.

        ``xs`` is stacked (an array or dict of arrays with a leading time axis) or a list of timesteps.
        """
        return self.step(xs, chunk=True, outputs=outputs, timeout=timeout)

    def stream(
        self,
        xs: Iterable[_convert.Inputs],
        *,
        window: int = _base.DEFAULT_WINDOW,
        outputs: Sequence[str] | None = None,
    ) -> Iterator[_convert.Outputs]:
        """Stream timesteps over one StreamStep call, yielding each step's outputs in order.

        At most ``window`` steps are in flight (sent but not yet consumed by the caller): the next item of
        ``xs`` is only pulled once a slot is free, so ``window=1`` is strict lock-step (e.g. to feed each
        output back as the next input) and larger windows hide the network round trip. ``xs`` is
        iterated on a grpc thread; an exception it raises is re-raised here after the outputs of the
        steps before it. A failed step raises RnnServeError and cancels the stream; the steps sent after
        it are refused, since they carry the indexes of the steps after it (``s.steps`` says where the
        session stands). A broken stream (UNAVAILABLE), or a step that failed with a status a retry may
        change (UNAVAILABLE, DEADLINE_EXCEEDED: e.g. its session-store write was not confirmed; ABORTED: the
        session moved to another replica), is reopened and resumes from the last answered step: the
        unanswered ones are sent again with their indexes, and those the server had applied come back from
        its replay cache (``Client(retries=)`` bounds the reconnections in a row).
        """
        _base.check_window(window)
        return self._stream(iter(xs), window, outputs)

    def _stream(self, xs: Iterator[Any], window: int, outputs: Sequence[str] | None) -> Iterator[_convert.Outputs]:
        client = self._client
        box = _Outbox(self, xs, window, outputs)
        failures = 0
        try:
            while True:
                call = client._stub.StreamStep(box.requests(), metadata=self._metadata)
                try:
                    for response in call:
                        for result in response.results:
                            _base.check_resumable(result)
                            out = self._stream_result(result, box.ack())
                            failures = 0
                            yield out
                            box.consumed()
                    if box.finished():
                        break
                    code = grpc.StatusCode.UNAVAILABLE  # the server ended the stream before answering every step
                    error: RnnServeError = RnnServeError(code, "the server ended the stream", session_id=self.id)
                except grpc.RpcError as err:
                    code, error = retry_code(err), from_rpc_error(err)
                except _base.StepRetry as failed:
                    code, error = failed.error.code, failed.error
                finally:
                    call.cancel()  # a no-op once finished; stops the server's work when the caller stops early
                if not client.retry.should_retry(code, failures):
                    raise error
                time.sleep(client.retry.delay(failures))
                failures += 1
        finally:
            box.close()
        if box.failure:
            raise box.failure[0]

    def reset(self, state: Mapping[str, ArrayLike] | None = None) -> None:
        """Reset the recurrent state to the model's initial value, or to ``state``."""
        req = pb.ResetSessionRequest(session_id=self.id)
        self._state_request(state, req.state)
        self._client._call(self._client._stub.ResetSession, req, metadata=self._metadata)
        self.steps = 0  # the next step is numbered 1 again

    def _get_state(self) -> pb.SessionState:
        resp = self._client._call(
            self._client._stub.GetState, pb.SessionRequest(session_id=self.id), metadata=self._metadata
        )
        self.steps = resp.steps
        return resp

    def get_state(self) -> dict[str, np.ndarray]:
        """The current recurrent state, by state name (per-session shapes)."""
        return decode_map(self._get_state().state)

    def set_state(self, state: Mapping[str, ArrayLike]) -> None:
        """Replace the recurrent state (all or some of the states, by name)."""
        req = pb.SetStateRequest(session_id=self.id)
        self._state_request(state, req.state)
        self._client._call(self._client._stub.SetState, req, metadata=self._metadata)

    def snapshot(self) -> bytes:
        """An opaque snapshot of the whole session, for ``restore`` here or ``Client.restore`` anywhere."""
        return self._get_state().snapshot

    def restore(self, snapshot: bytes, *, allow_other_version: bool = False) -> None:
        """Put this session back to a snapshot taken earlier of its model (FAILED_PRECONDITION for another
        model, or another version of it unless ``allow_other_version``)."""
        req = pb.SetStateRequest(session_id=self.id, snapshot=snapshot, allow_other_version=allow_other_version)
        self._client._call(self._client._stub.SetState, req, metadata=self._metadata)
        self._get_state()  # the snapshot carries its step count


class _Outbox:
    """The request side of ``Session.stream`` across reconnections.

    Each attempt's request iterator (consumed on a grpc thread) first resends the unanswered steps, then
    pulls new ones from ``xs`` while fewer than ``window`` are in flight (sent, output not yet consumed by
    the caller). One iterator pulls at a time, and a step it pulls is booked in ``unacked`` before it is
    sent, so a step pulled by an attempt that broke meanwhile is sent by the next one.
    """

    def __init__(self, session: Session, xs: Iterator[Any], window: int, outputs: Sequence[str] | None) -> None:
        self._session = session
        self._xs = xs
        self._window = window
        self._outputs = outputs
        self._first = session.steps + 1  # step index of the stream's first step
        self.unacked = Unacknowledged()
        self.failure: list[BaseException] = []
        self._pulled = 0  # steps taken from xs (only the pulling iterator changes it)
        self._in_flight = 0
        self._attempt = 0
        self._pulling = False
        self._exhausted = False
        self._closed = False
        self._cond = threading.Condition()

    def requests(self) -> Iterator[pb.StreamStepRequest]:
        """A new attempt's requests; the previous attempt's iterator ends."""
        with self._cond:
            self._attempt += 1
            attempt, position = self._attempt, self.unacked.acked
            self._cond.notify_all()
        return self._requests(attempt, position)

    def _requests(self, attempt: int, position: int) -> Iterator[pb.StreamStepRequest]:
        while (step := self._next(attempt, position)) is not None:
            position += 1
            yield pb.StreamStepRequest(steps=[step])

    def _next(self, attempt: int, position: int) -> pb.StepRequest | None:
        """The step at ``position``, pulling it from ``xs`` when it is new; None ends this attempt's requests
        (superseded, closed, or ``xs`` done: then the half-close still gets the steps sent answered)."""
        while True:
            with self._cond:
                while True:
                    if self._closed or attempt != self._attempt:
                        return None
                    if position < self.unacked.built:
                        return self.unacked.at(position)
                    if self._exhausted:
                        return None
                    if not self._pulling and self._in_flight < self._window:
                        self._pulling = True
                        break
                    self._cond.wait()
            self._pull()

    def _pull(self) -> None:
        step = None
        try:
            x = next(self._xs)
            index = self._first + self._pulled
            step = self._session._step_request(
                x, chunk=False, outputs=self._outputs, step_index=index, request_id=str(index)
            )
        except StopIteration:
            pass
        except Exception as exc:
            self.failure.append(exc)  # re-raised after the outputs of the steps before it
        with self._cond:
            self._pulling = False
            if step is None:
                self._exhausted = True
            else:
                self.unacked.steps.append(step)
                self._pulled += 1
                self._in_flight += 1
            self._cond.notify_all()

    def ack(self) -> pb.StepRequest | None:
        """The step the result just read answers."""
        with self._cond:
            return self.unacked.ack()

    def consumed(self) -> None:
        """The caller took an output: a window slot is free."""
        with self._cond:
            self._in_flight -= 1
            self._cond.notify_all()

    def finished(self) -> bool:
        with self._cond:
            return self._exhausted and not self._pulling and not self.unacked.steps

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class MultiStream:
    """One StreamStep call carrying steps of many sessions per message, e.g. for a gateway.

    Use as a context manager; ``step`` is thread-safe (callers take turns on the stream)::

        with client.multi_stream() as ms:
            ys = ms.step({s1: x1, s2: x2})
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._closed = False
        self._open()

    def _open(self) -> None:
        self._requests: queue.SimpleQueue[pb.StreamStepRequest | None] = queue.SimpleQueue()
        self._call = self._client._stub.StreamStep(self._pending(self._requests), metadata=self._client._metadata)

    @staticmethod
    def _pending(requests: queue.SimpleQueue[pb.StreamStepRequest | None]) -> Iterator[pb.StreamStepRequest]:
        while (request := requests.get()) is not None:
            yield request

    def __enter__(self) -> MultiStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def step(
        self,
        batch: Mapping[Any, _convert.Inputs],
        *,
        outputs: Sequence[str] | None = None,
        return_exceptions: bool = False,
    ) -> dict[Any, Any]:
        """Apply one timestep to each session of ``batch`` in one message; outputs keyed like ``batch``.

        Keys are Session objects or session ids (with an id, inputs must be a dict by name). A failed
        step raises RnnServeError after the others were applied, or with ``return_exceptions=True``
        stands in the result as its RnnServeError.
        """
        request, keys = _base.multi_request(batch, outputs)
        return _base.multi_results(self._exchange(request), keys, return_exceptions=return_exceptions)

    def step_batch(
        self,
        sessions: Sequence[Any],
        inputs: Any,
        *,
        outputs: Sequence[str] | None = None,
        return_exceptions: bool = False,
    ) -> BatchResult:
        """One timestep of each of ``sessions`` (all on one model) in columnar form: ``inputs`` stacked along
        a leading axis, one row per session (an array, or a dict by input name). The server decodes and
        checks the whole stack at once, so this is the fast path for a gateway with many devices.

        A failed row raises RnnServeError after the other rows were applied, or with
        ``return_exceptions=True`` is reported in ``BatchResult.errors``.
        """
        request, keys = _base.batch_request(sessions, inputs, outputs)
        return _base.batch_results(self._exchange(request), keys, return_exceptions=return_exceptions)

    def _exchange(self, request: pb.StreamStepRequest) -> pb.StreamStepResponse:
        """Send one message and read its response; after UNAVAILABLE the message is sent again on a new
        stream, when every step in it carries a step index (so none is applied twice)."""
        retry = self._client.retry
        with self._lock:
            if self._closed:
                raise RuntimeError("this multi-stream is closed")
            failures = 0
            while True:
                self._requests.put(request)
                try:
                    return next(self._call)
                except StopIteration:
                    code = grpc.StatusCode.UNAVAILABLE
                    error = RnnServeError(code, "the server ended the stream")
                except grpc.RpcError as err:
                    code, error = retry_code(err), from_rpc_error(err)
                self._requests.put(None)
                self._call.cancel()
                if not (_base.all_indexed(request) and retry.should_retry(code, failures)):
                    self._closed = True
                    raise error
                time.sleep(retry.delay(failures))
                failures += 1
                self._open()

    def close(self) -> None:
        """Half-close the stream and wait for the server to end it."""
        with self._lock:
            failed = self._closed
            self._closed = True
            self._requests.put(None)  # ends the request iterator grpc's thread is blocked in
            if failed:
                self._call.cancel()
                return
            try:
                for _ in self._call:
                    pass
            except grpc.RpcError:
                pass  # the stream already failed; that was reported by step()
