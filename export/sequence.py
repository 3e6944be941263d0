"""Whole-sequence models: ``forward(inputs (B, T, ...), lengths (B,) int64) -> output``.

Not every recurrent model can stream: a bidirectional one needs the whole sequence. Such a model is exported
as a *sequence model* (manifest ``kind: "sequence"``), served by the ``Predict`` RPC only. The artifact takes
a padded, batch-first batch (token ids ``(B, T)`` int64 through an embedding, or float features
``(B, T, F)``) and each sequence's length, with dynamic batch and time axes.

    ex = adapt_sequence(model, embedding=model.embedding, rnn=model.rnn, head=head)
    export(ex, name="bilstm", repository="model_repository")   # verified against model(tokens, lengths)
    ex = adapt_sequence(nn.GRU(8, 16, bidirectional=True))      # per-step outputs over float features

:func:`adapt_sequence` builds the exportable module from the model's own parts (see
:mod:`rnnserve.export.padded` for why ``pack_padded_sequence`` is replaced); its oracle is the original
model, ``pack_padded_sequence`` and all (for a bare recurrent module, the module on the packed sequences).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn

from rnnserve import __version__
from rnnserve.export.errors import ExportError, ExportVerificationError
from rnnserve.export.padded import PaddedRecurrent, PaddedSequence
from rnnserve.export.quiet import quiet
from rnnserve.export.step import TensorInfo
from rnnserve.export.verify import Worst
from rnnserve.manifest import DType, ModelManifest, TensorSpec, Verification

ONNX_OPSET = 17
# Verification runs every batch size at every max length; none of these is the T traced at export (6).
BATCH_SIZES = (1, 4, 7)
MAX_LENGTHS = (1, 5, 17)
SequenceRunner = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SequenceExportable:
    """A whole-sequence model ready to export.

    ``module`` is what gets exported (scriptable, ``forward(inputs, lengths)``); ``model`` is the eager oracle
    with the same call (e.g. the original model with ``pack_padded_sequence``). With ``vocab_size`` the input
    is token ids ``(B, T)`` and verification draws them in ``[1, vocab_size)``; else it is float features
    ``(B, T, features)`` drawn from a normal distribution. Either is padded with 0 past each length.
    ``output`` is one position's output: ``(B, ...)`` for the whole sequence, or, with ``per_step``, at each
    step, the artifact returning ``(B, T, ...)`` (compared with the oracle at the steps within each length).
    """

    module: nn.Module
    model: nn.Module
    vocab_size: int
    output: TensorInfo
    kind: str = "sequence model"
    input: str = "tokens"
    lengths: str = "lengths"
    features: int = 0
    dtype: torch.dtype = torch.float32
    """The float features' dtype (without ``vocab_size``)."""
    per_step: bool = False

    def input_spec(self) -> TensorSpec:
        """The padded input as the manifest declares it: batch and time axes free."""
        if self.vocab_size:
            return TensorSpec(name=self.input, dtype="int64", shape=[-1, -1])
        return TensorSpec(name=self.input, dtype=_servable_dtype(self.dtype, self.input), shape=[-1, -1, self.features])

    def output_spec(self) -> TensorSpec:
        shape = [-1, -1, *self.output.shape[1:]] if self.per_step else list(self.output.shape)
        return TensorSpec(
            name=self.output.name, dtype=_servable_dtype(self.output.dtype, self.output.name), shape=shape
        )

    def random_inputs(
        self, batch: int, max_length: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A random padded batch and its lengths (unsorted, holding 1 and ``max_length``)."""
        if self.vocab_size:
            return random_batch(batch, max_length, self.vocab_size, generator)
        return random_features(batch, max_length, self.features, generator, self.dtype)


def adapt_sequence(
    model: nn.Module,
    *,
    rnn: nn.RNNBase | None = None,
    embedding: nn.Embedding | None = None,
    head: nn.Module | None = None,
    per_step: bool | None = None,
    output: str | None = None,
) -> SequenceExportable:
    """A whole-sequence model: ``head`` over ``rnn`` run on the padded ``embedding(tokens)`` or float features.

    ``model(inputs, lengths)`` is the eager oracle: it must compute exactly that (typically with
    ``pack_padded_sequence(..., enforce_sorted=False)``), where ``inputs`` is batch-first. ``head`` holds the
    layers after the recurrence, e.g. ``nn.Sequential(model.fc1, nn.ReLU(), model.fc2, nn.Sigmoid())``; it
    takes the last layer's final hidden states of both directions, concatenated, or with ``per_step=True`` the
    last layer's output at every step (``(B, T, directions * hidden)``; zeros past each length). Without
    ``embedding`` the input is float features ``x`` of ``(B, T, rnn.input_size)``.

    ``model`` may be the recurrent module itself (``rnn`` left out): its oracle is the module on the packed
    sequences, and ``per_step`` defaults to True (its per-step outputs, as ``pad_packed_sequence`` gives them).
    ``output`` names the output: ``y`` by default, ``prob`` for an embedding classifier.
    """
    bare = rnn is None
    rnn = cast(nn.RNNBase, model) if rnn is None else rnn
    if not isinstance(rnn, nn.RNNBase):
        what = "model (given without rnn=)" if bare else "rnn"
        raise ExportError(f"{what} must be an nn.RNN, nn.LSTM or nn.GRU, got {type(rnn).__name__}")
    if embedding is not None and not isinstance(embedding, nn.Embedding):
        raise ExportError(f"embedding must be an nn.Embedding, got {type(embedding).__name__}")
    per_step = bare if per_step is None else per_step
    oracle = PackedReference(rnn, embedding, head, per_step) if bare else model
    for m in (oracle, embedding, rnn, head):
        if m is not None:
            m.eval()
    module = PaddedSequence(embedding, PaddedRecurrent(rnn), head, per_step).eval()
    dtype = cast(torch.Tensor, rnn.weight_ih_l0).dtype  # nn.Module types attributes as Tensor | Module
    features = rnn.input_size if embedding is None else 0
    vocab_size = embedding.num_embeddings if embedding is not None else 0
    if output is None:
        output = "prob" if embedding is not None and not per_step else "y"
    probe_ex = SequenceExportable(
        module, oracle, vocab_size, TensorInfo(output, (-1, 1)), features=features, dtype=dtype
    )
    with torch.no_grad():
        probe = module(*probe_ex.random_inputs(2, 3, torch.Generator().manual_seed(0)))
    if probe.dim() < (3 if per_step else 2) or probe.shape[0] != 2 or (per_step and probe.shape[1] != 3):
        expect = "(batch, time, ...)" if per_step else "(batch, ...)"
        raise ExportError(f"the sequence module returned {list(probe.shape)} at batch 2, time 3; expected {expect}")
    position = probe.shape[2:] if per_step else probe.shape[1:]
    kind = f"{type(embedding).__name__}({embedding.num_embeddings}, {embedding.embedding_dim}) + " if embedding else ""
    kind += f"{'bidirectional ' if rnn.bidirectional else ''}{type(rnn).__name__}({rnn.input_size}, "
    kind += f"{rnn.hidden_size}, num_layers={rnn.num_layers})" + (f" + {type(head).__name__} head" if head else "")
    kind += " over float features" if embedding is None else ""
    kind += ", per-step outputs" if per_step else ""
    return replace(
        probe_ex,
        output=TensorInfo(output, (-1, *position), dtype=probe.dtype),
        kind=kind,
        input="tokens" if embedding is not None else "x",
        per_step=per_step,
    )


class PackedReference(nn.Module):
    """The eager oracle of a bare recurrent module: ``forward(inputs (B, T, ...), lengths)`` runs it on
    ``pack_padded_sequence`` and returns what :class:`PaddedSequence` computes from the same parts."""

    def __init__(self, rnn: nn.RNNBase, embedding: nn.Module | None, head: nn.Module | None, per_step: bool) -> None:
        super().__init__()
        self.rnn, self.embedding, self.head, self.per_step = rnn, embedding, head, per_step

    def forward(self, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.embedding(inputs) if self.embedding is not None else inputs
        # A PackedSequence is the same whatever the module's batch_first, so time-major modules need nothing.
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not supported with oneDNN.*")
            out, hidden = self.rnn(packed)
        if self.per_step:
            y, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        else:
            h = hidden[0] if isinstance(hidden, tuple) else hidden
            y = torch.cat((h[-2], h[-1]), 1) if self.rnn.bidirectional else h[-1]
        return self.head(y) if self.head is not None else y


def random_lengths(batch: int, max_length: int, generator: torch.Generator) -> torch.Tensor:
    """Lengths in ``[1, max_length]``, unsorted, holding 1 and ``max_length`` (where the batch has room)."""
    lengths = torch.randint(1, max_length + 1, (batch,), generator=generator)
    lengths[torch.randperm(batch, generator=generator)[:2]] = torch.tensor([max_length, 1])[: min(batch, 2)]
    return lengths


def random_features(
    batch: int, max_length: int, features: int, generator: torch.Generator, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normal float features ``(batch, max_length, features)``, 0 past each length, and the lengths."""
    lengths = random_lengths(batch, max_length, generator)
    x = torch.randn(batch, max_length, features, generator=generator).to(dtype)
    x[torch.arange(max_length).unsqueeze(0) >= lengths.unsqueeze(1)] = 0
    return x, lengths


def random_batch(
    batch: int, max_length: int, vocab_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids in ``[1, vocab_size)``, 0 past each length; lengths unsorted, holding 1 and ``max_length``."""
    lengths = random_lengths(batch, max_length, generator)
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
    example = ex.random_inputs(3, 6, torch.Generator().manual_seed(0))
    with quiet() as log, torch.no_grad():
        try:
            # The legacy exporter turns the scripted time loop into an ONNX Loop: any T works.
            torch.onnx.export(
                _scripted(ex),
                example,
                str(path),
                dynamo=False,
                input_names=[ex.input, ex.lengths],
                output_names=[ex.output.name],
                dynamic_axes={
                    ex.input: {0: "batch", 1: "time"},
                    ex.lengths: {0: "batch"},
                    ex.output.name: {0: "batch", 1: "time"} if ex.per_step else {0: "batch"},
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

    def run(inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        feeds = {ex.input: inputs.numpy(), ex.lengths: lengths.numpy()}
        return torch.from_numpy(np.asarray(session.run([ex.output.name], feeds)[0]))

    return run


def _load_torchscript(path: Path, ex: SequenceExportable) -> SequenceRunner:
    module = torch.jit.load(str(path), map_location="cpu").eval()

    def run(inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(inputs, lengths)

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
    """Largest |eager model - artifact| over random padded batches; raises above ``tolerance``.

    Per-step outputs count within each length; past it the artifact must give zeros."""
    if not batch_sizes or min(batch_sizes) < 1 or not max_lengths or min(max_lengths) < 1:
        raise ExportError(f"verification needs batch sizes and max lengths >= 1 ({batch_sizes}, {max_lengths})")
    generator = torch.Generator().manual_seed(seed)
    worst = Worst()
    for batch in batch_sizes:
        for max_length in max_lengths:
            inputs, lengths = ex.random_inputs(batch, max_length, generator)
            with torch.no_grad():
                expected = ex.model(inputs, lengths)
            if ex.per_step and expected.dim() >= 2 and expected.shape[1] == max_length:
                valid = torch.arange(max_length).unsqueeze(0) < lengths.unsqueeze(1)
                valid = valid.reshape(*valid.shape, *[1] * (expected.dim() - 2))
                expected = torch.where(valid, expected, torch.zeros_like(expected))
            worst.update(expected, runner(inputs, lengths), f"batch {batch}, max length {max_length}")
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
    from rnnserve.export.api import staging

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
        ModelManifest(
            name=name,
            version=version,
            format=format,  # type: ignore[arg-type]
            artifact=artifact,
            kind="sequence",
            lengths_input=ex.lengths,
            inputs=[ex.input_spec(), TensorSpec(name=ex.lengths, dtype="int64", shape=[-1])],
            outputs=[ex.output_spec()],
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


def _servable_dtype(dtype: torch.dtype, name: str) -> DType:
    # The dtype table is export()'s own; imported here because api imports this module.
    from rnnserve.export.api import _dtype_name

    return _dtype_name(TensorInfo(name, (-1,), dtype=dtype))
