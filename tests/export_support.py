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
