"""The protocol core of the client: every client and session operation as a plan (``_plan``), no I/O.

``ClientProtocol`` and ``SessionProtocol`` are the bases of the sync (``_sync``) and asyncio (``_aio``) shells'
classes. They build the requests, read the answers, keep the session's bookkeeping (its id, the step count that
numbers its next step, the routing header) and decide the retries; the shells only open the channel and
perform the actions the plans yield.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeAlias, TypeVar, cast

import grpc
import numpy as np
from numpy.typing import ArrayLike

from rnnserve.client import _convert, _predict
from rnnserve.client._channel import DEFAULT_MAX_MESSAGE_BYTES, channel_options, health_call, health_status
from rnnserve.client._errors import RnnServeError
from rnnserve.client._plan import DEFAULT, Call, Metadata, Plan, Sleep, in_turn, operation
from rnnserve.client._predict import PredictResult
from rnnserve.client._retry import Attempts, RetryPolicy
from rnnserve.client._types import ModelInfo, Stats, UnloadResult
from rnnserve.proto import rnnserve_pb2 as pb
from rnnserve.tensors import decode_map

MetadataLike: TypeAlias = Mapping[str, str] | Sequence[tuple[str, str]]
"""Metadata as callers give it: a mapping or ``(key, value)`` pairs."""

_S = TypeVar("_S", bound="SessionProtocol")

ROUTING_HEADER = "x-session-id"
"""Metadata naming the session on every session call and stream: the gateway routes on it (docs/deployment.md)."""


def normalize_metadata(metadata: MetadataLike | None, token: str | None = None) -> Metadata | None:
    """Metadata pairs for every call; ``token`` adds ``authorization: Bearer TOKEN`` (the server's auth)."""
    items = list((metadata.items() if isinstance(metadata, Mapping) else metadata) or ())
    if token is not None:
        items.append(("authorization", f"Bearer {token}"))
    if not items:
        return None
    return tuple((str(k).lower(), str(v)) for k, v in items)


def with_session(metadata: Metadata | None, session_id: str) -> Metadata:
    """``metadata`` plus the routing header for ``session_id``."""
    return (*(metadata or ()), (ROUTING_HEADER, session_id))


def new_session_id() -> str:
    """A random session id the client proposes on OpenSession (128 bits, URL-safe, as the server's own)."""
    return secrets.token_urlsafe(16)


def reopened(session_id: str, state: pb.SessionState, model: pb.ModelInfo) -> pb.OpenSessionResponse:
    """The answer an OpenSession would have given, rebuilt for a session whose OpenSession landed but whose
    answer was lost (its retry got ALREADY_EXISTS: the id is random, so only our own attempt can hold it)."""
    return pb.OpenSessionResponse(session_id=session_id, model=model, steps=state.steps)


class ClientProtocol(Generic[_S]):
    """A client's settings and operations; the shell subclass opens the channel (``_connect``), makes its kind
    of session (``_new_session``) and runs plans.

    The constructor's arguments are documented on ``Client``.
    """

    _channel: Any  # the shell's grpc channel; plans only hand its stub methods back to the shell

    def __init__(
        self,
        address: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = None,
        max_message_bytes: int | None = DEFAULT_MAX_MESSAGE_BYTES,
        options: Sequence[tuple[str, Any]] | None = None,
        metadata: MetadataLike | None = None,
        token: str | None = None,
        retries: int = 5,
        backoff: float = 0.05,
        max_backoff: float = 2.0,
    ) -> None:
        self.retry = RetryPolicy(retries, backoff, max_backoff)
        self.address = address
        self.timeout = timeout
        self._metadata = normalize_metadata(metadata, token)
        self._connect(credentials, channel_options(max_message_bytes, options))

    def _connect(self, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]) -> None:
        """Open ``self._channel`` and its RnnServe stub ``self._stub`` (the shell's kind of channel)."""
        raise NotImplementedError

    def _new_session(self, response: pb.OpenSessionResponse) -> _S:
        """The shell's session object for an opened session."""
        raise NotImplementedError

    # -- plans ---------------------------------------------------------------------------------------

    def _rpc(
        self,
        method: str | Callable[..., Any],
        request: Any,
        timeout: float | None = DEFAULT,
        *,
        retry: bool = True,
        metadata: Metadata | None = None,
    ) -> Plan[Any]:
        """One unary call, retried after a retryable status (``RetryPolicy``); ``timeout`` is per attempt."""
        call = Call(
            method,
            request,
            self.timeout if timeout is DEFAULT else timeout,
            self._metadata if metadata is None else metadata,
        )
        attempts = self._attempts()
        while True:
            try:
                return (yield call)
            except grpc.RpcError as err:
                delay = attempts.after(err, allowed=retry)
            yield Sleep(delay)

    def _attempts(self) -> Attempts:
        """The retry bookkeeping of one call or stream of this client."""
        return Attempts(self.retry, self.address)

    _call = operation(_rpc)  # one call by hand, with a stub method: ``client._call(client._stub.GetState, req)``

    def _open(self, req: pb.OpenSessionRequest) -> Plan[pb.OpenSessionResponse]:
        """OpenSession with an id of our choosing, sent as the routing header too, so that behind a gateway
        the session is opened on the replica its later calls reach. A retry whose first attempt had landed
        gets ALREADY_EXISTS (nobody else can hold a random id): the session is then looked up instead."""
        req.session_id = new_session_id()
        metadata = with_session(self._metadata, req.session_id)
        try:
            return (yield from self._rpc("OpenSession", req, metadata=metadata))
        except RnnServeError as err:
            if err.code != grpc.StatusCode.ALREADY_EXISTS:
                raise
        state = yield from self._rpc("GetState", pb.SessionRequest(session_id=req.session_id), metadata=metadata)
        info = yield from self._rpc("GetModel", pb.GetModelRequest(name=state.model, version=state.version))
        return reopened(req.session_id, state, info)

    # -- operations ----------------------------------------------------------------------------------

    @operation
    def list_models(self, name: str = "") -> Plan[list[ModelInfo]]:
        """Every model version the server knows (ready or not), optionally only those called ``name``."""
        response = yield from self._rpc("ListModels", pb.ListModelsRequest(name=name))
        return [_convert.model_info(m) for m in response.models]

    @operation
    def model(self, name: str, version: int | None = None) -> Plan[ModelInfo]:
        """One model version; None means the newest ready one."""
        return _convert.model_info(
            (yield from self._rpc("GetModel", pb.GetModelRequest(name=name, version=version or 0)))
        )

    @operation
    def stats(self, model: str = "") -> Plan[Stats]:
        """Server statistics, optionally for one model only."""
        return _convert.stats((yield from self._rpc("GetStats", pb.StatsRequest(model=model))))

    @operation
    def load_model(
        self, name: str, version: int | None = None, timeout: float | None = DEFAULT
    ) -> Plan[list[ModelInfo]]:
        """Load (or reload) a version folder of the server's repository; None: every version of ``name``.

        Returns each version's outcome: READY, or FAILED with ``error`` (a version that was serving keeps
        serving when its reload fails).
        """
        req = pb.LoadModelRequest(name=name, version=version or 0)
        # Not retried: a load that timed out may still be building, and another would build it again.
        response = yield from self._rpc("LoadModel", req, timeout, retry=False)
        return [_convert.model_info(m) for m in response.models]

    @operation
    def unload_model(
        self, name: str, version: int | None = None, force: bool = False, timeout: float | None = DEFAULT
    ) -> Plan[UnloadResult]:
        """Unload a version (None: every version of ``name``). A version with open sessions is refused
        (FAILED_PRECONDITION) unless ``force``, which ends those sessions."""
        req = pb.UnloadModelRequest(name=name, version=version or 0, force=force)
        return _convert.unload_result((yield from self._rpc("UnloadModel", req, timeout, retry=False)))

    @operation
    def health(self, service: str = "", timeout: float | None = DEFAULT) -> Plan[str]:
        """The standard grpc health status of ``service`` ("" is the whole server): e.g. ``"SERVING"``.

        Needs the ``grpcio-health-checking`` package (torch-free).
        """
        check, request = health_call(self._channel, service)
        # Not retried: the status now, not once the server is back.
        return health_status((yield from self._rpc(check, request, timeout, retry=False)))

    @operation
    def open_session(
        self,
        model: str,
        version: int | None = None,
        initial_state: _convert.Arrays | None = None,
        parameters: _convert.Arrays | None = None,
    ) -> Plan[_S]:
        """Open a session on ``model`` (newest ready version unless ``version``); close it when done.

        ``parameters`` gives the model's per-session parameters (see ``ModelInfo.parameters``)."""
        req = pb.OpenSessionRequest(model=model, version=version or 0)
        if initial_state or parameters:
            # Cast to the declared dtypes, which needs the model's signature first.
            info = _convert.model_info(
                (yield from self._rpc("GetModel", pb.GetModelRequest(name=model, version=version or 0)))
            )
            _convert.state_map(initial_state, info, req.initial_state)
            _convert.state_map(parameters, info, req.parameters, parameters=True)
        return self._new_session((yield from self._open(req)))

    @operation
    def restore(self, snapshot: bytes, model: str = "", *, allow_other_version: bool = False) -> Plan[_S]:
        """Open a new session from a snapshot (``Session.snapshot()``, possibly from another replica), on the
        snapshot's own model and version; ``allow_other_version``: on the newest version of that model."""
        req = pb.OpenSessionRequest(model=model, snapshot=snapshot, allow_other_version=allow_other_version)
        return self._new_session((yield from self._open(req)))

    @operation
    def predict(
        self,
        model: str,
        inputs: _convert.Inputs,
        lengths: ArrayLike,
        *,
        version: int | None = None,
        initial_state: _convert.Arrays | None = None,
        parameters: _convert.Arrays | None = None,
        outputs: Sequence[str] | None = None,
    ) -> Plan[PredictResult]:
        """Run a batch of whole sequences, padded batch first, with each one's length (no session).

        ``inputs`` is an array for a single-input model, else ``{name: array}``. A sequence model takes
        e.g. token ids ``(batch, max_length)``; a step model ``(batch, max_length, *input shape)``, run from
        its initial state or from ``initial_state`` (one per sequence, stacked on a leading axis), with
        ``parameters`` likewise. One GetModel call first (it pins the version and gives the dtypes to cast to).
        """
        info = _convert.model_info(
            (yield from self._rpc("GetModel", pb.GetModelRequest(name=model, version=version or 0)))
        )
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
        return _predict.predict_result((yield from self._rpc("Predict", request)))


class SessionProtocol:
    """One server-side session: the model's recurrent state lives on the server.

    Attributes:
        id: the server's session id.
        model: the model's signature (ModelInfo).
        steps: timesteps applied so far, as last reported by the server; the next step is numbered
            ``steps + 1`` (its ``step_index``), so a retried step is applied once.
    """

    id: str
    model: ModelInfo
    steps: int

    def __init__(self, client: ClientProtocol[Any], response: pb.OpenSessionResponse) -> None:
        self._client = client
        self.id = response.session_id
        # Every call about this session carries its id as metadata, for the gateway's session affinity.
        self._metadata = with_session(client._metadata, self.id)
        self.model = _convert.model_info(response.model)
        self.steps = response.steps
        self._closed = False

    @property
    def closed(self) -> bool:
        """True once close() ran."""
        return self._closed

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        model = f"{self.model.name}:{self.model.version}"
        return f"<{type(self).__name__} {self.id} model={model} steps={self.steps}{state}>"

    # -- plans ---------------------------------------------------------------------------------------

    def _rpc(self, method: str, request: Any, timeout: float | None = DEFAULT) -> Plan[Any]:
        return self._client._rpc(method, request, timeout, metadata=self._metadata)

    def _step_plan(
        self, x: _convert.Inputs | _convert.Chunk, chunk: bool, outputs: Sequence[str] | None, timeout: float | None
    ) -> Plan[_convert.Outputs]:
        # Built when the plan starts, that is in this session's turn: the index follows the steps acknowledged
        # before it, and a retry resends this request, index included, so the server applies it once.
        if chunk:
            arrays, num_steps = _convert.stacked_inputs(x, self.model)
        else:
            arrays, num_steps = _convert.named_inputs(cast(_convert.Inputs, x), self.model), 0
        req = pb.StepRequest()
        _convert.fill_step(req, self.id, arrays, num_steps=num_steps, outputs=outputs, step_index=self.steps + 1)
        response = yield from self._rpc("Step", req, timeout)
        self.steps = response.steps
        return _convert.outputs(response.outputs)

    def _read_state(self) -> Plan[pb.SessionState]:
        response = yield from self._rpc("GetState", pb.SessionRequest(session_id=self.id))
        self.steps = response.steps
        return response

    # -- operations ----------------------------------------------------------------------------------

    @operation
    def close(self) -> Plan[None]:
        """Close the session on the server (an already expired or closed session is fine)."""
        if self._closed:
            return
        self._closed = True
        try:
            yield from self._rpc("CloseSession", pb.SessionRequest(session_id=self.id))
        except RnnServeError as err:
            if err.code != grpc.StatusCode.NOT_FOUND:
                raise

    @in_turn
    def step(
        self,
        x: _convert.Inputs | _convert.Chunk,
        *,
        chunk: bool = False,
        outputs: Sequence[str] | None = None,
        timeout: float | None = DEFAULT,
    ) -> Plan[_convert.Outputs]:
        """Apply one timestep and return its outputs.

        ``x`` is an array (single-input models) or a dict ``{input: array}``, per-session shapes (no batch
        axis). Returns an array when the result has one output, else a dict; ``outputs`` picks which.
        With ``chunk=True``, ``x`` holds several consecutive timesteps (see step_chunk). A call that fails
        with a retryable status is retried with the same step index (``Client(retries=)``).
        """
        return (yield from self._step_plan(x, chunk, outputs, timeout))

    @in_turn
    def step_chunk(
        self, xs: _convert.Chunk, *, outputs: Sequence[str] | None = None, timeout: float | None = DEFAULT
    ) -> Plan[_convert.Outputs]:
        """Apply several consecutive timesteps in one message; outputs get a leading time axis.

        ``xs`` is stacked (an array or dict of arrays with a leading time axis) or a list of timesteps.
        """
        return (yield from self._step_plan(xs, True, outputs, timeout))

    @operation
    def reset(self, state: _convert.Arrays | None = None) -> Plan[None]:
        """Reset the recurrent state to the model's initial value, or to ``state``."""
        req = pb.ResetSessionRequest(session_id=self.id)
        _convert.state_map(state, self.model, req.state)
        yield from self._rpc("ResetSession", req)
        self.steps = 0  # the next step is numbered 1 again

    _get_state = operation(_read_state)  # the whole SessionState message

    @operation
    def get_state(self) -> Plan[dict[str, np.ndarray]]:
        """The current recurrent state, by state name (per-session shapes)."""
        return decode_map((yield from self._read_state()).state)

    @operation
    def set_state(self, state: _convert.Arrays) -> Plan[None]:
        """Replace the recurrent state (all or some of the states, by name)."""
        req = pb.SetStateRequest(session_id=self.id)
        _convert.state_map(state, self.model, req.state)
        yield from self._rpc("SetState", req)

    @operation
    def snapshot(self) -> Plan[bytes]:
        """An opaque snapshot of the whole session, for ``restore`` here or ``Client.restore`` anywhere."""
        return (yield from self._read_state()).snapshot

    @operation
    def restore(self, snapshot: bytes, *, allow_other_version: bool = False) -> Plan[None]:
        """Put this session back to a snapshot taken earlier of its model (FAILED_PRECONDITION for another
        model, or another version of it unless ``allow_other_version``)."""
        req = pb.SetStateRequest(session_id=self.id, snapshot=snapshot, allow_other_version=allow_other_version)
        yield from self._rpc("SetState", req)
        yield from self._read_state()  # the snapshot carries its step count
