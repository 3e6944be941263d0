"""Whole-sequence Predict for both clients: the request from numpy values, and the result back."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from rnnserve.client import _convert
from rnnserve.client._types import ModelInfo
from rnnserve.proto import rnnserve_pb2 as pb
from rnnserve.tensors import decode_map, encode_map, to_proto


@dataclass(frozen=True)
class PredictResult:
    """The answer to ``Client.predict``.

    ``outputs`` is an array (one output) or ``{name: array}``: ``(batch, ...)`` for a sequence model,
    ``(batch, max_length, ...)`` for a step model, zeros past each sequence's length. ``final_state`` (step
    models) holds each sequence's state after its last step, ``(batch, *per-session shape)``.
    """

    outputs: Any
    final_state: dict[str, np.ndarray] = field(default_factory=dict)


def predict_request(
    model: str,
    info: ModelInfo,
    inputs: _convert.Inputs,
    lengths: ArrayLike,
    *,
    version: int | None,
    initial_state: Mapping[str, ArrayLike] | None,
    parameters: Mapping[str, ArrayLike] | None,
    outputs: Sequence[str] | None,
) -> pb.PredictRequest:
    """Inputs are padded, batch first: ``(batch, max_length, ...)``; ``info`` (the model's description) names
    a bare array and gives the dtypes to cast to, as for a session's steps."""
    request = pb.PredictRequest(model=model, version=version or 0, outputs=list(outputs or ()))
    encode_map(_convert.named_inputs(inputs, info), request.inputs)
    lens = np.asarray(lengths)
    if lens.dtype.kind in "iu":  # Python ints and int32 are fine; anything else goes as is for the server to name
        lens = lens.astype(np.int64)
    to_proto(lens, request.lengths)
    _convert.state_map(initial_state, info, request.initial_state)
    if parameters:
        encode_map({k: np.asarray(v) for k, v in parameters.items()}, request.parameters)
    return request


def predict_result(response: pb.PredictResponse) -> PredictResult:
    return PredictResult(_convert.outputs(response.outputs), decode_map(response.final_state))
