"""The native API's codec: its messages to the data plane's work and the results back into responses.

A Step request is one step (or chunk) of one session. A StreamStep message carries list-form steps and/or a
columnar StepBatch: the StepBatch is one row per session sharing one group; list-form steps are each their own
step, except that eight or more single steps of distinct sessions of one model, alike in names, shapes and
dtypes (what a multiplexing client sends), are stacked and queued as one group too (``GROUP_MIN``), their
results answered per step exactly as they would be one by one.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import Counter
from collections.abc import Awaitable, Mapping, Sequence

import grpc
import numpy as np

from rnnserve.manifest import StateSpec, TensorSpec
from rnnserve.proto import rnnserve_pb2 as pb
from rnnserve.server.core.work import JobGroup, StepOutcome, StepResult
from rnnserve.server.dataplane import DataPlane, SessionStateView
from rnnserve.server.errors import InvalidArgument
from rnnserve.server.limits import Limits
from rnnserve.server.models.model import LoadedModel
from rnnserve.server.models.predict import PredictResult
from rnnserve.server.models.repository import FailedModel
from rnnserve.server.transport.pump import observe
from rnnserve.server.transport.rpc import parse
from rnnserve.server.transport.status import to_status
from rnnserve.tensors import DTYPE_TO_PB, encode_map, to_proto


def tensor_spec(spec: TensorSpec) -> pb.TensorSpec:
    return pb.TensorSpec(name=spec.name, dtype=DTYPE_TO_PB[spec.dtype], shape=spec.session_shape)


def state_spec(spec: StateSpec) -> pb.StateSpec:
    return pb.StateSpec(
        name=spec.name,
        output_name=spec.output,
        dtype=DTYPE_TO_PB[spec.dtype],
        shape=spec.session_shape,
        batch_axis=spec.batch_axis,
        initial=spec.initial.kind,
    )


_STATIC_INFO: weakref.WeakKeyDictionary[LoadedModel, pb.ModelInfo] = weakref.WeakKeyDictionary()
"""Each loaded model's description but its session count; a model retired by a reload or unload drops out."""


def model_info(model: LoadedModel) -> pb.ModelInfo:
    """The model's description; the static part is built once per model (OpenSession returns it every time)."""
    cached = _STATIC_INFO.get(model)
    if cached is None:
        cached = _STATIC_INFO[model] = _static_model_info(model)
    info = pb.ModelInfo()
    info.CopyFrom(cached)
    info.open_sessions = model.open_sessions
    return info


def _static_model_info(model: LoadedModel) -> pb.ModelInfo:
    m = model.manifest
    return pb.ModelInfo(
        name=m.name,
        version=m.version,
        format=m.format,
        state="READY",
        inputs=[tensor_spec(t) for t in m.inputs if t.name != m.lengths_input],  # lengths go in their own field
        outputs=[tensor_spec(t) for t in m.outputs],
        states=[state_spec(s) for s in m.session_states],  # a context window's output_name is its input
        state_bytes=m.state_bytes,
        max_batch_size=model.max_batch_size,
        allow_nonfinite=m.allow_nonfinite,
        source=m.source,
        kind=m.kind,
        parameters=[tensor_spec(p) for p in m.parameters],
        constants=[pb.TensorSpec(name=c.name, dtype=DTYPE_TO_PB[c.dtype], shape=c.shape) for c in m.constants],
        device=model.runtime.device,
    )


# ModelStats field -> the BatchStats counter it reports.
_STATS = {
    "steps": "steps",
    "batches": "batches",
    "max_batch": "max_batch",
    "batch_histogram": "histogram",
    "compute_ns": "compute_ns",
    "queue_ns": "queue_ns",
    "inline_batches": "inline",
}


def model_stats(model: LoadedModel) -> pb.ModelStats:
    """A model version's batching statistics (GetStats)."""
    stats = model.batcher.stats
    counters = {wire: getattr(stats, name) for wire, name in _STATS.items()}
    return pb.ModelStats(name=model.name, version=model.version, open_sessions=model.open_sessions, **counters)


def failed_model_info(failed: FailedModel) -> pb.ModelInfo:
    return pb.ModelInfo(name=failed.name, version=failed.version, state="FAILED", error=failed.error)


def predict_response(
    request: pb.PredictRequest, model: LoadedModel, result: PredictResult, wanted: list[str]
) -> pb.PredictResponse:
    response = pb.PredictResponse(model=model.name, version=model.version, request_id=request.request_id)
    fill_outputs(response.outputs, result.outputs, wanted)
    encode_map(result.final_state, response.final_state)
    return response


def session_state(view: SessionStateView) -> pb.SessionState:
    msg = pb.SessionState(
        session_id=view.session_id,
        model=view.model,
        version=view.version,
        steps=view.steps,
        snapshot=view.snapshot,
    )
    encode_map(view.state, msg.state)
    return msg


def fill_outputs(target, outputs: Mapping[str, np.ndarray], wanted: list[str]) -> None:
    """Encode the outputs a request asked for (all when ``wanted`` is empty)."""
    encode_map({k: v for k, v in outputs.items() if not wanted or k in wanted}, target)


def batch_result(
    result: pb.StepBatchResult, model: LoadedModel | None, group: JobGroup, n: int, wanted: list[str]
) -> None:
    """Fill a StepBatchResult from a finished JobGroup: outputs stacked by row, zeros in failed rows."""
    codes = [0] * n
    messages = [""] * n
    for i, exc in group.errors.items():
        code, message = to_status(exc)
        codes[i], messages[i] = code.value[0], message
    result.codes.extend(codes)
    result.messages.extend(messages)
    result.steps.extend(group.steps)
    if model is not None and group.stacked is not None:
        # The whole message ran as one batch: each output is already stacked by row.
        for spec, value in zip(model.manifest.outputs, group.stacked, strict=True):
            if not wanted or spec.name in wanted:
                to_proto(value, result.outputs[spec.name])
        return
    done = [o for o in group.outputs if o is not None]
    if model is None or not done:
        return
    for j, spec in enumerate(model.manifest.outputs):
        if wanted and spec.name not in wanted:
            continue
        first = done[0][j]
        stacked = np.zeros((n, *first.shape), dtype=first.dtype)
        for i, outputs in enumerate(group.outputs):
            if outputs is not None:
                stacked[i] = outputs[j]
        to_proto(stacked, result.outputs[spec.name])


# ---- Step ---------------------------------------------------------------------------------------------------
def submit_step(
    dp: DataPlane, limits: Limits, request: pb.StepRequest, *, keep: bool = False
) -> tuple[LoadedModel, asyncio.Future]:
    """A StepRequest (a Step's, or a list-form stream step) decoded, checked against its session's model and
    queued: its model and the future of its outcome."""
    arrays = limits.tensors(request.inputs)
    session = dp.sessions.get(request.session_id)
    checks = session.model.checks
    inputs = checks.inputs(arrays, request.num_steps)
    if request.outputs:
        checks.outputs(request.outputs)
    return dp.submit_step(session, inputs, request.num_steps, request.step_index, keep=keep)


def step_response(request: pb.StepRequest, model: LoadedModel, done: StepOutcome) -> pb.StepResponse:
    """A Step's response from its finished future's value."""
    response = pb.StepResponse(session_id=request.session_id, request_id=request.request_id)
    fill_result(response, model, done, request.num_steps, list(request.outputs))
    return response


def fill_result(
    result: pb.StepResponse | pb.StepResult, model: LoadedModel, outcome: StepOutcome, num_steps: int, wanted: list[str]
) -> None:
    """A step's step count and the outputs asked for, from its outcome (its future's value)."""
    out = StepResult.of(model.checks.output_names, outcome, num_steps)
    result.steps = out.steps
    fill_outputs(result.outputs, out.outputs, wanted)


# ---- StreamStep ---------------------------------------------------------------------------------------------
GROUP_MIN = 8
"""Single steps in one list-form message from which they run as a columnar group (fewer: per step)."""


class PendingStep:
    """One list-form step of a message: queued (``future``) or refused (``error``)."""

    __slots__ = ("error", "future", "model", "request", "wanted")

    def __init__(
        self,
        request: pb.StepRequest,
        model: LoadedModel | None,
        future: asyncio.Future | None,
        wanted: list[str],
        error: Exception | None = None,
    ):
        self.request = request
        self.model = model
        self.future = future
        self.wanted = wanted
        self.error = error


class PendingGroup:
    """A list-form message's single steps queued as one columnar group (``StepStream._as_group``)."""

    __slots__ = ("future", "model", "requests", "wanted")

    def __init__(
        self, requests: Sequence[pb.StepRequest], model: LoadedModel | None, future: asyncio.Future, wanted: list[str]
    ):
        self.requests = requests
        self.model = model
        self.future = future
        self.wanted = wanted


class PendingBatch:
    """A message's StepBatch: queued as one group (``future``) or refused as a whole (``error``)."""

    __slots__ = ("error", "future", "ids", "model", "request", "wanted")

    def __init__(
        self,
        request: pb.StepBatch,
        ids: list[str],
        model: LoadedModel | None = None,
        future: asyncio.Future | None = None,
        wanted: list[str] | None = None,
        error: Exception | None = None,
    ):
        self.request = request
        self.ids = ids
        self.model = model
        self.future = future
        self.wanted = wanted or []
        self.error = error


class PendingMessage:
    """A stream message's queued work, answered in one StreamStepResponse."""

    __slots__ = ("batch", "steps")

    def __init__(self, steps: list[PendingStep] | PendingGroup, batch: PendingBatch | None):
        self.steps = steps
        self.batch = batch


class RefusedMessage:
    """A message refused as a whole (past --max-steps-per-message): each of its steps answers the refusal."""

    __slots__ = ("error", "message")

    def __init__(self, message: pb.StreamStepRequest, error: Exception):
        self.message = message
        self.error = error


class StepStream:
    """StreamStep's codec for the stream pump (server/transport/pump.py)."""

    def __init__(self, dataplane: DataPlane, limits: Limits, rejected: Counter[tuple[str, str]]):
        self.dp = dataplane
        self.limits = limits
        self.rejected = rejected  # (method, status name) -> refused steps, for the metrics

    def receive(self, raw: bytes) -> tuple[pb.StreamStepRequest | RefusedMessage, Awaitable[None] | None]:
        message = parse(pb.StreamStepRequest, raw, self.limits.max_message_bytes)
        if message.HasField("batch") and not message.batch.session_ids:
            # A StepBatch result has a status per row: one with no rows has nowhere to say why.
            raise InvalidArgument(
                "the message's StepBatch has no session_ids: give one session id per row of its stacked inputs, "
                "or leave the batch out"
            )
        refused = self.limits.stream_message_error(message)
        if refused is not None:  # the whole message is refused; the stream goes on
            return RefusedMessage(message, refused), None
        # Sessions only the session store holds are loaded before anything of the message is queued, so its
        # steps stay in order.
        steps = message.steps
        batch_ids = list(message.batch.session_ids)
        restoring = self.dp.restore_missing(
            [s.session_id for s in steps] + batch_ids,
            [s.step_index for s in steps] + (list(message.batch.step_indices) or [0] * len(batch_ids)),
        )
        return message, restoring

    def submit(self, message: pb.StreamStepRequest | RefusedMessage) -> PendingMessage:
        if isinstance(message, RefusedMessage):
            error, refused = message.error, message.message
            batch = PendingBatch(refused.batch, list(refused.batch.session_ids), error=error)
            return PendingMessage(
                [PendingStep(step, None, None, [], error) for step in refused.steps],
                batch if refused.HasField("batch") else None,
            )
        has_batch = message.HasField("batch")
        group = self._as_group(message.steps)
        if group is not None:
            return PendingMessage(group, self._submit_batch(message.batch) if has_batch else None)
        steps = []
        for step in message.steps:
            try:
                model, future = submit_step(self.dp, self.limits, step, keep=True)
                steps.append(PendingStep(step, model, future, list(step.outputs)))
            except Exception as exc:  # reported in this step's result
                steps.append(PendingStep(step, None, None, [], exc))
        return PendingMessage(steps, self._submit_batch(message.batch) if has_batch else None)

    def _as_group(self, steps: Sequence[pb.StepRequest]) -> PendingGroup | None:
        """A list-form message of single steps of distinct sessions, with the same input names, shapes and
        dtypes and the same requested outputs, runs as one columnar group: one input check for the message,
        one batch, the model's stacked outputs (the StepBatch's way). Each step keeps its own result, code and
        message. None: anything else (or anything a step would be refused for), which takes the per-step way,
        so every error reads exactly as it does there."""
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
            wanted_checked = model.checks.outputs(wanted)
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
            return None  # refused as a whole (nothing was queued): the per-step way says why, step by step
        return PendingGroup(steps, batch_model, future, wanted_checked)

    def _submit_batch(self, batch: pb.StepBatch) -> PendingBatch:
        ids = list(batch.session_ids)
        try:
            model, future = self.dp.submit_batch(
                ids, self.limits.tensors(batch.inputs), batch.step_indices, outputs=batch.outputs
            )
        except Exception as exc:  # the whole batch fails with this status, the stream goes on
            return PendingBatch(batch, ids, error=exc)
        return PendingBatch(batch, ids, model, future, list(batch.outputs))

    async def answer(self, item: PendingMessage) -> pb.StreamStepResponse:
        response = pb.StreamStepResponse()
        steps = item.steps
        if isinstance(steps, PendingGroup):
            await self._answer_group(response, steps)
        else:
            for step in steps:
                request = step.request
                result = response.results.add(session_id=request.session_id, request_id=request.request_id)
                try:
                    if step.error is not None:
                        raise step.error
                    # Submitted with keep: a broken stream cancelling this future does not drop the step (the
                    # steps queued after it apply).
                    outcome = await step.future  # type: ignore[misc]
                    fill_result(result, step.model, outcome, request.num_steps, step.wanted)  # type: ignore[arg-type]
                except Exception as exc:  # one step's failure does not end the stream
                    self._refuse(result, exc)
        if item.batch is not None:
            await self._answer_batch(response.batch, item.batch)
        return response

    def _refuse(self, result: pb.StepResult, exc: BaseException) -> None:
        code, message = to_status(exc)
        self.rejected[("StreamStep", code.name)] += 1
        result.code = code.value[0]
        result.message = message

    async def _answer_group(self, response: pb.StreamStepResponse, group: PendingGroup) -> None:
        done = await group.future  # a group's rows have no futures of their own: cancelling drops nothing
        # Each row read from the group's columns as they are (a row's ``JobGroup.outcome`` would build a lone
        # step's lists first, which costs the grouped path a few percent).
        names = group.model.checks.output_names if group.model is not None else []
        for i, request in enumerate(group.requests):
            result = response.results.add(session_id=request.session_id, request_id=request.request_id)
            error = done.errors.get(i)
            if error is not None:
                self._refuse(result, error)
                continue
            result.steps = done.steps[i]
            if done.stacked is not None:
                outputs = {n: done.stacked[j][i] for j, n in enumerate(names)}
            else:
                row = done.outputs[i]
                outputs = dict(zip(names, row, strict=True)) if row is not None else {}
            fill_outputs(result.outputs, outputs, group.wanted)

    async def _answer_batch(self, result: pb.StepBatchResult, batch: PendingBatch) -> None:
        ids = batch.ids
        result.session_ids.extend(ids)
        result.request_id = batch.request.request_id
        if batch.error is not None:
            code, message = to_status(batch.error)
            self.rejected[("StreamStep", code.name)] += len(ids)
            result.codes.extend([code.value[0]] * len(ids))
            result.messages.extend([message] * len(ids))
            result.steps.extend([0] * len(ids))
            return
        assert batch.future is not None  # queued: it has no error
        batch_result(result, batch.model, await batch.future, len(ids), batch.wanted)

    def failed(self, item: PendingMessage, exc: Exception) -> pb.StreamStepResponse:
        raise exc  # every refusal is answered in its step's result: anything else is the server's fault

    def drop(self, item: PendingMessage) -> None:
        steps = item.steps
        if isinstance(steps, PendingGroup):
            observe(steps.future)
        else:
            for step in steps:
                observe(step.future)
        if item.batch is not None:
            observe(item.batch.future)

    def ended(self, code: grpc.StatusCode) -> None:
        self.rejected[("StreamStep", code.name)] += 1
