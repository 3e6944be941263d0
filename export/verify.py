"""Check an exported artifact against the eager reference before anything is published.

For each batch size, random inputs are streamed through the artifact one step at a time, from the initial
state, feeding its state outputs back in. Every step's output is compared with the reference (for built-in
modules, the original module over the whole sequence), every step's states with the eager step module, and
the final states with the reference's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rnnserve.export.errors import ExportError, ExportVerificationError
from rnnserve.export.runner import Runner
from rnnserve.export.step import Exportable


@dataclass
class Worst:
    """The largest error seen so far, and where."""

    error: float = 0.0
    where: str = ""

    def update(self, expected: torch.Tensor, actual: torch.Tensor, where: str) -> None:
        if tuple(expected.shape) != tuple(actual.shape):
            raise ExportVerificationError(
                f"{where}: the artifact returned shape {list(actual.shape)}, the reference {list(expected.shape)}"
            )
        error = (expected.double() - actual.double()).abs().max().item() if expected.numel() else 0.0
        if not math.isnan(self.error) and (math.isnan(error) or error > self.error):
            self.error, self.where = error, where  # a NaN sticks: it is the worst


def verify(
    ex: Exportable,
    runner: Runner,
    *,
    steps: int,
    batch_sizes: Sequence[int],
    tolerance: float,
    label: str,
    progress: Callable[[str], None],
    seed: int = 0,
) -> float:
    """Return the largest absolute error; raise :class:`ExportVerificationError` if it exceeds ``tolerance``."""
    if steps < 1 or not batch_sizes or min(batch_sizes) < 1:
        raise ExportError(f"verification needs steps >= 1 and batch sizes >= 1 (got {steps}, {list(batch_sizes)})")
    if not ex.input.dtype.is_floating_point:
        raise ExportError(f"input {ex.input.name} is {ex.input.dtype}: verification feeds random floats")
    assert ex.output is not None
    generator = torch.Generator().manual_seed(seed)
    worst = Worst()
    for batch in batch_sizes:
        progress(f"verifying batch {batch}: {steps} steps, artifact vs eager reference")
        xs = torch.randn((batch, steps, *ex.input.session_shape), generator=generator, dtype=ex.input.dtype)
        reference = ex.reference(xs)
        eager_states = ex.initial_state(batch)
        states = ex.initial_state(batch)
        for t in range(steps):
            with torch.no_grad():
                _, *eager_states = ex.step(xs[:, t], *eager_states)
            y, states = runner(xs[:, t].contiguous(), states)
            worst.update(reference.outputs[:, t], y, f"batch {batch}, step {t}, output {ex.output.name}")
            for info, want, got in zip(ex.states, eager_states, states, strict=True):
                worst.update(want, got, f"batch {batch}, step {t}, state {info.name}")
        for info, want, got in zip(ex.states, reference.states, states, strict=True):
            worst.update(want, got, f"batch {batch}, final state {info.name} vs the reference")
    if math.isnan(worst.error) or worst.error > tolerance:
        raise ExportVerificationError(
            f"verification failed for {label}: max |eager - exported| = {worst.error:.3g} at {worst.where}, "
            f"over the tolerance {tolerance:g}. Nothing was written. If the step module is right and the gap is "
            "rounding, raise the tolerance (--tolerance); otherwise the step module does not compute what the "
            "reference does."
        )
    return worst.error
