"""Write a step module as ONNX, and load it back with onnxruntime for verification.

The legacy TorchScript-based exporter (``dynamo=False``) is tried first: it is fast (about a second) and
handles the adapters' plain ops well. Should it fail, the dynamo exporter is tried. The batch axis of every
input and output, states included (axis 1 for ``nn.LSTM``-style states), is exported as dynamic.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
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
EXPORTERS = ("legacy", "dynamo")  # tried in this order


def _example_args(ex: Exportable) -> tuple[torch.Tensor, ...]:
    # Batch 2, not 1: an exporter may specialise a size-1 axis as a broadcast.
    return (torch.randn(ex.input.batched(2), dtype=ex.input.dtype), *ex.initial_state(2))


def write_onnx(ex: Exportable, path: Path, exporters: Sequence[str] = EXPORTERS) -> str:
    """Export ``ex.step`` to ``path`` with the first of ``exporters`` that succeeds; returns a note on how
    (for the manifest description)."""
    failures: list[str] = []
    with quiet() as log, torch.no_grad():
        for exporter in exporters:
            try:
                note = _EXPORTERS[exporter](ex, path)
            except Exception as exc:
                path.unlink(missing_ok=True)
                failures.append(f"{exporter} exporter: {exc}")
                continue
            # The manifest description says why the preferred exporter was not used (first line of each).
            return note + "".join(f"; {f.splitlines()[0][:200]}" for f in failures)
    raise ExportError(
        f"ONNX export of {ex.kind} failed. {' '.join(failures)} Try --format torchscript.\n"
        f"Exporter output:\n{log.getvalue()[-4000:]}"
    )


def _names_and_axes(ex: Exportable) -> tuple[list[str], list[str], list[int]]:
    assert ex.output is not None
    inputs = [ex.input.name] + [s.name for s in ex.states]
    outputs = [ex.output.name] + [s.output for s in ex.states]
    return inputs, outputs, [0] + [s.batch_axis for s in ex.states]


def _legacy(ex: Exportable, path: Path) -> str:
    inputs, outputs, axes = _names_and_axes(ex)
    torch.onnx.export(
        ex.step,
        _example_args(ex),
        str(path),
        dynamo=False,
        input_names=inputs,
        output_names=outputs,
        dynamic_axes={n: {a: "batch"} for n, a in zip(inputs + outputs, axes + axes, strict=True)},
        opset_version=OPSET,
    )
    return f"ONNX opset {OPSET} (legacy exporter)"


def _dynamo(ex: Exportable, path: Path) -> str:
    inputs, outputs, axes = _names_and_axes(ex)
    batch = torch.export.Dim("batch")
    torch.onnx.export(
        ex.step,
        _example_args(ex),
        str(path),
        dynamo=True,
        input_names=inputs,
        output_names=outputs,
        dynamic_shapes=_dynamic_shapes(ex.step, [{a: batch} for a in axes]),
        opset_version=DYNAMO_OPSET,
        external_data=False,
    )
    return f"ONNX opset {DYNAMO_OPSET} (dynamo exporter)"


_EXPORTERS: dict[str, Callable[[Exportable, Path], str]] = {"legacy": _legacy, "dynamo": _dynamo}


def _dynamic_shapes(step: torch.nn.Module, per_arg: list[dict]) -> dict[str, object]:
    """``torch.export`` wants dynamic shapes structured like the signature: ``*states`` gets one tuple."""
    shapes: dict[str, object] = {}
    rest = list(per_arg)
    for name, param in inspect.signature(step.forward).parameters.items():
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            shapes[name] = tuple(rest)
            rest = []
        elif rest:
            shapes[name] = rest.pop(0)
    return shapes


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
