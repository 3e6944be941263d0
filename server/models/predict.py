"""Predict: a batch of whole, variable-length sequences (padded, plus each one's length) in one call.

* A ``kind: sequence`` model (e.g. a bidirectional LSTM classifier) takes the padded batch and the lengths
  directly: one runtime call per chunk of at most ``max_batch_size`` sequences.
* A step model runs the sequences' steps from their initial state (the model's, or one given per sequence).
  Sequences are sorted by length, longest first, so at step ``t`` the ones still running are a prefix of the
  batch and each call takes just that prefix: a finished sequence's state is simply no longer fed, which
  keeps it frozen at its last real step, and its outputs past its length stay zero. An input's context window
  is part of each sequence's state, as in a session: each step's input is the new chunk, fed behind the
  window. Sequences whose unbatched parameters differ run in separate calls.

Neither touches sessions or the state slab, and the model calls run on this module's own worker threads (the
event loop only validates), beside the batcher's, so a long Predict does not hold up streaming steps.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from rnnserve.manifest import TensorSpec
from rnnserve.server.errors import FailedPrecondition, Internal, InvalidArgument, RnnServeError
from rnnserve.server.models.model import LoadedModel

log = logging.getLogger(__name__)
WORKERS = 2


class PredictRequest(NamedTuple):
    """A batch of padded sequences to run, as every API brings it."""

    inputs: Mapping[str, np.ndarray]
    """Sequence models: as the model takes them; step models: (batch, max_length, ...), padded past each length."""
    lengths: np.ndarray | None
    """int64[batch] (or int32), each sequence's length (None: not given, refused)."""
    initial_state: Mapping[str, np.ndarray]
    """Step models: states (batch, ...) to start from instead of the model's initial ones; any subset."""
    parameters: Mapping[str, np.ndarray]
    """Step models: per-sequence parameters (batch, ...) instead of their defaults; any subset."""


class PredictResult(NamedTuple):
    outputs: dict[str, np.ndarray]
    """Sequence models: (batch, ...); step models: (batch, max_length, ...), zeros past each length."""
    final_state: dict[str, np.ndarray]
    """Step models: each sequence's state after its last step, (batch, *per-session shape)."""


def refuse_sessions(model: LoadedModel) -> None:
    """Sessions step a model one timestep at a time; a sequence model only takes whole sequences."""
    if model.manifest.kind == "sequence":
        raise FailedPrecondition(f"model {model.key} takes whole sequences: use Predict")


class Predictor:
    """Validates Predict requests on the event loop and runs them on a small thread pool."""

    def __init__(self, workers: int = WORKERS) -> None:
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="predict")

    async def predict(self, model: LoadedModel, request: PredictRequest) -> PredictResult:
        job_type = _SequenceJob if model.manifest.kind == "sequence" else _StepsJob
        job = job_type(model, request)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, job.run)
        except RnnServeError:
            raise
        except Exception as exc:
            log.exception("model %s failed on a Predict of %d sequences", model.key, len(job.lengths))
            raise Internal(f"model {model.key} failed: {exc}") from exc

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


# --- validation -------------------------------------------------------------------------------------------


def _check_lengths(model: LoadedModel, lengths: np.ndarray | None) -> np.ndarray:
    """The lengths as int64 (a client may send int32, as the model's own lengths input may be: the KServe
    metadata shows that input's dtype)."""
    if lengths is None or lengths.dtype not in (np.int64, np.int32) or lengths.ndim != 1 or len(lengths) == 0:
        got = "nothing" if lengths is None else f"{lengths.dtype.name}{list(lengths.shape)}"
        raise InvalidArgument(
            f"Predict on model {model.key} needs 'lengths': int64[batch] with one length per sequence, got {got}"
        )
    return lengths.astype(np.int64, copy=False)


def _check_range(model: LoadedModel, lengths: np.ndarray, max_length: int) -> None:
    bad = np.flatnonzero((lengths < 1) | (lengths > max_length))
    if bad.size:
        i = int(bad[0])
        raise InvalidArgument(
            f"lengths[{i}] = {int(lengths[i])} of model {model.key}: each length must be within [1, {max_length}] "
            "(the padded time axis)"
        )


class _Job:
    """One validated Predict request; ``run`` computes it on a worker thread."""

    def __init__(self, model: LoadedModel, request: PredictRequest) -> None:
        self.model = model
        self.lengths = _check_lengths(model, request.lengths)
        self._check(request)

    def _check(self, request: PredictRequest) -> None:
        raise NotImplementedError

    def run(self) -> PredictResult:
        raise NotImplementedError


class _SequenceJob(_Job):
    """A kind-sequence model: the padded inputs and the lengths go to the model as they are."""

    def _check(self, request: PredictRequest) -> None:
        model, inputs = self.model, request.inputs
        if request.initial_state or request.parameters:
            raise InvalidArgument(f"model {model.key} takes whole sequences: it has no state or parameters to give")
        m = model.manifest
        self.specs = [t for t in m.inputs if t.name != m.lengths_input]
        model.checks.names(
            "input", inputs, [(t.name, f"{t.dtype}{_model_shape(t)}") for t in self.specs], " and the lengths"
        )
        batch = len(self.lengths)
        max_length = 0
        for spec in self.specs:
            arr = inputs[spec.name]
            shape = tuple(batch if i == spec.batch_axis else d for i, d in enumerate(spec.shape))
            model.checks.tensor("input", spec.name, arr, np.dtype(spec.dtype), shape, lead="batch")
            # The padded time axis: where the manifest says, else the one after the batch axis.
            time_axis = spec.time_axis if spec.time_axis is not None else spec.batch_axis + 1
            if arr.ndim > time_axis:
                max_length = max(max_length, arr.shape[time_axis])
        _check_range(model, self.lengths, max_length or int(self.lengths.max()))
        self.inputs = {t.name: inputs[t.name] for t in self.specs}
        # Fed in the dtype the graph declares (ONNX's own RNN operators take int32 sequence_lens).
        self.lengths_dtype = np.dtype(next(t.dtype for t in m.inputs if t.name == m.lengths_input))

    def run(self) -> PredictResult:
        model = self.model
        m = model.manifest
        parts: dict[str, list[np.ndarray]] = {t.name: [] for t in m.outputs}
        for rows in _chunks(np.arange(len(self.lengths)), model.max_batch_size):
            feeds = {t.name: np.take(self.inputs[t.name], rows, axis=t.batch_axis) for t in self.specs}
            feeds[str(m.lengths_input)] = self.lengths[rows].astype(self.lengths_dtype)
            feeds.update(model.constants)
            out = model.runtime.run(feeds)
            for spec in m.outputs:
                parts[spec.name].append(_batch_first(model, spec, out[spec.name], len(rows)))
        return PredictResult({k: np.concatenate(v) for k, v in parts.items()}, {})


class _StepsJob(_Job):
    """A step model: each sequence's steps from its initial state, state frozen past its length."""

    def _check(self, request: PredictRequest) -> None:
        model, inputs = self.model, request.inputs
        m = model.manifest
        batch = len(self.lengths)
        model.checks.names("input", inputs, [(t.name, f"{t.dtype}{_steps_shape(t)}") for t in m.inputs])
        max_length = 0
        for spec in m.inputs:
            arr = inputs[spec.name]
            want = (batch, max_length or -1, *spec.session_shape)
            model.checks.tensor("input", spec.name, arr, np.dtype(spec.dtype), want, lead="batch, time")
            max_length = arr.shape[1]
        _check_range(model, self.lengths, max_length)
        self.max_length = max_length
        self.inputs = {t.name: inputs[t.name] for t in m.inputs}
        self.states = model.checks.states(request.initial_state, model.initial_state, partial=True, batch=batch)
        self.parameters = model.checks.parameters(request.parameters, model.parameter_defaults, batch=batch)

    def run(self) -> PredictResult:
        model = self.model
        m = model.manifest
        batch = len(self.lengths)
        outputs: dict[str, np.ndarray] = {}
        specs = model.state_specs  # the model's states, then its inputs' context windows
        n_states = len(m.states)
        final = [np.empty((batch, *s.session_shape), s.dtype) for s in specs]
        # Longest first: the sequences still running at any step are a prefix of the (sorted) chunk.
        order = np.argsort(-self.lengths, kind="stable")
        for rows in self._chunks(order):
            lengths = self.lengths[rows]
            # Model layout (batch axis where the manifest puts it), one row per sequence of the chunk.
            states = [np.moveaxis(v[rows], 0, s.batch_axis) for s, v in zip(specs, self.states, strict=True)]
            params = [
                np.moveaxis(v[rows], 0, p.batch_axis) if p.batched else v[rows[0], ...]
                for p, v in zip(m.parameters, self.parameters, strict=True)
            ]
            for t in range(int(lengths[0])):
                live = int(np.count_nonzero(lengths > t))
                feeds = {s.name: _layout(self.inputs[s.name][rows[:live], t], s) for s in m.inputs}
                for w, window in zip(m.windows, states[n_states:], strict=True):
                    feeds[w.name] = w.extend(_rows(window, w, live), feeds[w.name])
                slab_feeds = {s.name: _rows(v, s, live) for s, v in zip(m.states, states, strict=False)}
                slab_feeds |= {
                    p.name: _rows(v, p, live) if p.batched else v for p, v in zip(m.parameters, params, strict=True)
                }
                feeds |= _to_device(model, slab_feeds)
                feeds.update(model.constants)
                out = model.runtime.run(feeds)
                for spec, state in zip(m.states, states, strict=False):
                    new = _host(out[spec.output])
                    if new.shape[spec.batch_axis] != live or new.dtype != state.dtype:
                        raise Internal(
                            f"model {model.key} returned state '{spec.output}' of shape {list(new.shape)} "
                            f"{new.dtype} for a batch of {live}; the manifest declares {spec.shape} {spec.dtype}"
                        )
                    state[(slice(None),) * spec.batch_axis + (slice(0, live),)] = new
                for w, window in zip(m.windows, states[n_states:], strict=True):
                    window[(slice(None),) * w.batch_axis + (slice(0, live),)] = w.tail(feeds[w.name])
                for out_spec in m.outputs:
                    y = _batch_first(model, out_spec, out[out_spec.name], live)
                    if out_spec.name not in outputs:
                        outputs[out_spec.name] = np.zeros((batch, self.max_length, *y.shape[1:]), y.dtype)
                    outputs[out_spec.name][rows[:live], t] = y
            for spec, state, dest in zip(specs, states, final, strict=True):
                dest[rows] = np.moveaxis(state, spec.batch_axis, 0)
        return PredictResult(outputs, {s.name: v for s, v in zip(specs, final, strict=True)})

    def _chunks(self, order: np.ndarray) -> list[np.ndarray]:
        """The model calls' rows, in ``order``: at most ``max_batch_size`` each, and, for a model with
        unbatched parameters (fed one value per call), only sequences with equal values in one."""
        m = self.model.manifest
        unbatched = [v for p, v in zip(m.parameters, self.parameters, strict=True) if not p.batched]
        if not unbatched:
            return _chunks(order, self.model.max_batch_size)
        groups: dict[bytes, list[int]] = {}
        for row in order.tolist():
            groups.setdefault(b"".join(np.ascontiguousarray(v[row]).tobytes() for v in unbatched), []).append(row)
        return [c for g in groups.values() for c in _chunks(np.asarray(g), self.model.max_batch_size)]


# --- helpers ------------------------------------------------------------------------------------------------


def _chunks(rows: np.ndarray, size: int) -> list[np.ndarray]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def _rows(value: np.ndarray, spec: TensorSpec, n: int) -> np.ndarray:
    """The first ``n`` rows along the spec's batch axis (contiguous: onnxruntime wants C order)."""
    return np.ascontiguousarray(value[(slice(None),) * spec.batch_axis + (slice(0, n),)])


def _layout(batch_first: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Rows stacked on axis 0, moved to the spec's batch axis."""
    return np.ascontiguousarray(np.moveaxis(batch_first, 0, spec.batch_axis))


def _batch_first(model: LoadedModel, spec: TensorSpec, value: np.ndarray, n: int) -> np.ndarray:
    value = np.asarray(value)
    if value.ndim <= spec.batch_axis or value.shape[spec.batch_axis] != n:
        raise Internal(f"model {model.key} returned output '{spec.name}' of shape {list(value.shape)} for {n} rows")
    return np.moveaxis(value, spec.batch_axis, 0) if spec.batch_axis else value


def _to_device(model: LoadedModel, feeds: dict[str, np.ndarray]) -> dict:
    # On a GPU the runtimes take states (and parameters) as CUDA tensors, as the batcher feeds them from its slab.
    if model.runtime.device != "cuda" or not feeds:
        return feeds
    import torch

    return {k: torch.as_tensor(np.ascontiguousarray(v), device="cuda") for k, v in feeds.items()}


def _host(value) -> np.ndarray:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


def _model_shape(spec: TensorSpec) -> str:
    dims = ("batch" if i == spec.batch_axis else ("*" if d == -1 else str(d)) for i, d in enumerate(spec.shape))
    return "[" + ", ".join(dims) + "]"


def _steps_shape(spec: TensorSpec) -> str:
    return "[" + ", ".join(["batch", "time", *("*" if d == -1 else str(d) for d in spec.session_shape)]) + "]"
