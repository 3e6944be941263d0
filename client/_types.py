"""Plain dataclasses for what the server describes (models, statistics), with numpy dtype names."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: numpy dtype name and per-session shape (no batch axis; -1 is free)."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class StateSpec:
    """A recurrent state carried by the server between steps."""

    name: str
    output_name: str
    dtype: str
    shape: tuple[int, ...]
    batch_axis: int = 0
    initial: str = "zeros"


@dataclass(frozen=True)
class ModelInfo:
    """What the server says about one model version."""

    name: str
    version: int
    format: str = ""
    state: str = ""
    error: str = ""
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    states: tuple[StateSpec, ...] = ()
    state_bytes: int = 0
    max_batch_size: int = 0
    allow_nonfinite: bool = False
    open_sessions: int = 0
    source: str = ""
    device: str = ""
    kind: str = "step"
    """``step`` (sessions and Predict) or ``sequence`` (whole sequences, Predict only)."""
    parameters: tuple[TensorSpec, ...] = ()
    """Per-session parameters given at ``open_session(parameters=...)``."""
    constants: tuple[TensorSpec, ...] = ()
    """Inputs the server feeds from the model's config (never sent by clients)."""

    @property
    def ready(self) -> bool:
        """True when the server can open sessions on this model."""
        return self.state == "READY"

    def input(self, name: str) -> TensorSpec:
        """The input spec called ``name`` (KeyError if there is none)."""
        return _by_name(self.inputs, name, "input")

    def output(self, name: str) -> TensorSpec:
        """The output spec called ``name`` (KeyError if there is none)."""
        return _by_name(self.outputs, name, "output")


def _by_name(specs: tuple[TensorSpec, ...], name: str, kind: str) -> TensorSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    raise KeyError(f"no {kind} named {name!r}; have {[s.name for s in specs]}")


@dataclass(frozen=True)
class ModelStats:
    """Counters for one model version (see StatsResponse in the proto)."""

    name: str
    version: int
    steps: int = 0
    batches: int = 0
    max_batch: int = 0
    batch_histogram: tuple[int, ...] = ()
    open_sessions: int = 0
    compute_ns: int = 0
    queue_ns: int = 0
    inline_batches: int = 0  # of the batches, those the server ran on its event loop (no thread hop)

    @property
    def mean_batch(self) -> float:
        """Average timesteps per model call (0.0 before the first call)."""
        return self.steps / self.batches if self.batches else 0.0


@dataclass(frozen=True)
class Stats:
    """Server-wide statistics."""

    models: tuple[ModelStats, ...] = field(default_factory=tuple)
    open_sessions: int = 0
    expired_sessions: int = 0


@dataclass(frozen=True)
class BatchResult:
    """The answer to ``MultiStream.step_batch``: one row per session, in the order they were given.

    ``outputs`` is one stacked array (or a dict of them for several outputs) with zeros in failed rows;
    ``errors`` maps a failed row's index to its RnnServeError (the other rows were applied).
    """

    outputs: Any
    steps: list[int]
    errors: dict[int, Any]


@dataclass(frozen=True)
class UnloadResult:
    """The answer to ``Client.unload_model``: the versions unloaded (state ``UNLOADED``) and how many open
    sessions a forced unload ended."""

    models: list[ModelInfo]
    closed_sessions: int = 0
