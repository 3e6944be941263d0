"""The RnnServe gRPC service. Thin: convert the request, call the data plane, convert the response."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from rnnserve.proto import rnnserve_pb2 as pb
from rnnserve.server.dataplane import DataPlane
from rnnserve.server.errors import InvalidArgument
from rnnserve.server.limits import Limits
from rnnserve.server.model import LoadedModel
from rnnserve.server.repository import FailedModel
from rnnserve.server.transport.native import codec as converters
from rnnserve.server.transport.pump import AnswerQueue, observe
from rnnserve.server.transport.status import parse, to_status

SERVICE_NAME = "rnnserve.v1.RnnServe"


def _outcome(model: LoadedModel | FailedModel) -> pb.ModelInfo:
    if isinstance(model, FailedModel):
        return converters.failed_model_info(model)
    return converters.model_info(model)


class RnnServeServicer:
    def __init__(self, dataplane: DataPlane, *, max_stream_inflight: int, limits: Limits | None = None):
        self.dp = dataplane
        self.max_stream_inflight = max_stream_inflight
        self.limits = limits or Limits()
        # (method, status name) -> refused calls and streamed steps, for the metrics (server/metrics.py).
        self.rejected: Counter[tuple[str, str]] = Counter()

    # ---- models -----------------------------------------------------------------------------------------
    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        models = [self._info(m) for m in self.dp.models(request.name)]
        failed = [
            converters.failed_model_info(f)
            for key, f in sorted(self.dp.repository.failed.items())
            if not request.name or key[0] == request.name
        ]
        return pb.ListModelsResponse(models=models + failed)

    async def GetModel(self, request: pb.GetModelRequest, context) -> pb.ModelInfo:
        return self._info(self.dp.model(request.name, request.version))

    def _info(self, model: LoadedModel) -> pb.ModelInfo:
        """A serving model's description; READY with an error when its last reload failed."""
        info = converters.model_info(model)
        error = self.dp.admin.reload_errors.get((model.name, model.version))
        if error:
            info.error = f"reload failed, still serving the previous load: {error}"
        return info

    async def LoadModel(self, request: pb.LoadModelRequest, context) -> pb.LoadModelResponse:
        loaded = await self.dp.load_model(request.name, request.version)
        return pb.LoadModelResponse(models=[_outcome(m) for m in loaded])

    async def UnloadModel(self, request: pb.UnloadModelRequest, context) -> pb.UnloadModelResponse:
        result = await self.dp.unload_model(request.name, request.version, force=request.force)
        models = [_outcome(m) for m in result.unloaded]
        for info in models:
            info.state = "UNLOADED"
        return pb.UnloadModelResponse(models=models, closed_sessions=result.closed_sessions)

    # ---- sessions ---------------------------------------------------------------------------------------
    async def OpenSession(self, request: pb.OpenSessionRequest, context) -> pb.OpenSessionResponse:
        session = self.dp.open_session(
            request.model,
            request.version,
            self.limits.tensors(request.initial_state),
            request.snapshot,
            self.limits.tensors(request.parameters),
            owner=self.limits.session_owner(context.peer()),
            session_id=request.session_id,
            allow_other_version=request.allow_other_version,
        )
        await self.dp.opened(session)  # a durable model's session is in the session store before we answer
        return pb.OpenSessionResponse(
            session_id=session.id, model=converters.model_info(session.model), steps=session.steps
        )

    async def CloseSession(self, request: pb.SessionRequest, context) -> pb.CloseSessionResponse:
        await self._restored((request.session_id,))  # one only the session store holds is closed there too
        self.dp.close_session(request.session_id)
        return pb.CloseSessionResponse()

    async def ResetSession(self, request: pb.ResetSessionRequest, context) -> pb.ResetSessionResponse:
        await self.dp.reset_session(request.session_id, self.limits.tensors(request.state))
        return pb.ResetSessionResponse()

    async def GetState(self, request: pb.SessionRequest, context) -> pb.SessionState:
        return converters.session_state(await self.dp.get_state(request.session_id))

    async def SetState(self, request: pb.SetStateRequest, context) -> pb.SetStateResponse:
        await self.dp.set_state(
            request.session_id, self.limits.tensors(request.state), request.snapshot, request.allow_other_version
        )
        return pb.SetStateResponse()

    async def GetStats(self, request: pb.StatsRequest, context) -> pb.StatsResponse:
        stats = []
        for m in self.dp.models(request.model):
            s = m.batcher.stats if m.batcher else None
            if s is None:
                continue
            stats.append(
                pb.ModelStats(
                    name=m.name,
                    version=m.version,
                    steps=s.steps,
                    batches=s.batches,
                    max_batch=s.max_batch,
                    batch_histogram=s.histogram,
                    open_sessions=m.open_sessions,
                    compute_ns=s.compute_ns,
                    queue_ns=s.queue_ns,
                    inline_batches=s.inline,
                )
            )
        return pb.StatsResponse(
            models=stats, open_sessions=len(self.dp.sessions), expired_sessions=self.dp.sessions.expired
        )

    async def _restored(self, session_ids: Sequence[str], step_indices: Sequence[int] = ()) -> None:
        """Sessions only the session store holds (this server restarted, or the gateway moved them here), or
        whose copy here is behind it (they moved and came back), are loaded before the call goes on."""
        if (restoring := self.dp.restore_missing(session_ids, step_indices)) is not None:
            await restoring

    # ---- steps ------------------------------------------------------------------------------------------
    async def Step(self, request: pb.StepRequest, context) -> pb.StepResponse:
        self.limits.check_steps(request.num_steps or 1)
        await self._restored((request.session_id,), (request.step_index,))
        model, future = self.dp.submit_step(
            request.session_id,
            self.limits.tensors(request.inputs),
            request.num_steps,
            request.step_index,
            outputs=request.outputs,
        )
        wanted = list(request.outputs)
        result = self.dp.step_result(model, await future, request.num_steps)
        response = pb.StepResponse(session_id=request.session_id, steps=result.steps, request_id=request.request_id)
        converters.fill_outputs(response.outputs, result.outputs, wanted)
        return response

    async def Predict(self, request: pb.PredictRequest, context) -> pb.PredictResponse:
        model = self.dp.model(request.model, request.version)
        wanted = model.check_outputs(request.outputs)
        result = await self.dp.predict(
            request.model,
            request.version,
            self.limits.tensors(request.inputs),
            self.limits.tensor(request.lengths, "lengths") if request.HasField("lengths") else None,
            self.limits.tensors(request.initial_state),
            self.limits.tensors(request.parameters),
        )
        return converters.predict_response(request, model, result, wanted)

    async def StreamStep(self, request_iterator: AsyncIterator[bytes], context) -> AsyncIterator[pb.StreamStepResponse]:
        # The reader queues every step of a message as soon as it arrives (so sessions in different messages
        # batch together); this generator answers messages in arrival order. The bounded queue is the
        # stream's backpressure: past max_stream_inflight unanswered messages the reader stops reading.
        queue = AnswerQueue(self.max_stream_inflight)
        done = object()

        async def read() -> None:
            try:
                async for raw in request_iterator:
                    message = parse(pb.StreamStepRequest, raw, self.limits.max_message_bytes)
                    if message.HasField("batch") and not message.batch.session_ids:
                        # A StepBatch result has a status per row: one with no rows has nowhere to say why.
                        raise InvalidArgument(
                            "the message's StepBatch has no session_ids: give one session id per row of its "
                            "stacked inputs, or leave the batch out"
                        )
                    refused = self.limits.stream_message_error(message)
                    if refused is not None:  # the whole message is refused; the stream goes on
                        batch = message.batch
                        await queue.put(
                            (
                                [(step, None, None, refused) for step in message.steps],
                                (batch, list(batch.session_ids), None, None, [], refused)
                                if message.HasField("batch")
                                else None,
                            )
                        )
                        continue
                    # Before queueing anything of the message, so its steps stay in order.
                    batch_ids = list(message.batch.session_ids)
                    restoring = self.dp.restore_missing(
                        [s.session_id for s in message.steps] + batch_ids,
                        [s.step_index for s in message.steps]
                        + (list(message.batch.step_indices) or [0] * len(batch_ids)),
                    )
                    if restoring is not None:  # (no coroutine per message when there is nothing to restore)
                        await restoring
                    grouped = self._steps_as_group(message.steps)
                    if grouped is not None:
                        batch_part = self._submit_batch(message) if message.HasField("batch") else None
                        await queue.put((grouped, batch_part))
                        continue
                    entries = []
                    # A lone step may complete the writer's own wait future (one wakeup, not two).
                    waiter = queue.take_waiter() if len(message.steps) == 1 and not message.HasField("batch") else None
                    used = False
                    for step in message.steps:
                        try:
                            model, future = self.dp.submit_step(
                                step.session_id,
                                self.limits.tensors(step.inputs),
                                step.num_steps,
                                step.step_index,
                                keep=True,
                                future=waiter,
                                outputs=step.outputs,
                            )
                            used = waiter is not None and future is waiter
                            entries.append((step, model, future, list(step.outputs)))
                        except Exception as exc:  # reported in this step's result
                            entries.append((step, None, None, exc))
                    batch_part = self._submit_batch(message) if message.HasField("batch") else None
                    await queue.put((entries, batch_part), waiter_used=used)
                await queue.put(done)
            except Exception as exc:  # ends the stream with its status
                await queue.put(exc)

        reader = asyncio.get_running_loop().create_task(read())
        item = None
        try:
            while (item := await queue.get()) is not done:
                if isinstance(item, Exception):
                    code, message = to_status(item)
                    self.rejected[("StreamStep", code.name)] += 1
                    # Set, not raised (``context.abort``): see ``_unary``.
                    context.set_code(code)
                    context.set_details(message)
                    return
                entries, batch = item
                response = pb.StreamStepResponse()
                if isinstance(entries, _Grouped):
                    await self._answer_grouped(response, entries)
                    entries = ()
                for step, model, future, extra in entries:
                    result = response.results.add(session_id=step.session_id, request_id=step.request_id)
                    try:
                        if model is None:
                            raise extra
                        # Submitted with keep: a broken stream cancelling this future does not drop the step
                        # (the steps queued after it apply).
                        value = await future
                        out = self.dp.step_result(model, value, step.num_steps)
                        result.steps = out.steps
                        converters.fill_outputs(result.outputs, out.outputs, extra)
                    except Exception as exc:  # one step's failure does not end the stream
                        code, msg = to_status(exc)
                        self.rejected[("StreamStep", code.name)] += 1
                        result.code = code.value[0]
                        result.message = msg
                if batch is not None:
                    await self._answer_batch(response.batch, *batch)
                yield response
        finally:
            # The stream ended: what its client will never read still applies (steps are submitted with
            # keep), and an error of it is nobody's to report.
            _drop_answers(item)
            queue.close(reader, _drop_answers)

    def _steps_as_group(self, steps: Sequence[pb.StepRequest]) -> _Grouped | None:
        """A list-form message of single steps of distinct sessions, with the same input names, shapes and
        dtypes and the same requested outputs, runs as one columnar group: one input check for the message,
        one batch, the model's stacked outputs (the StepBatch fast path). Each step keeps its own result, code
        and message. None: anything else (or anything a step would be refused for), which takes the per-step
        path, so every error reads exactly as it does there."""
        if len(steps) < GROUP_MIN:
            return None
        first = steps[0]
        wanted = list(first.outputs)
        ids = [s.session_id for s in steps]
        if len(set(ids)) != len(ids) or any(s.num_steps or list(s.outputs) != wanted for s in steps):
            return None
        # One model for all (the list form allows several; a StepBatch does not), and outputs it has.
        # (An unknown session fails alone in the group, NOT_FOUND, as it would alone.)
        known = [session for sid in ids if (session := self.dp.sessions.peek(sid)) is not None]
        if not known or any(session.model is not known[0].model for session in known):
            return None
        model = known[0].model
        try:
            wanted_checked = model.check_outputs(wanted)
            decoded = [self.limits.tensors(s.inputs) for s in steps]
        except Exception:
            return None
        names = decoded[0].keys()
        shapes = {n: (a.shape, a.dtype) for n, a in decoded[0].items()}
        for arrays in decoded:
            if arrays.keys() != names or any((a.shape, a.dtype) != shapes[n] for n, a in arrays.items()):
                return None
        stacked = {n: np.stack([arrays[n] for arrays in decoded]) for n in names}
        indices = [s.step_index for s in steps]
        try:
            batch_model, future = self.dp.submit_batch(ids, stacked, indices if any(indices) else ())
        except Exception:
            return None  # refused as a whole (nothing was queued): the per-step path says why, step by step
        return _Grouped(steps, batch_model, future, wanted_checked)

    async def _answer_grouped(self, response: pb.StreamStepResponse, grouped: _Grouped) -> None:
        group = await grouped.future  # a group's rows have no futures of their own: cancelling drops nothing
        model = grouped.model
        names = [o.name for o in model.manifest.outputs] if model is not None else []
        for i, step in enumerate(grouped.steps):
            result = response.results.add(session_id=step.session_id, request_id=step.request_id)
            error = group.errors.get(i)
            if error is not None:
                code, msg = to_status(error)
                self.rejected[("StreamStep", code.name)] += 1
                result.code = code.value[0]
                result.message = msg
                continue
            result.steps = group.steps[i]
            if group.stacked is not None:
                outputs = {n: group.stacked[j][i] for j, n in enumerate(names)}
            else:
                row = group.outputs[i]
                outputs = dict(zip(names, row, strict=True)) if row is not None else {}
            converters.fill_outputs(result.outputs, outputs, grouped.wanted)

    def _submit_batch(self, message: pb.StreamStepRequest) -> tuple:
        batch = message.batch
        ids = list(batch.session_ids)
        try:
            model, future = self.dp.submit_batch(
                ids, self.limits.tensors(batch.inputs), batch.step_indices, outputs=batch.outputs
            )
            wanted = list(batch.outputs)
            return batch, ids, model, future, wanted, None
        except Exception as exc:  # the whole batch fails with this status, the stream goes on
            return batch, ids, None, None, [], exc

    async def _answer_batch(self, result: pb.StepBatchResult, batch, ids, model, future, wanted, error) -> None:
        result.session_ids.extend(ids)
        result.request_id = batch.request_id
        if error is not None:
            code, message = to_status(error)
            self.rejected[("StreamStep", code.name)] += len(ids)
            result.codes.extend([code.value[0]] * len(ids))
            result.messages.extend([message] * len(ids))
            result.steps.extend([0] * len(ids))
            return
        converters.batch_result(result, model, await future, len(ids), wanted)


def _drop_answers(item: object) -> None:
    """Observe the steps of a stream message whose answer nobody will read (``streams.observe``)."""
    if not isinstance(item, tuple):
        return
    entries, batch = item
    if isinstance(entries, _Grouped):
        observe(entries.future)
    else:
        for entry in entries:
            observe(entry[2])
    if batch is not None:
        observe(batch[3])


GROUP_MIN = 8
"""Single steps in one list-form message from which they run as a columnar group (fewer: per step)."""


@dataclass
class _Grouped:
    """A list-form message's steps submitted as one columnar group (``_steps_as_group``)."""

    steps: Sequence[pb.StepRequest]
    model: LoadedModel | None
    future: asyncio.Future
    wanted: list[str]


# name -> (request type, response type, streaming?)
METHODS: dict[str, tuple[type, type, bool]] = {
    "ListModels": (pb.ListModelsRequest, pb.ListModelsResponse, False),
    "GetModel": (pb.GetModelRequest, pb.ModelInfo, False),
    "LoadModel": (pb.LoadModelRequest, pb.LoadModelResponse, False),
    "UnloadModel": (pb.UnloadModelRequest, pb.UnloadModelResponse, False),
    "OpenSession": (pb.OpenSessionRequest, pb.OpenSessionResponse, False),
    "CloseSession": (pb.SessionRequest, pb.CloseSessionResponse, False),
    "ResetSession": (pb.ResetSessionRequest, pb.ResetSessionResponse, False),
    "GetState": (pb.SessionRequest, pb.SessionState, False),
    "SetState": (pb.SetStateRequest, pb.SetStateResponse, False),
    "Step": (pb.StepRequest, pb.StepResponse, False),
    "Predict": (pb.PredictRequest, pb.PredictResponse, False),
    "GetStats": (pb.StatsRequest, pb.StatsResponse, False),
    "StreamStep": (pb.StreamStepRequest, pb.StreamStepResponse, True),
}


def _unary(
    method: Callable, request_type: type, rejected: Counter[tuple[str, str]] | None = None, *, limits: Limits
) -> Callable:
    name = method.__name__

    async def handler(raw: bytes, context: grpc.aio.ServicerContext):
        try:
            return await method(parse(request_type, raw, limits.max_message_bytes), context)
        except Exception as exc:
            code, message = to_status(exc, log_as=request_type.DESCRIPTOR.name)
            if rejected is not None:
                rejected[(name, code.name)] += 1
        # The status is set, not raised (``context.abort``): grpc keeps the error it raises in a reference
        # cycle with this frame, and so the refused request's bytes, until a full collection.
        context.set_code(code)
        context.set_details(message)
        return None

    return handler


def generic_handler(servicer: RnnServeServicer) -> grpc.GenericRpcHandler:
    """Handlers that take raw request bytes (no grpc-side deserializer), so malformed requests get
    INVALID_ARGUMENT from ``parse`` instead of grpc's INTERNAL."""
    handlers = {}
    for name, (request_type, response_type, streaming) in METHODS.items():
        method = getattr(servicer, name)
        if streaming:
            handlers[name] = grpc.stream_stream_rpc_method_handler(
                method, request_deserializer=None, response_serializer=response_type.SerializeToString
            )
        else:
            handlers[name] = grpc.unary_unary_rpc_method_handler(
                _unary(method, request_type, servicer.rejected, limits=servicer.limits),
                request_deserializer=None,
                response_serializer=response_type.SerializeToString,
            )
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
