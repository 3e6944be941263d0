"""Write a step module as ONNX, and load it back with onnxruntime for verification.

The legacy TorchScript-based exporter (``dynamo=False``) is tried first: it is fast (about a second) and
handles the adapters' plain ops well. Should it fail, the dynamo exporter is tried. The batch axis of every
input and output, states included (axis 1 for ``nn.LSTM``-style states), is exported as dynamic.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rnnserve.export.errors import ExportError
from rnnserve.export.quiet import quiet
from rnnserve.export.runner import Runner
from rnnserve.export.step import Exportable

ARTIFACT = "model.onnx"
OPSET = 17
DYNAMO_OPSET = 18  # the dynamo exporter's lowest well-supported opset


def _example_args(ex: Exportable) -> tuple[torch.Tensor, ...]:
    # Batch 2, not 1: an exporter may specialise a size-1 axis as a broadcast.
    return (torch.randn(ex.input.batched(2), dtype=ex.input.dtype), *ex.initial_state(2))


def write_onnx(ex: Exportable, path: Path) -> str:
    """Export ``ex.step`` to ``path``; returns a note on how (for the manifest description)."""
    assert ex.output is not None
    args = _example_args(ex)
    input_names = [ex.input.name] + [s.name for s in ex.states]
    output_names = [ex.output.name] + [s.output for s in ex.states]
    axes = [0] + [s.batch_axis for s in ex.states]
    with quiet() as log, torch.no_grad():
        try:
            torch.onnx.export(
                ex.step,
                args,
                str(path),
                dynamo=False,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes={n: {a: "batch"} for n, a in zip(input_names + output_names, axes + axes, strict=True)},
                opset_version=OPSET,
            )
            return f"ONNX opset {OPSET} (legacy exporter)"
        except Exception as legacy_error:
            path.unlink(missing_ok=True)
            first = legacy_error
        try:
            batch = torch.export.Dim("batch")
            torch.onnx.export(
                ex.step,
                args,
                str(path),
                dynamo=True,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=tuple({a: batch} for a in axes),
                opset_version=DYNAMO_OPSET,
                external_data=False,
            )
            return f"ONNX opset {DYNAMO_OPSET} (dynamo exporter; the legacy exporter failed: {first})"
        except Exception as dynamo_error:
            raise ExportError(
                f"ONNX export of {ex.kind} failed. Legacy exporter: {first}. Dynamo exporter: {dynamo_error}. "
                f"Try --format torchscript.\nExporter output:\n{log.getvalue()[-4000:]}"
            ) from dynamo_error


def load_onnx(path: Path, ex: Exportable) -> Runner:
    """An onnxruntime (CPU) session for ``path``, called like the step module."""
    import onnxruntime as ort

    assert ex.output is not None
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    output_names = [ex.output.name] + [s.output for s in ex.states]

    def run(x: torch.Tensor, states: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feeds = {ex.input.name: x.numpy()} | {s.name: v.numpy() for s, v in zip(ex.states, states, strict=True)}
        y, *new_states = (torch.from_numpy(np.asarray(o)) for o in session.run(output_names, feeds))
        return y, new_states

    return run
