"""``inference.GRPCInferenceService``: the KServe v2 / Triton gRPC API on rnnserve's data plane.

Served on the native API's port, so ``tritonclient.grpc`` code works unchanged. A request with Triton's
sequence parameters is one step of a sequence, kept in a native session (see sequences.py) and
batched with every other session's steps by the model's batcher. A request without them is answered alone,
from the model's initial state (a one-step Predict), and may carry a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import numpy as np

import rnnserve
from rnnserve.proto import kserve_grpc_service_pb2 as kpb
from rnnserve.server.dataplane import DataPlane
from rnnserve.server.errors import InvalidArgument, NotFound, RnnServeError, echo, echo_names
from rnnserve.server.model import LoadedModel
from rnnserve.server.principal import current_principal
from rnnserve.server.repository import FailedModel
from rnnserve.server.sessions import Session
from rnnserve.server.transport.kserve import models
from rnnserve.server.transport.kserve.sequences import SequenceTable, missing_start, sequence_flags
from rnnserve.server.transport.kserve.tensors import DATATYPES, StepInputs, decode_inputs, encode_outputs
from rnnserve.server.transport.native.servicer import _unary
from rnnserve.server.transport.pump import AnswerQueue, observe
from rnnserve.server.transport.status import parse, to_status

log = logging.getLogger(__name__)
SERVICE_NAME = "inference.GRPCInferenceService"  # Triton's name: the path every KServe client calls
EXTENSIONS = ("model_repository", "model_configuration", "statistics", "sequence")
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


def _version(text: str) -> int:
    if not text:
        return 0
    # ASCII digits only: str.isdigit() also takes '²', which int() refuses; 18 digits fit an int64.
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise InvalidArgument(
            f"model version '{echo(text)}' is not a version number: digits 0-9, or empty for the newest"
        )
    return int(text)


def _shape_text(shape) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _check_inputs(model: LoadedModel, inputs: dict[str, np.ndarray], *, sequence: bool) -> None:
    """Names, datatypes and shapes against the model, in Triton's words and its [batch, ...] shapes (the
    data plane's own checks, which speak of per-session shapes, still run after these)."""
    specs = model.manifest.inputs
    for name in inputs:
        if name not in {s.name for s in specs}:
            raise InvalidArgument(f"unexpected inference input '{echo(name)}' for model '{model.name}'")
    for spec in specs:
        expected = [-1, *spec.session_shape]
        if spec.name not in inputs:
            wanted = ", ".join(f"'{s.name}' {DATATYPES[s.dtype]}{_shape_text([-1, *s.session_shape])}" for s in specs)
            raise InvalidArgument(
                f"expected {len(specs)} inputs but got {len(inputs)} inputs for model '{model.name}'; it takes {wanted}"
            )
        arr = inputs[spec.name]
        if arr.dtype != np.dtype(spec.dtype):
            raise InvalidArgument(
                f"inference input '{spec.name}' data-type is '{DATATYPES[arr.dtype.name]}', but model "
                f"'{model.name}' expects '{DATATYPES[spec.dtype]}'"
            )
        shape = list(arr.shape)
        if len(shape) != len(expected) or any(e not in (-1, g) for e, g in zip(expected, shape, strict=True)):
            raise InvalidArgument(
                f"unexpected shape for input '{spec.name}' for model '{model.name}'. Expected "
                f"{_shape_text(expected)}, got {_shape_text(shape)}"
            )
        if sequence and shape[0] != 1:
            raise InvalidArgument(
                f"a sequence request to model '{model.name}' carries one step of one sequence: input "
                f"'{spec.name}' needs batch dimension 1, got {_shape_text(shape)}"
            )


def _wanted(model: LoadedModel, request: kpb.ModelInferRequest) -> list[str]:
    names = [o.name for o in model.manifest.outputs]
    wanted = [o.name for o in request.outputs]
    for name in wanted:
        if name not in names:
            raise InvalidArgument(f"unexpected inference output '{echo(name)}' for model '{model.name}'")
    return wanted or names


class KServeServicer:
    def __init__(self, dataplane: DataPlane, *, max_stream_inflight: int):
        self.dp = dataplane
        self.max_stream_inflight = max_stream_inflight
        self.sequences = SequenceTable()
        # Each loaded model's fast step decoder; a model retired by a reload or unload drops out by itself.
        self._step_inputs: weakref.WeakKeyDictionary[LoadedModel, StepInputs] = weakref.WeakKeyDictionary()

    def _decoder(self, model: LoadedModel) -> StepInputs:
        found = self._step_inputs.get(model)
        if found is None:
            found = self._step_inputs[model] = StepInputs(model)
        return found

    # ---- health and metadata ----------------------------------------------------------------------------
    async def ServerLive(self, request: kpb.ServerLiveRequest, context) -> kpb.ServerLiveResponse:
        return kpb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: kpb.ServerReadyRequest, context) -> kpb.ServerReadyResponse:
        return kpb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: kpb.ModelReadyRequest, context) -> kpb.ModelReadyResponse:
        try:
            self.dp.model(request.name, _version(request.version))
        except NotFound:
            return kpb.ModelReadyResponse(ready=False)
        return kpb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request: kpb.ServerMetadataRequest, context) -> kpb.ServerMetadataResponse:
        return kpb.ServerMetadataResponse(name="rnnserve", version=rnnserve.__version__, extensions=EXTENSIONS)

    async def ModelMetadata(self, request: kpb.ModelMetadataRequest, context) -> kpb.ModelMetadataResponse:
        model = self.dp.model(request.name, _version(request.version))
        return models.model_metadata(model, self.dp.repository.versions(model.name))

    async def ModelConfig(self, request: kpb.ModelConfigRequest, context) -> kpb.ModelConfigResponse:
        model = self.dp.model(request.name, _version(request.version))
        return kpb.ModelConfigResponse(config=models.model_config(model, self.dp.sessions.ttl))

    async def ModelStatistics(self, request: kpb.ModelStatisticsRequest, context) -> kpb.ModelStatisticsResponse:
        if not request.name:
            chosen = self.dp.models()
        elif request.version:
            chosen = [self.dp.model(request.name, _version(request.version))]
        else:
            chosen = self.dp.models(request.name) or [self.dp.model(request.name)]  # the latter: NOT_FOUND
        return kpb.ModelStatisticsResponse(model_stats=[models.model_statistics(m) for m in chosen])

    # ---- repository -------------------------------------------------------------------------------------
    async def RepositoryIndex(self, request: kpb.RepositoryIndexRequest, context) -> kpb.RepositoryIndexResponse:
        return models.repository_index(self.dp.repository, request.ready)

    async def RepositoryModelLoad(
        self, request: kpb.RepositoryModelLoadRequest, context
    ) -> kpb.RepositoryModelLoadResponse:
        if request.parameters:
            # Triton's load may carry a config or files to load instead of the repository's; rnnserve loads
            # only what is in its repository.
            raise InvalidArgument(f"load parameters {echo_names(sorted(request.parameters))} are not supported")
        failed = [m for m in await self.dp.load_model(request.model_name) if isinstance(m, FailedModel)]
        if failed:
            reasons = "; ".join(f"version {f.version}: {f.error}" for f in failed)
            raise InvalidArgument(f"failed to load '{echo(request.model_name)}': {reasons}")
        return kpb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: kpb.RepositoryModelUnloadRequest, context
    ) -> kpb.RepositoryModelUnloadResponse:
        # Never forced: a model with open sequences stays (FAILED_PRECONDITION names how many).
        await self.dp.unload_model(request.model_name)
        return kpb.RepositoryModelUnloadResponse()

    # ---- inference --------------------------------------------------------------------------------------
    async def ModelInfer(self, request: kpb.ModelInferRequest, context) -> kpb.ModelInferResponse:
        return await self.submit(request, client_key(context), context.peer())

    def submit(
        self,
        request: kpb.ModelInferRequest,
        client: str,
        peer: str | None = None,
        *,
        stream: bool = False,
        waiter: asyncio.Future | None = None,
    ) -> Awaitable[kpb.ModelInferResponse | kpb.ModelStreamInferResponse]:
        """Validate the request and queue its work now (so a stream's requests batch together); await the
        result for its response (a ModelStreamInferResponse with ``stream``). Everything refusable is refused
        here, before anything changes. ``client``: ``client_key``; ``peer``: grpc's ``context.peer()``, which
        a START's new session is counted against (--max-sessions-per-client). ``waiter``: a sequence step
        completes this future (a stream writer's own, server/transport/pump.py); a request without a sequence
        leaves it alone."""
        flags = sequence_flags(request)
        _check_empty_final(request)
        version = _version(request.model_version)
        model = self.dp.model(request.model_name, version)
        # A sequence step in the usual form is matched against the model in one pass; anything else (and
        # every refusal) goes through the general decode and checks below.
        step = self._decoder(model).decode(request) if flags.id is not None else None
        wanted = _wanted(model, request)
        if step is None:
            inputs = decode_inputs(request, self.dp.limits)
            _check_inputs(model, inputs, sequence=flags.id is not None)
            if flags.id is None:
                return asyncio.ensure_future(self._stateless(request, model, inputs, wanted, stream))
            step = {name: arr[0] for name, arr in inputs.items()}
            checked = False
        else:
            checked = True
        if not models.is_stateful(model):
            raise InvalidArgument(
                f"model '{model.name}' takes whole sequences in one request: send it without sequence_id"
            )
        key = (client, model.name, flags.id)
        if flags.start:
            # Every check the step would get runs before the live session (if any) is replaced: a refused
            # START leaves its sequence going on as it was.
            step = self.dp.check_step(model, step, 0, checked=checked, queue=True)
            checked = True
            old = self.sequences.pop(key)
            if old is not None:
                self._close(old)  # START on a live sequence begins it again, from the initial state
            session = self.dp.open_session(model.name, model.version, {}, b"", owner=self.dp.limits.session_owner(peer))
            self.sequences.put(key, session)
        else:
            found = self.sequences.get(key)
            if found is None:
                raise missing_start(flags.id, model.name)
            session = found
        try:
            # The data plane's own checks (NaN/Inf...) run here: a refused START is undone just below.
            # keep: on a stream, a client leaving does not drop a step already accepted (it applies, as it
            # would have had its answer been read).
            step_model, future = self.dp.submit_step(session.id, step, 0, checked=checked, future=waiter, keep=stream)
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
        result = self.dp.step_result(model, await future, 0)
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
            result = await self.dp.predict(model.name, model.version, inputs, lengths, {}, {})
            return self._response(request, model, result.outputs, wanted, stream)
        batch = next(iter(inputs.values())).shape[0] if inputs else 0
        one_step = {name: arr[:, None] for name, arr in inputs.items()}  # (batch, T=1, ...)
        lengths = np.ones(batch, np.int64)
        result = await self.dp.predict(model.name, model.version, one_step, lengths, {}, {})
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

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[bytes], context
    ) -> AsyncIterator[kpb.ModelStreamInferResponse]:
        # The reader submits each request as it arrives, so the steps of every sequence on the stream batch
        # together; this generator answers in arrival order (a sequence's steps complete in order anyway).
        # The bounded queue is the backpressure: past max_stream_inflight unanswered requests, reading stops.
        client, peer = client_key(context), context.peer()
        queue = AnswerQueue(self.max_stream_inflight)
        done = object()

        async def read() -> None:
            try:
                async for raw in request_iterator:
                    request = None
                    waiter = queue.take_waiter()
                    try:
                        request = parse(kpb.ModelInferRequest, raw, self.dp.limits.max_message_bytes)
                        pending: Awaitable | Exception = self.submit(request, client, peer, stream=True, waiter=waiter)
                    except Exception as exc:  # answered in this request's response; the stream goes on
                        pending = exc
                    # A sequence step (its answer is a coroutine) took the waiter: its completion wakes the writer.
                    await queue.put((request, pending), waiter_used=waiter is not None and asyncio.iscoroutine(pending))
                await queue.put(done)
            except Exception as exc:  # the transport failed: end the stream with its status
                await queue.put(exc)

        reader = asyncio.get_running_loop().create_task(read())
        try:
            while (item := await queue.get()) is not done:
                if isinstance(item, Exception):
                    code, message = to_status(item)
                    context.set_code(code)  # set, not raised: see servicers._unary
                    context.set_details(message)
                    return
                request, pending = item
                try:
                    if isinstance(pending, Exception):
                        raise pending
                    yield await pending
                except Exception as exc:
                    yield self._stream_error(request, exc)
        finally:
            queue.close(reader, _drop_answer)

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


def _drop_answer(item: object) -> None:
    """A stream request whose answer nobody will read (the client left): a request without a sequence is
    dropped; a sequence step still applies, its outcome observed (``streams.observe``)."""
    if isinstance(item, tuple) and isinstance(item[1], asyncio.Future):
        item[1].cancel()
    elif isinstance(item, tuple):
        observe(item[1])


# name -> (request type, response type); ModelStreamInfer is the one streaming method.
METHODS: dict[str, tuple[type, type]] = {
    "ServerLive": (kpb.ServerLiveRequest, kpb.ServerLiveResponse),
    "ServerReady": (kpb.ServerReadyRequest, kpb.ServerReadyResponse),
    "ModelReady": (kpb.ModelReadyRequest, kpb.ModelReadyResponse),
    "ServerMetadata": (kpb.ServerMetadataRequest, kpb.ServerMetadataResponse),
    "ModelMetadata": (kpb.ModelMetadataRequest, kpb.ModelMetadataResponse),
    "ModelInfer": (kpb.ModelInferRequest, kpb.ModelInferResponse),
    "ModelConfig": (kpb.ModelConfigRequest, kpb.ModelConfigResponse),
    "ModelStatistics": (kpb.ModelStatisticsRequest, kpb.ModelStatisticsResponse),
    "RepositoryIndex": (kpb.RepositoryIndexRequest, kpb.RepositoryIndexResponse),
    "RepositoryModelLoad": (kpb.RepositoryModelLoadRequest, kpb.RepositoryModelLoadResponse),
    "RepositoryModelUnload": (kpb.RepositoryModelUnloadRequest, kpb.RepositoryModelUnloadResponse),
}


def kserve_handler(servicer: KServeServicer) -> grpc.GenericRpcHandler:
    """Handlers under Triton's service name, taking raw bytes as the native API's do (a malformed request
    gets INVALID_ARGUMENT, not grpc's INTERNAL)."""
    handlers: dict[str, grpc.RpcMethodHandler] = {
        name: grpc.unary_unary_rpc_method_handler(
            _unary(getattr(servicer, name), request_type, limits=servicer.dp.limits),
            response_serializer=response_type.SerializeToString,
        )
        for name, (request_type, response_type) in METHODS.items()
    }
    stream: Callable = servicer.ModelStreamInfer
    handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
        stream, response_serializer=kpb.ModelStreamInferResponse.SerializeToString
    )
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
