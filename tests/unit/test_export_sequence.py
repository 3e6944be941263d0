"""Whole-sequence export: padded recurrences with lengths equal the packed eager modules, in both formats, at
any T; a module that computes something else is refused before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from rnnserve.examples.models import BiLSTMClassifier
from rnnserve.export import ExportVerificationError, adapt_sequence, export
from rnnserve.export.sequence import random_batch
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
