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

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        dev = self._torch_device
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])).to(dev) for n in self.input_names]
        with torch.inference_mode():
            result = self.module(*args)
        if isinstance(result, torch.Tensor):
            result = (result,)
        if len(result) != self._n_out:
            raise RuntimeError(
                f"TorchScript module returned {len(result)} tensors, manifest declares {self._n_out} "
                f"({self.output_names})"
            )
        return {n: t.detach().cpu().numpy() for n, t in zip(self.output_names, result, strict=True)}

    @property
    def device(self) -> str:
        return self._torch_device.type
