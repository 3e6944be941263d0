"""`rnnserve export`: the real console script as a subprocess (a dotted module and a .py file as targets, a
refused export), plus in-process runs of the CLI for the error paths."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from export_support import max_error, rnnserve_cli, run_artifact, tuple_cell_by_hand

from rnnserve.cli import main
from rnnserve.export import ExportError
from rnnserve.export.cli import load_target
from rnnserve.manifest import ModelManifest

USER_MODELS = textwrap.dedent(
    """
    import torch
    from dataclasses import replace
    from torch import nn

    from rnnserve.export import adapt, adapt_sequence


    class RawCell(nn.Module):
        # No Linear layers and no size attributes: the exporter needs --input-size/--hidden-size.
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.w = nn.Parameter(0.3 * torch.randn(6, 5))

        def forward(self, x, h):
            return torch.tanh(x @ self.w.T + h)


    class Shifted(nn.Module):
        def __init__(self, step):
            super().__init__()
            self.inner = step

        def forward(self, x, h):
            y, h = self.inner(x, h)
            return y + 1e-3, h


    def make_cell():
        return RawCell()


    def broken():
        good = adapt(nn.GRU(3, 4))
        return replace(good, step=Shifted(good.step))


    def bidirectional():
        return nn.LSTM(3, 4, bidirectional=True)


    def bi_sequence():
        torch.manual_seed(0)
        return adapt_sequence(nn.GRU(3, 4, bidirectional=True))


    def adapted():
        return adapt(nn.GRU(3, 4))


    def adapts_raw_cell():
        return adapt(RawCell())


    class TupleCell(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.ih, self.hh = nn.Linear(3, 8), nn.Linear(4, 8)

        def forward(self, x, state):
            h, c = state
            i, g = (self.ih(x) + self.hh(h)).chunk(2, -1)
            c = torch.sigmoid(i) * c + torch.tanh(g)
            return torch.tanh(c) * 2, (torch.tanh(c), c)


    def tuple_cell():
        return TupleCell()
    """
)


@pytest.fixture
def user_file(tmp_path: Path) -> Path:
    path = tmp_path / "user_models.py"
    path.write_text(USER_MODELS)
    return path


def test_cli_exports_a_module_factory(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    result = rnnserve_cli("export", "rnnserve.examples.models:gru2", "--repository", str(repo))
    assert result.returncode == 0, result.stderr
    folder = repo / "gru2" / "1"
    assert result.stdout.strip().splitlines()[-1] == str(folder)
    assert "verifying batch 4" in result.stderr and "wrote" in result.stderr
    manifest = ModelManifest.read(folder)
    assert manifest.source == "rnnserve.examples.models:gru2" and manifest.format == "onnx"


def test_cli_exports_from_a_py_file_and_asks_for_sizes(user_file: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    asked = rnnserve_cli("export", f"{user_file}:make_cell", "--repository", str(repo))
    assert asked.returncode == 1
    assert "cannot infer the input/hidden size of RawCell" in asked.stderr and "--input-size" in asked.stderr
    assert not repo.exists()

    result = rnnserve_cli(
        "export",
        f"{user_file}:make_cell",
        "--repository",
        str(repo),
        "--name",
        "raw",
        "--format",
        "torchscript",
        "--input-size",
        "5",
        "--hidden-size",
        "6",
        "--steps",
        "20",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    manifest = ModelManifest.read(repo / "raw" / "1")
    assert manifest.inputs[0].shape == [-1, 5] and manifest.states[0].shape == [-1, 6]
    assert manifest.verification is not None and manifest.verification.steps == 20

    cell, _ = load_target(f"{user_file}:make_cell")
    xs = torch.randn(2, 8, 5)
    h, want = torch.zeros(2, 6), []
    with torch.no_grad():
        for t in range(8):
            h = cell(xs[:, t], h)
            want.append(h)
    got, _ = run_artifact(repo / "raw" / "1", xs)
    assert max_error(torch.stack(want, 1), got) <= 1e-5


def test_cli_refuses_a_wrong_step_module(user_file: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    result = rnnserve_cli("export", f"{user_file}:broken", "--repository", str(repo), "--format", "onnx")
    assert result.returncode != 0
    assert "verification failed" in result.stderr and "tolerance 1e-05" in result.stderr
    assert not (repo / "broken").exists()


def test_cli_error_paths_in_process(user_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = str(tmp_path / "repo")
    assert main(["export", f"{user_file}:bidirectional", "--repository", repo]) == 1
    assert "bidirectional" in capsys.readouterr().err
    assert main(["export", "no_such_module_here:f", "--repository", repo]) == 1
    assert "cannot import 'no_such_module_here'" in capsys.readouterr().err
    assert main(["export", "rnnserve.examples.models:nope", "--repository", repo]) == 1
    assert "has no 'nope'" in capsys.readouterr().err
    assert main(["export", "rnnserve.examples.models", "--repository", repo]) == 1
    assert "expected MODULE_OR_FILE:FACTORY" in capsys.readouterr().err
    assert main(["export", "--repository", repo]) == 2
    assert main(["export", "x:y", "--all-examples", "--repository", repo]) == 2
    assert "give no MODULE_OR_FILE:FACTORY or --name" in capsys.readouterr().err

    args = ["export", "rnnserve.examples.models:wuv_cell", "--repository", repo, "--quiet", "--steps", "5"]
    assert main([*args, "--version", "3"]) == 0
    assert capsys.readouterr().err == ""
    assert main([*args, "--version", "3"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--version", "3", "--overwrite"]) == 0


def test_cli_imports_a_module_of_the_current_folder_by_name(tmp_path: Path) -> None:
    """``rnnserve export my_models:f`` run beside my_models.py finds it, as ``python -m`` would."""
    (tmp_path / "my_models.py").write_text("from torch import nn\n\ndef factory():\n    return nn.GRU(3, 4)\n")
    result = rnnserve_cli("export", "my_models:factory", "--repository", "repo", "--steps", "5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert ModelManifest.read(tmp_path / "repo" / "factory" / "1").source == "my_models:factory"


def test_cli_says_when_an_export_adds_a_version_beside_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["export", "rnnserve.examples.models:wuv_cell", "--repository", str(tmp_path), "--quiet", "--steps", "5"]
    assert main(args) == 0
    assert capsys.readouterr().err == ""  # the model's only version: nothing to say
    assert main([*args, "--format", "torchscript"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(tmp_path / "wuv_cell" / "2")
    assert "note: wrote wuv_cell version 2 (torchscript) beside version 1 (onnx)." in err
    assert "New sessions that ask for no version get the newest, version 2." in err
    assert "another --name (e.g. wuv_cell_torchscript)" in err


def test_load_target_takes_objects_classes_and_factories(tmp_path: Path) -> None:
    path = tmp_path / "objs.py"
    path.write_text("from torch import nn\ncell = nn.GRUCell(2, 3)\nCell = nn.RNNCell\nnumber = 3\n")
    assert isinstance(load_target(f"{path}:cell")[0], torch.nn.GRUCell)
    with pytest.raises(ExportError, match="factory must take no arguments"):
        load_target(f"{path}:Cell")
    with pytest.raises(ExportError, match="gave a int"):
        load_target(f"{path}:number")
    with pytest.raises(ExportError, match="no such Python file"):
        load_target(f"{tmp_path / 'missing.py'}:f")


def test_cli_exports_a_tuple_state_cell_and_a_float_feature_sequence_model(user_file: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    result = rnnserve_cli("export", f"{user_file}:tuple_cell", "--repository", str(repo), "--format", "torchscript")
    assert result.returncode == 0, result.stderr
    manifest = ModelManifest.read(repo / "tuple_cell" / "1")
    assert [(s.name, s.shape) for s in manifest.states] == [("h", [-1, 4]), ("c", [-1, 4])]
    cell, _ = load_target(f"{user_file}:tuple_cell")
    xs = torch.randn(2, 12, 3)
    got, _ = run_artifact(repo / "tuple_cell" / "1", xs)
    assert max_error(tuple_cell_by_hand(cell, xs, (torch.zeros(2, 4), torch.zeros(2, 4))), got) <= 1e-5

    result = rnnserve_cli("export", f"{user_file}:bi_sequence", "--repository", str(repo), "--batch-sizes", "2,3")
    assert result.returncode == 0, result.stderr
    manifest = ModelManifest.read(repo / "bi_sequence" / "1")
    assert manifest.kind == "sequence" and [t.shape for t in manifest.inputs] == [[-1, -1, 3], [-1]]
    assert manifest.verification is not None and manifest.verification.batch_sizes == [2, 3]


def test_cli_refuses_flags_that_cannot_apply(
    user_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    cases = [
        ("adapted", ["--input-size", "3"], "--input-size cannot apply", "already adapted"),
        ("bidirectional", ["--hidden-size", "4"], "--hidden-size cannot apply", "LSTM declares its own sizes"),
        ("bi_sequence", ["--input-size", "3"], "--input-size cannot apply", "whole-sequence model"),
        ("bi_sequence", ["--steps", "5"], "--steps cannot apply", "whole padded sequences"),
        ("bi_sequence", ["--max-queue-delay-us", "5"], "--max-queue-delay-us cannot apply", "without the session"),
    ]
    for factory, flags, refusal, why in cases:
        assert main(["export", f"{user_file}:{factory}", "--repository", str(repo), *flags]) == 2, factory
        err = capsys.readouterr().err
        assert refusal in err and why in err, err
    assert main(["export", "--all-examples", "--repository", str(repo), "--hidden-size", "4"]) == 2
    assert "--hidden-size cannot apply to --all-examples" in capsys.readouterr().err
    assert not repo.exists()


def test_cli_recommends_size_flags_only_where_they_help(
    user_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = str(tmp_path / "repo")
    # The factory calls adapt() itself: the flags never reach that call, so they are not recommended.
    assert main(["export", f"{user_file}:adapts_raw_cell", "--repository", repo]) == 1
    err = capsys.readouterr().err
    assert "cannot infer the input/hidden size of RawCell" in err and "CLI: --input-size" not in err
    assert "--input-size/--hidden-size do not reach it" in err
    # Sizes given and wrong: giving sizes again would not help either.
    assert (
        main(["export", f"{user_file}:make_cell", "--repository", repo, "--input-size", "4", "--hidden-size", "6"]) == 1
    )
    err = capsys.readouterr().err
    assert "the sizes given (input 4, hidden 6) did not work either" in err and "CLI: --input-size" not in err
    # The bare cell with nothing to infer from: here the flags are the way out.
    assert main(["export", f"{user_file}:make_cell", "--repository", repo]) == 1
    assert "(CLI: --input-size/--hidden-size)" in capsys.readouterr().err
