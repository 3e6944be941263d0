"""Protobuf <-> data-plane values."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from rnnserve.manifest import StateSpec, TensorSpec
from rnnserve.proto import rnnserve_pb2 as pb
from rnnserve.server.dataplane import SessionStateView
from rnnserve.server.model import LoadedModel
from rnnserve.server.repository import FailedModel
from rnnserve.tensors import DTYPE_TO_PB, decode_map, encode_map


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
    m = model.manifest
    return pb.ModelInfo(
        name=m.name,
        version=m.version,
        format=m.format,
        state="READY",
        inputs=[tensor_spec(t) for t in m.inputs],
        outputs=[tensor_spec(t) for t in m.outputs],
        states=[state_spec(s) for s in m.states],
        state_bytes=m.state_bytes,
        max_batch_size=model.max_batch_size,
        allow_nonfinite=m.allow_nonfinite,
        open_sessions=model.open_sessions,
        source=m.source,
        device=model.runtime.device,
    )


def failed_model_info(failed: FailedModel) -> pb.ModelInfo:
    return pb.ModelInfo(name=failed.name, version=failed.version, state="FAILED", error=failed.error)


def tensors(field: Mapping[str, pb.Tensor]) -> dict[str, np.ndarray]:
    return decode_map(field)


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
