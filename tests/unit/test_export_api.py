"""export(): versions, overwrite, atomic publication, refusal of a wrong step module, initial states, user step
modules with declared specs, progress lines, and the Exportable.reference contract."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from export_support import max_error, run_artifact
from torch import nn

from rnnserve.export import (
    Exportable,
    ExportError,
    ExportVerificationError,
    StateInfo,
    TensorInfo,
    adapt,
    export,
)
from rnnserve.manifest import ConstantInit, FileInit, ModelManifest


def _gru() -> nn.GRU:
    torch.manual_seed(0)
    return nn.GRU(3, 4, batch_first=True)


def test_versions_count_up_and_existing_ones_are_kept(tmp_path: Path) -> None:
    first = export(_gru(), name="m", repository=tmp_path, steps=5, progress=False)
    second = export(_gru(), name="m", repository=tmp_path, steps=5, progress=False)
    assert (first.name, second.name) == ("1", "2")
    created = ModelManifest.read(first).created
    with pytest.raises(ExportError, match=r"already exists.*--overwrite"):
        export(_gru(), name="m", repository=tmp_path, version=1, steps=5, progress=False)
    assert ModelManifest.read(first).created == created
    again = export(_gru(), name="m", repository=tmp_path, version=1, overwrite=True, steps=5, progress=False)
    assert again == first and ModelManifest.read(first).version == 1
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1", "2"]  # no temp or old folders left


def test_manifest_has_every_field(tmp_path: Path) -> None:
    folder = export(
        _gru(), name="g", repository=tmp_path, format="torchscript", version=7, source="pkg.mod:make", progress=False
    )
    raw = json.loads((folder / "manifest.json").read_text())
    manifest = ModelManifest.model_validate(raw)
    assert folder.name == "7" and manifest.version == 7 and manifest.artifact == "model.pt"
    assert manifest.source == "pkg.mod:make" and manifest.rnnserve_version
    assert manifest.created.endswith("+00:00")
    assert manifest.verification is not None and manifest.verification.batch_sizes == [1, 4]
    assert manifest.verification.tolerance == 1e-5 and manifest.verification.max_abs_error <= 1e-5
    assert "GRU(3, 4, num_layers=1)" in manifest.description and "TorchScript" in manifest.description


class OffByALittle(nn.Module):
    """A step module that is almost, but not quite, the GRU it claims to be."""

    def __init__(self, step: nn.Module) -> None:
        super().__init__()
        self.inner = step

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, h = self.inner(x, h)
        return y + 1e-3, h


def broken_exportable() -> Exportable:
    good = adapt(_gru())
    return replace(good, step=OffByALittle(good.step))


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_a_wrong_step_module_is_refused_and_nothing_is_written(fmt: str, tmp_path: Path) -> None:
    export(_gru(), name="m", repository=tmp_path, steps=5, progress=False)
    with pytest.raises(ExportVerificationError) as info:
        export(broken_exportable(), name="m", repository=tmp_path, format=fmt, progress=False)
    message = str(info.value)
    assert "tolerance 1e-05" in message and "max |eager - exported| = 0.001" in message
    assert "Nothing was written" in message
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1"]
    with pytest.raises(ExportVerificationError):
        export(broken_exportable(), name="fresh", repository=tmp_path, format=fmt, progress=False)
    assert not (tmp_path / "fresh").exists()


def test_tolerance_is_the_callers_choice(tmp_path: Path) -> None:
    folder = export(broken_exportable(), name="m", repository=tmp_path, tolerance=1e-2, steps=5, progress=False)
    assert ModelManifest.read(folder).verification.max_abs_error == pytest.approx(1e-3, rel=1e-3)


def test_initial_states_file_and_constant(tmp_path: Path) -> None:
    lstm = nn.LSTM(3, 4, num_layers=2)
    h0 = torch.randn(2, 4)  # per-session shape: (num_layers, hidden)
    ex = adapt(lstm, initial_state=[h0, 0.25])
    folder = export(ex, name="lstm", repository=tmp_path, progress=False)
    manifest = ModelManifest.read(folder)
    h, c = manifest.states
    assert isinstance(h.initial, FileInit) and (folder / h.initial.path).is_file()
    np.testing.assert_array_equal(h.initial_value(folder), h0.numpy())
    assert isinstance(c.initial, ConstantInit) and c.initial.value == 0.25
    # From the manifest's initial values, the artifact streams like nn.LSTM started from (h0, 0.25).
    xs = torch.randn(2, 10, 3)
    got, _ = run_artifact(folder, xs)
    with torch.no_grad():
        want, _ = lstm(xs.transpose(0, 1), (h0[:, None].expand(2, 2, 4), torch.full((2, 2, 4), 0.25)))
    assert max_error(want.transpose(0, 1), got) <= 1e-5
    assert max_error(ex.reference(xs).outputs, got) <= 1e-5


def test_initial_state_in_model_layout_with_a_batch_of_one_is_accepted() -> None:
    ex = adapt(nn.GRU(3, 4, num_layers=2), initial_state=[torch.ones(2, 1, 4)])
    assert ex.states[0].initial_value().shape == (2, 4)
    with pytest.raises(ExportError, match="per-session shape"):
        adapt(nn.GRU(3, 4, num_layers=2), initial_state=[torch.ones(3, 4)])


class Ema(nn.Module):
    """A hand-written step module: an exponential moving average and a running count."""

    def forward(self, x: torch.Tensor, avg: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, ...]:
        avg = 0.9 * avg + 0.1 * x
        return avg * 2.0, avg, n + 1.0


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_user_step_module_with_declared_specs(fmt: str, tmp_path: Path) -> None:
    ex = Exportable(
        Ema(),
        TensorInfo("x", (-1, 3)),
        [StateInfo("avg", (-1, 3), initial=1.0), StateInfo("n", (-1, 1), output="n_next")],
        output=TensorInfo("twice", (-1, 3)),
    )
    folder = export(ex, name="ema", repository=tmp_path, format=fmt, progress=False)
    manifest = ModelManifest.read(folder)
    assert [o.name for o in manifest.outputs] == ["twice"]
    assert [(s.name, s.output) for s in manifest.states] == [("avg", "avg_out"), ("n", "n_next")]
    xs = torch.randn(2, 6, 3)
    got, (_, n) = run_artifact(folder, xs)
    assert max_error(ex.reference(xs).outputs, got) <= 1e-6
    assert torch.equal(n, torch.full((2, 1), 6.0))


def test_declared_specs_are_checked_against_the_step() -> None:
    with pytest.raises(ExportError, match=r"missing 1 required.*forward\(x, \*states\) -> \(y, \*new_states\)"):
        Exportable(Ema(), TensorInfo("x", (-1, 3)), [StateInfo("avg", (-1, 3))])
    with pytest.raises(ExportError, match=r"returned Tensor; .* returns \(y, \*new_states\)"):
        Exportable(nn.Linear(3, 3), TensorInfo("x", (-1, 3)))
    with pytest.raises(ExportError, match=r"output y: declared \[-1, 4\].*returns \[-1, 3\]"):
        states = [StateInfo("a", (-1, 3)), StateInfo("n", (-1, 1))]
        Exportable(Ema(), TensorInfo("x", (-1, 3)), states, output=TensorInfo("y", (-1, 4)))
    with pytest.raises(ExportError, match="duplicate tensor names"):
        Exportable(Ema(), TensorInfo("x", (-1, 3)), [StateInfo("x", (-1, 3)), StateInfo("n", (-1, 1))])
    with pytest.raises(ExportError, match="-1 at batch_axis"):
        StateInfo("h", (2, 5, -1), batch_axis=1)


def test_reference_contract() -> None:
    gru = _gru()
    ex = adapt(gru, head=nn.Linear(4, 2))
    xs = torch.randn(5, 7, 3)
    ref = ex.reference(xs)
    assert ref.outputs.shape == (5, 7, 2) and ref.states[0].shape == (1, 5, 4)
    outputs, (h,) = ex.reference(xs[:, :3])  # unpacks as (outputs, final states)
    continued = ex.reference(xs[:, 3:], [h])  # resuming from a final state continues the stream
    assert max_error(torch.cat([outputs, continued.outputs], 1), ref.outputs) <= 1e-6
    assert max_error(ex.stream(xs).outputs, ref.outputs) <= 1e-5
    assert ex.model is gru
    with pytest.raises(ExportError, match=r"expected \(batch, steps, 3\)"):
        ex.reference(torch.randn(5, 3))


def test_progress_lines(tmp_path: Path) -> None:
    lines: list[str] = []
    export(_gru(), name="m", repository=tmp_path, progress=lines.append)
    assert lines[0].startswith("adapting GRU") and lines[1].startswith("exporting GRU")
    assert any(line.startswith("verifying batch 1") for line in lines)
    assert any(line.startswith("verifying batch 4") for line in lines)
    assert lines[-1].startswith(f"wrote {tmp_path / 'm' / '1'}")


def test_progress_goes_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    export(_gru(), name="m", repository=tmp_path, steps=3)
    err = capsys.readouterr().err
    assert "rnnserve export: verifying batch 4" in err and "wrote" in err


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="model name"):
        export(_gru(), name="../evil", repository=tmp_path, progress=False)
    with pytest.raises(ExportError, match="unknown format"):
        export(_gru(), name="m", repository=tmp_path, format="tflite", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ExportError, match=r"expected an nn\.Module"):
        adapt("not a model")  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())
