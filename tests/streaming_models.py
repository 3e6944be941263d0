"""Streaming models as their authors ship them, built straight with onnx.helper and torch (no rnnserve export):

- ``vad``: a VAD-style step model whose graph really slices its input. It takes 64 samples of context + 512 new
  ones (``x``: [B, 576]), a sample rate ``sr`` as a scalar (no batch axis) and a state ``h`` [B, 1]; a
  65-tap convolution over the 576 samples gives ``frames`` [B, 512] (each depends on the 64 before it), and
  ``h_out = tanh(h / 2 + mean(frames) * sr / 16000)``, ``prob = sigmoid(h_out)``. As ONNX and as TorchScript.
- ``padded``: ``y = sum(reflect_pad(x, 1))`` over a free length (reflect padding needs length >= 2), running
  sum in ``h``.
- ``bilstm``: ONNX's own bidirectional LSTM operator, time-major ``X`` [T, B, F] with int32 ``sequence_lens``.

``HandContext`` runs a model with the context window kept by hand: the reference for the server's own.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

CONTEXT, CHUNK, TAPS = 64, 512, 65
FEATURES, HIDDEN = 3, 4


def vad_kernel(seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((1, 1, TAPS)) / 4).astype(np.float32)


def _save(model: Any, path: Path) -> None:
    import onnx

    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def build_vad_onnx(path: Path, samples: int | str = CONTEXT + CHUNK) -> None:
    """``samples``: the graph's declared length of ``x`` (an int fixes it; a name leaves it free)."""
    from onnx import TensorProto, helper, numpy_helper

    def const(name: str, value: np.ndarray) -> Any:
        return numpy_helper.from_array(value, name)

    nodes = [
        helper.make_node("Unsqueeze", ["x", "one"], ["xu"]),
        helper.make_node("Conv", ["xu", "w"], ["c"]),
        helper.make_node("Squeeze", ["c", "one"], ["frames"]),
        helper.make_node("ReduceMean", ["frames"], ["m"], axes=[1], keepdims=1),
        helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["srf", "base"], ["k"]),
        helper.make_node("Mul", ["m", "k"], ["mk"]),
        helper.make_node("Mul", ["h", "half"], ["hh"]),
        helper.make_node("Add", ["hh", "mk"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["h_out"]),
        helper.make_node("Sigmoid", ["h_out"], ["prob"]),
    ]
    graph = helper.make_graph(
        nodes,
        "vad",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", samples]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
            helper.make_tensor_value_info("h", TensorProto.FLOAT, ["b", 1]),
        ],
        [
            helper.make_tensor_value_info("frames", TensorProto.FLOAT, ["b", "n"]),
            helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["b", 1]),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["b", 1]),
        ],
        [
            const("one", np.array([1], np.int64)),
            const("w", vad_kernel()),
            const("base", np.array(16000, np.float32)),
            const("half", np.array(0.5, np.float32)),
        ],
    )
    _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)


def build_vad_torchscript(path: Path) -> None:
    import torch

    class Vad(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.from_numpy(vad_kernel()), requires_grad=False)

        def forward(
            self, x: torch.Tensor, sr: torch.Tensor, h: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            frames = torch.nn.functional.conv1d(x.unsqueeze(1), self.w).squeeze(1)
            k = sr.to(torch.float32) / 16000.0
            h_out = torch.tanh(h * 0.5 + frames.mean(dim=1, keepdim=True) * k)
            return frames, torch.sigmoid(h_out), h_out

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(Vad().eval()).save(str(path))


VAD_CONFIG: dict[str, Any] = {
    "inputs": [{"name": "x", "shape": [-1, CHUNK], "context": {"length": CONTEXT}}],
    "outputs": [{"name": "frames", "shape": [-1, CHUNK]}, {"name": "prob", "shape": [-1, 1]}],
    "states": [{"name": "h", "output": "h_out", "shape": [-1, 1]}],
    "parameters": [{"name": "sr", "dtype": "int64", "shape": [], "batched": False, "default": 16000}],
}


def write_vad(root: Path, name: str, fmt: str = "onnx", **changes: Any) -> Path:
    """``root/name/1`` with the vad artifact and its manifest (VAD_CONFIG with ``changes`` on top)."""
    folder = root / name / "1"
    artifact = "vad.onnx" if fmt == "onnx" else "vad.pt"
    (build_vad_onnx if fmt == "onnx" else build_vad_torchscript)(folder / artifact)
    config = {"name": name, "version": 1, "format": fmt, "artifact": artifact, **VAD_CONFIG, **changes}
    (folder / "manifest.json").write_text(json.dumps(config))
    return folder


def vad_call(folder: Path) -> Callable[[np.ndarray, int, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The artifact in ``folder`` called directly: ``(x [B, 576], sr, h [B, 1]) -> (frames, prob, h_out)``."""
    if (folder / "vad.onnx").exists():
        import onnxruntime as ort

        session = ort.InferenceSession(str(folder / "vad.onnx"), providers=["CPUExecutionProvider"])

        def run_onnx(x: np.ndarray, sr: int, h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            frames, prob, h_out = session.run(["frames", "prob", "h_out"], {"x": x, "sr": np.array(sr), "h": h})
            return frames, prob, h_out

        return run_onnx
    import torch

    module = torch.jit.load(str(folder / "vad.pt"))

    def run_torch(x: np.ndarray, sr: int, h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with torch.no_grad():
            out = module(torch.from_numpy(x), torch.tensor(sr), torch.from_numpy(h))
        return tuple(o.numpy() for o in out)  # type: ignore[return-value]

    return run_torch


class HandContext:
    """One session of the vad model with its context window and state kept by hand, as a client had to."""

    def __init__(self, folder: Path, sr: int = 16000) -> None:
        self.call = vad_call(folder)
        self.sr = sr
        self.reset()

    def reset(self) -> None:
        self.window = np.zeros((1, CONTEXT), np.float32)
        self.h = np.zeros((1, 1), np.float32)

    def step(self, chunk: np.ndarray) -> dict[str, np.ndarray]:
        x = np.concatenate([self.window, chunk[None]], axis=1)
        frames, prob, self.h = self.call(x, self.sr, self.h)
        self.window = x[:, -CONTEXT:]
        return {"frames": frames[0], "prob": prob[0]}


def build_padded_onnx(path: Path) -> None:
    """``y = sum(reflect_pad(x, 1))`` [B, 1] over ``x`` [B, n]; ``h_out = h + y``."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["p"], mode="reflect"),
        helper.make_node("ReduceSum", ["p", "axis1"], ["y"], keepdims=1),
        helper.make_node("Add", ["h", "y"], ["h_out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "padded",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "n"]),
            helper.make_tensor_value_info("h", TensorProto.FLOAT, ["b", 1]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 1]),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["b", 1]),
        ],
        [
            numpy_helper.from_array(np.array([0, 1, 0, 1], np.int64), "pads"),
            numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        ],
    )
    _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)


def padded_reference(x: np.ndarray) -> float:
    return float(np.pad(x, (1, 1), mode="reflect").sum())


def build_bilstm_onnx(path: Path, seed: int = 0, layout: int = 0) -> None:
    """ONNX's LSTM operator, bidirectional, with int32 ``sequence_lens`` [B]. ``layout`` 0: time-major ``X``
    [T, B, F], ``Y`` [T, 2, B, H] and ``Y_h`` [2, B, H], as the operator is; 1: batch-major ``X`` [B, T, F],
    ``Y`` [B, T, 2, H] and ``Y_h`` [B, 2, H]."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((2, 4 * HIDDEN, FEATURES)) / 2).astype(np.float32)
    r = (rng.standard_normal((2, 4 * HIDDEN, HIDDEN)) / 2).astype(np.float32)
    b = (rng.standard_normal((2, 8 * HIDDEN)) / 2).astype(np.float32)
    lstm = helper.make_node(
        "LSTM",
        ["X" if layout == 0 else "Xt", "W", "R", "B", "sequence_lens"],
        ["Y" if layout == 0 else "Yt", "Y_h" if layout == 0 else "Y_ht"],
        hidden_size=HIDDEN,
        direction="bidirectional",
    )
    # onnxruntime implements only the time-major layout: a batch-major graph transposes around it.
    nodes = (
        [lstm]
        if layout == 0
        else [
            helper.make_node("Transpose", ["X"], ["Xt"], perm=[1, 0, 2]),
            lstm,
            helper.make_node("Transpose", ["Yt"], ["Y"], perm=[2, 0, 1, 3]),
            helper.make_node("Transpose", ["Y_ht"], ["Y_h"], perm=[1, 0, 2]),
        ]
    )
    x_dims: list[Any] = ["t", "b", FEATURES] if layout == 0 else ["b", "t", FEATURES]
    y_dims: list[Any] = ["t", 2, "b", HIDDEN] if layout == 0 else ["b", "t", 2, HIDDEN]
    h_dims: list[Any] = [2, "b", HIDDEN] if layout == 0 else ["b", 2, HIDDEN]
    graph = helper.make_graph(
        nodes,
        "bilstm",
        [
            helper.make_tensor_value_info("X", TensorProto.FLOAT, x_dims),
            helper.make_tensor_value_info("sequence_lens", TensorProto.INT32, ["b"]),
        ],
        [
            helper.make_tensor_value_info("Y", TensorProto.FLOAT, y_dims),
            helper.make_tensor_value_info("Y_h", TensorProto.FLOAT, h_dims),
        ],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(r, "R"), numpy_helper.from_array(b, "B")],
    )
    _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)


BILSTM_CONFIG: dict[str, Any] = {  # time-major (layout 0)
    "kind": "sequence",
    "lengths_input": "sequence_lens",
    "inputs": [
        {"name": "X", "shape": [-1, -1, FEATURES], "batch_axis": 1, "time_axis": 0},
        {"name": "sequence_lens", "dtype": "int32", "shape": [-1]},
    ],
    "outputs": [
        {"name": "Y", "shape": [-1, 2, -1, HIDDEN], "batch_axis": 2},
        {"name": "Y_h", "shape": [2, -1, HIDDEN], "batch_axis": 1},
    ],
}

BILSTM_BATCH_MAJOR: dict[str, Any] = {  # layout 1: the time axis follows the batch axis, the default
    "kind": "sequence",
    "lengths_input": "sequence_lens",
    "inputs": [
        {"name": "X", "shape": [-1, -1, FEATURES]},
        {"name": "sequence_lens", "dtype": "int32", "shape": [-1]},
    ],
    "outputs": [{"name": "Y", "shape": [-1, -1, 2, HIDDEN]}, {"name": "Y_h", "shape": [-1, 2, HIDDEN]}],
}
