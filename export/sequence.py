"""Whole-sequence models: ``forward(tokens (B, T) int64, lengths (B,) int64) -> output (B, ...)``.

Not every recurrent model can stream: a bidirectional one needs the whole sequence. Such a model is exported
as a *sequence model* (manifest ``kind: "sequence"``), served by the ``Predict`` RPC only. The artifact takes
a padded batch of token ids and each sequence's length, with dynamic batch and time axes.

    ex = adapt_sequence(model, embedding=model.embedding, rnn=model.rnn, head=head)
    export(ex, name="bilstm", repository="model_repository")   # verified against model(tokens, lengths)

:func:`adapt_sequence` builds the exportable module from the model's own parts (see
:mod:`rnnserve.export.padded` for why ``pack_padded_sequence`` is replaced); its oracle is the original
model, ``pack_padded_sequence`` and all.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rnnserve import __version__
from rnnserve.export.errors import ExportError, ExportVerificationError
from rnnserve.export.padded import PaddedClassifier, PaddedRecurrent
from rnnserve.export.quiet import quiet
from rnnserve.export.step import TensorInfo
from rnnserve.export.verify import Worst
from rnnserve.manifest import ModelManifest, TensorSpec, Verification

ONNX_OPSET = 17
# Verification runs every batch size at every max length; none of these is the T traced at export (6).
BATCH_SIZES = (1, 4, 7)
MAX_LENGTHS = (1, 5, 17)
SequenceRunner = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SequenceExportable:
    """A whole-sequence model ready to export.

    ``module`` is what gets exported (scriptable, ``forward(tokens, lengths)``); ``model`` is the eager oracle
    with the same call (e.g. the original model with ``pack_padded_sequence``). Verification draws token ids
    in ``[1, vocab_size)`` and pads with 0 past each length.
    """

    module: nn.Module
    model: nn.Module
    vocab_size: int
    output: TensorInfo
    kind: str = "sequence model"
    tokens: str = "tokens"
    lengths: str = "lengths"


def adapt_sequence(
    model: nn.Module,
    *,
    embedding: nn.Embedding,
    rnn: nn.RNNBase,
    head: nn.Module | None = None,
    output: str = "prob",
) -> SequenceExportable:
    """``head(cat(final hidden states of rnn's last layer, both directions))`` over ``embedding(tokens)``.

    ``model(tokens, lengths)`` is the eager oracle: it must compute exactly that (typically with
    ``pack_padded_sequence(..., enforce_sorted=False)``). ``head`` holds the layers after the concatenation,
    e.g. ``nn.Sequential(model.fc1, nn.ReLU(), model.fc2, nn.Sigmoid())``.
    """
    if not isinstance(embedding, nn.Embedding):
        raise ExportError(f"embedding must be an nn.Embedding, got {type(embedding).__name__}")
    if not isinstance(rnn, nn.RNNBase):
        raise ExportError(f"rnn must be an nn.RNN, nn.LSTM or nn.GRU, got {type(rnn).__name__}")
    for m in (model, embedding, rnn, head):
        if m is not None:
            m.eval()
    module = PaddedClassifier(embedding, PaddedRecurrent(rnn), head).eval()
    with torch.no_grad():
        probe = module(torch.ones(2, 3, dtype=torch.int64), torch.tensor([3, 2]))
    kind = f"{type(embedding).__name__}({embedding.num_embeddings}, {embedding.embedding_dim}) + "
    kind += f"{'bidirectional ' if rnn.bidirectional else ''}{type(rnn).__name__}({rnn.input_size}, "
    kind += f"{rnn.hidden_size}, num_layers={rnn.num_layers})" + (f" + {type(head).__name__} head" if head else "")
    return SequenceExportable(
        module=module,
        model=model,
        vocab_size=embedding.num_embeddings,
        output=TensorInfo(output, (-1, *probe.shape[1:]), dtype=probe.dtype),
        kind=kind,
    )


def random_batch(
    batch: int, max_length: int, vocab_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids in ``[1, vocab_size)``, 0 past each length; lengths unsorted, holding 1 and ``max_length``."""
    lengths = torch.randint(1, max_length + 1, (batch,), generator=generator)
    lengths[torch.randperm(batch, generator=generator)[:2]] = torch.tensor([max_length, 1])[: min(batch, 2)]
    tokens = torch.randint(1, vocab_size, (batch, max_length), generator=generator)
    tokens[torch.arange(max_length).unsqueeze(0) >= lengths.unsqueeze(1)] = 0
    return tokens, lengths


# --- writing and loading the artifact ---------------------------------------------------------------------


def _scripted(ex: SequenceExportable) -> torch.jit.ScriptModule:
    # Scripting, not tracing: a trace would unroll the time loop at the example's T.
    try:
        return torch.jit.script(ex.module)
    except Exception as exc:
        raise ExportError(
            f"{ex.kind}: torch.jit.script failed ({exc}); the sequence module must be scriptable"
        ) from exc


def _write_torchscript(ex: SequenceExportable, path: Path) -> str:
    with quiet(), torch.no_grad():
        torch.jit.save(_scripted(ex), str(path))
    return "TorchScript (scripted)"


def _write_onnx(ex: SequenceExportable, path: Path) -> str:
    example = random_batch(3, 6, ex.vocab_size, torch.Generator().manual_seed(0))
    with quiet() as log, torch.no_grad():
        try:
            # The legacy exporter turns the scripted time loop into an ONNX Loop: any T works.
            torch.onnx.export(
                _scripted(ex),
                example,
                str(path),
                dynamo=False,
                input_names=[ex.tokens, ex.lengths],
                output_names=[ex.output.name],
                dynamic_axes={
                    ex.tokens: {0: "batch", 1: "time"},
                    ex.lengths: {0: "batch"},
                    ex.output.name: {0: "batch"},
                },
                opset_version=ONNX_OPSET,
            )
        except ExportError:
            raise
        except Exception as exc:
            path.unlink(missing_ok=True)
            raise ExportError(
                f"ONNX export of {ex.kind} failed: {exc}. Try --format torchscript.\n"
                f"Exporter output:\n{log.getvalue()[-4000:]}"
            ) from exc
    return f"ONNX opset {ONNX_OPSET} (scripted time loop, legacy exporter)"


def _load_onnx(path: Path, ex: SequenceExportable) -> SequenceRunner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        feeds = {ex.tokens: tokens.numpy(), ex.lengths: lengths.numpy()}
        return torch.from_numpy(np.asarray(session.run([ex.output.name], feeds)[0]))

    return run


def _load_torchscript(path: Path, ex: SequenceExportable) -> SequenceRunner:
    module = torch.jit.load(str(path), map_location="cpu").eval()

    def run(tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(tokens, lengths)

    return run


WRITERS: dict[str, tuple[str, Callable, Callable]] = {
    "onnx": ("model.onnx", _write_onnx, _load_onnx),
    "torchscript": ("model.pt", _write_torchscript, _load_torchscript),
}


def verify_sequence(
    ex: SequenceExportable,
    runner: SequenceRunner,
    *,
    batch_sizes: Sequence[int],
    max_lengths: Sequence[int],
    tolerance: float,
    label: str,
    seed: int = 0,
) -> float:
    """Largest |eager model - artifact| over random padded batches; raises above ``tolerance``."""
    if not batch_sizes or min(batch_sizes) < 1 or not max_lengths or min(max_lengths) < 1:
        raise ExportError(f"verification needs batch sizes and max lengths >= 1 ({batch_sizes}, {max_lengths})")
    generator = torch.Generator().manual_seed(seed)
    worst = Worst()
    for batch in batch_sizes:
        for max_length in max_lengths:
            tokens, lengths = random_batch(batch, max_length, ex.vocab_size, generator)
            with torch.no_grad():
                expected = ex.model(tokens, lengths)
            worst.update(expected, runner(tokens, lengths), f"batch {batch}, max length {max_length}")
    if math.isnan(worst.error) or worst.error > tolerance:
        raise ExportVerificationError(
            f"verification failed for {label}: max |eager - exported| = {worst.error:.3g} at {worst.where}, over "
            f"the tolerance {tolerance:g}. Nothing was written."
        )
    return worst.error


def export_sequence(
    ex: SequenceExportable,
    *,
    name: str,
    repository: str | Path,
    format: str = "onnx",
    version: int | None = None,
    overwrite: bool = False,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    max_lengths: Sequence[int] = MAX_LENGTHS,
    tolerance: float = 1e-5,
    source: str = "",
    description: str = "",
    max_batch_size: int = 256,
    progress: Callable[[str], None] = lambda line: None,
) -> Path:
    """Export, verify and publish ``repository/name/version/`` like :func:`rnnserve.export.export`."""
    # The version and publishing rules are export()'s own; imported here because api imports this module.
    from rnnserve.export.api import _dtype_name, staging

    if format not in WRITERS:
        raise ExportError(f"unknown format {format!r}: choose one of {sorted(WRITERS)}")
    started = time.perf_counter()
    with staging(repository, name, version, overwrite) as (tmp, version):
        artifact, write, load = WRITERS[format]
        progress(f"exporting {ex.kind} to {format}")
        how = write(ex, tmp / artifact)
        progress(f"verifying batch sizes {list(batch_sizes)} x max lengths {list(max_lengths)} vs the eager model")
        runner = load(tmp / artifact, ex)
        label = f"{name} v{version} ({format})"
        error = verify_sequence(
            ex, runner, batch_sizes=batch_sizes, max_lengths=max_lengths, tolerance=tolerance, label=label
        )
        progress(f"verified: max abs error {error:.3g} <= tolerance {tolerance:g}")
        output = TensorSpec(name=ex.output.name, dtype=_dtype_name(ex.output), shape=list(ex.output.shape))
        ModelManifest(
            name=name,
            version=version,
            format=format,  # type: ignore[arg-type]
            artifact=artifact,
            kind="sequence",
            lengths_input=ex.lengths,
            inputs=[
                TensorSpec(name=ex.tokens, dtype="int64", shape=[-1, -1]),
                TensorSpec(name=ex.lengths, dtype="int64", shape=[-1]),
            ],
            outputs=[output],
            max_batch_size=max_batch_size,
            source=source,
            rnnserve_version=__version__,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            verification=Verification(
                steps=max(max_lengths), batch_sizes=list(batch_sizes), tolerance=tolerance, max_abs_error=error
            ),
            description=description or f"{ex.kind}; {how}",
        ).write(tmp)
    final = Path(repository) / name / str(version)
    progress(f"wrote {final} in {time.perf_counter() - started:.1f} s")
    return final
