"""The correctness oracle, end to end: for every example model, every adapter kind and both artifact formats,
streaming T=50 steps one at a time through a real server equals the eager PyTorch module over the whole
sequence (max abs error <= 1e-5)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rnnserve.client import Client
from rnnserve.examples import EXAMPLES
from rnnserve.export import Exportable, adapt, export

T = 50
TOLERANCE = 1e-5
FORMATS = ["onnx", "torchscript"]


class TanhCell(nn.Module):
    """A user cell of the form cell(x, h) -> h."""

    def __init__(self, n_in: int = 4, n_h: int = 6):
        super().__init__()
        self.x2h, self.h2h = nn.Linear(n_in, n_h), nn.Linear(n_h, n_h, bias=False)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.x2h(x) + self.h2h(h))


class OutCell(nn.Module):
    """A user cell of the form cell(x, h) -> (y, h)."""

    def __init__(self, n_in: int = 4, n_h: int = 6, n_out: int = 3):
        super().__init__()
        self.u, self.w, self.v = nn.Linear(n_in, n_h), nn.Linear(n_h, n_h), nn.Linear(n_h, n_out)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.u(x) + self.w(h))
        return self.v(h), h


def _seeded(build: Callable[[], Exportable]) -> Callable[[], Exportable]:
    def make() -> Exportable:
        torch.manual_seed(1234)
        return build()

    return make


ADAPTERS: dict[str, Callable[[], Exportable]] = {
    "rnn_tanh": _seeded(lambda: adapt(nn.RNN(4, 6, batch_first=True))),
    "rnn_relu_3layer_head": _seeded(
        lambda: adapt(nn.RNN(4, 6, num_layers=3, nonlinearity="relu"), head=nn.Linear(6, 2))
    ),
    "rnn_nobias": _seeded(lambda: adapt(nn.RNN(4, 6, num_layers=2, bias=False, batch_first=True))),
    "lstm": _seeded(lambda: adapt(nn.LSTM(4, 6, batch_first=True), head=nn.Linear(6, 3))),
    "lstm_proj_3layer": _seeded(lambda: adapt(nn.LSTM(4, 8, num_layers=3, proj_size=3))),
    "lstm_nobias": _seeded(lambda: adapt(nn.LSTM(4, 6, num_layers=2, bias=False, batch_first=True))),
    "gru": _seeded(lambda: adapt(nn.GRU(4, 6, num_layers=2), head=nn.Linear(6, 2))),
    "gru_nobias": _seeded(lambda: adapt(nn.GRU(4, 6, bias=False, batch_first=True))),
    "rnncell": _seeded(lambda: adapt(nn.RNNCell(4, 6, nonlinearity="relu"))),
    "lstmcell": _seeded(lambda: adapt(nn.LSTMCell(4, 6), head=nn.Linear(6, 2))),
    "grucell": _seeded(lambda: adapt(nn.GRUCell(4, 6, bias=False))),
    "user_cell_h": _seeded(lambda: adapt(TanhCell(), input_size=4, hidden_size=6)),
    "user_cell_yh": _seeded(lambda: adapt(OutCell(), input_size=4, hidden_size=6)),
    "cell_stack_head": _seeded(
        lambda: adapt(
            nn.ModuleList([TanhCell(4, 6), TanhCell(6, 6)]), head=nn.Linear(6, 2), input_size=4, hidden_size=6
        )
    ),
}
CASES = {**{f"example_{k}": v for k, v in EXAMPLES.items()}, **{f"adapter_{k}": v for k, v in ADAPTERS.items()}}


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("parity-repo")
    for name, factory in CASES.items():
        for fmt in FORMATS:
            export(factory(), name=f"{name}_{fmt}", repository=root, format=fmt, steps=5, progress=False)
    return root


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_streaming_through_the_server_equals_eager(address: str, case: str, fmt: str):
    exportable = CASES[case]()
    with Client(address) as client, client.session(f"{case}_{fmt}") as session:
        shape = session.model.inputs[0].shape
        xs = torch.randn((1, T, *shape), generator=torch.Generator().manual_seed(7))
        expected, final_states = exportable.reference(xs)
        streamed = np.stack(list(session.stream(xs[0].numpy())))
        state = session.get_state()
    assert streamed.shape == tuple(expected.shape[1:])
    assert np.abs(streamed - expected[0].detach().numpy()).max() <= TOLERANCE
    # The server's final state is the eager module's final state too.
    for spec, value in zip(exportable.states, final_states, strict=True):
        eager = value.detach().select(spec.batch_axis, 0).numpy()
        assert np.abs(state[spec.name] - eager).max() <= TOLERANCE, spec.name
