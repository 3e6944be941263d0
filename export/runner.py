"""How verification calls an exported artifact: one step, torch tensors in and out."""

from __future__ import annotations

from collections.abc import Callable

import torch

# (x, states) -> (y, new_states)
Runner = Callable[[torch.Tensor, list[torch.Tensor]], tuple[torch.Tensor, list[torch.Tensor]]]
