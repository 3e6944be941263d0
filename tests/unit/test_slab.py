"""The state slab: slots, growth, gather/scatter along a non-zero batch axis; the torch (device) slab behaves
exactly like the numpy one (checked here on the CPU, so the GPU slab's logic is covered without a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rnnserve.manifest import StateSpec
from rnnserve.server.models.slab import DeviceStateSlab, StateSlab

SPECS = [
    StateSpec(name="h", output="h_out", shape=[2, -1, 3], batch_axis=1),
    StateSpec(name="c", output="c_out", shape=[-1, 4], batch_axis=0, dtype="float64"),
]
INITIAL = [np.full((2, 3), 0.5, np.float32), np.arange(4, dtype=np.float64)]


def _slabs() -> list[StateSlab]:
    return [StateSlab(SPECS, INITIAL, capacity=2), DeviceStateSlab(SPECS, INITIAL, "cpu", capacity=2)]


def _np(values) -> list[np.ndarray]:
    return [v.numpy() if isinstance(v, torch.Tensor) else v for v in values]


@pytest.mark.parametrize("slab", _slabs(), ids=["numpy", "torch"])
def test_slots_growth_gather_scatter(slab: StateSlab):
    rng = np.random.default_rng(0)
    model: dict[int, list[np.ndarray]] = {}  # what each slot should hold
    for _ in range(9):  # forces two doublings from capacity 2
        slot = slab.allocate()
        model[slot] = [v.copy() for v in INITIAL]
    assert slab.capacity == 16 and slab.used == 9
    for _ in range(20):
        slots = rng.choice(sorted(model), size=int(rng.integers(1, 6)), replace=False)
        gathered = _np(slab.gather(slots))
        assert gathered[0].shape == (2, len(slots), 3) and gathered[1].shape == (len(slots), 4)
        for j, s in enumerate(slots):
            assert np.array_equal(gathered[0][:, j], model[s][0]) and np.array_equal(gathered[1][j], model[s][1])
        new = [rng.standard_normal(g.shape).astype(g.dtype) for g in gathered]
        slab.scatter(slots, [torch.from_numpy(v) for v in new] if isinstance(slab, DeviceStateSlab) else new)
        for j, s in enumerate(slots):
            model[s] = [new[0][:, j], new[1][j]]
    for s, expected in model.items():
        assert all(np.array_equal(a, b) for a, b in zip(slab.read(s), expected, strict=True))
    freed = next(iter(model))
    slab.release(freed)
    again = slab.allocate([np.zeros((2, 3), np.float32), np.ones(4)])
    assert again == freed
    assert np.array_equal(slab.read(again)[1], np.ones(4))
