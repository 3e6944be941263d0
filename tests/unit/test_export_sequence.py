"""Whole-sequence export: padded recurrences with lengths equal the packed eager modules, in both formats, at
any T, over token ids or float features; per-step outputs equal each sequence run alone at its length; a
module that computes something else is refused before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from export_support import max_error, run_sequence_artifact
from torch import nn

from rnnserve.examples.models import BiLSTMClassifier
from rnnserve.export import ExportError, ExportVerificationError, adapt_sequence, export
from rnnserve.export.sequence import random_batch, random_features
from rnnserve.manifest import ModelManifest


class Packed(nn.Module):
    """Embedding + any recurrent module over pack_padded_sequence; returns the last layer's final hidden
    state of each direction, concatenated."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.embedding = nn.Embedding(50, 6, padding_idx=0)
        self.rnn = rnn

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(
            self.embedding(tokens), lengths, batch_first=True, enforce_sorted=False
        )
        _, h = self.rnn(packed)
        h = h[0] if isinstance(h, tuple) else h
        return torch.cat((h[-2], h[-1]), 1) if self.rnn.bidirectional else h[-1]


RNNS = {
    "gru_3_layers_bi": lambda: nn.GRU(6, 5, num_layers=3, batch_first=True, bidirectional=True),
    "lstm_proj_bi": lambda: nn.LSTM(6, 7, num_layers=2, batch_first=True, bidirectional=True, proj_size=3),
    "rnn_relu": lambda: nn.RNN(6, 5, num_layers=2, nonlinearity="relu", batch_first=True),
    "lstm_no_bias": lambda: nn.LSTM(6, 5, batch_first=True, bidirectional=True, bias=False),
}


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("rnn", list(RNNS))
def test_recurrent_modules_export_and_verify(tmp_path: Path, rnn: str, fmt: str) -> None:
    torch.manual_seed(0)
    model = Packed(RNNS[rnn]()).eval()
    ex = adapt_sequence(model, embedding=model.embedding, rnn=model.rnn)
    folder = export(ex, name="m", repository=tmp_path, format=fmt, progress=False)
    manifest = ModelManifest.read(folder)
    assert manifest.kind == "sequence" and manifest.verification is not None
    assert manifest.verification.max_abs_error <= 1e-5


def test_a_module_unlike_its_model_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = BiLSTMClassifier().eval()
    ex = adapt_sequence(model, embedding=model.embedding, rnn=model.rnn)  # no head: the model's output differs
    with pytest.raises(ExportVerificationError):
        export(ex, name="m", repository=tmp_path, format="onnx", progress=False)
    assert not (tmp_path / "m").exists()


def test_random_batches_are_padded_unsorted_and_hold_both_extremes() -> None:
    tokens, lengths = random_batch(6, 9, 20, torch.Generator().manual_seed(0))
    assert int(lengths.max()) == 9 and int(lengths.min()) == 1
    for row, n in zip(tokens, lengths.tolist(), strict=True):
        assert bool((row[:n] >= 1).all()) and bool((row[:n] < 20).all()) and not row[n:].any()


# --- float features, no embedding ----------------------------------------------------------------------


def _alone(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A bare recurrent module's per-step outputs over one unpadded sequence x (T, F), in eager PyTorch."""
    batch_first = getattr(module, "batch_first", True)
    with torch.no_grad():
        out, _ = module(x.unsqueeze(0 if batch_first else 1))
    return out[0] if batch_first else out[:, 0]


FEATURE_RNNS = {
    "lstm_2_layers_time_major": lambda: nn.LSTM(4, 5, num_layers=2, bidirectional=True),
    "gru_batch_first": lambda: nn.GRU(4, 6, batch_first=True, bidirectional=True),
    "rnn_relu_2_layers": lambda: nn.RNN(4, 3, num_layers=2, nonlinearity="relu", bidirectional=True),
    "lstm_proj": lambda: nn.LSTM(4, 6, proj_size=2, batch_first=True, bidirectional=True),
}


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("rnn", list(FEATURE_RNNS))
def test_bidirectional_modules_over_float_features_export_per_step(tmp_path: Path, rnn: str, fmt: str) -> None:
    torch.manual_seed(0)
    module = FEATURE_RNNS[rnn]().eval()
    folder = export(adapt_sequence(module), name="m", repository=tmp_path, format=fmt, progress=False)
    manifest = ModelManifest.read(folder)
    directions_out = 2 * (module.proj_size or module.hidden_size)
    assert manifest.kind == "sequence" and manifest.lengths_input == "lengths"
    assert [(t.name, t.dtype, t.shape) for t in manifest.inputs] == [
        ("x", "float32", [-1, -1, 4]),
        ("lengths", "int64", [-1]),
    ]
    assert [(t.name, t.shape) for t in manifest.outputs] == [("y", [-1, -1, directions_out])]

    # A T and batch the export never saw; each sequence must equal the module run on it alone.
    x, lengths = random_features(6, 13, 4, torch.Generator().manual_seed(1))
    got = run_sequence_artifact(folder, x, lengths)
    assert got.shape == (6, 13, directions_out)
    for b, n in enumerate(lengths.tolist()):
        assert max_error(got[b, :n], _alone(module, x[b, :n])) <= 1e-5
        assert not got[b, n:].any()  # zeros past the length, as pad_packed_sequence gives


class FeatureClassifier(nn.Module):
    """A bidirectional GRU over packed float features; both directions' final states -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(4, 5, num_layers=2, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, h = self.rnn(packed)
        return self.fc(torch.cat((h[-2], h[-1]), 1))


class FeatureTagger(nn.Module):
    """A bidirectional LSTM over packed float features, a Linear on every step's output."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(4, 5, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = nn.utils.rnn.pad_packed_sequence(self.rnn(packed)[0], batch_first=True)
        return self.fc(out)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("per_step", [False, True])
def test_whole_models_over_float_features_with_a_head(tmp_path: Path, per_step: bool, fmt: str) -> None:
    torch.manual_seed(2)
    model = (FeatureTagger() if per_step else FeatureClassifier()).eval()
    ex = adapt_sequence(model, rnn=model.rnn, head=model.fc, per_step=per_step)
    folder = export(ex, name="m", repository=tmp_path, format=fmt, progress=False)
    assert ModelManifest.read(folder).outputs[0].shape == ([-1, -1, 3] if per_step else [-1, 3])
    x, lengths = random_features(5, 9, 4, torch.Generator().manual_seed(3))
    got = run_sequence_artifact(folder, x, lengths)
    for b, n in enumerate(lengths.tolist()):
        with torch.no_grad():
            alone = model(x[b : b + 1, :n], torch.tensor([n]))[0]
        assert max_error(got[b, :n] if per_step else got[b], alone) <= 1e-5
        if per_step:
            assert not got[b, n:].any()  # zeros past the length, not the head's bias


def test_a_sequence_module_must_be_recurrent() -> None:
    with pytest.raises(ExportError, match=r"model \(given without rnn=\) must be an nn.RNN, nn.LSTM or nn.GRU"):
        adapt_sequence(nn.GRUCell(3, 4))
