"""The notebook examples: each factory's reference agrees with the notebook model's own forward, and every
example exports (ONNX through the CLI, TorchScript through the API) to an artifact that streams the same."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from export_support import max_error, rnnserve_cli, run_artifact
from torch import nn

from rnnserve.examples import EXAMPLES, SEQUENCE_EXAMPLES
from rnnserve.export import export_examples
from rnnserve.manifest import ModelManifest


def _prefixes(model: nn.Module, xs: torch.Tensor) -> torch.Tensor:
    # The Elman model returns the head at the last step only: step t of the stream is model(x[:, :t+1]).
    return torch.stack([model(xs[:, : t + 1]) for t in range(xs.shape[1])], 1)


# The notebook model's whole-sequence forward, as per-step outputs (B, T, ...).
ORACLES: dict[str, Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {
    "elman_tanh": _prefixes,
    "elman_relu": _prefixes,
    "wuv_cell": lambda model, xs: model(xs),
    "rnn_regressor": lambda model, xs: model(xs)[0],
    "lstm_proj_classifier": lambda model, xs: model(xs),
    "gru2": lambda model, xs: model(xs),
}
SHAPES = {  # name -> (input size, output size)
    "elman_tanh": (3, 2),
    "elman_relu": (3, 2),
    "wuv_cell": (2, 3),
    "rnn_regressor": (1, 1),
    "lstm_proj_classifier": (768, 2),
    "gru2": (16, 4),
}


def test_example_names() -> None:
    assert list(EXAMPLES) == list(ORACLES)


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("name", list(EXAMPLES))
@pytest.mark.parametrize("batch", [1, 3])
def test_reference_agrees_with_the_notebook_model(name: str, batch: int) -> None:
    ex = EXAMPLES[name]()
    n_in, n_out = SHAPES[name]
    assert ex.input.shape == (-1, n_in) and ex.output.shape == (-1, n_out)
    assert ex.model is not None and not ex.model.training
    xs = torch.randn(batch, 7, n_in)
    with torch.no_grad():
        want = ORACLES[name](ex.model, xs)
    ref = ex.reference(xs)
    assert ref.outputs.shape == (batch, 7, n_out)
    assert max_error(want, ref.outputs) <= 1e-5
    assert max_error(ex.stream(xs).outputs, ref.outputs) <= 1e-5  # the step module agrees too


def test_factories_are_deterministic() -> None:
    for name, factory in EXAMPLES.items():
        a, b = factory().step.state_dict(), factory().step.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_regressor_state_matches_nn_rnn_final_hidden() -> None:
    ex = EXAMPLES["rnn_regressor"]()
    xs = torch.arange(1.0, 21.0).view(4, 5, 1)  # notebook 003's 1..20 in 4 batches of 5
    with torch.no_grad():
        _, hidden = ex.model(xs)
    assert max_error(ex.reference(xs).states[0], hidden) <= 1e-6


def _check_repository(repo: Path, fmt: str, suffix: str = "") -> None:
    for name in SEQUENCE_EXAMPLES:  # whole-sequence models: Predict only (tests/integration/test_predict.py runs them)
        manifest = ModelManifest.read(repo / f"{name}{suffix}" / "1")
        assert manifest.format == fmt and manifest.kind == "sequence", name
    for name, factory in EXAMPLES.items():
        folder = repo / f"{name}{suffix}" / "1"
        manifest = ModelManifest.read(folder)
        assert manifest.format == fmt and manifest.source == f"rnnserve.examples.models:{name}"
        ex = factory()
        xs = torch.randn(2, 20, SHAPES[name][0])
        got, final = run_artifact(folder, xs)
        ref = ex.reference(xs)
        assert max_error(ref.outputs, got) <= 1e-5, name
        for want, have in zip(ref.states, final, strict=True):
            assert max_error(want, have) <= 1e-5, name


def test_all_examples_onnx_via_cli(tmp_path: Path) -> None:
    repo = tmp_path / "onnx-repo"
    result = rnnserve_cli("export", "--all-examples", "--repository", str(repo), "--format", "onnx")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in repo.iterdir()) == sorted([*EXAMPLES, *SEQUENCE_EXAMPLES])
    _check_repository(repo, "onnx")


def test_all_examples_torchscript_via_api(tmp_path: Path) -> None:
    repo = tmp_path / "ts-repo"
    paths = export_examples(repo, ["torchscript"], progress=False)
    assert paths == [repo / name / "1" for name in [*EXAMPLES, *SEQUENCE_EXAMPLES]]
    _check_repository(repo, "torchscript")


def test_both_formats_share_a_repository_and_reruns_are_idempotent(tmp_path: Path) -> None:
    for _ in range(2):
        paths = export_examples(
            tmp_path, ["onnx", "torchscript"], names=["wuv_cell"], version=1, overwrite=True, steps=5, progress=False
        )
    assert paths == [tmp_path / "wuv_cell" / "1", tmp_path / "wuv_cell_torchscript" / "1"]
    assert ModelManifest.read(paths[1]).format == "torchscript"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wuv_cell", "wuv_cell_torchscript"]
