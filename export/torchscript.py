"""Write a step module as TorchScript, and load it back with ``torch.jit.load`` for verification.

``torch.jit.script`` keeps the module's Python control flow, so it is tried first; user cells often use
Python that scripting rejects (and ``StackStep`` takes ``*states``), and those are traced instead.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rnnserve.export.errors import ExportError
from rnnserve.export.quiet import quiet
from rnnserve.export.runner import Runner
from rnnserve.export.step import Exportable

ARTIFACT = "model.pt"


def write_torchscript(ex: Exportable, path: Path) -> str:
    """Save ``ex.step`` as TorchScript to ``path``; returns a note saying whether it was scripted or traced."""
    args = (torch.randn(ex.input.batched(2), dtype=ex.input.dtype), *ex.initial_state(2))
    with quiet(), torch.no_grad():
        try:
            module = torch.jit.script(ex.step)
            module(*args)  # scripting can succeed and the call still fail on types it guessed wrong
            how = "TorchScript (scripted)"
        except Exception as script_error:
            try:
                module = torch.jit.trace(ex.step, args, check_trace=False)
            except Exception as trace_error:
                raise ExportError(
                    f"TorchScript export of {ex.kind} failed: torch.jit.script: {script_error}; "
                    f"torch.jit.trace: {trace_error}. Try --format onnx."
                ) from trace_error
            how = "TorchScript (traced; scripting failed)"
        torch.jit.save(module, str(path))
    return how


def load_torchscript(path: Path, ex: Exportable) -> Runner:
    """The saved module loaded with ``torch.jit.load``, called positionally as the manifest says."""
    module = torch.jit.load(str(path), map_location="cpu")
    module.eval()

    def run(x: torch.Tensor, states: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.no_grad():
            y, *new_states = module(x, *states)
        return y, new_states

    return run
