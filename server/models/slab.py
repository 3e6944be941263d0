"""The state slab: every session's recurrent state of one model version in a few preallocated arrays.

One array per state input, laid out exactly as the model expects it (the batch axis where the manifest puts
it), indexed by a session's *slot*. A batch gathers its sessions' rows with one ``np.take`` per state and
scatters the new state back with one indexed assignment, so the hot path holds no per-session tensors.
Capacity doubles when full; closed sessions' slots are reused. A model's per-session parameters live in the
same slab after its states and context windows (same slot, gathered every call, never scattered).

:class:`DeviceStateSlab` keeps the same arrays as torch tensors on a CUDA device, so with a GPU the state
never crosses to the host between steps.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from rnnserve.manifest import TensorSpec


class StateSlab:
    def __init__(self, specs: Sequence[TensorSpec], initial: Sequence[np.ndarray], capacity: int = 64):
        self.specs = list(specs)
        self.initial = [np.asarray(v) for v in initial]
        self.capacity = max(1, capacity)
        # numpy arrays here, torch tensors in DeviceStateSlab: each subclass reads them with its own library.
        self._arrays: list[Any] = [self._alloc(spec, self.capacity) for spec in self.specs]
        self._free: list[int] = list(range(self.capacity - 1, -1, -1))
        # Growth replaces the arrays; gathers and scatters run in worker threads, so both take this lock.
        self.lock = threading.Lock()

    @staticmethod
    def _shape(spec: TensorSpec, capacity: int) -> list[int]:
        shape = list(spec.shape)
        shape[spec.batch_axis] = capacity
        return shape

    def _alloc(self, spec: TensorSpec, capacity: int) -> np.ndarray:
        return np.zeros(self._shape(spec, capacity), dtype=spec.dtype)

    @property
    def dtypes(self) -> list:
        """The element type of each state array, in the slab's own array library."""
        return [a.dtype for a in self._arrays]

    @staticmethod
    def _index(spec: TensorSpec, rows: int | np.ndarray | slice) -> tuple:
        return (slice(None),) * spec.batch_axis + (rows,)

    @property
    def used(self) -> int:
        return self.capacity - len(self._free)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._arrays)

    def allocate(self, state: Sequence[np.ndarray] | None = None) -> int:
        """Take a free slot and fill it with ``state`` (per-session arrays) or the initial state."""
        with self.lock:
            if not self._free:
                self._grow()
            slot = self._free.pop()
        self.write(slot, state if state is not None else self.initial)
        return slot

    def release(self, slot: int) -> None:
        with self.lock:
            self._free.append(slot)

    def _grow(self) -> None:
        new_capacity = self.capacity * 2
        grown = []
        for spec, old in zip(self.specs, self._arrays, strict=True):
            arr = self._alloc(spec, new_capacity)
            arr[self._index(spec, slice(0, self.capacity))] = old
            grown.append(arr)
        self._arrays = grown
        self._free.extend(range(new_capacity - 1, self.capacity - 1, -1))
        self.capacity = new_capacity

    def read(self, slot: int) -> list[np.ndarray]:
        """Copies of one session's state, per-session shapes."""
        with self.lock:
            return [a[self._index(s, slot)].copy() for s, a in zip(self.specs, self._arrays, strict=True)]

    def write(self, slot: int, state: Sequence[np.ndarray]) -> None:
        """Write the first ``len(state)`` arrays of one slot (states, or states and parameters)."""
        with self.lock:
            for spec, arr, value in zip(self.specs, self._arrays, state, strict=False):
                arr[self._index(spec, slot)] = value

    def gather(self, slots: np.ndarray) -> list[np.ndarray]:
        """The batch's states, batch axis in model order (contiguous copies)."""
        with self.lock:
            return [np.take(a, slots, axis=s.batch_axis) for s, a in zip(self.specs, self._arrays, strict=True)]

    def scatter(self, slots: np.ndarray, values: Sequence[np.ndarray]) -> None:
        """Write the batch's new states (the leading arrays; parameters after them are never written)."""
        with self.lock:
            for spec, arr, value in zip(self.specs, self._arrays, values, strict=False):
                arr[self._index(spec, slots)] = value


class DeviceStateSlab(StateSlab):
    """The slab as torch tensors on a CUDA device: gathers and scatters are device index ops, and the
    runtime reads and writes the state in place on the device. Reads and writes of one session (snapshots,
    resets) copy through the host."""

    def __init__(self, specs: Sequence[TensorSpec], initial: Sequence[np.ndarray], device: str, capacity: int = 64):
        import torch

        self._torch = torch
        self.device = torch.device(device)
        super().__init__(specs, initial, capacity)

    def _alloc(self, spec: TensorSpec, capacity: int):
        torch = self._torch
        return torch.zeros(self._shape(spec, capacity), dtype=getattr(torch, spec.dtype), device=self.device)

    def _index_tensor(self, slots: np.ndarray):
        return self._torch.as_tensor(slots, dtype=self._torch.long, device=self.device)

    def read(self, slot: int) -> list[np.ndarray]:
        with self.lock:
            return [a.select(s.batch_axis, slot).cpu().numpy() for s, a in zip(self.specs, self._arrays, strict=True)]

    def write(self, slot: int, state: Sequence[np.ndarray]) -> None:
        with self.lock:
            for spec, arr, value in zip(self.specs, self._arrays, state, strict=False):
                arr.select(spec.batch_axis, slot).copy_(self._torch.as_tensor(np.asarray(value)))

    def gather(self, slots: np.ndarray) -> list:
        index = self._index_tensor(slots)
        with self.lock:
            return [a.index_select(s.batch_axis, index) for s, a in zip(self.specs, self._arrays, strict=True)]

    def scatter(self, slots: np.ndarray, values: Sequence) -> None:
        index = self._index_tensor(slots)
        with self.lock:
            for spec, arr, value in zip(self.specs, self._arrays, values, strict=False):
                # The model's states come as device tensors; context windows (cut on the host) as arrays.
                arr.index_copy_(spec.batch_axis, index, self._torch.as_tensor(value, device=self.device))

    @property
    def nbytes(self) -> int:
        return sum(a.element_size() * a.nelement() for a in self._arrays)
