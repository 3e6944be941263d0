"""A loaded model version: manifest, runtime, state slab, batcher, and the checks every request passes."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rnnserve.manifest import Durability, ModelManifest, TensorSpec
from rnnserve.server.errors import InvalidArgument, echo_names
from rnnserve.server.runtime import Runtime
from rnnserve.server.scheduling.batcher import Batcher
from rnnserve.server.slab import DeviceStateSlab, StateSlab

if TYPE_CHECKING:
    from rnnserve.server.durability import Persistence
    from rnnserve.server.sessions import Session


def all_finite(arr: np.ndarray) -> bool:
    """No NaN or Inf in a float array. One C reduction: the float64 sum of finite values is finite unless it
    overflows (only float64 inputs can), and any NaN or Inf makes it non-finite; only then is each element
    looked at. A step's tensor is small, so this is about a third cheaper than ``np.isfinite(arr).all()``."""
    if math.isfinite(_SUM(arr, None, np.float64)):
        return True
    return bool(np.isfinite(arr).all())


_SUM = np.add.reduce


def _shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join("*" if d == -1 else str(d) for d in shape) + "]"


class LoadedModel:
    def __init__(
        self,
        manifest: ModelManifest,
        version_dir: Path,
        runtime: Runtime,
        *,
        max_batch_size: int | None = None,
        max_queue_delay_us: int | None = None,
        durability: str | None = None,
        concurrent_batches: int = 1,
        inline_budget_us: int = 1000,
    ):
        self.manifest = manifest
        self.concurrent_batches = concurrent_batches
        self.inline_budget_us = inline_budget_us
        # The manifest's durability, else the server's default (--durability), else none.
        self.durability: Durability = (
            manifest.durability
            if durability is None or "durability" in manifest.model_fields_set
            else Durability(mode=durability)  # type: ignore[arg-type]
        )
        self.name = manifest.name
        self.version = manifest.version
        self.version_text = str(manifest.version)  # as the KServe API writes it, once
        self.key = f"{manifest.name}:{manifest.version}"
        self.version_dir = version_dir
        self.runtime = runtime
        self.initial_state = [s.initial_value(version_dir) for s in manifest.states]
        self.constants = {c.name: c.array(version_dir) for c in manifest.constants}
        # Per-session parameters sit in the slab after the states: one gather feeds both.
        self.parameter_defaults = [p.default_value() for p in manifest.parameters]
        slab_specs = [*manifest.states, *manifest.parameters]
        slab_initial = self.initial_state + [
            d if d is not None else np.zeros(p.session_shape, p.dtype)
            for p, d in zip(manifest.parameters, self.parameter_defaults, strict=True)
        ]
        # On a GPU the state stays on the device between steps; the runtime then takes and returns device tensors.
        self.slab = (
            DeviceStateSlab(slab_specs, slab_initial, runtime.device)
            if runtime.device == "cuda"
            else StateSlab(slab_specs, slab_initial)
        )
        self.max_batch_size = max_batch_size or manifest.max_batch_size
        if manifest.max_batch_size == 1:
            # A model whose batch is fixed at 1 serves its sessions one per call, whatever the server says.
            self.max_batch_size = 1
        self.max_queue_delay_us = manifest.max_queue_delay_us if max_queue_delay_us is None else max_queue_delay_us
        self.batcher: Batcher | None = None  # created on the event loop by start()
        # The server's session store policy (server/durability.py); None: sessions are never written.
        self.persistence: Persistence | None = None
        self.open_sessions = 0
        # Set when a reload or unload retires this object: called once its last session is gone, to stop it.
        self.on_idle: Callable[[LoadedModel], None] | None = None
        self._info_pb = None  # the transport's ModelInfo message for this model, built once
        self._input_checks = [(t.name, np.dtype(t.dtype), t.session_shape) for t in manifest.inputs]
        self._state_checks = [(s.name, np.dtype(s.dtype), s.session_shape) for s in manifest.states]
        self._check_finite = not manifest.allow_nonfinite

    def self_check(self) -> None:
        """Call the model once on zeros at batch 1 (and 2 where it batches) and compare every result with the
        manifest, so a config that disagrees with its model fails at load, with a message, not at a step."""
        m = self.manifest
        for n in (1, 2) if self.max_batch_size > 1 else (1,):
            feeds: dict[str, np.ndarray] = {}
            for spec in m.inputs:
                shape = [n if i == spec.batch_axis else (1 if d == -1 else d) for i, d in enumerate(spec.shape)]
                feeds[spec.name] = (
                    np.ones(shape, spec.dtype) if spec.name == m.lengths_input else np.zeros(shape, spec.dtype)
                )
            for spec, value in zip(self.slab.specs, self.slab.initial, strict=True):
                feeds[spec.name] = np.stack([value] * n, axis=spec.batch_axis)
            feeds.update(self.constants)
            if self.runtime.device == "cuda":
                import torch

                for spec in self.slab.specs:
                    feeds[spec.name] = torch.as_tensor(feeds[spec.name], device="cuda")
            try:
                out = self.runtime.run(feeds)
            except Exception as exc:
                raise ValueError(f"calling the model at batch {n} failed: {type(exc).__name__}: {exc}") from exc
            expected = [(t.output if hasattr(t, "output") else t.name, t) for t in [*m.outputs, *m.states]]
            for name, spec in expected:
                value = out[name]
                shape = list(value.shape)
                want = [n if i == spec.batch_axis else d for i, d in enumerate(spec.shape)]
                dtype = str(value.dtype).removeprefix("torch.")
                if (
                    dtype != spec.dtype
                    or len(shape) != len(want)
                    or any(w not in (-1, g) for w, g in zip(want, shape, strict=True))
                ):
                    raise ValueError(
                        f"output '{name}' at batch {n} is {dtype}{shape}, the manifest says {spec.dtype}"
                        f"{['*' if d == -1 else d for d in want]}"
                    )

    def start(self) -> None:
        self.batcher = Batcher(
            self,
            max_batch_size=self.max_batch_size,
            max_queue_delay_us=self.max_queue_delay_us,
            concurrency=self.concurrent_batches,
            inline_budget_ns=self.inline_budget_us * 1000,
        )
        self.batcher.start()

    async def stop(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()

    # ---- sessions ---------------------------------------------------------------------------------------
    def acquire(self, state: list[np.ndarray] | None = None, parameters: list[np.ndarray] | None = None) -> int:
        """A slab slot holding the session's state (default: initial) and parameters (default: defaults)."""
        values = None
        if state is not None or parameters is not None:
            values = (state if state is not None else self.initial_state) + (
                parameters if parameters is not None else self.check_parameters({})
            )
        self.open_sessions += 1
        return self.slab.allocate(values)

    def release(self, session: Session) -> None:
        if session.slot >= 0:
            if self.persistence is not None:
                # Closed or expired: the store forgets it too (after any write of it already submitted).
                self.persistence.forget(session)
            self.slab.release(session.slot)
            session.slot = -1
            self.open_sessions -= 1
            if self.open_sessions == 0 and self.on_idle is not None:
                self.on_idle(self)

    # ---- request checks ---------------------------------------------------------------------------------
    def check_inputs(
        self, inputs: Mapping[str, np.ndarray], num_steps: int, *, lead: str = "num_steps", finite: bool = True
    ) -> dict[str, np.ndarray]:
        """Validate one step's (or chunk's) data inputs; return them in manifest order.

        Messages name the tensor and the expected dtype and per-session shape, so a client can fix its call.
        ``lead`` names the leading axis when ``num_steps`` is set; ``finite=False`` leaves the NaN/Inf check
        to the caller (a StepBatch rejects only its bad rows).
        """
        if len(inputs) != len(self._input_checks) or any(n not in inputs for n, _, _ in self._input_checks):
            expected = ", ".join(f"'{n}' {d.name}{_shape_text(s)}" for n, d, s in self._input_checks)
            raise InvalidArgument(
                f"model {self.key} takes {len(self._input_checks)} input tensor(s): {expected}; "
                f"got {echo_names(sorted(inputs))}"
            )
        checked = {}
        lead_shape = (num_steps,) if num_steps else ()
        for name, dtype, shape in self._input_checks:
            arr = inputs[name]
            self._check_tensor(
                "input", name, arr, dtype, lead_shape + shape, lead=lead if num_steps else "", finite=finite
            )
            checked[name] = arr
        return checked

    def check_outputs(self, wanted: Sequence[str]) -> list[str]:
        """The outputs a request asks for (empty: all), refused before its step is queued when one is unknown."""
        if wanted:
            names = [o.name for o in self.manifest.outputs]
            unknown = [w for w in wanted if w not in names]
            if unknown:
                raise InvalidArgument(f"model {self.key} has no output {echo_names(unknown)}; its outputs are {names}")
        return list(wanted)

    def nonfinite_rows(self, inputs: Mapping[str, np.ndarray]) -> dict[int, str]:
        """Rows (leading axis) of stacked inputs that hold NaN or Inf, with the first such input's name."""
        if not self._check_finite:
            return {}
        bad: dict[int, str] = {}
        for name, arr in inputs.items():
            if arr.dtype.kind == "f" and arr.size:
                rows = np.flatnonzero(~np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1))
                for row in rows.tolist():
                    bad.setdefault(row, name)
        return bad

    def check_state(self, state: Mapping[str, np.ndarray], *, partial: bool) -> list[np.ndarray]:
        """Validate user-given state tensors; missing ones (when ``partial``) take the initial value."""
        unknown = sorted(set(state) - {n for n, _, _ in self._state_checks})
        if unknown:
            names = [n for n, _, _ in self._state_checks]
            raise InvalidArgument(f"model {self.key} has no state named {echo_names(unknown)}; its states are {names}")
        result = []
        for (name, dtype, shape), initial in zip(self._state_checks, self.initial_state, strict=True):
            if name not in state:
                if not partial:
                    raise InvalidArgument(f"state '{name}' is missing: expected {dtype.name}{_shape_text(shape)}")
                result.append(initial)
                continue
            arr = state[name]
            self._check_tensor("state", name, arr, dtype, shape)
            result.append(arr)
        return result

    def _check_tensor(
        self,
        kind: str,
        name: str,
        arr: np.ndarray,
        dtype: np.dtype,
        shape: tuple[int, ...],
        *,
        lead: str = "",
        finite: bool = True,
    ) -> None:
        if arr.dtype != dtype:
            raise InvalidArgument(
                f"{kind} '{name}' of model {self.key}: expected dtype {dtype.name}, got {arr.dtype.name}"
            )
        if arr.ndim != len(shape) or any(e != -1 and e != g for e, g in zip(shape, arr.shape, strict=True)):
            what = f"[{lead}, ...per-session shape]" if lead else "per-session shape, no batch axis"
            raise InvalidArgument(
                f"{kind} '{name}' of model {self.key}: expected shape {_shape_text(shape)} ({what}), "
                f"got {list(arr.shape)}"
            )
        if finite and self._check_finite and arr.dtype.kind == "f" and not all_finite(arr):
            raise self._nonfinite(kind, name)

    def check_finite(self, inputs: Mapping[str, np.ndarray]) -> None:
        """The NaN/Inf check alone, for inputs whose names, dtypes and shapes a transport already checked."""
        if self._check_finite:
            for name, arr in inputs.items():
                if arr.dtype.kind == "f" and not all_finite(arr):
                    raise self._nonfinite("input", name)

    def _nonfinite(self, kind: str, name: str) -> InvalidArgument:
        return InvalidArgument(
            f"{kind} '{name}' of model {self.key} holds NaN or Inf, which this model does not accept "
            "(set allow_nonfinite in its manifest to allow them)"
        )

    def check_parameters(self, given: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Validate a session's parameters; missing ones take their default (or are refused without one)."""
        specs = self.manifest.parameters
        unknown = sorted(set(given) - {p.name for p in specs})
        if unknown:
            raise InvalidArgument(
                f"model {self.key} has no parameter named {echo_names(unknown)}; "
                f"its parameters are {[p.name for p in specs]}"
            )
        values = []
        for spec, default in zip(specs, self.parameter_defaults, strict=True):
            shape = spec.session_shape
            if spec.name not in given:
                if default is None:
                    raise InvalidArgument(
                        f"model {self.key} needs parameter '{spec.name}' ({spec.dtype}{_shape_text(shape)}) "
                        "at session open"
                    )
                values.append(default)
                continue
            arr = given[spec.name]
            self._check_tensor("parameter", spec.name, arr, np.dtype(spec.dtype), shape)
            values.append(arr)
        return values

    def state_dict(self, values: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Name the leading (state) arrays of a slab row."""
        return {s.name: v for s, v in zip(self.manifest.states, values, strict=False)}

    def parameter_dict(self, values: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Name the parameter arrays of a slab row (after the states)."""
        row = values[len(self.manifest.states) :]
        return {p.name: v for p, v in zip(self.manifest.parameters, row, strict=True)}

    def input_specs(self) -> list[TensorSpec]:
        return self.manifest.inputs
