"""Every adapter kind, exported for real to both formats, loaded back with onnxruntime / torch.jit.load and
streamed 50 steps: the stream must equal the ORIGINAL module (whole sequence, or cells called step by step)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
import torch
from export_support import TupleLSTMCell, max_error, run_artifact, tuple_cell_by_hand
from torch import nn

from rnnserve.export import ExportError, adapt, adapt_sequence, export
from rnnserve.export.errors import ExportUsageError
from rnnserve.manifest import ModelManifest

FORMATS = ["onnx", "torchscript"]
STEPS, BATCH, TOL = 50, 3, 1e-5
IN = 4


def _rnn(kind: str, **kw: object) -> nn.RNNBase:
    torch.manual_seed(1)
    cls = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[kind]
    return cls(IN, 6, **kw)


# (module factory, head factory or None)
RECURRENT: dict[str, tuple[Callable[[], nn.RNNBase], Callable[[int], nn.Module] | None]] = {
    "rnn_tanh_l1_batch_first_head": (lambda: _rnn("rnn", batch_first=True), lambda n: nn.Linear(n, 3)),
    "rnn_relu_l3_seq_first": (lambda: _rnn("rnn", num_layers=3, nonlinearity="relu"), None),
    "rnn_tanh_l3_nobias": (lambda: _rnn("rnn", num_layers=3, bias=False, batch_first=True), None),
    "lstm_l1_batch_first_head": (lambda: _rnn("lstm", batch_first=True), lambda n: nn.Linear(n, 3)),
    "lstm_proj_l3_seq_first": (lambda: _rnn("lstm", num_layers=3, proj_size=3), None),
    "lstm_proj_nobias_head": (
        lambda: _rnn("lstm", bias=False, proj_size=2, batch_first=True),
        lambda n: nn.Sequential(nn.Linear(n, 5), nn.Tanh()),
    ),
    "lstm_l3_nobias_seq_first": (lambda: _rnn("lstm", num_layers=3, bias=False), lambda n: nn.Linear(n, 2)),
    "gru_l1_seq_first_head": (lambda: _rnn("gru"), lambda n: nn.Linear(n, 3)),
    "gru_l3_nobias_batch_first": (lambda: _rnn("gru", num_layers=3, bias=False, batch_first=True), None),
}


def _original_sequence(
    module: nn.RNNBase, head: nn.Module | None, xs: torch.Tensor, states: list[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The module over the whole sequence, batch_first honoured, head applied at every step."""
    hx = tuple(states) if isinstance(module, nn.LSTM) else states[0]
    with torch.no_grad():
        out, final = module(xs if module.batch_first else xs.transpose(0, 1), hx)
        out = out if module.batch_first else out.transpose(0, 1)
        out = head(out) if head is not None else out
    return out, list(final) if isinstance(final, tuple) else [final]


def _random_states(manifest: ModelManifest, batch: int) -> list[torch.Tensor]:
    # A non-zero start proves the state layout (batch axis 1, layer order) is what the module expects.
    return [0.5 * torch.randn([batch if d == -1 else d for d in s.shape]) for s in manifest.states]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", list(RECURRENT))
def test_recurrent_modules_stream_like_the_original(case: str, fmt: str, tmp_path: Path) -> None:
    make_module, make_head = RECURRENT[case]
    module = make_module()
    out_size = module.proj_size or module.hidden_size
    head = make_head(out_size) if make_head else None
    folder = export(adapt(module, head=head), name=case, repository=tmp_path, format=fmt, progress=False)
    assert folder == tmp_path / case / "1"

    manifest = ModelManifest.read(folder)
    assert manifest.format == fmt and manifest.verification is not None
    assert manifest.verification.max_abs_error <= TOL and manifest.verification.steps == 50
    assert [s.name for s in manifest.states] == (["h", "c"] if isinstance(module, nn.LSTM) else ["h"])
    h = manifest.states[0]
    assert h.shape == [module.num_layers, -1, out_size] and h.batch_axis == 1
    assert manifest.inputs[0].shape == [-1, IN] and manifest.inputs[0].batch_axis == 0

    torch.manual_seed(2)
    xs = torch.randn(BATCH, STEPS, IN)  # batch 3: not one of the verification batch sizes
    states = _random_states(manifest, BATCH)
    want, want_final = _original_sequence(module, head, xs, states)
    got, got_final = run_artifact(folder, xs, states)
    assert max_error(want, got) <= TOL
    for w, g in zip(want_final, got_final, strict=True):
        assert max_error(w, g) <= TOL


def test_onnx_batch_axis_is_dynamic_on_every_input_and_output(tmp_path: Path) -> None:
    folder = export(_rnn("lstm", num_layers=2, proj_size=3), name="lstm", repository=tmp_path, progress=False)
    graph = onnx.load(str(folder / "model.onnx")).graph
    manifest = ModelManifest.read(folder)
    axes = {t.name: t.batch_axis for t in manifest.inputs + manifest.outputs}
    axes |= {s.name: s.batch_axis for s in manifest.states} | {s.output: s.batch_axis for s in manifest.states}
    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        assert dims[axes[value.name]].dim_param, f"{value.name}: batch axis {axes[value.name]} is not dynamic"
    for value in graph.input:  # inputs keep their fixed sizes (an output may lose one to shape inference)
        dims = value.type.tensor_type.shape.dim
        assert all(d.dim_value > 0 for i, d in enumerate(dims) if i != axes[value.name])


# --- cells -------------------------------------------------------------------------------------------------


class PlainCell(nn.Module):
    """A user cell returning h only, with a Python branch and no size attributes."""

    def __init__(self, n_in: int, n_hidden: int) -> None:
        super().__init__()
        self.ih = nn.Linear(n_in, n_hidden)
        self.hh = nn.Linear(n_hidden, n_hidden, bias=False)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.ih(x) + self.hh(h))


class OutputCell(nn.Module):
    """A user cell returning (y, h) with y of another size than h."""

    def __init__(self, n_in: int, n_hidden: int, n_out: int) -> None:
        super().__init__()
        self.U, self.W, self.V = nn.Linear(n_in, n_hidden), nn.Linear(n_hidden, n_hidden), nn.Linear(n_hidden, n_out)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.U(x) + self.W(h))
        return self.V(h), h


def _cell_cases() -> dict[str, tuple[Callable[[], nn.Module], Callable[[], nn.Module] | None]]:
    return {
        "rnncell_tanh": (lambda: nn.RNNCell(IN, 5), None),
        "rnncell_relu_nobias_head": (
            lambda: nn.RNNCell(IN, 5, bias=False, nonlinearity="relu"),
            lambda: nn.Linear(5, 2),
        ),
        "lstmcell_head": (lambda: nn.LSTMCell(IN, 5), lambda: nn.Linear(5, 2)),
        "grucell": (lambda: nn.GRUCell(IN, 5), None),
        "user_cell_h": (lambda: PlainCell(IN, 7), None),
        "user_cell_yh_head": (lambda: OutputCell(IN, 7, 3), lambda: nn.Linear(3, 2)),
        "stack_mixed_head": (
            lambda: nn.ModuleList([nn.RNNCell(IN, 5), OutputCell(5, 6, 4), nn.LSTMCell(4, 3), nn.GRUCell(3, 5)]),
            lambda: nn.Linear(5, 2),
        ),
        "stack_user_cells": (lambda: nn.ModuleList([PlainCell(IN, 6), PlainCell(6, 6)]), None),
    }


def _cells_by_hand(cells: list[nn.Module], head: nn.Module | None, xs: torch.Tensor, states: list[torch.Tensor]):
    """The original cells called step by step."""
    outs = []
    with torch.no_grad():
        for t in range(xs.shape[1]):
            x, new = xs[:, t], []
            for cell in cells:
                if isinstance(cell, nn.LSTMCell):
                    x, c = cell(x, (states[len(new)], states[len(new) + 1]))
                    new += [x, c]
                elif isinstance(cell, OutputCell):
                    x, h = cell(x, states[len(new)])
                    new.append(h)
                else:
                    x = cell(x, states[len(new)])
                    new.append(x)
            states = new
            outs.append(head(x) if head is not None else x)
    return torch.stack(outs, 1), states


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", list(_cell_cases()))
def test_cells_stream_like_the_original_cells(case: str, fmt: str, tmp_path: Path) -> None:
    make_cell, make_head = _cell_cases()[case]
    torch.manual_seed(3)
    obj, head = make_cell(), make_head() if make_head else None
    folder = export(adapt(obj, head=head), name=case, repository=tmp_path, format=fmt, progress=False)
    manifest = ModelManifest.read(folder)
    assert all(s.batch_axis == 0 and len(s.shape) == 2 for s in manifest.states)
    if fmt == "torchscript" and not isinstance(obj, nn.ModuleList):
        assert "scripted" in manifest.description  # single cells script; stacks (*states) are traced

    torch.manual_seed(4)
    xs = torch.randn(BATCH, STEPS, IN)
    states = [0.5 * torch.randn(BATCH, s.shape[1]) for s in manifest.states]
    cells = list(obj) if isinstance(obj, nn.ModuleList) else [obj]
    want, want_final = _cells_by_hand(cells, head, xs, states)
    got, got_final = run_artifact(folder, xs, states)
    assert max_error(want, got) <= TOL
    for w, g in zip(want_final, got_final, strict=True):
        assert max_error(w, g) <= TOL


def test_lstm_cell_state_names_and_stack_state_names() -> None:
    assert [s.name for s in adapt(nn.LSTMCell(3, 4)).states] == ["h", "c"]
    stack = adapt(nn.ModuleList([nn.LSTMCell(3, 4), nn.GRUCell(4, 4)]))
    assert [(s.name, s.output) for s in stack.states] == [
        ("h_l0", "h_l0_out"),
        ("c_l0", "c_l0_out"),
        ("h_l1", "h_l1_out"),
    ]


# --- the check notebook 001 attempts, with its bugs fixed --------------------------------------------------


def test_manual_rnn_forward_equals_nn_rnn(tmp_path: Path) -> None:
    torch.manual_seed(1)
    rnn = nn.RNN(input_size=5, hidden_size=2, num_layers=1, batch_first=True)
    w_xh, w_hh = rnn.weight_ih_l0, rnn.weight_hh_l0  # the notebook wrote `weight.hh_l0`
    b_xh, b_hh = rnn.bias_ih_l0, rnn.bias_hh_l0
    x_seq = torch.tensor([[1.0] * 5, [2.0] * 5, [3.0] * 5])
    with torch.no_grad():
        output, hn = rnn(x_seq.reshape(1, 3, 5))
        out_man = []
        for t in range(3):
            xt = x_seq[t].reshape(1, 5)
            ht = xt @ w_xh.T + b_xh  # the notebook added b_hh here and forgot b_xh
            prev_h = out_man[t - 1] if t > 0 else torch.zeros_like(ht)
            ot = torch.tanh(ht + prev_h @ w_hh.T + b_hh)  # the notebook assigned torch.tanh itself
            out_man.append(ot)
    manual = torch.stack(out_man, 1)
    assert max_error(manual, output) <= 1e-6
    assert max_error(manual[:, -1], hn[0]) <= 1e-6

    # ...and the exported stream computes the same thing.
    folder = export(rnn, name="rnn", repository=tmp_path, progress=False)
    got, _ = run_artifact(folder, x_seq.reshape(1, 3, 5))
    assert max_error(manual, got) <= 1e-6


# --- refusals -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [nn.RNN, nn.LSTM, nn.GRU])
def test_bidirectional_is_refused_with_a_clear_error(cls: type[nn.RNNBase], tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"bidirectional.*cannot be streamed"):
        export(cls(3, 4, bidirectional=True), name="bi", repository=tmp_path, progress=False)
    assert not (tmp_path / "bi").exists()


def test_parameters_off_the_cpu_are_refused() -> None:
    with pytest.raises(ExportError, match=r"parameters on \['meta'\]: move it to CPU first"):
        adapt(nn.GRU(3, 4, device="meta"))


def test_whole_model_is_not_mistaken_for_a_cell() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.fc = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.rnn(x)[0])

    with pytest.raises(ExportError, match=r"adapt\(model.rnn, head=model.fc\)"):
        adapt(Model())


def test_user_cell_sizes_inferred_or_asked_for() -> None:
    ex = adapt(OutputCell(2, 8, 3))  # sizes found by probing its Linear layers
    assert ex.input.shape == (-1, 2) and ex.states[0].shape == (-1, 8) and ex.output.shape == (-1, 3)

    class RawCell(nn.Module):  # no Linear layers, no size attributes: nothing to infer from
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 5))

        def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
            return torch.tanh(x @ self.w.T + h)

    with pytest.raises(ExportError, match=r"cannot infer the input/hidden size of RawCell.*pass input_size="):
        adapt(RawCell())
    ex = adapt(RawCell(), input_size=5, hidden_size=6)
    assert ex.input.shape == (-1, 5) and ex.states[0].shape == (-1, 6)


def test_dynamo_exporter_fallback_writes_a_working_artifact(tmp_path: Path) -> None:
    """The legacy exporter is preferred; the dynamo one (used if it fails) must give an equivalent artifact."""
    from rnnserve.export.onnx import load_onnx, write_onnx
    from rnnserve.export.verify import verify

    torch.manual_seed(5)
    stack = nn.ModuleList([nn.RNNCell(IN, 5), nn.LSTMCell(5, 3)])  # *states: the trickiest signature
    ex = adapt(stack, head=nn.Linear(3, 2))
    note = write_onnx(ex, tmp_path / "model.onnx", exporters=("dynamo",))
    assert "dynamo" in note
    error = verify(
        ex,
        load_onnx(tmp_path / "model.onnx", ex),
        steps=20,
        batch_sizes=(1, 3),
        tolerance=TOL,
        label="dynamo",
        progress=lambda line: None,
    )
    assert error <= TOL


# --- user cells with a tuple state ------------------------------------------------------------------------


class PairCell(nn.Module):
    """``cell(x, (h, c)) -> (h, c)`` like nn.LSTMCell (y is h); sizes only from its attributes."""

    def __init__(self, n_in: int, n_hidden: int) -> None:
        super().__init__()
        self.input_size, self.hidden_size = n_in, n_hidden
        self.w = nn.Parameter(0.3 * torch.randn(n_hidden, n_in + n_hidden))

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = state
        c = 0.5 * c + torch.tanh(torch.cat((x, h), 1) @ self.w.T)
        return torch.tanh(c), c


class TripleCell(nn.Module):
    """Three states: ``cell(x, (a, b, c)) -> (y, (a, b, c))``."""

    def __init__(self, n_in: int, n_hidden: int) -> None:
        super().__init__()
        self.ih, self.hh = nn.Linear(n_in, n_hidden), nn.Linear(n_hidden, n_hidden)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
        a, b, c = state
        a = torch.tanh(self.ih(x) + self.hh(b)) + 0.1 * a
        return a + c, (a, b * 0.5 + a, c * 0.9)


TUPLE_CELLS: dict[str, tuple[Callable[[], nn.Module], list[str]]] = {
    "lstm_like_y_and_state": (lambda: TupleLSTMCell(IN, 6, 3), ["h", "c"]),
    "lstm_cell_like_state_only": (lambda: PairCell(IN, 5), ["h", "c"]),
    "three_states": (lambda: TripleCell(IN, 5), ["s0", "s1", "s2"]),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", list(TUPLE_CELLS))
def test_tuple_state_cells_stream_like_the_cell_looped(case: str, fmt: str, tmp_path: Path) -> None:
    make_cell, names = TUPLE_CELLS[case]
    torch.manual_seed(6)
    cell = make_cell()
    ex = adapt(cell)  # no sizes given: state count, names and shapes come from probing the tuple
    assert [s.name for s in ex.states] == names and all(s.shape[0] == -1 for s in ex.states)
    folder = export(ex, name=case, repository=tmp_path, format=fmt, progress=False)
    manifest = ModelManifest.read(folder)
    assert [s.name for s in manifest.states] == names and manifest.inputs[0].shape == [-1, IN]

    xs = torch.randn(BATCH, STEPS, IN)
    states = [0.5 * torch.randn(BATCH, s.shape[1]) for s in manifest.states]
    want = tuple_cell_by_hand(cell, xs, tuple(states))
    got, _ = run_artifact(folder, xs, states)
    assert max_error(want, got) <= TOL


def test_tuple_state_cell_in_a_stack(tmp_path: Path) -> None:
    torch.manual_seed(7)
    stack = nn.ModuleList([TupleLSTMCell(IN, 6, 3), nn.GRUCell(3, 4), PairCell(4, 5)])
    ex = adapt(stack, head=nn.Linear(5, 2))
    assert [s.name for s in ex.states] == ["h_l0", "c_l0", "h_l1", "h_l2", "c_l2"]
    folder = export(ex, name="stack", repository=tmp_path, format="onnx", progress=False)
    xs = torch.randn(2, 20, IN)
    got, _ = run_artifact(folder, xs)
    assert max_error(ex.reference(xs).outputs, got) <= TOL
    # The reference is the original cells looped by hand: check that too.
    h0, c0, h1, h2, c2 = (torch.zeros(2, n) for n in (6, 6, 4, 5, 5))
    want = []
    with torch.no_grad():
        for t in range(20):
            y, (h0, c0) = stack[0](xs[:, t], (h0, c0))
            h1 = stack[1](y, h1)
            h2, c2 = stack[2](h1, (h2, c2))
            want.append(ex.step.head(h2))
    assert max_error(torch.stack(want, 1), got) <= TOL


def test_sizes_that_cannot_apply_are_refused() -> None:
    with pytest.raises(ExportUsageError, match=r"input_size= cannot apply: GRU declares its own sizes"):
        adapt(nn.GRU(3, 4), input_size=3)
    with pytest.raises(ExportUsageError, match=r"hidden_size= cannot apply: GRUCell declares its own sizes"):
        adapt(nn.ModuleList([nn.GRUCell(3, 4)]), hidden_size=4)
    with pytest.raises(ExportUsageError, match=r"hidden_size= cannot apply: GRU\(3, 4.* is already adapted"):
        adapt(adapt(nn.GRU(3, 4)), hidden_size=4)
    with pytest.raises(ExportUsageError, match=r"input_size= cannot apply: .*whole-sequence model"):
        export(adapt_sequence(nn.GRU(3, 4, bidirectional=True)), name="m", repository="unused", input_size=3)
    # Where sizes do apply, they still work: a user cell after a built-in layer 0 takes hidden_size=.
    ex = adapt(nn.ModuleList([nn.GRUCell(3, 4), PairCell(4, 5)]), hidden_size=5)
    assert [s.shape for s in ex.states] == [(-1, 4), (-1, 5), (-1, 5)]
