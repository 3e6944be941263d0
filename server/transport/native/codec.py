"""Protobuf <-> data-plane values."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from rnnserve.manifest import StateSpec, TensorSpec
from rnnserve.proto import rnnserve_pb2 as pb
from rnnserve.server.dataplane import SessionStateView
from rnnserve.server.model import LoadedModel
from rnnserve.server.predict import PredictResult
from rnnserve.server.repository import FailedModel
from rnnserve.tensors import DTYPE_TO_PB, decode_map, encode_map, from_proto, to_proto


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


def model_info(model: LoadedModel) -> pb.ModelInfo:
    """The model's description; the static part is built once per model (OpenSession returns it every time)."""
    cached = model._info_pb
    if cached is None:
        cached = model._info_pb = _static_model_info(model)
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
        states=[state_spec(s) for s in m.states],
        state_bytes=m.state_bytes,
        max_batch_size=model.max_batch_size,
        allow_nonfinite=m.allow_nonfinite,
        source=m.source,
        kind=m.kind,
        parameters=[tensor_spec(p) for p in m.parameters],
        constants=[pb.TensorSpec(name=c.name, dtype=DTYPE_TO_PB[c.dtype], shape=c.shape) for c in m.constants],
        device=model.runtime.device,
    )


def failed_model_info(failed: FailedModel) -> pb.ModelInfo:
    return pb.ModelInfo(name=failed.name, version=failed.version, state="FAILED", error=failed.error)


def tensors(field: Mapping[str, pb.Tensor]) -> dict[str, np.ndarray]:
    return decode_map(field)


def tensor(msg: pb.Tensor, name: str) -> np.ndarray:
    return from_proto(msg, name)


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


def batch_result(result: pb.StepBatchResult, model: LoadedModel | None, group, n: int, wanted: list[str]) -> None:
    """Fill a StepBatchResult from a finished JobGroup: outputs stacked by row, zeros in failed rows."""
    from rnnserve.server.transport.status import to_status

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
