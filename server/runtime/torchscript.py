"""TorchScript artifacts through torch.jit.load (never torch.load/pickle)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from rnnserve.manifest import ModelManifest
from rnnserve.server.runtime.base import Runtime


class TorchScriptRuntime(Runtime):
    def __init__(self, manifest: ModelManifest, artifact: Path, *, device: str, threads: int):
        super().__init__(manifest)
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device cuda asked for, but torch sees no CUDA device; serve with --device cpu")
        if threads:
            torch.set_num_threads(threads)
        self._torch_device = torch.device(device)
        self.module = torch.jit.load(str(artifact), map_location=self._torch_device).eval()
        self._n_out = len(self.output_names)
        self._n_data_out = len(manifest.outputs)
        self._on_device = self._torch_device.type == "cuda"

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        dev = self._torch_device
        args = [
            v.to(dev) if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v)).to(dev)
            for v in (feeds[n] for n in self.input_names)
        ]
        with torch.inference_mode():
            result = self.module(*args)
        if isinstance(result, torch.Tensor):
            result = (result,)
        if len(result) != self._n_out:
            raise RuntimeError(
                f"TorchScript module returned {len(result)} tensors, manifest declares {self._n_out} "
                f"({self.output_names})"
            )
        out = {}
        for i, (name, value) in enumerate(zip(self.output_names, result, strict=True)):
            # On a GPU the next state stays there (the slab holds device tensors); data goes to the host.
            out[name] = value if self._on_device and i >= self._n_data_out else value.detach().cpu().numpy()
        return out

    @property
    def device(self) -> str:
        return self._torch_device.type
