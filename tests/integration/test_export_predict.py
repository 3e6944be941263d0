"""Exported models served end to end by a real server: bidirectional recurrent modules over float features
(no embedding) through Predict equal each sequence run alone in eager PyTorch, and a user cell with a tuple
state streamed through sessions equals the eager cell looped over the sequence. ONNX and TorchScript both."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from conftest import ServerHandle
from export_support import TupleLSTMCell, tuple_cell_by_hand
from torch import nn

from rnnserve.client import Client
from rnnserve.export import adapt, adapt_sequence, export
from rnnserve.export.sequence import random_features

FORMATS = ["onnx", "torchscript"]
SEQUENCE_MODULES = {
    "bigru": lambda: nn.GRU(4, 5, num_layers=2, batch_first=True, bidirectional=True),
    "bilstm_time_major": lambda: nn.LSTM(4, 6, bidirectional=True),
}
MAX_BATCH = 3  # under the batch sizes below: each Predict is split into several model calls


def _modules() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    modules: dict[str, nn.Module] = {name: make().eval() for name, make in SEQUENCE_MODULES.items()}
    modules["tuple_cell"] = TupleLSTMCell(4, 6, 3).eval()
    return modules


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerHandle, dict[str, nn.Module]]]:
    repo = tmp_path_factory.mktemp("exported-repo")
    modules = _modules()
    for fmt in FORMATS:
        for name, module in modules.items():
            ex = adapt(module) if name == "tuple_cell" else adapt_sequence(module)
            export(ex, name=f"{name}_{fmt}", repository=repo, format=fmt, progress=False)
    handle = ServerHandle(repo, max_batch_size=MAX_BATCH)
    yield handle, modules
    handle.stop()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", list(SEQUENCE_MODULES))
def test_predict_equals_each_sequence_alone(
    served: tuple[ServerHandle, dict[str, nn.Module]], name: str, fmt: str
) -> None:
    server, modules = served
    module = modules[name]
    generator = torch.Generator().manual_seed(1)
    with Client(server.address, timeout=60) as client:
        assert client.model(f"{name}_{fmt}").kind == "sequence"
        for batch, max_length in [(1, 1), (4, 7), (7, 30)]:
            x, lengths = random_features(batch, max_length, 4, generator)
            result = client.predict(f"{name}_{fmt}", x.numpy(), lengths.numpy())
            assert result.outputs.shape == (batch, max_length, 2 * module.hidden_size)
            for b, n in enumerate(lengths.tolist()):
                alone = x[b : b + 1, :n] if module.batch_first else x[b, :n].unsqueeze(1)
                with torch.no_grad():
                    out, _ = module(alone)
                want = (out[0] if module.batch_first else out[:, 0]).numpy()
                assert np.abs(result.outputs[b, :n] - want).max() <= 1e-5
                assert not result.outputs[b, n:].any()


@pytest.mark.parametrize("fmt", FORMATS)
def test_tuple_state_cell_streams_like_the_cell_looped(
    served: tuple[ServerHandle, dict[str, nn.Module]], fmt: str
) -> None:
    server, modules = served
    cell = modules["tuple_cell"]
    xs = torch.randn(3, 25, 4, generator=torch.Generator().manual_seed(2))
    want = tuple_cell_by_hand(cell, xs, (torch.zeros(3, 6), torch.zeros(3, 6))).numpy()
    with Client(server.address, timeout=60) as client:
        info = client.model(f"tuple_cell_{fmt}")
        assert [(s.name, list(s.shape)) for s in info.states] == [("h", [6]), ("c", [6])]
        sessions = [client.open_session(f"tuple_cell_{fmt}") for _ in range(3)]
        try:
            for t in range(xs.shape[1]):
                for b, s in enumerate(sessions):
                    assert np.abs(s.step(xs[b, t].numpy()) - want[b, t]).max() <= 1e-5
        finally:
            for s in sessions:
                s.close()
