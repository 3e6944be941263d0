"""The protocol core of a multi-stream (one StreamStep call carrying steps of many sessions per message): its
messages, how their answers pair with the caller's keys, and when a message may be resent on a new stream.

Its operations are plans (``_plan``) yielding the actions below, which each shell performs on its own call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from rnnserve.client import _convert
from rnnserve.client._errors import RnnServeError, status_code
from rnnserve.client._plan import Action, Plan, Sleep, in_turn
from rnnserve.client._retry import Failure
from rnnserve.client._types import BatchResult, ModelInfo
from rnnserve.proto import rnnserve_pb2 as pb
from rnnserve.tensors import encode_map

if TYPE_CHECKING:
    from rnnserve.client._protocol import ClientProtocol


@dataclass(frozen=True, slots=True)
class Exchange(Action):
    """Write ``request`` on the stream and read one response; the shell answers the response, None when the
    server ended the stream, or throws in the grpc error."""

    request: pb.StreamStepRequest


@dataclass(frozen=True, slots=True)
class Cancel(Action):
    """End the current call (it failed): the shell cancels it."""


@dataclass(frozen=True, slots=True)
class Reopen(Action):
    """Open a new StreamStep call to send on from now on."""


def session_key(key: Any) -> tuple[str, ModelInfo | None]:
    """A multi-stream key (a session object or a session id) as (session id, model when known)."""
    if isinstance(key, str):
        return key, None
    return key.id, key.model


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
        _convert.fill_step(
            request.steps.add(), session_id, arrays, outputs=outputs, request_id=str(i), step_index=index
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


class MultiStreamProtocol:
    """One StreamStep call carrying steps of many sessions per message, e.g. for a gateway.

    Use as a context manager; ``step`` is safe to call concurrently (callers take turns on the stream)::

        with client.multi_stream() as ms:
            ys = ms.step({s1: x1, s2: x2})
    """

    def __init__(self, client: ClientProtocol) -> None:
        self._client = client
        self._closed = False

    def _exchange(self, request: pb.StreamStepRequest) -> Plan[pb.StreamStepResponse]:
        """Send one message and read its response; after a retryable failure the message is sent again on a
        new stream, when every step in it carries a step index (so none is applied twice)."""
        if self._closed:
            raise RuntimeError("this multi-stream is closed")
        attempts = self._client._attempts()
        while True:
            failure: Failure
            try:
                response = yield Exchange(request)
            except grpc.RpcError as err:
                failure = err
            else:
                if response is not None:
                    return response
                failure = RnnServeError(grpc.StatusCode.UNAVAILABLE, "the server ended the stream")
            yield Cancel()
            try:
                delay = attempts.after(failure, allowed=all_indexed(request))
            except RnnServeError:
                self._closed = True
                raise
            yield Sleep(delay)
            yield Reopen()

    def _closing(self) -> bool:
        """Mark the multi-stream closed; True when it had failed (its call is over: cancel, do not drain it)."""
        failed = self._closed
        self._closed = True
        return failed

    @in_turn
    def step(
        self,
        batch: Mapping[Any, _convert.Inputs],
        *,
        outputs: Sequence[str] | None = None,
        return_exceptions: bool = False,
    ) -> Plan[dict[Any, Any]]:
        """Apply one timestep to each session of ``batch`` in one message; outputs keyed like ``batch``.

        Keys are Session objects or session ids (with an id, inputs must be a dict by name). A failed
        step raises RnnServeError after the others were applied, or with ``return_exceptions=True``
        stands in the result as its RnnServeError.
        """
        request, keys = multi_request(batch, outputs)
        response = yield from self._exchange(request)
        return multi_results(response, keys, return_exceptions=return_exceptions)

    @in_turn
    def step_batch(
        self,
        sessions: Sequence[Any],
        inputs: Any,
        *,
        outputs: Sequence[str] | None = None,
        return_exceptions: bool = False,
    ) -> Plan[BatchResult]:
        """One timestep of each of ``sessions`` (all on one model) in columnar form: ``inputs`` stacked along
        a leading axis, one row per session (an array, or a dict by input name). The server decodes and
        checks the whole stack at once, so this is the fast path for a gateway with many devices.

        A failed row raises RnnServeError after the other rows were applied, or with
        ``return_exceptions=True`` is reported in ``BatchResult.errors``.
        """
        request, keys = batch_request(sessions, inputs, outputs)
        response = yield from self._exchange(request)
        return batch_results(response, keys, return_exceptions=return_exceptions)
