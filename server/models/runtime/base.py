"""The runtime interface the batcher calls."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import numpy as np

from rnnserve.manifest import ModelManifest


class Runtime(ABC):
    """Runs the step function on one batch.

    ``feeds`` holds every data input and state input by manifest name, batched along each tensor's
    ``batch_axis``. The result holds every data output and every state output (by the state's ``output``
    name). Called from a worker thread: implementations must release the GIL while computing (onnxruntime
    and torch both do).

    Data inputs and outputs are numpy arrays on the host. States are in the slab's array type: numpy on the
    CPU, torch tensors on the device when ``device`` is ``cuda`` (so state stays on the GPU).
    """

    def __init__(self, manifest: ModelManifest):
        self.manifest = manifest
        self.input_names = manifest.input_names
        self.output_names = manifest.output_names

    @abstractmethod
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    @property
    @abstractmethod
    def device(self) -> str: ...
