"""TorchScript artifacts through torch.jit.load (never torch.load/pickle)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rnnserve.manifest import ModelManifest
from rnnserve.server.models.runtime.base import Runtime


class TorchScriptRuntime(Runtime):
    def __init__(self, manifest: ModelManifest, artifact: Path, *, device: str, threads: int):
        super().__init__(manifest)
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device cuda asked for, but torch sees no CUDA device; serve with --device cpu")
        if threads:
            torch.set_num_threads(threads)
        self._torch_device = torch.device(device)
        self.module = torch.jit.load(str(artifact), map_location=self._torch_device).eval()
        self._on_device = self._torch_device.type == "cuda"
        # The positional structure: flat by default, or nested as the manifest's `torchscript` says
        # (e.g. forward(x, (h, c)) -> (y, (h2, c2))).
        signature = manifest.torchscript
        self._args: list = list(signature.inputs) if signature else list(self.input_names)
        self._results: list = list(signature.outputs) if signature else list(self.output_names)
        self._state_outputs = {s.output for s in manifest.states}

    def _tensor(self, value) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            return value.to(self._torch_device)
        array = np.ascontiguousarray(value)
        if not array.flags.writeable:
            # A request's bytes (a whole StepBatch tensor is fed as is): torch wants memory it may write.
            array = array.copy()
        return torch.from_numpy(array).to(self._torch_device)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [
            tuple(self._tensor(feeds[n]) for n in a) if isinstance(a, list) else self._tensor(feeds[a])
            for a in self._args
        ]
        with torch.inference_mode():
            result = self.module(*args)
        flat: dict[str, torch.Tensor] = {}
        _unpack(self._results if len(self._results) > 1 else self._results[0], result, flat, "result")
        out: dict[str, Any] = {}  # numpy arrays, and device tensors for the state a GPU keeps
        for name, value in flat.items():
            # On a GPU the next state stays there (the slab holds device tensors); data goes to the host.
            out[name] = value if self._on_device and name in self._state_outputs else value.detach().cpu().numpy()
        return out

    @property
    def device(self) -> str:
        return self._torch_device.type


def _unpack(structure, value, out: dict, where: str) -> None:
    """Match a (nested) result against the declared structure of names, or say how they differ."""
    if isinstance(structure, str):
        if not isinstance(value, torch.Tensor):
            raise RuntimeError(f"TorchScript {where} for '{structure}' is a {type(value).__name__}, not a tensor")
        out[structure] = value
        return
    if not isinstance(value, tuple | list) or len(value) != len(structure):
        got = f"{len(value)} values" if isinstance(value, tuple | list) else type(value).__name__
        raise RuntimeError(
            f"TorchScript {where} is {got}; the manifest declares {len(structure)}: {structure} "
            "(set `torchscript.outputs` in the manifest to the module's result structure)"
        )
    for i, (s, v) in enumerate(zip(structure, value, strict=True)):
        _unpack(s, v, out, f"{where}[{i}]")
