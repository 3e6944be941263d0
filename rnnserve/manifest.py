"""The model manifest: ``REPO/NAME/VERSION/manifest.json``, written by ``rnnserve export`` and read by the server.

It describes how to call the artifact as a *step function*::

    (data inputs..., state inputs...) -> (data outputs..., state outputs...)

* TorchScript artifacts are called positionally: ``forward(*inputs, *states)`` returns the tuple
  ``(*outputs, *next_states)``, in manifest order.
* ONNX artifacts are called by name: each state's ``name`` is a graph input and its ``output`` a graph output.

Shapes are full model shapes including the batch axis, written as -1 (like every free dimension); the
``batch_axis`` field says where it is. A session sees per-session shapes: the model shape without the batch axis.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MANIFEST_FILE = "manifest.json"
DType = Literal["float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool"]


class _Strict(BaseModel):
    # Unknown keys are errors: a typo in a hand-edited manifest must not be silently ignored.
    model_config = ConfigDict(extra="forbid")


class TensorSpec(_Strict):
    name: str = Field(min_length=1)
    """Tensor name (ONNX graph input/output name; for TorchScript a label for the positional argument)."""
    dtype: DType = "float32"
    """Element type, numpy spelling."""
    shape: list[int]
    """Full model shape; -1 for the batch axis and any free dimension."""
    batch_axis: int = 0
    """Index of the batch axis in ``shape``."""

    @model_validator(mode="after")
    def _check_axis(self) -> TensorSpec:
        if not 0 <= self.batch_axis < len(self.shape):
            raise ValueError(f"batch_axis {self.batch_axis} is outside shape {self.shape}")
        if self.shape[self.batch_axis] != -1:
            raise ValueError(f"shape {self.shape} must have -1 at batch_axis {self.batch_axis}")
        if any(d < -1 or d == 0 for d in self.shape):
            raise ValueError(f"shape {self.shape}: dimensions are positive, or -1 for free")
        return self

    @property
    def session_shape(self) -> tuple[int, ...]:
        """Per-session shape (the batch axis removed)."""
        return tuple(d for i, d in enumerate(self.shape) if i != self.batch_axis)


class ZerosInit(_Strict):
    kind: Literal["zeros"] = "zeros"


class ConstantInit(_Strict):
    kind: Literal["constant"]
    value: float
    """Every element of the initial state."""


class FileInit(_Strict):
    kind: Literal["file"]
    path: str
    """A ``.npy`` file, relative to the version folder, holding the per-session initial state."""


InitialState = Annotated[ZerosInit | ConstantInit | FileInit, Field(discriminator="kind")]


class StateSpec(TensorSpec):
    output: str = Field(min_length=1)
    """Name of the model output that carries this state's next value."""
    initial: InitialState = Field(default_factory=ZerosInit)
    """Initial value of a new (or reset) session."""

    @field_validator("shape")
    @classmethod
    def _fixed_dims(cls, shape: list[int]) -> list[int]:
        # State lives in a preallocated slab, so every dimension but the batch axis must be fixed.
        if sum(1 for d in shape if d == -1) != 1:
            raise ValueError(f"state shape {shape}: exactly one -1 (the batch axis) allowed")
        return shape

    def initial_value(self, version_dir: Path | None = None) -> np.ndarray:
        """The per-session initial state as an array of ``session_shape``."""
        shape = self.session_shape
        init = self.initial
        if isinstance(init, ZerosInit):
            return np.zeros(shape, dtype=self.dtype)
        if isinstance(init, ConstantInit):
            return np.full(shape, init.value, dtype=self.dtype)
        if version_dir is None:
            raise ValueError(f"state '{self.name}': a file initial value needs the version folder")
        path = (version_dir / init.path).resolve()
        if version_dir.resolve() not in path.parents:
            raise ValueError(f"state '{self.name}': initial file {init.path} is outside the model folder")
        arr = np.load(path, allow_pickle=False)
        if tuple(arr.shape) != shape:
            raise ValueError(f"state '{self.name}': {init.path} has shape {list(arr.shape)}, expected {list(shape)}")
        return arr.astype(self.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of this state per session."""
        return int(np.prod(self.session_shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


class Verification(_Strict):
    steps: int
    batch_sizes: list[int]
    tolerance: float
    max_abs_error: float
    """Largest |eager - exported| over every output and state, every step and batch size."""


class ModelManifest(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    version: int = Field(ge=1)
    format: Literal["onnx", "torchscript"]
    artifact: str
    """Artifact file, relative to the version folder."""
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    states: list[StateSpec] = Field(default_factory=list)
    allow_nonfinite: bool = False
    """Accept NaN/Inf in float inputs (rejected with INVALID_ARGUMENT otherwise)."""
    max_batch_size: int = Field(default=256, ge=1)
    """Most sessions in one model call."""
    max_queue_delay_us: int = Field(default=0, ge=0)
    """How long a ready step may wait for more sessions to join its batch."""
    source: str = ""
    """Where the model came from (``module:factory`` for rnnserve exports)."""
    rnnserve_version: str = ""
    created: str = ""
    verification: Verification | None = None
    description: str = ""

    @model_validator(mode="after")
    def _unique_names(self) -> ModelManifest:
        names = [t.name for t in self.inputs] + [s.name for s in self.states]
        outs = [t.name for t in self.outputs] + [s.output for s in self.states]
        for kind, seq in (("input", names), ("output", outs)):
            dup = {n for n in seq if seq.count(n) > 1}
            if dup:
                raise ValueError(f"duplicate {kind} names: {sorted(dup)}")
        if Path(self.artifact).is_absolute() or ".." in Path(self.artifact).parts:
            raise ValueError(f"artifact {self.artifact!r} must be a path inside the version folder")
        return self

    @property
    def state_bytes(self) -> int:
        return sum(s.nbytes for s in self.states)

    def write(self, version_dir: Path) -> Path:
        path = version_dir / MANIFEST_FILE
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path

    @classmethod
    def read(cls, version_dir: Path) -> ModelManifest:
        path = version_dir / MANIFEST_FILE
        return cls.model_validate(json.loads(path.read_text()))
