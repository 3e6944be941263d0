"""The model under test: the default LSTM step model (exported here, with torch) or any repository model.

The default is the model every system in the comparison serves: ``torch.manual_seed(0)``, a 2-layer
``LSTM(64, 256)`` and a ``Linear(256, 32)`` head. It is written as an ONNX *step* function
``(x, h, c) -> (y, h', c')`` whose states have shape ``(layers, B, hidden)`` (batch axis 1), built from the
``nn.LSTM`` weights with unrolled gate math, so the bench depends on nothing but torch (not on
``rnnserve.export``), and it is checked against ``nn.LSTM`` before anything is measured.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rnnserve.manifest import ModelManifest

DEFAULT_NAME = "lstm"


@dataclass(frozen=True)
class LstmConfig:
    input_size: int = 64
    hidden: int = 256
    layers: int = 2
    output: int = 32
    seed: int = 0


TINY = LstmConfig(input_size=8, hidden=16, layers=2, output=4)


@dataclass(frozen=True)
class InputDesc:
    """One data input as a load generator needs it: name, numpy dtype name, per-session shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class BenchModel:
    name: str
    version: int
    version_dir: Path
    manifest: ModelManifest

    @property
    def inputs(self) -> list[InputDesc]:
        # Free dimensions (other than the batch axis) become 1: the bench sends the smallest legal tensor.
        return [
            InputDesc(t.name, t.dtype, tuple(1 if d == -1 else d for d in t.session_shape))
            for t in self.manifest.inputs
        ]

    @property
    def outputs(self) -> list[InputDesc]:
        return [
            InputDesc(t.name, t.dtype, tuple(1 if d == -1 else d for d in t.session_shape))
            for t in self.manifest.outputs
        ]

    @property
    def state_bytes(self) -> int:
        return self.manifest.state_bytes

    def describe(self) -> dict:
        m = self.manifest
        return {
            "name": m.name,
            "version": m.version,
            "format": m.format,
            "source": m.source,
            "inputs": [{"name": i.name, "dtype": i.dtype, "shape": list(i.shape)} for i in self.inputs],
            "outputs": [{"name": o.name, "dtype": o.dtype, "shape": list(o.shape)} for o in self.outputs],
            "state_bytes": m.state_bytes,
            "max_batch_size": m.max_batch_size,
        }


def random_batch(inputs: list[InputDesc], batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Finite random data for every input, batch axis first (the load generators drop it)."""
    out = {}
    for spec in inputs:
        shape = (batch, *spec.shape)
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            out[spec.name] = (0.5 * rng.standard_normal(shape)).astype(dtype)
        elif dtype.kind == "b":
            out[spec.name] = rng.integers(0, 2, shape).astype(dtype)
        else:
            out[spec.name] = rng.integers(0, 2, shape).astype(dtype)  # small ints: valid token ids for most models
    return out


def load_model(repository: Path, name: str, version: int = 0) -> BenchModel:
    """The repository's model ``name`` at ``version`` (0: the newest version folder)."""
    model_dir = repository / name
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model {name!r} not found in repository {repository}")
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if not versions:
        raise FileNotFoundError(f"model {name!r} in {repository} has no version folder")
    chosen = version or versions[-1]
    version_dir = model_dir / str(chosen)
    manifest = ModelManifest.read(version_dir)
    return BenchModel(manifest.name, manifest.version, version_dir, manifest)


def _torch_modules(cfg: LstmConfig):
    import torch

    torch.manual_seed(cfg.seed)
    lstm = torch.nn.LSTM(cfg.input_size, cfg.hidden, num_layers=cfg.layers, batch_first=True).eval()
    head = torch.nn.Linear(cfg.hidden, cfg.output).eval()
    return lstm, head


def _step_module(lstm, head):
    """``nn.LSTM`` as one timestep: per layer one matmul over ``[x, h]`` (both weight matrices fused,
    both biases summed), then PyTorch's gate order i, f, g, o."""
    import torch

    class LstmStep(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = lstm.num_layers
            self.hidden = lstm.hidden_size
            for k in range(self.layers):
                w = torch.cat([getattr(lstm, f"weight_ih_l{k}"), getattr(lstm, f"weight_hh_l{k}")], dim=1)
                b = getattr(lstm, f"bias_ih_l{k}") + getattr(lstm, f"bias_hh_l{k}")
                self.register_buffer(f"w{k}", w.detach().clone())
                self.register_buffer(f"b{k}", b.detach().clone())
            self.head = head

        def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
            hs, cs = [], []
            inp = x
            for k in range(self.layers):
                gates = torch.nn.functional.linear(
                    torch.cat([inp, h[k]], dim=1), getattr(self, f"w{k}"), getattr(self, f"b{k}")
                )
                i, f, g, o = gates.chunk(4, dim=1)
                c_k = torch.sigmoid(f) * c[k] + torch.sigmoid(i) * torch.tanh(g)
                h_k = torch.sigmoid(o) * torch.tanh(c_k)
                hs.append(h_k)
                cs.append(c_k)
                inp = h_k
            return self.head(inp), torch.stack(hs), torch.stack(cs)

    return LstmStep().eval()


def build_lstm_repository(root: Path, cfg: LstmConfig = LstmConfig(), *, max_batch_size: int = 1024) -> BenchModel:
    """Export the LSTM step model as ONNX into ``root/lstm/1`` and check it against ``nn.LSTM``."""
    import torch

    lstm, head = _torch_modules(cfg)
    step = _step_module(lstm, head)
    version_dir = root / DEFAULT_NAME / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    batch = 2
    example = (
        torch.zeros(batch, cfg.input_size),
        torch.zeros(cfg.layers, batch, cfg.hidden),
        torch.zeros(cfg.layers, batch, cfg.hidden),
    )
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            step,
            example,
            str(version_dir / "model.onnx"),
            input_names=["x", "h", "c"],
            output_names=["y", "h_out", "c_out"],
            dynamic_axes={
                "x": {0: "b"},
                "h": {1: "b"},
                "c": {1: "b"},
                "y": {0: "b"},
                "h_out": {1: "b"},
                "c_out": {1: "b"},
            },
            dynamo=False,
        )
    manifest = ModelManifest(
        name=DEFAULT_NAME,
        version=1,
        format="onnx",
        artifact="model.onnx",
        inputs=[{"name": "x", "shape": [-1, cfg.input_size]}],
        outputs=[{"name": "y", "shape": [-1, cfg.output]}],
        states=[
            {"name": "h", "output": "h_out", "shape": [cfg.layers, -1, cfg.hidden], "batch_axis": 1},
            {"name": "c", "output": "c_out", "shape": [cfg.layers, -1, cfg.hidden], "batch_axis": 1},
        ],
        max_batch_size=max_batch_size,
        source="rnnserve.bench.model:build_lstm_repository",
        description=f"torch.manual_seed({cfg.seed}); LSTM({cfg.input_size}, {cfg.hidden}, num_layers={cfg.layers})"
        f" + Linear({cfg.hidden}, {cfg.output}); one timestep per call",
    )
    manifest.write(version_dir)
    verify_against_torch(version_dir, cfg)
    return BenchModel(manifest.name, manifest.version, version_dir, manifest)


def verify_against_torch(version_dir: Path, cfg: LstmConfig, *, steps: int = 4, batch: int = 3) -> float:
    """Step the ONNX artifact through onnxruntime and compare with ``nn.LSTM`` over the whole sequence;
    raise when they disagree. Returns the largest absolute difference."""
    import onnxruntime as ort
    import torch

    lstm, head = _torch_modules(cfg)
    xs = torch.randn(batch, steps, cfg.input_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = head(lstm(xs)[0]).numpy()
    sess = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    h = np.zeros((cfg.layers, batch, cfg.hidden), np.float32)
    c = np.zeros_like(h)
    worst = 0.0
    for t in range(steps):
        y, h, c = sess.run(["y", "h_out", "c_out"], {"x": xs[:, t].numpy(), "h": h, "c": c})
        worst = max(worst, float(np.abs(y - expected[:, t]).max()))
    if not worst < 1e-4:
        raise RuntimeError(f"exported LSTM step model disagrees with nn.LSTM: max abs error {worst:.3g}")
    return worst
