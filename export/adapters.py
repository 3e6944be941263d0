"""Adapters: turn PyTorch recurrent modules and cells into :class:`Exportable` step modules.

``adapt(obj)`` recognises ``nn.RNN``/``nn.LSTM``/``nn.GRU`` (optionally with a head), ``nn.RNNCell``,
``nn.LSTMCell``, ``nn.GRUCell``, a user cell ``cell(x, h) -> h`` or ``-> (y, h)``, a user cell with a tuple
state ``cell(x, (h, c)) -> (y, (h, c))`` or ``-> (h, c)`` (like ``nn.LSTMCell``), and an ``nn.ModuleList``
of such cells. The reference of each Exportable is the *original* module: ``nn.LSTM`` and friends run over
the whole sequence, cells called step by step, so verifying an export also proves the adapter right.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
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
    UserCellTuple,
    UserCellYH,
)
from rnnserve.export.errors import ExportError, ExportUsageError, SizeInferenceError
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
        refuse_sizes(input_size, hidden_size, f"{obj.kind} is already adapted: its step module fixes its sizes")
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
        refuse_sizes(input_size, hidden_size, f"{type(obj).__name__} declares its own sizes")
        ex = _adapt_recurrent(obj, head)
    elif isinstance(obj, nn.ModuleList):
        ex = _adapt_cells(list(obj), head, input_size, hidden_size, stacked=True)
    else:
        ex = _adapt_cells([obj], head, input_size, hidden_size, stacked=False)
    if initial_state is not None:
        ex = _with_initial(ex, initial_state)
    return ex


def refuse_sizes(input_size: int | None, hidden_size: int | None, why: str) -> None:
    """Sizes are for user cells whose sizes cannot be inferred; anywhere else they would be silently ignored."""
    for argument, value in (("input_size", input_size), ("hidden_size", hidden_size)):
        if value is not None:
            raise ExportUsageError(argument, f"{why}; it is for user cells whose sizes cannot be inferred")


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
            f"rnnserve.export.adapt_sequence(module) (float features, per-step outputs), or "
            "adapt_sequence(model, rnn=model.rnn, embedding=..., head=...) for a whole model."
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


@dataclass(frozen=True)
class _Call:
    """How a cell is called: ``states`` state tensors, passed as one tuple or (one state) as a tensor; and
    whether it returns ``y`` before its new state(s) or just the new state(s) (then ``y`` is the first)."""

    states: int
    tuple_state: bool
    returns_y: bool
    input_size: int
    state_sizes: tuple[int, ...]
    y_size: int

    def __call__(self, cell: nn.Module, x: torch.Tensor, states: list[torch.Tensor]) -> list[torch.Tensor]:
        """``[y, *new_states]`` of one eager call."""
        out = cell(x, tuple(states) if self.tuple_state else states[0])
        y, new = out if self.returns_y else (None, out)
        new = list(new) if self.tuple_state else [new]
        return [new[0] if y is None else y, *new]


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
    if all(isinstance(c, nn.RNNCellBase) for c in cells):
        refuse_sizes(input_size, hidden_size, f"{type(cells[0]).__name__} declares its own sizes")
    if input_size is not None and isinstance(cells[0], nn.RNNCellBase):
        refuse_sizes(input_size, None, f"layer 0 ({type(cells[0]).__name__}) declares its own input size")
    units: list[nn.Module] = []
    calls: list[_Call] = []
    states: list[StateInfo] = []
    dtype = _dtype_of(cells)
    size = input_size
    for i, cell in enumerate(cells):
        if isinstance(cell, nn.RNNBase):
            raise ExportError(
                f"layer {i} is an {type(cell).__name__}, not a cell: adapt it directly, adapt(module, head=...)"
            )
        if isinstance(cell, nn.RNNCellBase):
            lstm = isinstance(cell, nn.LSTMCell)
            hid = cell.hidden_size
            call = _Call(2 if lstm else 1, lstm, False, cell.input_size, (hid,) * (2 if lstm else 1), hid)
            unit = _builtin_unit(cell)
            if size is not None and size != call.input_size:
                raise ExportError(f"layer {i} ({type(cell).__name__}) takes input size {call.input_size}, gets {size}")
        else:
            call = _probe_user_cell(cell, i, size, hidden_size, dtype, given=(input_size, hidden_size))
            if call.tuple_state:
                unit = UserCellTuple(cell, call.returns_y)
            else:
                unit = UserCellYH(cell) if call.returns_y else UserCellH(cell)
        suffix = f"_l{i}" if stacked else ""
        # One state is h, a pair is named like nn.LSTMCell's (h, c), longer tuples by position.
        state_names = {1: ("h",), 2: ("h", "c")}.get(call.states, tuple(f"s{j}" for j in range(call.states)))
        states += [
            StateInfo(f"{n}{suffix}", (-1, d), dtype=dtype) for n, d in zip(state_names, call.state_sizes, strict=True)
        ]
        units.append(unit)
        calls.append(call)
        if i == 0:
            input_size = call.input_size
        size = call.y_size
    assert input_size is not None
    if stacked or isinstance(units[0], UserCellTuple):
        step: nn.Module = StackStep(units, [c.states for c in calls], head)
    elif calls[0].states == 2:
        step = LSTMCellStep(units[0], head)  # type: ignore[arg-type]
    else:
        step = CellStep(units[0], head)
    names = ", ".join(type(c).__name__ for c in cells)
    kind = (f"stack of [{names}]" if stacked else names) + (f" + {type(head).__name__} head" if head else "")
    return Exportable(
        step,
        TensorInfo("x", (-1, input_size), dtype=dtype),
        states,
        reference_fn=_cells_reference(cells, calls, head),
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


def _cells_reference(cells: list[nn.Module], calls: list[_Call], head: nn.Module | None) -> ReferenceFn:
    """The original cells called step by step in eager mode, each layer's output feeding the next."""

    def reference(xs: torch.Tensor, states: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        outputs = []
        for t in range(xs.shape[1]):
            x, at, new = xs[:, t], 0, []
            for cell, call in zip(cells, calls, strict=True):
                x, *own = call(cell, x, states[at : at + call.states])
                new += own
                at += call.states
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


# Not 2 to 4: a cell that unpacks a tuple state (h, c = state) would split a plain tensor state of that batch
# along its batch axis, and might seem to work.
_PROBE_BATCH = 5
_TUPLE_STATES = (2, 3, 4)  # tuple lengths tried once a plain tensor state fails


def _probe_user_cell(
    cell: nn.Module,
    layer: int,
    input_size: int | None,
    hidden_size: int | None,
    dtype: torch.dtype,
    given: tuple[int | None, int | None] = (None, None),
) -> _Call:
    """Find how ``cell`` is called and at which (input size, hidden size) it works.

    Sizes come from arguments, then ``input_size``/``hidden_size`` attributes, then the feature sizes of the
    cell's ``nn.Linear``-like submodules. Each candidate pair is tried at batch 5 with a tensor state, then
    with tuple states of 2 to 4 tensors of that hidden size (all the same size); the cell must give back
    state(s) of the shapes it got. ``given`` are the sizes the caller passed (for the error message).
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
    where = f"layer {layer} ({name})" if layer else name
    errors: dict[str, Exception] = {}  # the last error with a tensor state, and with a pair
    for n_states in (1, *_TUPLE_STATES):
        found: list[_Call] = []
        last_error: Exception | None = None
        for i in ins:
            for h in hids:
                try:
                    call = _try_call(cell, i, h, n_states, dtype)
                except Exception as exc:  # a wrong guess: the cell's own layers reject the size
                    last_error = exc
                    continue
                if call is not None:
                    found.append(call)
        if len({(c.input_size, c.state_sizes) for c in found}) > 1:
            pairs = sorted({(c.input_size, c.state_sizes[0]) for c in found})
            raise SizeInferenceError(
                f"cannot infer the sizes of {where}: (input, hidden) pairs {pairs} all work; "
                "pass input_size= and hidden_size=",
                sizes_help=True,
            )
        if found:
            return found[0]
        if last_error is not None and n_states <= 2:
            errors["a tensor state" if n_states == 1 else "a tuple state (h, c)"] = last_error
    detail = "; ".join(f"with {k}: {e}" for k, e in errors.items())
    detail = f" (last error {detail})" if detail else ""
    conventions = (
        "A cell is called cell(x, h) -> h or (y, h), or with a tuple state cell(x, (h, c)) -> (y, (h, c)) or "
        "(h, c), with x (batch, input) and each state (batch, hidden)"
    )
    if not ins or not hids:
        advice = "nothing to infer them from (no input_size/hidden_size attributes, no Linear layers): pass "
        advice += "input_size= and hidden_size="
    elif given[0] is not None and given[1] is not None:
        advice = f"the sizes given (input {given[0]}, hidden {given[1]}) did not work either: fix the cell"
    else:
        advice = "if the cell does follow it, pass the sizes it takes, input_size= and hidden_size="
    raise SizeInferenceError(
        f"cannot infer the input/hidden size of {where}, tried input sizes {ins} and hidden sizes {hids}"
        f"{detail}. {conventions}; {advice}. For a whole model, adapt its recurrent part instead, e.g. "
        "adapt(model.rnn, head=model.fc).",
        sizes_help=not (given[0] is not None and given[1] is not None),
    )


def _try_call(cell: nn.Module, input_size: int, hidden: int, n_states: int, dtype: torch.dtype) -> _Call | None:
    """The call convention if ``cell`` works with a tensor state (``n_states`` 1) or a tuple of ``n_states``."""
    b = _PROBE_BATCH
    x = torch.randn(b, input_size, dtype=dtype)
    given = [torch.randn(b, hidden, dtype=dtype) for _ in range(n_states)]
    tuple_state = n_states > 1
    with torch.no_grad():
        out = cell(x, tuple(given) if tuple_state else given[0])
    if tuple_state:
        # (y, (s1, ...)) or (s1, ...) like nn.LSTMCell
        returns_y = isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], tuple | list)
        y, new = out if returns_y else (None, out)
        if not isinstance(new, tuple | list) or len(new) != n_states:
            return None
    else:
        returns_y = isinstance(out, tuple)
        y, new_h = out if returns_y and len(out) == 2 else (None, out)
        new = [new_h]
    if not all(isinstance(s, torch.Tensor) and s.shape == g.shape for s, g in zip(new, given, strict=True)):
        return None
    y = new[0] if y is None else y
    if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[0] != b:
        return None
    return _Call(n_states, tuple_state, returns_y, input_size, (hidden,) * n_states, y.shape[1])


def _candidates(given: int | None, attribute: object, features: list[int]) -> list[int]:
    if given is not None:
        return [given]
    if isinstance(attribute, int) and attribute > 0:
        return [attribute]
    return sorted(set(features))
