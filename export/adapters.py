"""Adapters: turn PyTorch recurrent modules and cells into :class:`Exportable` step modules.

``adapt(obj)`` recognises ``nn.RNN``/``nn.LSTM``/``nn.GRU`` (optionally with a head), ``nn.RNNCell``,
``nn.LSTMCell``, ``nn.GRUCell``, a user cell ``cell(x, h) -> h`` or ``-> (y, h)``, and an ``nn.ModuleList``
of such cells. The reference of each Exportable is the *original* module: ``nn.LSTM`` and friends run over
the whole sequence, cells called step by step, so verifying an export also proves the adapter right.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import cast

import torch
from torch import nn

from rnnserve.export.cells import (
    CellStep,
    GRUUnit,
    LayeredLSTMStep,
    LayeredStep,
    LSTMCellStep,
    LSTMUnit,
    RNNUnit,
    StackStep,
    UserCellH,
    UserCellYH,
)
from rnnserve.export.errors import ExportError
from rnnserve.export.step import Exportable, ReferenceFn, StateInfo, TensorInfo

InitialValues = Sequence[float | torch.Tensor | None]


def adapt(
    obj: nn.Module | Exportable,
    *,
    head: nn.Module | None = None,
    input_size: int | None = None,
    hidden_size: int | None = None,
    initial_state: InitialValues | None = None,
) -> Exportable:
    """Wrap ``obj`` as an :class:`Exportable` (returned unchanged if it already is one).

    ``head`` maps the last layer's output to ``y`` at every step (e.g. ``nn.Linear``). ``input_size`` and
    ``hidden_size`` are needed only for user cells whose sizes cannot be inferred. ``initial_state`` gives
    per-state initial values (``None``: zeros, a float, or a tensor of the per-session shape). The modules are
    put in eval mode: the export is for inference.
    """
    if isinstance(obj, Exportable):
        if head is not None or initial_state is not None:
            raise ExportError("adapt(): head= and initial_state= apply to modules, not to an Exportable")
        return obj
    if not isinstance(obj, nn.Module):
        raise ExportError(
            f"cannot export a {type(obj).__name__}: expected an nn.Module (RNN/LSTM/GRU, a cell, a ModuleList "
            "of cells) or an Exportable"
        )
    modules = [obj] if head is None else [obj, head]
    devices = sorted({p.device.type for m in modules for p in m.parameters()} - {"cpu"})
    if devices:
        # Export and verification run on CPU; the server moves the artifact to its own device.
        raise ExportError(f"{type(obj).__name__} has parameters on {devices}: move it to CPU first (.cpu())")
    for module in modules:
        module.eval()
    if isinstance(obj, nn.RNNBase):
        ex = _adapt_recurrent(obj, head)
    elif isinstance(obj, nn.ModuleList):
        ex = _adapt_cells(list(obj), head, input_size, hidden_size, stacked=True)
    else:
        ex = _adapt_cells([obj], head, input_size, hidden_size, stacked=False)
    if initial_state is not None:
        ex = _with_initial(ex, initial_state)
    return ex


def _with_initial(ex: Exportable, values: InitialValues) -> Exportable:
    if len(values) != len(ex.states):
        names = [s.name for s in ex.states]
        raise ExportError(f"initial_state has {len(values)} values for {len(names)} states {names}")
    states = []
    for info, value in zip(ex.states, values, strict=True):
        if isinstance(value, torch.Tensor) and value.dim() == len(info.shape) and value.shape[info.batch_axis] == 1:
            value = value.squeeze(info.batch_axis)  # accept a batch-of-one tensor in model layout too
        states.append(replace(info, initial=value))
    return replace(ex, states=tuple(states))


# --- nn.RNN / nn.LSTM / nn.GRU ------------------------------------------------------------------------------


def _adapt_recurrent(module: nn.RNNBase, head: nn.Module | None) -> Exportable:
    name = type(module).__name__
    if module.bidirectional:
        raise ExportError(
            f"{name} is bidirectional: its backward direction needs the whole sequence, so it cannot be streamed "
            "one step at a time. Export it as a whole-sequence model for Predict instead: "
            "rnnserve.export.adapt_sequence(model, embedding=..., rnn=..., head=...)."
        )
    if module.mode not in ("RNN_TANH", "RNN_RELU", "LSTM", "GRU"):
        raise ExportError(f"{name}: unsupported recurrent mode {module.mode!r}")
    layers = module.num_layers
    units: list[nn.Module] = []
    for k in range(layers):
        w_ih, w_hh = getattr(module, f"weight_ih_l{k}"), getattr(module, f"weight_hh_l{k}")
        b_ih = getattr(module, f"bias_ih_l{k}") if module.bias else None
        b_hh = getattr(module, f"bias_hh_l{k}") if module.bias else None
        if module.mode == "LSTM":
            w_hr = getattr(module, f"weight_hr_l{k}") if module.proj_size > 0 else None
            units.append(LSTMUnit(w_ih, w_hh, b_ih, b_hh, w_hr))
        elif module.mode == "GRU":
            units.append(GRUUnit(w_ih, w_hh, b_ih, b_hh))
        else:
            units.append(RNNUnit(w_ih, w_hh, b_ih, b_hh, relu=module.mode == "RNN_RELU"))
    dtype = cast(torch.Tensor, module.weight_ih_l0).dtype  # nn.Module types attributes as Tensor | Module
    out_size = module.proj_size or module.hidden_size
    states = [StateInfo("h", (layers, -1, out_size), batch_axis=1, dtype=dtype)]
    if module.mode == "LSTM":
        states.append(StateInfo("c", (layers, -1, module.hidden_size), batch_axis=1, dtype=dtype))
        step: nn.Module = LayeredLSTMStep(units, head)
    else:
        step = LayeredStep(units, head)
    kind = f"{name}({module.input_size}, {module.hidden_size}, num_layers={layers}"
    kind += (f", proj_size={module.proj_size}" if module.proj_size else "") + ")"
    kind += f" + {type(head).__name__} head" if head is not None else ""
    return Exportable(
        step,
        TensorInfo("x", (-1, module.input_size), dtype=dtype),
        states,
        reference_fn=_sequence_reference(module, head),
        kind=kind,
        model=module,
    )


def _sequence_reference(module: nn.RNNBase, head: nn.Module | None) -> ReferenceFn:
    """The original module over the whole sequence, then the head at every step."""

    def reference(xs: torch.Tensor, states: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        hx = (states[0], states[1]) if module.mode == "LSTM" else states[0]
        with warnings.catch_warnings():
            # A CPU-kernel notice ("LSTM with projections is not supported with oneDNN"), not a problem.
            warnings.filterwarnings("ignore", message=".*not supported with oneDNN.*")
            seq, final = module(xs if module.batch_first else xs.transpose(0, 1), hx)
        if not module.batch_first:
            seq = seq.transpose(0, 1)
        if head is not None:
            seq = torch.stack([head(seq[:, t]) for t in range(seq.shape[1])], 1)
        return seq, list(final) if isinstance(final, tuple) else [final]

    return reference


# --- cells, user cells and stacks of them -------------------------------------------------------------------


def _adapt_cells(
    cells: list[nn.Module],
    head: nn.Module | None,
    input_size: int | None,
    hidden_size: int | None,
    *,
    stacked: bool,
) -> Exportable:
    if not cells:
        raise ExportError("the ModuleList is empty: a stack needs at least one cell")
    units: list[nn.Module] = []
    n_states: list[int] = []
    returns_y: list[bool] = []
    states: list[StateInfo] = []
    dtype = _dtype_of(cells)
    size = input_size
    for i, cell in enumerate(cells):
        if isinstance(cell, nn.RNNBase):
            raise ExportError(
                f"layer {i} is an {type(cell).__name__}, not a cell: adapt it directly, adapt(module, head=...)"
            )
        if isinstance(cell, nn.RNNCellBase):
            in_size, hid, unit, yh = cell.input_size, cell.hidden_size, _builtin_unit(cell), False
            if size is not None and size != in_size:
                raise ExportError(f"layer {i} ({type(cell).__name__}) takes input size {in_size}, gets {size}")
        else:
            in_size, hid, yh, y_size = _probe_user_cell(cell, i, size, hidden_size, dtype)
            unit = UserCellYH(cell) if yh else UserCellH(cell)
        suffix = f"_l{i}" if stacked else ""
        states.append(StateInfo(f"h{suffix}", (-1, hid), dtype=dtype))
        if isinstance(cell, nn.LSTMCell):
            states.append(StateInfo(f"c{suffix}", (-1, hid), dtype=dtype))
        units.append(unit)
        n_states.append(2 if isinstance(cell, nn.LSTMCell) else 1)
        returns_y.append(yh)
        if i == 0:
            input_size = in_size
        size = y_size if yh else hid
    assert input_size is not None
    if stacked:
        step: nn.Module = StackStep(units, n_states, head)
    elif n_states[0] == 2:
        step = LSTMCellStep(units[0], head)  # type: ignore[arg-type]
    else:
        step = CellStep(units[0], head)
    names = ", ".join(type(c).__name__ for c in cells)
    kind = (f"stack of [{names}]" if stacked else names) + (f" + {type(head).__name__} head" if head else "")
    return Exportable(
        step,
        TensorInfo("x", (-1, input_size), dtype=dtype),
        states,
        reference_fn=_cells_reference(cells, returns_y, head),
        kind=kind,
        model=nn.ModuleList(cells) if stacked else cells[0],
    )


def _builtin_unit(cell: nn.RNNCellBase) -> nn.Module:
    b_ih = cell.bias_ih if cell.bias else None
    b_hh = cell.bias_hh if cell.bias else None
    if isinstance(cell, nn.LSTMCell):
        return LSTMUnit(cell.weight_ih, cell.weight_hh, b_ih, b_hh, None)
    if isinstance(cell, nn.GRUCell):
        return GRUUnit(cell.weight_ih, cell.weight_hh, b_ih, b_hh)
    return RNNUnit(cell.weight_ih, cell.weight_hh, b_ih, b_hh, relu=cell.nonlinearity == "relu")


def _cells_reference(cells: list[nn.Module], returns_y: list[bool], head: nn.Module | None) -> ReferenceFn:
    """The original cells called step by step in eager mode, each layer's output feeding the next."""

    def reference(xs: torch.Tensor, states: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        outputs = []
        for t in range(xs.shape[1]):
            x, at, new = xs[:, t], 0, []
            for cell, yh in zip(cells, returns_y, strict=True):
                if isinstance(cell, nn.LSTMCell):
                    x, c = cell(x, (states[at], states[at + 1]))
                    new += [x, c]
                    at += 2
                    continue
                out = cell(x, states[at])
                x, h = out if yh else (out, out)
                new.append(h)
                at += 1
            states = new
            outputs.append(head(x) if head is not None else x)
        return torch.stack(outputs, 1), states

    return reference


def _dtype_of(modules: list[nn.Module]) -> torch.dtype:
    for module in modules:
        for p in module.parameters():
            if p.is_floating_point():
                return p.dtype
    return torch.float32


def _probe_user_cell(
    cell: nn.Module, layer: int, input_size: int | None, hidden_size: int | None, dtype: torch.dtype
) -> tuple[int, int, bool, int]:
    """Find the (input size, hidden size) at which ``cell(x, h)`` works, and whether it returns ``(y, h)``.

    Sizes come from arguments, then ``input_size``/``hidden_size`` attributes, then the feature sizes of the
    cell's ``nn.Linear``-like submodules; each candidate pair is tried with a batch of 2 and must give back a
    hidden state of the same shape. Returns (input size, hidden size, returns (y, h), size of y).
    """
    name = type(cell).__name__
    features = [
        n
        for m in cell.modules()
        for n in (getattr(m, "in_features", None), getattr(m, "out_features", None))
        if isinstance(n, int) and n > 0
    ]
    ins = _candidates(input_size, getattr(cell, "input_size", None), features)
    hids = _candidates(hidden_size, getattr(cell, "hidden_size", None), features)
    found: list[tuple[int, int, bool, int]] = []
    last_error: Exception | None = None
    for i in ins:
        for h in hids:
            try:
                with torch.no_grad():
                    out = cell(torch.randn(2, i, dtype=dtype), torch.randn(2, h, dtype=dtype))
            except Exception as exc:  # a wrong guess: the cell's own layers reject the size
                last_error = exc
                continue
            yh = isinstance(out, tuple)
            y, new_h = out if yh and len(out) == 2 else (out, out)
            if (
                isinstance(y, torch.Tensor)
                and isinstance(new_h, torch.Tensor)
                and tuple(new_h.shape) == (2, h)
                and y.dim() == 2
                and y.shape[0] == 2
            ):
                found.append((i, h, yh, y.shape[1]))
    where = f"layer {layer} ({name})" if layer else name
    if not found:
        detail = f" (last error: {last_error})" if last_error else ""
        raise ExportError(
            f"cannot infer the input/hidden size of {where}, tried input sizes {ins} and hidden sizes {hids}"
            f"{detail}. A cell is called cell(x, h) -> h or (y, h) with x (batch, input) and h (batch, hidden); "
            "pass input_size=/hidden_size= (CLI: --input-size/--hidden-size). For a whole model, adapt its "
            "recurrent part instead, e.g. adapt(model.rnn, head=model.fc)."
        )
    if len({(i, h) for i, h, _, _ in found}) > 1:
        pairs = sorted({(i, h) for i, h, _, _ in found})
        raise ExportError(
            f"cannot infer the sizes of {where}: (input, hidden) pairs {pairs} all work; "
            "pass input_size= and hidden_size= (CLI: --input-size/--hidden-size)"
        )
    return found[0]


def _candidates(given: int | None, attribute: object, features: list[int]) -> list[int]:
    if given is not None:
        return [given]
    if isinstance(attribute, int) and attribute > 0:
        return [attribute]
    return sorted(set(features))
