"""Helpers for the export tests (no tests here): step an exported artifact the way the server does, straight
from its manifest with onnxruntime / ``torch.jit.load``, without going through rnnserve.export's own loaders."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rnnserve.manifest import ModelManifest

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_artifact(
    version_dir: Path, xs: torch.Tensor, initial: list[torch.Tensor] | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Stream ``xs`` (B, T, ...) through the artifact in ``version_dir`` one step at a time, feeding its state
    outputs back in. Starts from ``initial`` (model layout) or from the manifest's initial values."""
    manifest = ModelManifest.read(version_dir)
    batch = xs.shape[0]
    if initial is None:
        initial = []
        for spec in manifest.states:
            value = torch.from_numpy(spec.initial_value(version_dir)).unsqueeze(spec.batch_axis)
            initial.append(value.expand([batch if d == -1 else d for d in spec.shape]).contiguous())
    states = [s.numpy() if isinstance(s, torch.Tensor) else s for s in initial]
    path = str(version_dir / manifest.artifact)
    outputs = []
    if manifest.format == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        names = [t.name for t in manifest.outputs] + [s.output for s in manifest.states]
        for t in range(xs.shape[1]):
            feeds = {manifest.inputs[0].name: xs[:, t].contiguous().numpy()}
            feeds |= {s.name: v for s, v in zip(manifest.states, states, strict=True)}
            y, *states = session.run(names, feeds)
            outputs.append(torch.from_numpy(y))
        return torch.stack(outputs, 1), [torch.from_numpy(np.asarray(s)) for s in states]
    module = torch.jit.load(path)
    states_t = [torch.as_tensor(s) for s in states]
    with torch.no_grad():
        for t in range(xs.shape[1]):
            y, *states_t = module(xs[:, t].contiguous(), *states_t)
            outputs.append(y)
    return torch.stack(outputs, 1), states_t


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def rnnserve_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the ``rnnserve`` console script (the venv's, beside this interpreter) as a subprocess."""
    script = shutil.which("rnnserve", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "rnnserve.cli"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=cwd or REPO_ROOT, env=env, timeout=300)


def run_sequence_artifact(version_dir: Path, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Run a ``kind: sequence`` artifact on a padded batch and its lengths, straight from its manifest."""
    manifest = ModelManifest.read(version_dir)
    data = next(t.name for t in manifest.inputs if t.name != manifest.lengths_input)
    path = str(version_dir / manifest.artifact)
    if manifest.format == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        feeds = {data: inputs.numpy(), str(manifest.lengths_input): lengths.numpy()}
        return torch.from_numpy(np.asarray(session.run([manifest.outputs[0].name], feeds)[0]))
    with torch.no_grad():
        return torch.jit.load(path)(inputs, lengths)


class TupleLSTMCell(nn.Module):
    """A user LSTM cell with a tuple state, ``cell(x, (h, c)) -> (y, (h, c))``, ``y`` a Linear of ``h``."""

    def __init__(self, n_in: int, n_hidden: int, n_out: int) -> None:
        super().__init__()
        self.ih, self.hh = nn.Linear(n_in, 4 * n_hidden), nn.Linear(n_hidden, 4 * n_hidden, bias=False)
        self.out = nn.Linear(n_hidden, n_out)

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        h, c = state
        i, f, g, o = (self.ih(x) + self.hh(h)).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return self.out(h), (h, c)


def tuple_cell_by_hand(cell: nn.Module, xs: torch.Tensor, state: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A tuple-state user cell looped over xs (B, T, F) in eager PyTorch: its y at every step (B, T, ...)."""
    outs = []
    with torch.no_grad():
        for t in range(xs.shape[1]):
            out = cell(xs[:, t], state)
            y, state = out if isinstance(out[1], tuple) else (out[0], out)
            outs.append(y)
    return torch.stack(outs, 1)
