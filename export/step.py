"""The step-module convention and :class:`Exportable`, what every exporter and adapter deals in.

A *step module* computes one timestep: ``forward(x, *state) -> (y, *new_state)``. ``x`` and ``y`` carry the
batch on axis 0; every state tensor has an explicit batch axis too (``batch_axis``), so that the server can
gather the states of many sessions into one batch. An :class:`Exportable` bundles the step module with the
declarations of its input, output and states and with an eager *reference*: the computation the exported
artifact must reproduce (for the built-in adapters, the original PyTorch module itself).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from rnnserve.export.errors import ExportError


@dataclass(frozen=True)
class TensorInfo:
    """One data tensor of a step module. ``shape`` is the full model shape with -1 at ``batch_axis``."""

    name: str
    shape: tuple[int, ...]
    batch_axis: int = 0
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if not 0 <= self.batch_axis < len(self.shape) or self.shape[self.batch_axis] != -1:
            raise ExportError(f"{self.name}: shape {list(self.shape)} needs -1 at batch_axis {self.batch_axis}")
        if any(d <= 0 for i, d in enumerate(self.shape) if i != self.batch_axis):
            # Verification feeds random tensors, and the server preallocates state, so sizes must be fixed.
            raise ExportError(f"{self.name}: shape {list(self.shape)} may have -1 only at the batch axis")

    @property
    def session_shape(self) -> tuple[int, ...]:
        """The shape without the batch axis (what one session sees)."""
        return tuple(d for i, d in enumerate(self.shape) if i != self.batch_axis)

    def batched(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if i == self.batch_axis else d for i, d in enumerate(self.shape))


@dataclass(frozen=True)
class StateInfo(TensorInfo):
    """A state tensor: ``name`` is the step module's state input, ``output`` its next-value output.

    ``initial`` is the value of a new session: ``None`` for zeros, a float for a constant, or a tensor of
    ``session_shape`` (written as a ``.npy`` file beside the artifact).
    """

    output: str = ""
    initial: float | torch.Tensor | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.output:
            object.__setattr__(self, "output", f"{self.name}_out")
        if isinstance(self.initial, torch.Tensor):
            value = self.initial.detach().to(self.dtype)
            if tuple(value.shape) != self.session_shape:
                raise ExportError(
                    f"state {self.name}: initial value has shape {list(value.shape)}, "
                    f"expected the per-session shape {list(self.session_shape)}"
                )
            object.__setattr__(self, "initial", value)

    def initial_value(self) -> torch.Tensor:
        """The per-session initial value, of ``session_shape``."""
        if isinstance(self.initial, torch.Tensor):
            return self.initial.clone()
        fill = 0.0 if self.initial is None else float(self.initial)
        return torch.full(self.session_shape, fill, dtype=self.dtype)

    def initial_batch(self, batch: int) -> torch.Tensor:
        """The initial value repeated for ``batch`` sessions, in model layout."""
        value = self.initial_value().unsqueeze(self.batch_axis)
        return value.expand(self.batched(batch)).contiguous()


class Reference(NamedTuple):
    """Per-step outputs ``(B, T, *output_session_shape)`` and the final states (model layout)."""

    outputs: torch.Tensor
    states: tuple[torch.Tensor, ...]


# (xs of shape (B, T, *input_session_shape), initial states) -> Reference or (outputs, final states)
ReferenceFn = Callable[[torch.Tensor, list[torch.Tensor]], tuple[torch.Tensor, Sequence[torch.Tensor]]]


@dataclass
class Exportable:
    """A step module with its declarations and eager reference; what ``rnnserve.export.export`` writes out.

    Build one with :func:`rnnserve.export.adapt`, or by hand for your own step module (then the reference,
    unless given, is the step module itself run step by step in eager mode).
    """

    step: nn.Module
    input: TensorInfo
    states: Sequence[StateInfo] = ()
    """Any sequence; kept as a tuple."""
    output: TensorInfo | None = None
    """Declared output; ``None`` to take it from a probe call (named ``y``)."""
    reference_fn: ReferenceFn | None = None
    kind: str = "step module"
    """What was adapted, for progress lines and the manifest description."""
    model: nn.Module | None = field(default=None, repr=False)
    """The model this was adapted from, when there is one (a parity oracle for tests)."""

    def __post_init__(self) -> None:
        self.states = tuple(self.states)
        self.step.eval()  # inference semantics: no dropout, frozen batch-norm statistics
        self.output = self._probe(self.output)
        for info in (self.input, self.output):
            if info.batch_axis != 0:
                raise ExportError(f"{info.name}: data inputs and outputs carry the batch on axis 0")
        names = [self.input.name, self.output.name] + [n for s in self.states for n in (s.name, s.output)]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ExportError(f"duplicate tensor names {dup}: every input, output and state needs its own")

    def _probe(self, declared: TensorInfo | None) -> TensorInfo:
        """Call the step once at batch 2 to check the convention and learn (or check) the output shape."""
        x = torch.randn(self.input.batched(2), dtype=self.input.dtype)
        try:
            with torch.no_grad():
                out = self.step(x, *self.initial_state(2))
        except Exception as exc:
            raise ExportError(
                f"calling {type(self.step).__name__}(x, *states) with x {list(x.shape)} failed: {exc}. "
                "A step module computes forward(x, *states) -> (y, *new_states)"
            ) from exc
        if not isinstance(out, tuple) or len(out) != 1 + len(self.states):
            got = f"a tuple of {len(out)}" if isinstance(out, tuple) else type(out).__name__
            raise ExportError(
                f"{type(self.step).__name__} returned {got}; a step module with {len(self.states)} state(s) "
                f"returns (y, *new_states), a tuple of {1 + len(self.states)} tensors"
            )
        y, *new_states = out
        for info, value in zip(self.states, new_states, strict=True):
            if tuple(value.shape) != info.batched(2):
                raise ExportError(
                    f"state {info.name}: the step returned shape {list(value.shape)} at batch 2, "
                    f"declared {list(info.shape)} (batch_axis {info.batch_axis})"
                )
        if y.dim() == 0 or y.shape[0] != 2:
            raise ExportError(f"output shape {list(y.shape)} at batch 2: the output must carry the batch on axis 0")
        probed = TensorInfo("y", (-1, *y.shape[1:]), dtype=y.dtype)
        if declared is None:
            return probed
        if declared.shape != probed.shape or declared.dtype != probed.dtype:
            raise ExportError(
                f"output {declared.name}: declared {list(declared.shape)} {declared.dtype}, "
                f"the step returns {list(probed.shape)} {probed.dtype}"
            )
        return declared

    def initial_state(self, batch: int = 1) -> list[torch.Tensor]:
        """The initial states for ``batch`` new sessions, in model layout."""
        return [s.initial_batch(batch) for s in self.states]

    def reference(self, xs: torch.Tensor, initial_state: Sequence[torch.Tensor] | None = None) -> Reference:
        """Run the eager reference over ``xs`` of shape ``(B, T, *input_shape)``.

        Returns the per-step outputs ``(B, T, *output_shape)`` and the final states. Streaming the same
        ``xs`` through the exported artifact (or the server), one step at a time, must give the same outputs.
        """
        states = self._check_xs(xs, initial_state)
        if self.reference_fn is None:
            return self.stream(xs, states)
        with torch.no_grad():
            outputs, final = self.reference_fn(xs, states)
        return Reference(outputs, tuple(final))

    def stream(self, xs: torch.Tensor, initial_state: Sequence[torch.Tensor] | None = None) -> Reference:
        """Run the step module eagerly, one step at a time (what the artifact computes)."""
        states = self._check_xs(xs, initial_state)
        outputs: list[torch.Tensor] = []
        with torch.no_grad():
            for t in range(xs.shape[1]):
                y, *states = self.step(xs[:, t], *states)
                outputs.append(y)
        return Reference(torch.stack(outputs, 1), tuple(states))

    def _check_xs(self, xs: torch.Tensor, initial_state: Sequence[torch.Tensor] | None) -> list[torch.Tensor]:
        want = self.input.session_shape
        if xs.dim() != 2 + len(want) or tuple(xs.shape[2:]) != want:
            raise ExportError(f"xs has shape {list(xs.shape)}, expected (batch, steps, {', '.join(map(str, want))})")
        if initial_state is None:
            return self.initial_state(xs.shape[0])
        if len(initial_state) != len(self.states):
            raise ExportError(f"expected {len(self.states)} initial state tensors, got {len(initial_state)}")
        return list(initial_state)
