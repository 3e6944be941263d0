"""``nn.RNN``/``nn.LSTM``/``nn.GRU`` over padded batches with per-sequence lengths, in plain scriptable ops.

Eager PyTorch handles variable lengths with ``pack_padded_sequence``, which neither ONNX nor TorchScript
exports usefully. This computes the same thing on the padded ``(B, T, ...)`` tensor:

* forward direction: run all ``T`` steps, but keep each sequence's state frozen from ``t >= length`` on, so
  the final state is the state after its last real step;
* backward direction: reverse each sequence *within its length* (one gather; positions past the length stay
  where they are, so they still come after the real steps and stay masked), run forward, take the final
  state, and un-reverse the per-step outputs with the same gather (the permutation is its own inverse).

The time loop is a Python ``for`` over ``x.shape[1]``: ``torch.jit.script`` keeps it as a loop, and the ONNX
exporter turns the scripted loop into an ONNX ``Loop``, so the artifacts take any ``T``, not only the one
used at export. The per-step units are those of the streaming adapters (:mod:`rnnserve.export.cells`),
holding the original module's parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from rnnserve.export.cells import GRUUnit, LSTMUnit, RNNUnit
from rnnserve.export.errors import ExportError


class _Direction(nn.Module):
    """One direction of one layer of a single-state unit (RNN, GRU): ``unit(x, h) -> (y, h')``."""

    def __init__(self, unit: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.unit = unit
        self.hidden_size = hidden_size

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x.new_zeros(x.shape[0], self.hidden_size)
        outputs: list[torch.Tensor] = []
        for t in range(x.shape[1]):
            y, h_next = self.unit(x[:, t], h)
            h = torch.where(mask[:, t], h_next, h)
            outputs.append(y)
        return torch.stack(outputs, 1), h


class _LSTMDirection(nn.Module):
    """One direction of one ``nn.LSTM`` layer: ``unit(x, h, c) -> (h', c')`` (``h'`` projected with proj_size)."""

    def __init__(self, unit: LSTMUnit, out_size: int, hidden_size: int) -> None:
        super().__init__()
        self.unit = unit
        self.out_size = out_size
        self.hidden_size = hidden_size

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x.new_zeros(x.shape[0], self.out_size)
        c = x.new_zeros(x.shape[0], self.hidden_size)
        outputs: list[torch.Tensor] = []
        for t in range(x.shape[1]):
            h_next, c_next = self.unit(x[:, t], h, c)
            m = mask[:, t]
            h = torch.where(m, h_next, h)
            c = torch.where(m, c_next, c)
            outputs.append(h_next)
        return torch.stack(outputs, 1), h


class PaddedRecurrent(nn.Module):
    """``forward(x (B, T, input), lengths (B,)) -> (outputs (B, T, directions * hidden), finals (B, directions
    * hidden))``, what the module computes on ``pack_padded_sequence(x, lengths)``: ``outputs`` are the last
    layer's per-step outputs (``pad_packed_sequence``'s, zero past each length), ``finals`` the last layer's
    final hidden state of each direction, concatenated (forward first), i.e. ``torch.cat((h_n[-2], h_n[-1]),
    1)`` (``h_n[-1]`` when unidirectional). ``x`` is always batch-first here, whatever the module's
    ``batch_first`` (which only says how the eager module is fed)."""

    def __init__(self, module: nn.RNNBase) -> None:
        super().__init__()
        if module.mode not in ("RNN_TANH", "RNN_RELU", "LSTM", "GRU"):
            raise ExportError(f"{type(module).__name__}: unsupported recurrent mode {module.mode!r}")
        self.layers = nn.ModuleList()
        for k in range(module.num_layers):
            dirs = [_direction(module, f"_l{k}")]
            if module.bidirectional:
                dirs.append(_direction(module, f"_l{k}_reverse"))
            self.layers.append(nn.ModuleList(dirs))
        self.bidirectional = module.bidirectional

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        steps = torch.arange(x.shape[1], device=x.device).unsqueeze(0)  # (1, T)
        lens = lengths.to(steps.dtype).unsqueeze(1)  # (B, 1)
        valid = steps < lens  # (B, T)
        mask = valid.unsqueeze(2)  # broadcast over the hidden axis
        # Position t of the reversed sequence reads position length-1-t; padding stays in place.
        reverse = torch.where(valid, lens - 1 - steps, steps).unsqueeze(2)
        finals: list[torch.Tensor] = []
        for layer in self.layers:
            outputs: list[torch.Tensor] = []
            finals = []
            for i, direction in enumerate(layer):
                if i == 0:
                    y, h = direction(x, mask)
                else:
                    flipped = torch.gather(x, 1, reverse.expand(-1, -1, x.shape[2]))
                    y, h = direction(flipped, mask)
                    y = torch.gather(y, 1, reverse.expand(-1, -1, y.shape[2]))
                outputs.append(y)
                finals.append(h)
            x = torch.cat(outputs, 2)  # the next layer's input: both directions at every step
        # Past its length a step's output is not part of the sequence (pad_packed_sequence gives zeros there).
        return torch.where(mask, x, torch.zeros_like(x)), torch.cat(finals, 1)


def _direction(module: nn.RNNBase, suffix: str) -> nn.Module:
    w_ih, w_hh = getattr(module, f"weight_ih{suffix}"), getattr(module, f"weight_hh{suffix}")
    b_ih = getattr(module, f"bias_ih{suffix}") if module.bias else None
    b_hh = getattr(module, f"bias_hh{suffix}") if module.bias else None
    if module.mode == "LSTM":
        w_hr = getattr(module, f"weight_hr{suffix}") if module.proj_size > 0 else None
        unit = LSTMUnit(w_ih, w_hh, b_ih, b_hh, w_hr)
        return _LSTMDirection(unit, module.proj_size or module.hidden_size, module.hidden_size)
    if module.mode == "GRU":
        return _Direction(GRUUnit(w_ih, w_hh, b_ih, b_hh), module.hidden_size)
    return _Direction(RNNUnit(w_ih, w_hh, b_ih, b_hh, relu=module.mode == "RNN_RELU"), module.hidden_size)


class PaddedSequence(nn.Module):
    """``forward(inputs (B, T, ...), lengths (B,)) -> output``: an optional embedding, a recurrent module over
    the padded sequences, and a head on either the concatenated final hidden states (``per_step=False``,
    output ``(B, ...)``) or the per-step outputs (``per_step=True``, output ``(B, T, ...)``, zero past each
    length whatever the head gives for a zero input)."""

    def __init__(
        self, embedding: nn.Module | None, recurrent: PaddedRecurrent, head: nn.Module | None, per_step: bool
    ) -> None:
        super().__init__()
        self.embedding = embedding if embedding is not None else nn.Identity()
        self.recurrent = recurrent
        self.head = head if head is not None else nn.Identity()
        self.per_step = per_step

    def forward(self, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        outputs, finals = self.recurrent(self.embedding(inputs), lengths)
        if not self.per_step:
            return self.head(finals)
        y = self.head(outputs)
        valid = torch.arange(y.shape[1], device=y.device).unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)
        # (B, T, -1) and back: one mask shape for heads of any rank, without a loop over dims in the graph.
        flat = y.reshape(y.shape[0], y.shape[1], -1)
        return torch.where(valid.unsqueeze(2), flat, torch.zeros_like(flat)).reshape(y.shape)
