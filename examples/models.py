"""The tutorial notebooks' recurrent models, corrected, with factories that hand them to the exporter.

Each model class keeps its own whole-sequence ``forward``: that is the eager oracle the exported stream must
match. Each factory seeds the RNG (so the weights are the same on every call) and returns an
:class:`~rnnserve.export.Exportable` whose ``model`` is the notebook model.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from rnnserve.export import Exportable, adapt
from rnnserve.export.sequence import SequenceExportable, adapt_sequence

SEED = 0


class RNNCell(nn.Module):
    """The hand-written Elman cell of notebook 000: ``h' = act(x2h(x) + h2h(h))``."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh") -> None:
        super().__init__()
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', not {nonlinearity!r}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.nonlinearity = nonlinearity
        self.x2h = nn.Linear(input_size, hidden_size, bias=bias)
        self.h2h = nn.Linear(hidden_size, hidden_size, bias=bias)
        std = 1.0 / math.sqrt(hidden_size)
        for w in self.parameters():
            nn.init.uniform_(w, -std, std)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        if h is None:
            h = x.new_zeros(x.shape[0], self.hidden_size)
        a = self.x2h(x) + self.h2h(h)
        return torch.tanh(a) if self.nonlinearity == "tanh" else torch.relu(a)


class ElmanRNN(nn.Module):
    """A stack of :class:`RNNCell` with a linear head on the last layer's final hidden state (notebook 000).

    ``forward(x)`` with ``x`` of ``(B, T, input_size)`` returns ``(B, output_size)``: the head applied at the
    last step only. Streamed, step ``t`` therefore equals ``model(x[:, : t + 1])``.
    """

    def __init__(
        self, input_size: int, hidden_size: int, num_layers: int, output_size: int, activation: str = "tanh"
    ) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        sizes = [input_size] + [hidden_size] * (num_layers - 1)
        self.rnn_cell_list = nn.ModuleList(RNNCell(n, hidden_size, True, activation) for n in sizes)
        self.fc = nn.Linear(hidden_size, output_size)

    def forward(self, x: torch.Tensor, hx: torch.Tensor | None = None) -> torch.Tensor:
        if hx is None:
            hx = x.new_zeros(self.num_layers, x.shape[0], self.hidden_size)
        hidden = list(hx.unbind(0))
        for t in range(x.shape[1]):
            inp = x[:, t]
            for layer, cell in enumerate(self.rnn_cell_list):
                hidden[layer] = inp = cell(inp, hidden[layer])
        # No .squeeze() here (the notebook's bug): it dropped the batch axis of a batch of one.
        return self.fc(hidden[-1])


class WUVCell(nn.Module):
    """Notebook 002's cell: ``h' = tanh(W h + U x)``, ``o = V h'``; returns ``(o, h')``."""

    def __init__(self, in_size: int, hidden_size: int, out_size: int) -> None:
        super().__init__()
        self.W = nn.Linear(hidden_size, hidden_size)
        self.U = nn.Linear(in_size, hidden_size)
        self.V = nn.Linear(hidden_size, out_size)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.W(h) + self.U(x))
        return self.V(h), h


class WUVRNN(nn.Module):
    """Runs a :class:`WUVCell` over ``(B, T, in_size)``, returning every step's output ``(B, T, out_size)``."""

    def __init__(self, in_size: int, hidden_size: int, out_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.rnn_cell = WUVCell(in_size, hidden_size, out_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The notebook called the global `rnn_cell` and never batched; this uses its own cell, batched.
        h = x.new_zeros(x.shape[0], self.hidden_size)
        outs = []
        for t in range(x.shape[1]):
            o, h = self.rnn_cell(x[:, t], h)
            outs.append(o)
        return torch.stack(outs, 1)


class SequenceRegressor(nn.Module):
    """``nn.RNN`` + linear head predicting the next value of a sequence at every step (notebook 003)."""

    def __init__(self, input_size: int = 1, hidden_size: int = 32, num_layers: int = 1, output_size: int = 1) -> None:
        super().__init__()
        self.rnn = nn.RNN(input_size, hidden_size, num_layers, batch_first=True)
        self.fc = nn.Linear(hidden_size, output_size)

    def forward(self, x: torch.Tensor, hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        out, hidden = self.rnn(x, hidden)
        return self.fc(out), hidden  # (B, T, output_size): no .view(-1, ...) flattening the batch away


class TokenClassifier(nn.Module):
    """``nn.LSTM(768 -> 8, 2 layers, proj_size=2)`` giving 2 logits per timestep (notebook 002)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size=768, hidden_size=8, num_layers=2, batch_first=True, proj_size=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs, _ = self.lstm(x)
        return outputs  # (B, T, 2)


class GRUTagger(nn.Module):
    """A 2-layer GRU with a linear head at every step."""

    def __init__(self, input_size: int = 16, hidden_size: int = 32, num_classes: int = 4) -> None:
        super().__init__()
        self.gru = nn.GRU(input_size, hidden_size, num_layers=2, batch_first=True)
        self.fc = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x)
        return self.fc(out)


class BiLSTMClassifier(nn.Module):
    """Notebook 001's text classifier: embedding (``padding_idx=0``), a bidirectional LSTM over the packed
    sequences, both directions' last hidden states concatenated, then Linear-ReLU-Linear-sigmoid.

    ``forward(text (B, T) int64, lengths (B,) int64) -> (B, 1)`` probabilities. Fixed from the notebook:
    ``self_relu``/``self_sigmoid`` were locals (``self.relu`` did not exist), ``lengths.cpu().numpy`` was
    never called, and the sizes were undefined.
    """

    def __init__(self, vocab_size: int = 100, embed_dim: int = 16, rnn_hidden_size: int = 24, fc_hidden_size: int = 32):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.rnn = nn.LSTM(embed_dim, rnn_hidden_size, batch_first=True, bidirectional=True)
        self.fc1 = nn.Linear(rnn_hidden_size * 2, fc_hidden_size)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(fc_hidden_size, 1)
        self.sigmoid = nn.Sigmoid()

    def forward(self, text: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        out = self.embedding(text)
        out = nn.utils.rnn.pack_padded_sequence(out, lengths.cpu(), enforce_sorted=False, batch_first=True)
        _, (hidden, _cell) = self.rnn(out)
        out = torch.cat((hidden[-2], hidden[-1]), dim=1)  # last layer: forward, backward
        return self.sigmoid(self.fc2(self.relu(self.fc1(out))))


def _with_model(ex: Exportable, model: nn.Module) -> Exportable:
    model.eval()
    return replace(ex, model=model)


def elman_tanh() -> Exportable:
    """Two-layer tanh Elman stack (input 3, hidden 8) with a Linear(8, 2) head."""
    torch.manual_seed(SEED)
    model = ElmanRNN(input_size=3, hidden_size=8, num_layers=2, output_size=2, activation="tanh")
    return _with_model(adapt(model.rnn_cell_list, head=model.fc), model)


def elman_relu() -> Exportable:
    """Two-layer relu Elman stack (input 3, hidden 8) with a Linear(8, 2) head."""
    torch.manual_seed(SEED)
    model = ElmanRNN(input_size=3, hidden_size=8, num_layers=2, output_size=2, activation="relu")
    return _with_model(adapt(model.rnn_cell_list, head=model.fc), model)


def wuv_cell() -> Exportable:
    """The W/U/V cell, input 2, hidden 8, output 3."""
    torch.manual_seed(SEED)
    model = WUVRNN(2, 8, 3)
    return _with_model(adapt(model.rnn_cell, input_size=2, hidden_size=8), model)


def rnn_regressor() -> Exportable:
    """``nn.RNN(1, 32, batch_first=True)`` + Linear(32, 1): next-value regression."""
    torch.manual_seed(SEED)
    model = SequenceRegressor()
    return _with_model(adapt(model.rnn, head=model.fc), model)


def lstm_proj_classifier() -> Exportable:
    """``nn.LSTM(768, 8, num_layers=2, batch_first=True, proj_size=2)``: 2 logits per step."""
    torch.manual_seed(SEED)
    model = TokenClassifier()
    return _with_model(adapt(model.lstm), model)


def gru2() -> Exportable:
    """``nn.GRU(16, 32, num_layers=2, batch_first=True)`` + Linear(32, 4)."""
    torch.manual_seed(SEED)
    model = GRUTagger()
    return _with_model(adapt(model.gru, head=model.fc), model)


def bilstm_classifier() -> SequenceExportable:
    """Notebook 001's bidirectional LSTM text classifier (vocab 100, embed 16, hidden 24, fc 32): a whole-
    sequence model ``(tokens, lengths) -> prob``, served by Predict."""
    torch.manual_seed(SEED)
    model = BiLSTMClassifier().eval()
    head = nn.Sequential(model.fc1, model.relu, model.fc2, model.sigmoid)
    return adapt_sequence(model, embedding=model.embedding, rnn=model.rnn, head=head)
