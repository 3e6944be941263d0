"""Conversions between the user's numpy values and the wire messages, shared by the sync and async clients.

Nothing here does I/O, so both clients build the same requests and read the same responses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias, cast

import numpy as np
from numpy.typing import ArrayLike

from rnnserve.client._errors import RnnServeError, status_code
from rnnserve.client._types import ModelInfo, ModelStats, StateSpec, Stats, TensorSpec, UnloadResult
from rnnserve.proto import rnnserve_pb2 as pb
from rnnserve.tensors import PB_TO_DTYPE, decode_map, encode_map

# One timestep: an array for a single-input model, or named arrays.
Inputs: TypeAlias = ArrayLike | Mapping[str, ArrayLike]
# What a step returns: an array when the result has exactly one output, else named arrays.
Outputs: TypeAlias = np.ndarray | dict[str, np.ndarray]
# Named arrays given by the caller: a state, session parameters.
Arrays: TypeAlias = Mapping[str, ArrayLike]
# Several consecutive timesteps: stacked (leading time axis) or a sequence of per-step Inputs.
Chunk: TypeAlias = ArrayLike | Mapping[str, ArrayLike] | Sequence[Inputs]


def _dtype(value: int) -> str:
    return PB_TO_DTYPE.get(value, "unspecified")


def tensor_spec(msg: pb.TensorSpec) -> TensorSpec:
    return TensorSpec(name=msg.name, dtype=_dtype(msg.dtype), shape=tuple(msg.shape))


def state_spec(msg: pb.StateSpec) -> StateSpec:
    return StateSpec(
        name=msg.name,
        output_name=msg.output_name,
        dtype=_dtype(msg.dtype),
        shape=tuple(msg.shape),
        batch_axis=msg.batch_axis,
        initial=msg.initial,
    )


def model_info(msg: pb.ModelInfo) -> ModelInfo:
    """The dataclass view of a ModelInfo message."""
    return ModelInfo(
        name=msg.name,
        version=msg.version,
        format=msg.format,
        state=msg.state,
        error=msg.error,
        inputs=tuple(tensor_spec(s) for s in msg.inputs),
        outputs=tuple(tensor_spec(s) for s in msg.outputs),
        states=tuple(state_spec(s) for s in msg.states),
        state_bytes=msg.state_bytes,
        max_batch_size=msg.max_batch_size,
        allow_nonfinite=msg.allow_nonfinite,
        open_sessions=msg.open_sessions,
        source=msg.source,
        device=msg.device,
        kind=msg.kind or "step",
        parameters=tuple(tensor_spec(s) for s in msg.parameters),
        constants=tuple(tensor_spec(s) for s in msg.constants),
    )


def unload_result(msg: pb.UnloadModelResponse) -> UnloadResult:
    return UnloadResult([model_info(m) for m in msg.models], msg.closed_sessions)


def stats(msg: pb.StatsResponse) -> Stats:
    """The dataclass view of a StatsResponse."""
    models = tuple(
        ModelStats(
            name=m.name,
            version=m.version,
            steps=m.steps,
            batches=m.batches,
            max_batch=m.max_batch,
            batch_histogram=tuple(m.batch_histogram),
            open_sessions=m.open_sessions,
            compute_ns=m.compute_ns,
            queue_ns=m.queue_ns,
            inline_batches=m.inline_batches,
        )
        for m in msg.models
    )
    return Stats(models=models, open_sessions=msg.open_sessions, expired_sessions=msg.expired_sessions)


def _cast(value: ArrayLike, spec: TensorSpec | StateSpec | None) -> np.ndarray:
    """``np.asarray`` plus a same-kind cast to the declared dtype.

    Python floats and lists become float64, which a float32 model would reject; casting within a kind (or
    safely, int to float) spares every caller an ``.astype``. Anything else is sent as given so that the
    server's error message, not a guess here, says what is wrong.
    """
    arr = np.asarray(value)
    if spec is not None and spec.dtype != arr.dtype.name and spec.dtype != "unspecified":
        target = np.dtype(spec.dtype)
        if np.can_cast(arr.dtype, target, casting="same_kind"):
            arr = arr.astype(target)
    return arr


def _specs(model: ModelInfo | None) -> dict[str, TensorSpec]:
    return {s.name: s for s in model.inputs} if model is not None else {}


def named_inputs(x: Inputs, model: ModelInfo | None) -> dict[str, np.ndarray]:
    """Name the arrays of one timestep (or of a stacked chunk): a bare array goes to the only input."""
    specs = _specs(model)
    if isinstance(x, Mapping):
        return {name: _cast(value, specs.get(name)) for name, value in x.items()}
    if model is None:
        raise TypeError("a bare array needs the model's input name: pass a dict {input_name: array}")
    if len(model.inputs) != 1:
        raise TypeError(
            f"model {model.name!r} has inputs {[s.name for s in model.inputs]}: pass a dict {{name: array}}"
        )
    spec = model.inputs[0]
    return {spec.name: _cast(x, spec)}


def stacked_inputs(xs: Chunk, model: ModelInfo | None) -> tuple[dict[str, np.ndarray], int]:
    """Named arrays with a leading time axis, and its length, from a stacked chunk or a list of steps."""
    if isinstance(xs, Sequence) and not isinstance(xs, str | bytes) and xs and _is_step_list(xs):
        per_step = [named_inputs(x, model) for x in xs]
        names = per_step[0].keys()
        if any(step.keys() != names for step in per_step):
            raise ValueError("every timestep of a chunk must name the same inputs")
        arrays = {name: np.stack([step[name] for step in per_step]) for name in names}
    else:  # stacked: one array (a nested list of numbers included) or named arrays
        arrays = named_inputs(cast(Inputs, xs), model)
    lengths = {arr.shape[0] if arr.ndim else 0 for arr in arrays.values()}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(
            f"a chunk needs a non-empty leading time axis of the same length on every input, got "
            f"{ {name: arr.shape for name, arr in arrays.items()} }"
        )
    return arrays, lengths.pop()


def _is_step_list(xs: Sequence[Any]) -> bool:
    # A list of dicts or of arrays is a list of timesteps; a nested list of numbers is one stacked array.
    first = xs[0]
    return isinstance(first, Mapping | np.ndarray)


def fill_step(
    req: pb.StepRequest,
    session_id: str,
    inputs: Mapping[str, np.ndarray],
    *,
    num_steps: int = 0,
    outputs: Sequence[str] | None = None,
    request_id: str = "",
    step_index: int = 0,
) -> None:
    """Fill an empty StepRequest: one of its own, or one added to a StreamStepRequest (no copy of the arrays)."""
    req.session_id = session_id
    req.num_steps = num_steps
    req.request_id = request_id
    req.step_index = step_index
    encode_map(inputs, req.inputs)
    if outputs:
        req.outputs.extend(outputs)


def state_map(
    state: Mapping[str, ArrayLike] | None, model: ModelInfo | None, target: Any, *, parameters: bool = False
) -> None:
    """Fill a ``map<string, Tensor>`` of recurrent state (or of session parameters), casting to the declared
    dtypes."""
    if not state:
        return
    declared = (model.parameters if parameters else model.states) if model is not None else ()
    specs = {s.name: s for s in declared}
    encode_map({name: _cast(value, specs.get(name)) for name, value in state.items()}, target)


def outputs(field: Mapping[str, pb.Tensor]) -> Outputs:
    """Decode step outputs: the array itself when there is exactly one, else a dict by name."""
    decoded = decode_map(field)
    if len(decoded) == 1:
        return next(iter(decoded.values()))
    return decoded


def check_result(result: pb.StepResult) -> None:
    """Raise the per-step error a stream result carries, if any."""
    if result.code != 0:
        raise RnnServeError(
            status_code(result.code),
            result.message,
            session_id=result.session_id or None,
            request_id=result.request_id or None,
        )
