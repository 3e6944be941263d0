"""What the sync and async clients share: channel settings, session bookkeeping, stream result checks."""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

import grpc
import numpy as np

from rnnserve.client import _convert
from rnnserve.client._errors import RnnServeError, status_code
from rnnserve.client._retry import RETRYABLE
from rnnserve.client._types import BatchResult, ModelInfo
from rnnserve.proto import rnnserve_pb2 as pb
from rnnserve.tensors import encode_map

# Chunks of many timesteps easily pass grpc's 4 MiB default receive limit.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Steps of one session in flight on a stream: enough to hide the network round trip behind the server's
# batching delay, small enough that a failed step has few later steps already applied behind it.
DEFAULT_WINDOW = 8

Metadata: TypeAlias = Mapping[str, str] | Sequence[tuple[str, str]]


# After a dropped connection grpc waits 1 s (growing to 120 s) between reconnection attempts; calls retried
# meanwhile fail at once. A client that retries transparently reconnects sooner.
RECONNECT_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 5000),
]


def channel_options(max_message_bytes: int | None, options: Sequence[tuple[str, Any]] | None) -> list:
    """grpc channel options: reconnection backoff and message limits first, so explicit ``options`` override
    them."""
    opts: list[tuple[str, Any]] = list(RECONNECT_OPTIONS)
    if max_message_bytes is not None:
        opts += [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
    opts += list(options or ())
    return opts


def normalize_metadata(metadata: Metadata | None, token: str | None = None) -> tuple[tuple[str, str], ...] | None:
    """Metadata pairs for every call; ``token`` adds ``authorization: Bearer TOKEN`` (the server's auth)."""
    items = list((metadata.items() if isinstance(metadata, Mapping) else metadata) or ())
    if token is not None:
        items.append(("authorization", f"Bearer {token}"))
    if not items:
        return None
    return tuple((str(k).lower(), str(v)) for k, v in items)


ROUTING_HEADER = "x-session-id"
"""Metadata naming the session on every session call and stream: the gateway routes on it (README: Deployment)."""


class StepRetry(Exception):
    """A stream step failed with a status a retry may change: the stream is reopened and resumes at that step."""

    def __init__(self, error: RnnServeError) -> None:
        super().__init__(str(error))
        self.error = error


def check_resumable(result: pb.StepResult) -> None:
    """Raise StepRetry when a stream result failed with a status the clients retry (``_retry.RETRYABLE``: the
    session moved to another replica, the session store was down, the step's outcome is unknown). Checked
    before the result is paired with its step, so the stream resumes from that step as from a broken stream,
    and the step's index applies it at most once."""
    if result.code and status_code(result.code) in RETRYABLE:
        try:
            _convert.check_result(result)
        except RnnServeError as err:
            raise StepRetry(err) from None


def new_session_id() -> str:
    """A random session id the client proposes on OpenSession (128 bits, URL-safe, as the server's own)."""
    return secrets.token_urlsafe(16)


def with_session(metadata: tuple[tuple[str, str], ...] | None, session_id: str) -> tuple[tuple[str, str], ...]:
    """``metadata`` plus the routing header for ``session_id``."""
    return (*(metadata or ()), (ROUTING_HEADER, session_id))


def reopened(session_id: str, state: pb.SessionState, model: pb.ModelInfo) -> pb.OpenSessionResponse:
    """The answer an OpenSession would have given, rebuilt for a session whose OpenSession landed but whose
    answer was lost (its retry got ALREADY_EXISTS: the id is random, so only our own attempt can hold it)."""
    return pb.OpenSessionResponse(session_id=session_id, model=model, steps=state.steps)


def health_call(channel: Any, service: str) -> tuple[Any, Any]:
    """The standard health service's Check method on ``channel`` and the request for ``service``."""
    try:
        from grpc_health.v1 import health_pb2, health_pb2_grpc
    except ImportError as exc:  # a small, torch-free package, but not one grpcio itself ships
        raise ImportError("health checks need grpcio-health-checking: pip install grpcio-health-checking") from exc
    return health_pb2_grpc.HealthStub(channel).Check, health_pb2.HealthCheckRequest(service=service)


def health_status(response: Any) -> str:
    """The ServingStatus name of a grpc.health.v1 HealthCheckResponse (SERVING, NOT_SERVING, ...)."""
    return response.DESCRIPTOR.fields_by_name["status"].enum_type.values_by_number[response.status].name


def check_window(window: int) -> int:
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return window


def session_key(key: Any) -> tuple[str, ModelInfo | None]:
    """A multi-stream key (a session object or a session id) as (session id, model when known)."""
    if isinstance(key, str):
        return key, None
    return key.id, key.model


class SessionBase:
    """Session state both clients keep: id, model and the server's step count."""

    id: str
    model: ModelInfo
    steps: int

    def __init__(self, response: pb.OpenSessionResponse, metadata: tuple[tuple[str, str], ...] | None) -> None:
        self.id = response.session_id
        # Every call about this session carries its id as metadata, for the gateway's session affinity.
        self._metadata = with_session(metadata, self.id)
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

    def _step_request(
        self, x: Any, *, chunk: bool, outputs: Sequence[str] | None, step_index: int, request_id: str = ""
    ) -> pb.StepRequest:
        """``step_index``: the session's index of this (first) step, so that a retry is applied once."""
        if chunk:
            arrays, num_steps = _convert.stacked_inputs(x, self.model)
        else:
            arrays, num_steps = _convert.named_inputs(x, self.model), 0
        return _convert.step_request(
            self.id, arrays, num_steps=num_steps, outputs=outputs, request_id=request_id, step_index=step_index
        )

    def _state_request(self, state: Mapping[str, Any] | None, target: Any) -> None:
        _convert.state_map(state, self.model, target)

    def _stream_result(self, result: pb.StepResult, request: pb.StepRequest | None) -> _convert.Outputs:
        """Check one stream result against the step it answers (None: no step was outstanding), decode it."""
        _convert.check_result(result)
        expected = request.request_id if request is not None else "nothing"
        if request is None or (result.request_id and result.request_id != expected):
            # The proto promises results in request order; a mismatch would silently pair wrong outputs.
            raise RnnServeError(
                grpc.StatusCode.INTERNAL,
                f"stream result for request {result.request_id} arrived where {expected} was expected",
                session_id=self.id,
            )
        self.steps = result.steps
        return _convert.outputs(result.outputs)


def step_indices(keys: Sequence[Any]) -> list[int]:
    """Each key's step_index: a Session's next step (a session twice in one message: the one after), an id's 0
    (unchecked: the client does not know that session's steps)."""
    seen: dict[str, int] = {}
    indices = []
    for key in keys:
        if isinstance(key, str):
            indices.append(0)
            continue
        seen[key.id] = seen.get(key.id, key.steps) + 1
        indices.append(seen[key.id])
    return indices


def all_indexed(request: pb.StreamStepRequest) -> bool:
    """Whether every step of a stream message carries a step index, so that resending it is safe."""
    batch = request.batch
    rows = len(batch.session_ids)
    return all(s.step_index for s in request.steps) and (
        rows == 0 or (len(batch.step_indices) == rows and all(batch.step_indices))
    )


def multi_request(batch: Mapping[Any, Any], outputs: Sequence[str] | None) -> tuple[pb.StreamStepRequest, list[Any]]:
    """One stream message carrying one step per session of ``batch``; also returns the keys in order."""
    keys = list(batch)
    request = pb.StreamStepRequest()
    for i, (key, index) in enumerate(zip(keys, step_indices(keys), strict=True)):
        session_id, model = session_key(key)
        arrays = _convert.named_inputs(batch[key], model)
        request.steps.append(
            _convert.step_request(session_id, arrays, outputs=outputs, request_id=str(i), step_index=index)
        )
    return request, keys


def multi_results(
    response: pb.StreamStepResponse, keys: list[Any], *, return_exceptions: bool
) -> dict[Any, np.ndarray | dict[str, np.ndarray] | RnnServeError]:
    """Pair a multi-session response with its request keys; raise the first error unless asked not to."""
    if len(response.results) != len(keys):
        raise RnnServeError(
            grpc.StatusCode.INTERNAL,
            f"stream response carries {len(response.results)} results for {len(keys)} steps",
        )
    results: dict[Any, Any] = {}
    first_error: RnnServeError | None = None
    for key, result in zip(keys, response.results, strict=True):
        try:
            _convert.check_result(result)
        except RnnServeError as err:
            results[key] = err
            first_error = first_error or err
            continue
        if not isinstance(key, str):
            key.steps = result.steps
        results[key] = _convert.outputs(result.outputs)
    if first_error is not None and not return_exceptions:
        raise first_error
    return results


def batch_request(
    sessions: Sequence[Any], inputs: Any, outputs: Sequence[str] | None
) -> tuple[pb.StreamStepRequest, list[Any]]:
    """A columnar StepBatch: one timestep of each session, inputs stacked along a leading session axis."""
    keys = list(sessions)
    ids = [session_key(k)[0] for k in keys]
    model = next((m for m in (session_key(k)[1] for k in keys) if m is not None), None)
    request = pb.StreamStepRequest()
    request.batch.session_ids.extend(ids)
    indices = step_indices(keys)
    if any(indices):
        request.batch.step_indices.extend(indices)
    request.batch.outputs.extend(outputs or ())
    encode_map(_convert.named_inputs(inputs, model), request.batch.inputs)
    return request, keys


def batch_results(response: pb.StreamStepResponse, keys: list[Any], *, return_exceptions: bool) -> BatchResult:
    batch = response.batch
    if len(batch.codes) != len(keys):
        raise RnnServeError(
            grpc.StatusCode.INTERNAL, f"stream response carries {len(batch.codes)} rows for {len(keys)} sessions"
        )
    errors: dict[int, RnnServeError] = {}
    for i, (key, code) in enumerate(zip(keys, batch.codes, strict=True)):
        if code:
            errors[i] = RnnServeError(status_code(code), batch.messages[i], session_id=batch.session_ids[i])
        elif not isinstance(key, str):
            key.steps = batch.steps[i]
    if errors and not return_exceptions:
        raise next(iter(errors.values()))
    return BatchResult(_convert.outputs(batch.outputs) if batch.outputs else {}, list(batch.steps), errors)
