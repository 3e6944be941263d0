"""``export()``: adapt, export, verify, and publish ``REPO/NAME/VERSION/`` atomically."""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from rnnserve import __version__
from rnnserve.export.adapters import adapt, refuse_sizes
from rnnserve.export.errors import ExportError
from rnnserve.export.onnx import ARTIFACT as ONNX_ARTIFACT
from rnnserve.export.onnx import load_onnx, write_onnx
from rnnserve.export.sequence import SequenceExportable, export_sequence
from rnnserve.export.step import Exportable, StateInfo, TensorInfo
from rnnserve.export.torchscript import ARTIFACT as TS_ARTIFACT
from rnnserve.export.torchscript import load_torchscript, write_torchscript
from rnnserve.export.verify import verify
from rnnserve.manifest import (
    ConstantInit,
    DType,
    FileInit,
    ModelManifest,
    StateSpec,
    TensorSpec,
    Verification,
    ZerosInit,
)
from rnnserve.progress import Progress as ProgressLines

Format = Literal["onnx", "torchscript"]
FORMATS: dict[str, tuple[str, Callable, Callable]] = {
    "onnx": (ONNX_ARTIFACT, write_onnx, load_onnx),
    "torchscript": (TS_ARTIFACT, write_torchscript, load_torchscript),
}
Progress = Callable[[str], None] | bool
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # ModelManifest.name's pattern


def _progress_fn(progress: Progress) -> Callable[[str], None]:
    if callable(progress):
        return progress
    return ProgressLines("rnnserve export: ", enabled=progress).log


def export(
    model: nn.Module | Exportable | SequenceExportable,
    *,
    name: str,
    repository: str | Path,
    format: Format = "onnx",
    version: int | None = None,
    overwrite: bool = False,
    input_size: int | None = None,
    hidden_size: int | None = None,
    steps: int = 50,
    batch_sizes: Sequence[int] = (1, 4),
    tolerance: float = 1e-5,
    source: str = "",
    description: str = "",
    max_batch_size: int = 256,
    max_queue_delay_us: int = 0,
    progress: Progress = True,
) -> Path:
    """Export ``model`` to ``repository/name/version/`` (artifact + manifest.json) and return that folder.

    ``model`` is anything :func:`rnnserve.export.adapt` accepts (``input_size``/``hidden_size`` are passed
    on to it), or a :class:`SequenceExportable` (a whole-sequence model, see :mod:`rnnserve.export.sequence`).
    The artifact is verified against the eager reference over ``steps`` random steps at each batch size
    before the folder appears; on a larger error than ``tolerance`` nothing is written and
    :class:`ExportVerificationError` is raised. ``version`` defaults to one past the highest existing one;
    an existing version is replaced only with ``overwrite=True``. ``progress`` is a callable taking one line,
    or a bool (stderr lines).
    """
    say = _progress_fn(progress)
    if format not in FORMATS:
        raise ExportError(f"unknown format {format!r}: choose one of {sorted(FORMATS)}")
    if isinstance(model, SequenceExportable):  # a whole-sequence model (kind "sequence", served by Predict)
        refuse_sizes(input_size, hidden_size, f"{model.kind} is an adapted whole-sequence model")
        return export_sequence(
            model,
            name=name,
            repository=repository,
            format=format,
            version=version,
            overwrite=overwrite,
            batch_sizes=batch_sizes,
            tolerance=tolerance,
            source=source,
            description=description,
            max_batch_size=max_batch_size,
            progress=say,
        )
    started = time.perf_counter()
    if not isinstance(model, Exportable):
        say(f"adapting {type(model).__name__}")
    # An Exportable comes back as it is, unless given sizes that cannot apply to it.
    ex = adapt(model, input_size=input_size, hidden_size=hidden_size)
    with staging(repository, name, version, overwrite) as (tmp, version):
        artifact, write, load = FORMATS[format]
        say(f"exporting {ex.kind} to {format}")
        how = write(ex, tmp / artifact)
        label = f"{name} v{version} ({format})"
        error = verify(
            ex,
            load(tmp / artifact, ex),
            steps=steps,
            batch_sizes=batch_sizes,
            tolerance=tolerance,
            label=label,
            progress=say,
        )
        say(f"verified: max abs error {error:.3g} <= tolerance {tolerance:g}")
        manifest = ModelManifest(
            name=name,
            version=version,
            format=format,
            artifact=artifact,
            inputs=[_tensor_spec(ex.input)],
            outputs=[_tensor_spec(ex.output)],  # type: ignore[arg-type]
            states=[_state_spec(s, tmp) for s in ex.states],
            max_batch_size=max_batch_size,
            max_queue_delay_us=max_queue_delay_us,
            source=source,
            rnnserve_version=__version__,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            verification=Verification(
                steps=steps, batch_sizes=list(batch_sizes), tolerance=tolerance, max_abs_error=error
            ),
            description=description or f"{ex.kind}; {how}",
        )
        manifest.write(tmp)
    final = Path(repository) / name / str(version)
    say(f"wrote {final} in {time.perf_counter() - started:.1f} s")
    return final


@contextmanager
def staging(repository: str | Path, name: str, version: int | None, overwrite: bool) -> Iterator[tuple[Path, int]]:
    """Yield a temporary folder and the version number; on success it becomes ``repository/name/version``
    in one rename, on any error it is removed (with the model folder, if this call created it)."""
    if not _NAME.match(name):
        raise ExportError(f"model name {name!r}: use letters, digits, '_', '.', '-', starting with a letter or digit")
    model_dir = Path(repository) / name
    version = _pick_version(model_dir, version, overwrite)
    created_dir = not model_dir.exists()
    model_dir.mkdir(parents=True, exist_ok=True)
    # The temporary folder sits beside the final one (same filesystem, so the rename is atomic); its
    # dot-name is not a version number, so a server scanning the repository skips it.
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=model_dir))
    tmp.chmod(0o755)  # mkdtemp makes it private; the server may run as another user
    try:
        yield tmp, version
        _publish(tmp, model_dir / str(version), overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created_dir and model_dir.is_dir() and not any(model_dir.iterdir()):
            model_dir.rmdir()
        raise


def _pick_version(model_dir: Path, version: int | None, overwrite: bool) -> int:
    existing = [int(p.name) for p in model_dir.iterdir() if p.name.isdigit()] if model_dir.is_dir() else []
    if version is None:
        return max(existing, default=0) + 1
    if version < 1:
        raise ExportError(f"version {version}: versions are integers from 1")
    if version in existing and not overwrite:
        raise ExportError(
            f"{model_dir / str(version)} already exists: pick another --version, leave it out for the next "
            f"one ({max(existing) + 1}), or pass --overwrite"
        )
    return version


def _publish(tmp: Path, final: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``final``; an old ``final`` (only with ``overwrite``) is moved aside first."""
    old: Path | None = None
    if final.exists():
        if not overwrite:
            raise ExportError(f"{final} appeared while exporting; pass --overwrite to replace it")
        old = final.with_name(f".old-{final.name}-{tmp.name}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_DTYPES: dict[torch.dtype, DType] = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.int16: "int16",
    torch.int8: "int8",
    torch.uint8: "uint8",
    torch.bool: "bool",
}


def _dtype_name(info: TensorInfo) -> DType:
    if info.dtype not in _DTYPES:
        raise ExportError(f"{info.name}: dtype {info.dtype} is not servable; use one of {sorted(_DTYPES.values())}")
    return _DTYPES[info.dtype]


def _tensor_spec(info: TensorInfo) -> TensorSpec:
    return TensorSpec(name=info.name, dtype=_dtype_name(info), shape=list(info.shape), batch_axis=info.batch_axis)


def _state_spec(info: StateInfo, folder: Path) -> StateSpec:
    if isinstance(info.initial, torch.Tensor):
        # Written beside the artifact; the manifest refers to it relative to the version folder.
        path = f"initial_{info.name}.npy"
        np.save(folder / path, info.initial_value().numpy(), allow_pickle=False)
        initial: ZerosInit | ConstantInit | FileInit = FileInit(kind="file", path=path)
    elif info.initial is None or float(info.initial) == 0.0:
        initial = ZerosInit()
    else:
        initial = ConstantInit(kind="constant", value=float(info.initial))
    return StateSpec(
        name=info.name,
        dtype=_dtype_name(info),
        shape=list(info.shape),
        batch_axis=info.batch_axis,
        output=info.output,
        initial=initial,
    )


def export_examples(
    repository: str | Path,
    formats: Iterable[Format] = ("onnx",),
    *,
    names: Iterable[str] | None = None,
    version: int | None = None,
    overwrite: bool = False,
    steps: int = 50,
    batch_sizes: Sequence[int] = (1, 4),
    tolerance: float = 1e-5,
    progress: Progress = True,
) -> list[Path]:
    """Export the built-in examples (``rnnserve.examples.EXAMPLES`` and ``SEQUENCE_EXAMPLES``) to ``repository``.

    With one format, models are named as in ``EXAMPLES`` (``elman_tanh``, ...). With several, the first
    format keeps the plain names and the others get a suffix (``elman_tanh_torchscript``), so they can share
    one repository. ``version=1, overwrite=True`` makes a re-run idempotent.
    """
    from rnnserve.examples import EXAMPLES, SEQUENCE_EXAMPLES

    factories: dict[str, Callable[[], Exportable | SequenceExportable]] = {**EXAMPLES, **SEQUENCE_EXAMPLES}
    formats = list(formats)
    chosen = list(factories) if names is None else list(names)
    unknown = sorted(set(chosen) - set(factories))
    if unknown:
        raise ExportError(f"unknown examples {unknown}; known: {sorted(factories)}")
    jobs = [
        (fmt, example, example if i == 0 else f"{example}_{fmt}") for i, fmt in enumerate(formats) for example in chosen
    ]
    # On a terminal a bar counts the models under their lines; a callable ``progress`` gets the lines alone.
    lines = ProgressLines("rnnserve export: ", enabled=progress is True)
    written = []
    with lines.bar("example", len(jobs)) as start:
        for fmt, example, name in jobs:
            start(f"{name} ({fmt})")
            factory = factories[example]
            written.append(
                export(
                    factory(),
                    name=name,
                    repository=repository,
                    format=fmt,
                    version=version,
                    overwrite=overwrite,
                    steps=steps,
                    batch_sizes=batch_sizes,
                    tolerance=tolerance,
                    source=f"{factory.__module__}:{factory.__name__}",
                    progress=progress if callable(progress) else lines.log,
                )
            )
    return written
