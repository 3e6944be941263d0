"""One timestep of PyTorch's recurrent layers, written with plain ops, and the step modules built from them.

Why not call ``nn.LSTM`` on a length-1 sequence? Its ONNX export is broken for us: the legacy exporter
refuses ``proj_size`` and the dynamo exporter's graph cannot be loaded by onnxruntime with a dynamic batch.
``F.linear``/sigmoid/tanh/relu/chunk export cleanly to ONNX and TorchScript alike. Every unit holds the
original module's ``Parameter`` objects (shared, not copied) and follows PyTorch's documented equations and
gate order exactly; the verification step checks each export against the original module anyway.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RNNUnit(nn.Module):
    """Elman step ``h' = act(W_ih x + b_ih + W_hh h + b_hh)``; returns ``(y, h')`` with ``y = h'``."""

    def __init__(
        self,
        w_ih: torch.Tensor,
        w_hh: torch.Tensor,
        b_ih: torch.Tensor | None,
        b_hh: torch.Tensor | None,
        relu: bool,
    ) -> None:
        super().__init__()
        self.w_ih, self.w_hh, self.b_ih, self.b_hh = w_ih, w_hh, b_ih, b_hh
        self.relu = relu

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = F.linear(x, self.w_ih, self.b_ih) + F.linear(h, self.w_hh, self.b_hh)
        h = torch.relu(a) if self.relu else torch.tanh(a)
        return h, h


class GRUUnit(nn.Module):
    """GRU step, gates r, z, n as in ``nn.GRU``: ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``."""

    def __init__(
        self, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor | None, b_hh: torch.Tensor | None
    ) -> None:
        super().__init__()
        self.w_ih, self.w_hh, self.b_ih, self.b_hh = w_ih, w_hh, b_ih, b_hh

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        i_r, i_z, i_n = F.linear(x, self.w_ih, self.b_ih).chunk(3, dim=-1)
        h_r, h_z, h_n = F.linear(h, self.w_hh, self.b_hh).chunk(3, dim=-1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        h = (1.0 - z) * n + z * h
        return h, h


class LSTMUnit(nn.Module):
    """LSTM step, gates i, f, g, o as in ``nn.LSTM``; with ``proj_size``, ``h' = (o * tanh(c')) @ W_hr^T``."""

    def __init__(
        self,
        w_ih: torch.Tensor,
        w_hh: torch.Tensor,
        b_ih: torch.Tensor | None,
        b_hh: torch.Tensor | None,
        w_hr: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.w_ih, self.w_hh, self.b_ih, self.b_hh, self.w_hr = w_ih, w_hh, b_ih, b_hh, w_hr

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gates = F.linear(x, self.w_ih, self.b_ih) + F.linear(h, self.w_hh, self.b_hh)
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        # TorchScript sees a None attribute as NoneType and drops this branch at compile time.
        if self.w_hr is not None:
            h = F.linear(h, self.w_hr)
        return h, c


class _UserCell(nn.Module):
    # Two classes, not one with a flag: TorchScript type-checks both branches of an `if`, and only one of
    # them matches what the user's cell returns.
    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        self.cell = cell


class UserCellH(_UserCell):
    """A user cell ``cell(x, h) -> h`` as a unit returning ``(y, h')`` with ``y = h'``."""

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.cell(x, h)
        return h, h


class UserCellYH(_UserCell):
    """A user cell ``cell(x, h) -> (y, h)`` as a unit."""

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, h = self.cell(x, h)
        return y, h


class UserCellTuple(nn.Module):
    """A user cell with a tuple state, ``cell(x, (s1, ...)) -> (y, (s1', ...))`` or ``-> (s1', ...)`` (then
    ``y = s1'``, as ``nn.LSTMCell``), as a unit ``(x, *states) -> (y, *new_states)``. Its ``*states`` is not
    scriptable, so TorchScript export traces it, like :class:`StackStep`."""

    def __init__(self, cell: nn.Module, returns_y: bool) -> None:
        super().__init__()
        self.cell = cell
        self.returns_y = returns_y

    def forward(self, x: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.cell(x, tuple(states))
        y, new = out if self.returns_y else (out[0], out)
        return (y, *new)


class LayeredStep(nn.Module):
    """``nn.RNN``/``nn.GRU`` step: ``h`` is ``(num_layers, B, hidden)``; ``y = head(h'[-1])``."""

    def __init__(self, units: list[nn.Module], head: nn.Module | None) -> None:
        super().__init__()
        self.units = nn.ModuleList(units)
        self.head = head if head is not None else nn.Identity()

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        new_h: list[torch.Tensor] = []
        for i, unit in enumerate(self.units):
            x, h_i = unit(x, h[i])
            new_h.append(h_i)
        return self.head(x), torch.stack(new_h, 0)


class LayeredLSTMStep(nn.Module):
    """``nn.LSTM`` step: ``h`` is ``(num_layers, B, proj_size or hidden)``, ``c`` is ``(num_layers, B, hidden)``."""

    def __init__(self, units: list[nn.Module], head: nn.Module | None) -> None:
        super().__init__()
        self.units = nn.ModuleList(units)
        self.head = head if head is not None else nn.Identity()

    def forward(
        self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        new_h: list[torch.Tensor] = []
        new_c: list[torch.Tensor] = []
        for i, unit in enumerate(self.units):
            x, c_i = unit(x, h[i], c[i])
            new_h.append(x)
            new_c.append(c_i)
        return self.head(x), torch.stack(new_h, 0), torch.stack(new_c, 0)


class CellStep(nn.Module):
    """One single-state cell (``(B, hidden)`` state) followed by an optional head."""

    def __init__(self, unit: nn.Module, head: nn.Module | None) -> None:
        super().__init__()
        self.unit = unit
        self.head = head if head is not None else nn.Identity()

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, h = self.unit(x, h)
        return self.head(y), h


class LSTMCellStep(nn.Module):
    """One ``nn.LSTMCell`` (states ``h``, ``c`` of ``(B, hidden)``) followed by an optional head."""

    def __init__(self, unit: LSTMUnit, head: nn.Module | None) -> None:
        super().__init__()
        self.unit = unit
        self.head = head if head is not None else nn.Identity()

    def forward(
        self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h, c = self.unit(x, h, c)
        return self.head(h), h, c


class StackStep(nn.Module):
    """A stack of cells, each layer's output feeding the next, then an optional head.

    ``n_states[i]`` is how many state tensors unit ``i`` takes (2 for an LSTM cell, else 1; any number for
    a :class:`UserCellTuple`). A unit returns ``(y, *new_states)``, or just its new states with ``y`` the
    first (:class:`LSTMUnit`'s ``(h, c)``). The variadic ``*states`` cannot be scripted, so TorchScript export
    traces this (the loop over layers is static anyway).
    """

    def __init__(self, units: list[nn.Module], n_states: list[int], head: nn.Module | None) -> None:
        super().__init__()
        self.units = nn.ModuleList(units)
        self.n_states = list(n_states)
        self.head = head if head is not None else nn.Identity()

    def forward(self, x: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        new_states: list[torch.Tensor] = []
        at = 0
        for unit, n in zip(self.units, self.n_states, strict=True):
            out = unit(x, *states[at : at + n])
            x = out[0]
            new_states += list(out[1:] if len(out) == n + 1 else out)
            at += n
        return (self.head(x), *new_states)
