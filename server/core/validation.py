"""The checks a request's tensors pass against a model, whichever API brings them, in one wording.

Every refusal names the tensor, what was expected (dtype, shape with ``*`` for a free dimension, and what the
leading axes mean) and what came, so a client can fix its call. The native API, Predict and the KServe codec
all call these; the KServe codec passes Triton's wording (``Wording``) for the few messages Triton clients
match on. No grpc here: a refusal is an ``InvalidArgument``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from rnnserve.manifest import ModelManifest, TensorSpec
from rnnserve.server.errors import InvalidArgument, echo_names

Shape = tuple[int, ...]
"""A tensor's expected shape; -1: any size."""

_SUM = np.add.reduce


def all_finite(arr: np.ndarray) -> bool:
    """No NaN or Inf in a float array. One C reduction: the float64 sum of finite values is finite unless it
    overflows (only float64 inputs can), and any NaN or Inf makes it non-finite; only then is each element
    looked at. A step's tensor is small, so this is about a third cheaper than ``np.isfinite(arr).all()``."""
    if math.isfinite(_SUM(arr, None, np.float64)):
        return True
    return bool(np.isfinite(arr).all())


def shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join("*" if d == -1 else str(d) for d in shape) + "]"


class Wording:
    """How a refusal of a tensor's dtype or shape, or of an output name, reads. This one is rnnserve's own; an
    API whose clients match on another server's words (KServe: Triton's) passes a subclass."""

    def dtype(self, kind: str, name: str, checks: TensorChecks, expected: np.dtype, got: np.dtype) -> str:
        return f"{kind} '{name}' of model {checks.key}: expected dtype {expected.name}, got {got.name}"

    def shape(self, kind: str, name: str, checks: TensorChecks, expected: Shape, got: Shape, lead: str) -> str:
        what = f"[{lead}, ...per-session shape]" if lead else "per-session shape, no batch axis"
        return f"{kind} '{name}' of model {checks.key}: expected shape {shape_text(expected)} ({what}), got {list(got)}"

    def unknown_outputs(self, checks: TensorChecks, unknown: list[str]) -> str:
        return f"model {checks.key} has no output {echo_names(unknown)}; its outputs are {checks.output_names}"


NATIVE = Wording()


def _spec(spec: TensorSpec) -> tuple[str, np.dtype, Shape]:
    return spec.name, np.dtype(spec.dtype), tuple(spec.session_shape)


class TensorChecks:
    """One model's request checks: its inputs, states and parameters by name, dtype and per-session shape,
    its output names, and whether NaN/Inf are refused. Built once per loaded model."""

    def __init__(self, manifest: ModelManifest, key: str):
        self.key = key  # "name:version", as messages name the model
        self.name = manifest.name
        self.input_specs = [_spec(t) for t in manifest.inputs]
        self.state_specs = [_spec(s) for s in manifest.session_states]  # with the inputs' context windows
        self.parameter_specs = [_spec(p) for p in manifest.parameters]
        self.output_names = [o.name for o in manifest.outputs]
        self.refuse_nonfinite = not manifest.allow_nonfinite

    # ---- one tensor -------------------------------------------------------------------------------------
    def tensor(
        self,
        kind: str,
        name: str,
        arr: np.ndarray,
        dtype: np.dtype,
        shape: Shape,
        *,
        lead: str = "",
        finite: bool = True,
        wording: Wording = NATIVE,
    ) -> None:
        """``arr`` (the ``kind`` tensor ``name``) has ``dtype`` and ``shape`` (``lead``: what its leading axes
        before the per-session shape are, for the message) and, with ``finite``, no NaN or Inf."""
        if arr.dtype != dtype:
            raise InvalidArgument(wording.dtype(kind, name, self, dtype, arr.dtype))
        if arr.ndim != len(shape) or any(e != -1 and e != g for e, g in zip(shape, arr.shape, strict=True)):
            raise InvalidArgument(wording.shape(kind, name, self, shape, arr.shape, lead))
        if finite and self.refuse_nonfinite and arr.dtype.kind == "f" and not all_finite(arr):
            raise self.nonfinite(kind, name)

    def nonfinite(self, kind: str, name: str, where: str = "") -> InvalidArgument:
        """The refusal of a ``kind`` tensor holding NaN or Inf (``where``: which row of it, when stacked)."""
        return InvalidArgument(
            f"{kind} '{name}' of model {self.key}{where} holds NaN or Inf, which this model does not accept "
            "(set allow_nonfinite in its manifest to allow them)"
        )

    def names(
        self, kind: str, given: Mapping[str, object], expected: Sequence[tuple[str, str]], more: str = ""
    ) -> None:
        """``given`` holds exactly the ``kind`` tensors ``expected`` ((name, dtype and shape text) pairs);
        ``more``: what else the request carries besides them, for the message."""
        if len(given) != len(expected) or any(n not in given for n, _ in expected):
            listed = ", ".join(f"'{n}' {text}" for n, text in expected)
            raise InvalidArgument(
                f"model {self.key} takes {len(expected)} {kind} tensor(s): {listed}{more}; "
                f"got {echo_names(sorted(given))}"
            )

    # ---- a step's inputs and outputs --------------------------------------------------------------------
    def inputs(
        self,
        given: Mapping[str, np.ndarray],
        lead_size: int = 0,
        *,
        lead: str = "num_steps",
        finite: bool = True,
        wording: Wording = NATIVE,
    ) -> dict[str, np.ndarray]:
        """One step's (or chunk's, or stacked rows') data inputs, returned in manifest order.

        ``lead_size``: the size of a leading axis before each per-session shape (a chunk's steps, a StepBatch's
        rows; -1: any size; 0: no leading axis), which the messages call ``lead``. ``finite=False`` leaves
        the NaN/Inf check to the caller (a StepBatch refuses only its bad rows)."""
        specs = self.input_specs
        if len(given) != len(specs) or any(n not in given for n, _, _ in specs):
            self.names("input", given, [(n, f"{d.name}{shape_text(s)}") for n, d, s in specs])
        checked = {}
        lead_shape = (lead_size,) if lead_size else ()
        for name, dtype, shape in specs:
            arr = given[name]
            self.tensor(
                "input",
                name,
                arr,
                dtype,
                lead_shape + shape,
                lead=lead if lead_size else "",
                finite=finite,
                wording=wording,
            )
            checked[name] = arr
        return checked

    def finite(self, inputs: Mapping[str, np.ndarray]) -> None:
        """The NaN/Inf check alone, for inputs whose names, dtypes and shapes were matched already."""
        if self.refuse_nonfinite:
            for name, arr in inputs.items():
                if arr.dtype.kind == "f" and not all_finite(arr):
                    raise self.nonfinite("input", name)

    def nonfinite_rows(self, inputs: Mapping[str, np.ndarray]) -> dict[int, str]:
        """Rows (leading axis) of stacked inputs that hold NaN or Inf, with the first such input's name."""
        if not self.refuse_nonfinite:
            return {}
        bad: dict[int, str] = {}
        for name, arr in inputs.items():
            if arr.dtype.kind == "f" and arr.size:
                rows = np.flatnonzero(~np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1))
                for row in rows.tolist():
                    bad.setdefault(row, name)
        return bad

    def outputs(self, wanted: Sequence[str], wording: Wording = NATIVE) -> list[str]:
        """The outputs a request asks for (empty: all), refused before its step is queued when one is unknown."""
        if wanted:
            unknown = [w for w in wanted if w not in self.output_names]
            if unknown:
                raise InvalidArgument(wording.unknown_outputs(self, unknown))
        return list(wanted)

    # ---- a session's (or each sequence's) states and parameters -----------------------------------------
    def states(
        self, given: Mapping[str, np.ndarray], initial: Sequence[np.ndarray], *, partial: bool, batch: int = 0
    ) -> list[np.ndarray]:
        """User-given state tensors in manifest order; missing ones (when ``partial``) take ``initial``'s.
        ``batch``: one per sequence of a Predict, stacked on a leading axis of that size."""
        return self._per_session("state", self.state_specs, given, initial, batch, partial=partial)

    def parameters(
        self, given: Mapping[str, np.ndarray], defaults: Sequence[np.ndarray | None], *, batch: int = 0
    ) -> list[np.ndarray]:
        """A session's parameters in manifest order; missing ones take their default (refused without one).
        ``batch``: as for ``states``."""
        return self._per_session("parameter", self.parameter_specs, given, defaults, batch)

    def _per_session(
        self,
        kind: str,
        specs: list[tuple[str, np.dtype, Shape]],
        given: Mapping[str, np.ndarray],
        defaults: Sequence[np.ndarray | None],
        batch: int,
        *,
        partial: bool = True,
    ) -> list[np.ndarray]:
        unknown = sorted(set(given) - {n for n, _, _ in specs})
        if unknown:
            names = [n for n, _, _ in specs]
            raise InvalidArgument(
                f"model {self.key} has no {kind} named {echo_names(unknown)}; its {kind}s are {names}"
            )
        values = []
        for (name, dtype, shape), default in zip(specs, defaults, strict=True):
            if name in given:
                arr = given[name]
                self.tensor(kind, name, arr, dtype, (batch, *shape) if batch else shape, lead="batch" if batch else "")
                values.append(arr)
            elif not partial:
                raise InvalidArgument(f"{kind} '{name}' is missing: expected {dtype.name}{shape_text(shape)}")
            elif default is None:
                when = "for each sequence" if batch else "at session open"
                raise InvalidArgument(
                    f"model {self.key} needs {kind} '{name}' ({dtype.name}{shape_text(shape)}) {when}"
                )
            else:
                values.append(np.broadcast_to(default, (batch, *default.shape)) if batch else default)
        return values
