"""The model manifest (model config): ``REPO/NAME/VERSION/manifest.json``, written by ``rnnserve export`` or by
hand for a model exported elsewhere, and read by the server.

It describes how to call the artifact as a *step function*::

    (data inputs..., state inputs...) -> (data outputs..., state outputs...)

* TorchScript artifacts are called positionally: ``forward(*inputs, *states)`` returns the tuple
  ``(*outputs, *next_states)``, in manifest order.
* ONNX artifacts are called by name: each state's ``name`` is a graph input and its ``output`` a graph output.
* ``constants`` are fed on every call exactly as configured (not batched), ``parameters`` are per-session
  values given at session open and batched like inputs. For TorchScript, ``torchscript`` gives the argument
  and result structure when it is not the flat default (e.g. a tuple state).
* ``kind: sequence`` models take whole padded sequences plus a lengths input (served by Predict only).
* An input with a ``context`` is fed each new chunk behind the tail of the session's earlier input, which the
  server keeps per session (a *window*: session state named after the input, ``ModelManifest.windows``).

Shapes are full model shapes including the batch axis, written as -1 (like every free dimension); the
``batch_axis`` field says where it is. A session sees per-session shapes: the model shape without the batch axis.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

MANIFEST_FILE = "manifest.json"
DType = Literal["float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool"]


class _Strict(BaseModel):
    # Unknown keys are errors: a typo in a hand-edited manifest must not be silently ignored.
    model_config = ConfigDict(extra="forbid")


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


class ContextSpec(_Strict):
    """An input's context window: the server keeps each session's last ``length`` elements of this input along
    ``axis`` and feeds the model every new chunk behind them, so the client sends only the new elements."""

    length: int = Field(ge=1)
    """Elements of earlier input the model sees before each new chunk."""
    axis: int = -1
    """The axis of the input's (full model) shape they are kept along; negative counts from the end."""
    initial: InitialState = Field(default_factory=ZerosInit)
    """The window of a new (or reset) session: ``zeros``, a ``constant`` or a ``file`` of the window's
    per-session shape."""


class TensorSpec(_Strict):
    name: str = Field(min_length=1)
    """Tensor name (ONNX graph input/output name; for TorchScript a label for the positional argument)."""
    dtype: DType = "float32"
    """Element type, numpy spelling."""
    shape: list[int]
    """Full model shape; -1 for the batch axis and any free dimension (1 at the batch axis for a model whose
    batch is fixed at 1: it then serves one session per call). For an input with a ``context``, the shape a
    client sends (the new elements only)."""
    batch_axis: int = 0
    """Index of the batch axis in ``shape``."""
    context: ContextSpec | None = None
    """Inputs of step models: keep a window of earlier input per session and feed it in front of each chunk."""
    check_shape: list[int] | None = None
    """Inputs: the shape the load-time check feeds (``shape`` with a length at each free dimension; -1 at the
    batch axis), for a model that refuses the default length 1 there."""
    time_axis: int | None = None
    """Inputs of ``kind: sequence`` models: the padded time axis of ``shape`` (default: the one after the batch
    axis), e.g. 0 for a time-major ``[T, B, F]`` graph."""

    @property
    def has_batch_axis(self) -> bool:
        """Whether ``shape`` has a batch axis (only a parameter may have none: ``ParameterSpec.batched``)."""
        return True

    @model_validator(mode="after")
    def _check_axis(self) -> TensorSpec:
        if not self.has_batch_axis:
            return self
        if not 0 <= self.batch_axis < len(self.shape):
            raise ValueError(f"batch_axis {self.batch_axis} is outside shape {self.shape}")
        if self.shape[self.batch_axis] not in (-1, 1):
            raise ValueError(
                f"shape {self.shape} must have -1 (or 1, for a batch fixed at 1) at batch_axis {self.batch_axis}"
            )
        if any(d < -1 or d == 0 for d in self.shape):
            raise ValueError(f"shape {self.shape}: dimensions are positive, or -1 for free")
        return self

    @property
    def session_shape(self) -> tuple[int, ...]:
        """Per-session shape (the batch axis removed)."""
        if not self.has_batch_axis:
            return tuple(self.shape)
        return tuple(d for i, d in enumerate(self.shape) if i != self.batch_axis)

    @property
    def fixed_batch(self) -> bool:
        """The model takes exactly one session per call on this tensor."""
        return self.has_batch_axis and self.shape[self.batch_axis] == 1

    def _check_input_fields(self, kind: str) -> None:
        """``context``, ``check_shape`` and ``time_axis`` are for inputs; the manifest says which tensors are."""
        if kind != "input":
            for field in ("context", "check_shape", "time_axis"):
                if getattr(self, field) is not None:
                    raise ValueError(f"{kind} '{self.name}': {field} applies to inputs only")
            return
        rank = len(self.shape)
        if self.check_shape is not None:
            check = self.check_shape
            if len(check) != rank or any(
                (c != -1) if i == self.batch_axis else (c < 1 or d not in (-1, c))
                for i, (d, c) in enumerate(zip(self.shape, check, strict=True))
            ):
                raise ValueError(
                    f"input '{self.name}': check_shape {check} must be shape {self.shape} with a length (>= 1) at "
                    "each free dimension and -1 at the batch axis"
                )
        if self.time_axis is not None and not (0 <= self.time_axis < rank and self.time_axis != self.batch_axis):
            raise ValueError(
                f"input '{self.name}': time_axis {self.time_axis} is not an axis of {self.shape} besides the batch axis"
            )
        if self.context is not None:
            axis = self.context.axis + rank if self.context.axis < 0 else self.context.axis
            if not 0 <= axis < rank or axis == self.batch_axis:
                raise ValueError(
                    f"input '{self.name}': context axis {self.context.axis} is not an axis of {self.shape} besides "
                    "the batch axis"
                )
            if any(d == -1 for i, d in enumerate(self.shape) if i not in (axis, self.batch_axis)):
                raise ValueError(
                    f"input '{self.name}': with a context, only the batch and context axes of {self.shape} may be -1 "
                    "(the window is kept in a fixed shape)"
                )

    def window(self) -> WindowSpec | None:
        """This input's context window as session state (None without a ``context``)."""
        if self.context is None:
            return None
        axis = self.context.axis % len(self.shape)
        shape = list(self.shape)
        shape[axis] = self.context.length
        return WindowSpec(
            name=self.name,
            output=self.name,
            dtype=self.dtype,
            shape=shape,
            batch_axis=self.batch_axis,
            initial=self.context.initial,
            axis=axis,
            length=self.context.length,
        )


class StateSpec(TensorSpec):
    output: str = Field(min_length=1)
    """Name of the model output that carries this state's next value."""
    initial: InitialState = Field(default_factory=ZerosInit)
    """Initial value of a new (or reset) session."""

    @model_validator(mode="after")
    def _fixed_dims(self) -> StateSpec:
        # State lives in a preallocated slab, so every dimension but the batch axis must be fixed.
        if any(d == -1 for i, d in enumerate(self.shape) if i != self.batch_axis):
            raise ValueError(f"state shape {self.shape}: only the batch axis may be -1")
        return self

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
        arr = np.load(_inside(version_dir, init.path, f"state '{self.name}'"), allow_pickle=False)
        if tuple(arr.shape) != shape:
            raise ValueError(f"state '{self.name}': {init.path} has shape {list(arr.shape)}, expected {list(shape)}")
        return arr.astype(self.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of this state per session."""
        return int(np.prod(self.session_shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


class WindowSpec(StateSpec):
    """An input's context window as session state (``TensorSpec.window``; not written in a manifest): named
    after its input, whose tail (``output``, the input's name too) is its next value. ``shape`` is the input's
    with ``length`` at ``axis``."""

    axis: int
    """The axis of the model shape the window runs along (non-negative)."""
    length: int

    def _along(self, index: slice) -> tuple[slice, ...]:
        return (slice(None),) * self.axis + (index,)

    def extend(self, window: np.ndarray, chunk: np.ndarray) -> np.ndarray:
        """What the model is fed: ``window`` (the batch's windows) followed by ``chunk`` (their new input)."""
        return np.concatenate((window, chunk), axis=self.axis)

    def tail(self, fed: np.ndarray) -> np.ndarray:
        """The next window: the last ``length`` elements of what was fed."""
        return np.ascontiguousarray(fed[self._along(slice(-self.length, None))])


class ConstantSpec(_Strict):
    """An input the server feeds on every call, exactly as given (no batch axis is added)."""

    name: str = Field(min_length=1)
    dtype: DType = "float32"
    shape: list[int] = Field(default_factory=list)
    """Its full shape ([] for a scalar)."""
    value: float | int | bool | list | None = None
    """The value (a number, or nested lists matching ``shape``)..."""
    file: str | None = None
    """...or a ``.npy`` file relative to the version folder."""

    @model_validator(mode="after")
    def _one_source(self) -> ConstantSpec:
        if (self.value is None) == (self.file is None):
            raise ValueError(f"constant '{self.name}': give exactly one of value or file")
        return self

    def array(self, version_dir: Path) -> np.ndarray:
        if self.file is not None:
            arr = np.load(_inside(version_dir, self.file, f"constant '{self.name}'"), allow_pickle=False)
        else:
            arr = np.asarray(self.value)
        if list(arr.shape) != self.shape:
            raise ValueError(f"constant '{self.name}': value has shape {list(arr.shape)}, shape says {self.shape}")
        return arr.astype(self.dtype)


class ParameterSpec(TensorSpec):
    """A per-session input given at session open and fed (batched) on every call, e.g. a speaker id."""

    default: float | int | bool | list | None = None
    """Used when the session gives none; without a default the parameter is required at open."""
    batched: bool = True
    """False: the graph takes this input without a batch axis (a scalar setting such as a sample rate):
    ``shape`` is then its whole shape, and a batch only ever holds sessions with equal values of it."""

    @property
    def has_batch_axis(self) -> bool:
        return self.batched

    @model_validator(mode="after")
    def _fixed(self) -> ParameterSpec:
        if any(d == -1 for i, d in enumerate(self.shape) if i != self.batch_axis or not self.batched):
            what = "only the batch axis may be -1" if self.batched else "an unbatched parameter has no -1"
            raise ValueError(f"parameter shape {self.shape}: {what}")
        return self

    def stored(self) -> TensorSpec:
        """Its column in the state slab: a row per session, so an unbatched parameter gains a batch axis 0."""
        if self.batched:
            return self
        return TensorSpec(name=self.name, dtype=self.dtype, shape=[-1, *self.shape])

    def default_value(self) -> np.ndarray | None:
        if self.default is None:
            return None
        return np.broadcast_to(np.asarray(self.default, dtype=self.dtype), self.session_shape).copy()


class RuntimeSettings(_Strict):
    """Per-model runtime settings; unset ones follow the server's."""

    device: Literal["cpu", "cuda"] | None = None
    intra_op_threads: int | None = Field(default=None, ge=0)
    inter_op_threads: int | None = Field(default=None, ge=0)
    concurrent_batches: int | None = Field(default=None, ge=1)
    """Batches of this model computing at once, each on its own worker thread, over disjoint sessions; with
    more than one, the ready sessions are split across the free ones (at least 32 per batch). Unset: the
    server's ``--concurrent-batches`` (default 1)."""


# A TorchScript argument or result: a tensor's name, or a tuple of names (one level, e.g. an LSTM's (h, c)).
TorchScriptArg = str | list[str]


class TorchScriptSignature(_Strict):
    """How a TorchScript module's positional arguments and results map to the manifest's tensor names.

    Default (when absent): ``forward(*inputs, *parameters, *constants, *states)`` returns
    ``(*outputs, *next_states)``. A module with a tuple state ``forward(x, (h, c)) -> (y, (h2, c2))`` says
    ``{"inputs": ["x", ["h", "c"]], "outputs": ["y", ["h_out", "c_out"]]}``.
    """

    inputs: list[TorchScriptArg]
    outputs: list[TorchScriptArg]


def flatten_names(args: list) -> list[str]:
    """Every tensor name in a (nested) TorchScript argument list, in order."""
    names: list[str] = []
    for a in args:
        names.extend(flatten_names(a) if isinstance(a, list) else [a])
    return names


def _inside(version_dir: Path, relative: str, what: str) -> Path:
    path = (version_dir / relative).resolve()
    if version_dir.resolve() not in path.parents:
        raise ValueError(f"{what}: {relative} is outside the model folder")
    return path


class Durability(_Strict):
    """How a model's session state is written to the session store (``rnnserve serve --session-store``)."""

    mode: Literal["none", "periodic", "every-step"] = "none"
    """``none``: the store holds sessions only on shutdown/snapshot; ``periodic``: every ``every_steps`` steps
    or ``every_ms`` milliseconds, whichever comes first; ``every-step``: a batch's new states are written
    (one pipelined round trip per batch) before its responses are released."""
    every_steps: int | None = Field(default=None, ge=1)
    every_ms: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _periodic_needs_a_period(self) -> Durability:
        if self.mode == "periodic" and self.every_steps is None and self.every_ms is None:
            raise ValueError("durability periodic needs every_steps or every_ms")
        return self


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
    parameters: list[ParameterSpec] = Field(default_factory=list)
    """Per-session inputs given at session open."""
    constants: list[ConstantSpec] = Field(default_factory=list)
    """Inputs fed on every call from this config."""
    kind: Literal["step", "sequence"] = "step"
    """``step``: served through sessions (and Predict); ``sequence``: whole padded sequences, Predict only."""
    lengths_input: str | None = None
    """Sequence models: the input that takes each sequence's length (int64 or int32, shape [-1]; the server
    feeds it in the dtype declared here, whatever integer type the client sent)."""
    torchscript: TorchScriptSignature | None = None
    """TorchScript argument/result structure when it is not the flat default."""
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    """Per-model device and thread settings."""
    durability: Durability = Field(default_factory=Durability)
    """When session state is written to the session store."""
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
    def _consistent(self) -> ModelManifest:
        names = self.input_names
        outs = self.output_names
        for kind, seq in (("input", names), ("output", outs)):
            dup = {n for n in seq if seq.count(n) > 1}
            if dup:
                raise ValueError(f"duplicate {kind} names: {sorted(dup)}")
        if Path(self.artifact).is_absolute() or ".." in Path(self.artifact).parts:
            raise ValueError(f"artifact {self.artifact!r} must be a path inside the version folder")
        batched = [*self.inputs, *self.parameters, *self.states, *self.outputs]
        if any(t.fixed_batch for t in batched) and self.max_batch_size != 1:
            raise ValueError("a tensor has its batch axis fixed at 1: set max_batch_size to 1")
        for kind, tensors in (("input", self.inputs), ("output", self.outputs), ("state", self.states)):
            for t in tensors:
                t._check_input_fields(kind)
        for p in self.parameters:
            p._check_input_fields("parameter")
        if self.kind == "sequence":
            if self.states or self.parameters:
                raise ValueError("a sequence model has no states or parameters (it sees whole sequences)")
            lengths = next((t for t in self.inputs if t.name == self.lengths_input), None)
            if lengths is None:
                raise ValueError("a sequence model needs lengths_input naming one of its inputs")
            if lengths.dtype not in ("int64", "int32") or len(lengths.shape) != 1:
                raise ValueError(f"lengths input '{lengths.name}' must be int64 or int32 of shape [-1]")
            if any(t.context is not None for t in self.inputs):
                raise ValueError("a context is for step models (a sequence model sees each whole sequence at once)")
        else:
            if self.lengths_input is not None:
                raise ValueError("lengths_input is for kind: sequence models")
            if any(t.time_axis is not None for t in self.inputs):
                raise ValueError("time_axis is for kind: sequence models (a step model's input is one timestep)")
        if self.torchscript is not None:
            if self.format != "torchscript":
                raise ValueError("torchscript: applies to torchscript models only")
            for kind, given, known in (
                ("inputs", flatten_names(self.torchscript.inputs), names),
                ("outputs", flatten_names(self.torchscript.outputs), outs),
            ):
                if sorted(given) != sorted(known):
                    raise ValueError(f"torchscript.{kind} names {sorted(given)} must be exactly {sorted(known)}")
        return self

    @property
    def input_names(self) -> list[str]:
        """Every model input, in the default call order."""
        return (
            [t.name for t in self.inputs]
            + [p.name for p in self.parameters]
            + [c.name for c in self.constants]
            + [s.name for s in self.states]
        )

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs] + [s.output for s in self.states]

    @property
    def windows(self) -> list[WindowSpec]:
        """The context windows of its inputs, in input order."""
        return [w for w in (t.window() for t in self.inputs) if w is not None]

    @property
    def session_states(self) -> list[StateSpec]:
        """Everything a session's state holds: the model's states, then its inputs' context windows. Resets,
        GetState/SetState, snapshots and the session store see them all, by name."""
        return [*self.states, *self.windows]

    @property
    def state_bytes(self) -> int:
        return sum(s.nbytes for s in self.session_states)

    def write(self, version_dir: Path) -> Path:
        path = version_dir / MANIFEST_FILE
        # Durability is left out unless it was set, so a server's --durability applies to the model.
        exclude = None if "durability" in self.model_fields_set else {"durability"}
        path.write_text(self.model_dump_json(indent=2, exclude=exclude) + "\n")
        return path

    @classmethod
    def read(cls, version_dir: Path) -> ModelManifest:
        path = version_dir / MANIFEST_FILE
        return cls.model_validate(json.loads(path.read_text()))
