"""ONNX artifacts through onnxruntime."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from rnnserve.manifest import ModelManifest
from rnnserve.server.runtime.base import Runtime


class OnnxRuntime(Runtime):
    def __init__(self, manifest: ModelManifest, artifact: Path, *, device: str, threads: int):
        super().__init__(manifest)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError(
                    "device cuda asked for, but this onnxruntime has no CUDAExecutionProvider: "
                    "install onnxruntime-gpu (the `gpu` extra) instead of onnxruntime, or serve with --device cpu"
                )
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(artifact), sess_options=options, providers=providers)
        graph_inputs = {i.name for i in self.session.get_inputs()}
        graph_outputs = {o.name for o in self.session.get_outputs()}
        missing_in = [n for n in self.input_names if n not in graph_inputs]
        missing_out = [n for n in self.output_names if n not in graph_outputs]
        if missing_in or missing_out:
            raise ValueError(
                f"manifest and ONNX graph disagree: graph lacks inputs {missing_in} / outputs {missing_out}; "
                f"graph has inputs {sorted(graph_inputs)} and outputs {sorted(graph_outputs)}"
            )
        self._device = "cuda" if providers[0] == "CUDAExecutionProvider" else "cpu"

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.session.run(self.output_names, dict(feeds))
        return dict(zip(self.output_names, results, strict=True))

    @property
    def device(self) -> str:
        return self._device
