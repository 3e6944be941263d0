"""The tiny numpy model the core's unit tests run without a server: an accumulator over 2 features,
``h' = h + x`` and ``y = h'``, so every result and state is known exactly."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from rnnserve.manifest import ModelManifest, StateSpec, TensorSpec
from rnnserve.server.models.runtime import Runtime


def accumulator_manifest(state_shape: tuple[int, ...] = (-1, 2), batch_axis: int = 0, **fields: Any) -> ModelManifest:
    """Its manifest; ``state_shape``/``batch_axis`` lay out the state ``h``, ``fields`` set any other field."""
    return ModelManifest(
        name="acc",
        version=1,
        format="onnx",
        artifact="acc.onnx",
        inputs=[TensorSpec(name="x", shape=[-1, 2])],
        outputs=[TensorSpec(name="y", shape=[-1, 2])],
        states=[StateSpec(name="h", output="h_out", shape=list(state_shape), batch_axis=batch_axis)],
        **fields,
    )


class Accumulator(Runtime):
    """``h' = h + x``, ``y = h'`` (state batch axis 0); remembers each call's batch size."""

    def __init__(self, manifest: ModelManifest) -> None:
        super().__init__(manifest)
        self.sizes: list[int] = []

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.sizes.append(len(feeds["x"]))
        h = feeds["h"] + feeds["x"]
        return {"y": h, "h_out": h}

    @property
    def device(self) -> str:
        return "cpu"
