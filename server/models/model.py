"""A loaded model version: manifest, runtime, state slab, batcher, and the checks its requests pass."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rnnserve.manifest import Durability, ModelManifest
from rnnserve.server.core.session import Session
from rnnserve.server.core.validation import TensorChecks
from rnnserve.server.models.runtime import Runtime
from rnnserve.server.models.slab import DeviceStateSlab, StateSlab
from rnnserve.server.scheduling.batcher import Batcher
from rnnserve.server.scheduling.execution import CommitHook, Feeder


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
        persistence: CommitHook | None = None,
        on_idle: Callable[[LoadedModel], None] | None = None,
    ):
        self.manifest = manifest
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
        # A session's state: the model's states, then its inputs' context windows (manifest.session_states).
        self.state_specs = manifest.session_states
        self.initial_state = [s.initial_value(version_dir) for s in self.state_specs]
        self.constants = {c.name: c.array(version_dir) for c in manifest.constants}
        # Per-session parameters sit in the slab after the states: one gather feeds both.
        self.parameter_defaults = [p.default_value() for p in manifest.parameters]
        slab_specs = [*self.state_specs, *(p.stored() for p in manifest.parameters)]
        # Unbatched parameters (per-session settings the graph takes once per call): a batch only holds
        # sessions whose values are equal, so each slot's values are kept as its batch key.
        self._unbatched = [i for i, p in enumerate(manifest.parameters) if not p.batched]
        self._settings: dict[int, bytes] = {}
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
        # Commits batches' states and forgets ended sessions (server/durability/persistence.py); None: never written.
        self.persistence = persistence
        self.open_sessions = 0
        # Called each time its last session goes (server/models/admin.py Retirement: stops it once retired).
        self.on_idle = on_idle
        # The checks its requests pass, whichever API brings them (server/core/validation.py).
        self.checks = TensorChecks(manifest, self.key)
        # Built last: it reads the model's persistence, durability and release. Its loop starts in start().
        self.batcher = Batcher(
            self,
            max_batch_size=self.max_batch_size,
            max_queue_delay_us=self.max_queue_delay_us,
            concurrency=concurrent_batches,
            inline_budget_ns=inline_budget_us * 1000,
        )

    def self_check(self) -> None:
        """Call the model once on zeros at batch 1 (and 2 where it batches) and compare every result with the
        manifest, so a config that disagrees with its model fails at load, with a message, not at a step. A
        free dimension is fed its length in ``check_shape`` (default 1), a windowed input its window and that."""
        m = self.manifest
        feeder = Feeder(m)
        for n in (1, 2) if self.max_batch_size > 1 else (1,):
            feeds: dict[str, Any] = {}  # numpy arrays; torch tensors on a GPU
            for spec in m.inputs:
                dims = spec.check_shape or spec.shape
                shape = [n if i == spec.batch_axis else (1 if d == -1 else d) for i, d in enumerate(dims)]
                feeds[spec.name] = (
                    np.ones(shape, spec.dtype) if spec.name == m.lengths_input else np.zeros(shape, spec.dtype)
                )
            rows: list[Any] = [
                np.stack([value] * n, axis=spec.batch_axis)
                for spec, value in zip(self.slab.specs, self.slab.initial, strict=True)
            ]
            if self.runtime.device == "cuda":
                import torch

                rows = [torch.as_tensor(r, device="cuda") for r in rows]
            feeder.feed(feeds, rows)
            feeds.update(self.constants)
            try:
                out = self.runtime.run(feeds)
            except Exception as exc:
                fed = ", ".join(
                    f"{t.name} {t.dtype}{list(feeds[t.name].shape)}"
                    + (f" (a window of {t.context.length} + the new elements)" if t.context else "")
                    for t in m.inputs
                )
                hint = ""
                if any(-1 in t.session_shape and t.check_shape is None for t in m.inputs):
                    hint = " (a free dimension was fed length 1: set the input's check_shape to feed another)"
                raise ValueError(
                    f"calling the model at batch {n} failed, fed {fed}{hint}: {type(exc).__name__}: {exc}"
                ) from exc
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
        """Start its batcher's loop (on the event loop that serves it)."""
        self.batcher.start()

    async def stop(self) -> None:
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
        slot = self.slab.allocate(values)
        if self._unbatched:
            row = values if values is not None else self.slab.initial
            params = row[len(self.state_specs) :]
            self._settings[slot] = b"".join(np.ascontiguousarray(params[i]).tobytes() for i in self._unbatched)
        return slot

    def settings(self, slot: int) -> bytes:
        """The values of a slot's unbatched parameters (its batch key: server/scheduling/formation.py)."""
        return self._settings.get(slot, b"")

    def release(self, session: Session[Any]) -> None:
        if session.slot >= 0:
            if self.persistence is not None:
                # Closed or expired: the store forgets it too (after any write of it already submitted).
                self.persistence.forget(session)
            self.slab.release(session.slot)
            self._settings.pop(session.slot, None)
            session.slot = -1
            self.open_sessions -= 1
            if self.open_sessions == 0 and self.on_idle is not None:
                self.on_idle(self)

    # ---- a session's states and parameters (its inputs and outputs: ``checks``) -------------------------
    def check_state(self, state: Mapping[str, np.ndarray], *, partial: bool) -> list[np.ndarray]:
        """Validate user-given state tensors; missing ones (when ``partial``) take the initial value."""
        return self.checks.states(state, self.initial_state, partial=partial)

    def check_parameters(self, given: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Validate a session's parameters; missing ones take their default (or are refused without one)."""
        return self.checks.parameters(given, self.parameter_defaults)

    def state_dict(self, values: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Name the leading (state and context window) arrays of a slab row."""
        return {s.name: v for s, v in zip(self.state_specs, values, strict=False)}

    def parameter_dict(self, values: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Name the parameter arrays of a slab row (after the states and windows)."""
        row = values[len(self.state_specs) :]
        return {p.name: v for p, v in zip(self.manifest.parameters, row, strict=True)}
