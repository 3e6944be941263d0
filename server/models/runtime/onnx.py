"""ONNX artifacts through onnxruntime."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from rnnserve.manifest import ModelManifest
from rnnserve.server.models.runtime.base import Runtime


class OnnxRuntime(Runtime):
    def __init__(self, manifest: ModelManifest, artifact: Path, *, device: str, threads: int):
        super().__init__(manifest)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # One graph runs at a time per model, so parallel branches rarely pay: 1 unless the config says more.
        options.inter_op_num_threads = manifest.runtime.inter_op_threads or 1
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
        # onnxruntime quietly falls back to the CPU when its CUDA provider fails to load: ask what it took.
        self._device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        if device == "cuda" and self._device != "cuda":
            raise RuntimeError(
                "device cuda asked for, but onnxruntime could not load its CUDA provider (check the CUDA and "
                "cuDNN libraries onnxruntime-gpu needs), or serve with --device cpu"
            )
        if self._device == "cuda":
            import torch  # the device slab's tensors; the server extra installs torch

            if not torch.cuda.is_available():
                raise RuntimeError("device cuda asked for, but torch sees no CUDA device; serve with --device cpu")
            self._torch = torch

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._device == "cuda":
            return self._run_on_device(feeds)
        results = self.session.run(self.output_names, dict(feeds))
        return dict(zip(self.output_names, results, strict=True))

    def _run_on_device(self, feeds: Mapping) -> dict:
        """IOBinding: state inputs and outputs are bound to CUDA tensors of the slab's batch, so the state
        never crosses to the host; data inputs are copied up and data outputs come back to the host."""
        torch = self._torch
        manifest = self.manifest
        binding = self.session.io_binding()
        batch = 0
        for spec in manifest.inputs:
            value = np.ascontiguousarray(feeds[spec.name])
            batch = value.shape[spec.batch_axis]
            binding.bind_cpu_input(spec.name, value)
        for spec in manifest.outputs:
            binding.bind_output(spec.name, "cpu")
        next_states = {}
        for spec in manifest.states:
            value = feeds[spec.name].contiguous()
            dtype = np.dtype(spec.dtype)
            binding.bind_input(spec.name, "cuda", value.device.index or 0, dtype, tuple(value.shape), value.data_ptr())
            shape = list(spec.shape)
            shape[spec.batch_axis] = batch
            out = torch.empty(shape, dtype=value.dtype, device=value.device)
            binding.bind_output(spec.output, "cuda", out.device.index or 0, dtype, tuple(shape), out.data_ptr())
            next_states[spec.output] = out
        # Parameters (slab columns: CUDA tensors) and constants (host arrays) go in as they are.
        # ``kept`` holds each bound buffer until the call: the binding has only its address.
        bound = {spec.name for spec in manifest.inputs} | {spec.name for spec in manifest.states}
        kept = []
        for name, value in feeds.items():
            if name in bound:
                continue
            if isinstance(value, np.ndarray):
                kept.append(array := np.ascontiguousarray(value))
                binding.bind_cpu_input(name, array)
            else:
                kept.append(tensor := value.contiguous())
                dtype = np.dtype(str(tensor.dtype).removeprefix("torch."))
                binding.bind_input(
                    name, "cuda", tensor.device.index or 0, dtype, tuple(tensor.shape), tensor.data_ptr()
                )
        # torch queued the gather on its own CUDA stream; onnxruntime runs on another.
        torch.cuda.current_stream().synchronize()
        self.session.run_with_iobinding(binding)
        data = binding.get_outputs()[: len(manifest.outputs)]
        result = {spec.name: value.numpy() for spec, value in zip(manifest.outputs, data, strict=True)}
        result.update(next_states)
        return result

    @property
    def device(self) -> str:
        return self._device
