"""The KServe API's codec: a ModelInferRequest to the data plane's work, and its result to a response.

A request with Triton's sequence parameters is one step of a sequence, kept in a native session (see
sequences.py) and queued with every other session's steps. A request without
sequence parameters is answered alone, from the model's initial state (a one-step Predict), and may carry a
batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Sequence

import grpc
import numpy as np

from rnnserve.proto import kserve_grpc_service_pb2 as kpb
from rnnserve.server.core.session import Session
from rnnserve.server.core.validation import Shape, TensorChecks, Wording
from rnnserve.server.core.work import StepResult
from rnnserve.server.dataplane import DataPlane
from rnnserve.server.errors import InvalidArgument, RnnServeError, echo
from rnnserve.server.models.model import LoadedModel
from rnnserve.server.models.predict import PredictRequest
from rnnserve.server.principal import current_principal
from rnnserve.server.transport.kserve import models
from rnnserve.server.transport.kserve.sequences import SequenceTable, missing_start, sequence_flags
from rnnserve.server.transport.kserve.tensors import DATATYPES, decode_inputs, encode_outputs
from rnnserve.server.transport.pump import observe
from rnnserve.server.transport.rpc import parse
from rnnserve.server.transport.status import to_status

log = logging.getLogger(__name__)
# Triton's decoupled-streaming convention: a request carrying EMPTY_FINAL (perf_analyzer sends it, tritonclient
# with enable_empty_final_response) has each stream response say whether it is the request's last. An rnnserve
# model answers every request with exactly one response, so that one is marked final and no empty final
# response follows.
EMPTY_FINAL = "triton_enable_empty_final_response"
FINAL_RESPONSE = "triton_final_response"


def client_key(context: grpc.aio.ServicerContext) -> str:
    """Whose sequence ids these are: the caller's authenticated identities (its mutual-TLS certificate, its
    token's principal) when it has any, so one client can neither reach nor end another's sequence; else the
    one namespace all anonymous callers share, as on Triton, whose clients pick ids unique across clients and
    may continue a sequence from another connection. (Connections cannot stand in for clients: grpc shares
    one connection between the channels of a process, and a reconnect would lose sequences.)"""
    identities = context.peer_identities()
    principal = current_principal()
    key = "id:" + ",".join(i.decode(errors="replace") for i in identities) if identities else ""
    return key if principal is None else f"{key}|principal:{principal}"


def _check_empty_final(request: kpb.ModelInferRequest) -> None:
    params = request.parameters
    if EMPTY_FINAL in params and params[EMPTY_FINAL].WhichOneof("parameter_choice") != "bool_param":
        raise InvalidArgument(f"invalid value type for '{EMPTY_FINAL}' parameter, expected bool_param")


def version_number(text: str) -> int:
    if not text:
        return 0
    # ASCII digits only: str.isdigit() also takes '²', which int() refuses; 18 digits fit an int64.
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise InvalidArgument(
            f"model version '{echo(text)}' is not a version number: digits 0-9, or empty for the newest"
        )
    return int(text)


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


class TritonWording(Wording):
    """Triton's words, with its datatype names and [batch, ...] shapes, for the refusals Triton clients (and
    tests/integration/test_kserve.py) match on; every other refusal reads as on the native API."""

    def dtype(self, kind: str, name: str, checks: TensorChecks, expected: np.dtype, got: np.dtype) -> str:
        return (
            f"inference {kind} '{name}' data-type is '{DATATYPES[got.name]}', but model '{checks.name}' expects "
            f"'{DATATYPES[expected.name]}'"
        )

    def shape(self, kind: str, name: str, checks: TensorChecks, expected: Shape, got: Shape, lead: str) -> str:
        return (
            f"unexpected shape for {kind} '{name}' for model '{checks.name}'. Expected {_shape_text(expected)}, "
            f"got {_shape_text(got)}"
        )

    def unknown_outputs(self, checks: TensorChecks, unknown: list[str]) -> str:
        return f"unexpected inference output '{echo(unknown[0])}' for model '{checks.name}'"


TRITON = TritonWording()


def check_inputs(model: LoadedModel, inputs: dict[str, np.ndarray], *, sequence: bool) -> dict[str, np.ndarray]:
    """A request's inputs against the model, returned in manifest order: per-session shapes behind a leading
    batch axis, which a sequence step (one step of one sequence) has at 1. NaN/Inf are checked on the step."""
    checked = model.checks.inputs(inputs, -1, lead="batch", finite=False, wording=TRITON)
    if sequence:
        for name, arr in checked.items():
            if arr.shape[0] != 1:
                raise InvalidArgument(
                    f"a sequence request to model '{model.name}' carries one step of one sequence: input "
                    f"'{name}' needs batch dimension 1, got {_shape_text(arr.shape)}"
                )
    return checked


def wanted_outputs(model: LoadedModel, request: kpb.ModelInferRequest) -> list[str]:
    """The outputs the response carries: those the request names, else all."""
    return model.checks.outputs([o.name for o in request.outputs], TRITON) or model.checks.output_names


class InferCodec:
    """ModelInfer requests, unary or streamed, to the data plane's work and back; owns the live sequences."""

    def __init__(self, dataplane: DataPlane):
        self.dp = dataplane
        self.sequences = SequenceTable()

    def submit(
        self,
        request: kpb.ModelInferRequest,
        client: str,
        peer: str | None = None,
        *,
        stream: bool = False,
    ) -> Awaitable[kpb.ModelInferResponse | kpb.ModelStreamInferResponse]:
        """Validate the request and queue its work now (so a stream's requests batch together); await the
        result for its response (a ModelStreamInferResponse with ``stream``). Everything refusable is refused
        here, before anything changes. ``client``: ``client_key``; ``peer``: grpc's ``context.peer()``, which
        a START's new session is counted against (--max-sessions-per-client)."""
        flags = sequence_flags(request)
        _check_empty_final(request)
        model = self.dp.model(request.model_name, version_number(request.model_version))
        wanted = wanted_outputs(model, request)
        sequence = flags.id
        if sequence is None:
            inputs = decode_inputs(request, self.dp.limits)
            check_inputs(model, inputs, sequence=False)
            return asyncio.ensure_future(self._stateless(request, model, inputs, wanted, stream))
        inputs = check_inputs(model, decode_inputs(request, self.dp.limits), sequence=True)
        step = {name: arr[0] for name, arr in inputs.items()}
        if not models.is_stateful(model):
            raise InvalidArgument(
                f"model '{model.name}' takes whole sequences in one request: send it without sequence_id"
            )
        key = (client, model.name, sequence)
        if flags.start:
            # Every check the step would get runs before the live session (if any) is replaced: a refused
            # START leaves its sequence going on as it was.
            model.checks.finite(step)
            self.dp.check_room(model)
            old = self.sequences.pop(key)
            if old is not None:
                self._close(old)  # START on a live sequence begins it again, from the initial state
            session = self.dp.open_session(model.name, model.version, {}, b"", owner=self.dp.limits.session_owner(peer))
            self.sequences.put(key, session)
        else:
            found = self.sequences.get(key)
            if found is None:
                raise missing_start(sequence, model.name)
            session = found
        try:
            # A use of the session (its idle TTL starts again); one that ended meanwhile is refused here.
            live = self.dp.sessions.get(session.id)
            if not flags.start:  # (a START's step was checked before its sequence was replaced)
                model.checks.finite(step)
            # The data plane's own refusals (queue limits) come here too: a refused START is undone just
            # below. keep: on a stream, a client leaving does not drop a step already accepted (it applies, as
            # it would have had its answer been read).
            step_model, future = self.dp.submit_step(live, step, 0, keep=stream)
        except Exception:
            if flags.start:
                self.sequences.pop(key)
                self._close(session)
            raise
        if flags.end:
            # Out of the table now, so a START for the same id right behind it (a pipelined stream) opens a
            # new session; the session itself closes once this step is done.
            self.sequences.pop(key)
            future.add_done_callback(lambda _: self._close(session))
        return self._sequence_response(request, step_model, future, wanted, stream)

    async def _sequence_response(
        self,
        request: kpb.ModelInferRequest,
        model: LoadedModel,
        future: asyncio.Future,
        wanted: list[str],
        stream: bool,
    ) -> kpb.ModelInferResponse | kpb.ModelStreamInferResponse:
        # A coroutine, not a task: the stream's writer awaits it in order, and a task per step costs more
        # than the step's own bookkeeping. The step itself is queued already (``submit``).
        result = StepResult.of(model.checks.output_names, await future, 0)
        return self._response(request, model, result.outputs, wanted, stream, one_row=True)

    async def _stateless(
        self,
        request: kpb.ModelInferRequest,
        model: LoadedModel,
        inputs: dict[str, np.ndarray],
        wanted: list[str],
        stream: bool,
    ) -> kpb.ModelInferResponse | kpb.ModelStreamInferResponse:
        """No sequence: one request, answered alone from the model's initial state (Predict)."""
        m = model.manifest
        if m.kind == "sequence":
            lengths = inputs.pop(m.lengths_input or "", None)
            result = await self.dp.predict(model.name, model.version, PredictRequest(inputs, lengths, {}, {}))
            return self._response(request, model, result.outputs, wanted, stream)
        batch = next(iter(inputs.values())).shape[0] if inputs else 0
        one_step = {name: arr[:, None] for name, arr in inputs.items()}  # (batch, T=1, ...)
        lengths = np.ones(batch, np.int64)
        result = await self.dp.predict(model.name, model.version, PredictRequest(one_step, lengths, {}, {}))
        return self._response(request, model, {k: v[:, 0] for k, v in result.outputs.items()}, wanted, stream)

    @staticmethod
    def _response(
        request: kpb.ModelInferRequest,
        model: LoadedModel,
        outputs: dict[str, np.ndarray],
        wanted: list[str],
        stream: bool,
        *,
        one_row: bool = False,
    ) -> kpb.ModelInferResponse | kpb.ModelStreamInferResponse:
        # A stream's response is filled inside its ModelStreamInferResponse (wrapping it afterwards copies it).
        wrapper = kpb.ModelStreamInferResponse() if stream else None
        response = wrapper.infer_response if wrapper is not None else kpb.ModelInferResponse()
        response.model_name = model.name
        response.model_version = model.version_text
        response.id = request.id
        encode_outputs(response, outputs, wanted, one_row=one_row)
        if wrapper is None:
            return response
        if EMPTY_FINAL in request.parameters:
            response.parameters[FINAL_RESPONSE].bool_param = True
        return wrapper

    def _close(self, session: Session) -> None:
        with contextlib.suppress(RnnServeError):  # it expired or was ended meanwhile: nothing left to free
            self.dp.close_session(session.id)

    @staticmethod
    def _stream_error(request: kpb.ModelInferRequest | None, exc: Exception) -> kpb.ModelStreamInferResponse:
        code, message = to_status(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.error("internal error in ModelStreamInfer: %s", message)
        response = kpb.ModelStreamInferResponse(error_message=message)
        if request is not None:  # lets the client tell which request failed
            response.infer_response.model_name = request.model_name
            response.infer_response.id = request.id
            if EMPTY_FINAL in request.parameters:  # an error ends its request too
                response.infer_response.parameters[FINAL_RESPONSE].bool_param = True
        return response


class InferStream:
    """ModelStreamInfer's codec for the stream pump (server/transport/pump.py): each request is answered in
    its own response, a refused one with its error in the response's ``error_message``; the stream goes on."""

    def __init__(self, infer: InferCodec, client: str, peer: str | None):
        self.infer = infer
        self.client = client  # ``client_key``
        self.peer = peer
        self.max_bytes = infer.dp.limits.max_message_bytes

    def receive(self, raw: bytes) -> tuple[bytes, None]:
        return raw, None  # parsed in ``submit``: a malformed request is answered in the stream, not ended

    def submit(self, raw: bytes) -> tuple[kpb.ModelInferRequest | None, Awaitable | Exception]:
        request = None
        try:
            request = parse(kpb.ModelInferRequest, raw, self.max_bytes)
            pending: Awaitable | Exception = self.infer.submit(request, self.client, self.peer, stream=True)
        except Exception as exc:  # answered in this request's response; the stream goes on
            pending = exc
        return request, pending

    def answer(self, item: tuple[kpb.ModelInferRequest | None, Awaitable | Exception]) -> Awaitable:
        pending = item[1]
        if isinstance(pending, Exception):
            raise pending
        return pending

    def failed(self, item: tuple[kpb.ModelInferRequest | None, Awaitable | Exception], exc: Exception):
        return InferCodec._stream_error(item[0], exc)

    def drop(self, item: tuple[kpb.ModelInferRequest | None, Awaitable | Exception]) -> None:
        """A request without a sequence is dropped; a sequence step still applies, its outcome observed."""
        pending = item[1]
        if isinstance(pending, asyncio.Future):
            pending.cancel()
        elif not isinstance(pending, Exception):
            observe(pending)

    def ended(self, code: grpc.StatusCode) -> None:
        pass  # KServe refusals are not counted
