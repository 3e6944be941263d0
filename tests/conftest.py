"""Shared fixtures: a real rnnserve server on a free port (bind port 0), in a background thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


class ServerHandle:
    """A real RnnServer running on its own event loop thread."""

    def __init__(self, repository: Path, **settings: Any):
        from rnnserve.server.app import RnnServer
        from rnnserve.server.settings import ServerSettings

        self.settings = ServerSettings(repository=repository, host="127.0.0.1", port=0, **settings)
        self.server = RnnServer(self.settings)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="rnnserve-test-server", daemon=True)
        self._thread.start()
        self.port = self.call(self.server.start())
        self.address = f"127.0.0.1:{self.port}"

    def call(self, coro, timeout: float = 60.0):
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        try:
            self.call(self.server.stop(grace=0.5))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)


@pytest.fixture
def server_factory() -> Iterator[Callable[..., ServerHandle]]:
    """``server_factory(repository, **ServerSettings fields) -> ServerHandle`` (stopped after the test)."""
    handles: list[ServerHandle] = []

    def start(repository: Path, **settings: Any) -> ServerHandle:
        handle = ServerHandle(repository, **settings)
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        handle.stop()


# ---- a tiny repository built straight from torch (independent of rnnserve.export) ---------------------------
TINY_INPUT, TINY_HIDDEN, TINY_OUTPUT = 3, 5, 2


def tiny_reference(seed: int = 0):
    """The eager modules behind the tiny models: a GRUCell and a Linear head."""
    import torch

    torch.manual_seed(seed)
    return torch.nn.GRUCell(TINY_INPUT, TINY_HIDDEN), torch.nn.Linear(TINY_HIDDEN, TINY_OUTPUT)


def tiny_expected(xs, h0=None, seed: int = 0):
    """Eager outputs (T, OUT) and final hidden state for one session's inputs xs (T, IN)."""
    import numpy as np
    import torch

    cell, head = tiny_reference(seed)
    h = torch.zeros(1, TINY_HIDDEN) if h0 is None else torch.as_tensor(h0).reshape(1, TINY_HIDDEN)
    ys = []
    with torch.no_grad():
        for x in xs:
            h = cell(torch.as_tensor(np.asarray(x))[None], h)
            ys.append(head(h)[0].numpy())
    return np.stack(ys), h[0].numpy()


def tiny_step(seed: int = 0):
    """The tiny model as a step module ``(x, h) -> (y, h')`` with the weights of ``seed``."""
    import torch

    cell, head = tiny_reference(seed)

    class Step(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell, self.head = cell, head

        def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h2 = self.cell(x, h[0])
            return self.head(h2), h2.unsqueeze(0)

    return Step().eval()


def build_tiny_repository(root: Path) -> Path:
    """``gru`` (ONNX) and ``gru_ts`` (TorchScript): y = Linear(GRUCell(x, h)), state h of shape (1, B, 5)
    with batch axis 1, so the slab's non-zero batch axis is exercised."""
    import warnings

    import torch

    from rnnserve.manifest import ModelManifest

    step = tiny_step()
    spec = {
        "inputs": [{"name": "x", "shape": [-1, TINY_INPUT]}],
        "outputs": [{"name": "y", "shape": [-1, TINY_OUTPUT]}],
        "states": [{"name": "h", "output": "h_out", "shape": [1, -1, TINY_HIDDEN], "batch_axis": 1}],
    }
    onnx_dir = root / "gru" / "1"
    onnx_dir.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            step,
            (torch.randn(2, TINY_INPUT), torch.zeros(1, 2, TINY_HIDDEN)),
            str(onnx_dir / "model.onnx"),
            input_names=["x", "h"],
            output_names=["y", "h_out"],
            dynamic_axes={"x": {0: "b"}, "h": {1: "b"}, "y": {0: "b"}, "h_out": {1: "b"}},
            dynamo=False,
        )
    ModelManifest(name="gru", version=1, format="onnx", artifact="model.onnx", **spec).write(onnx_dir)
    ts_dir = root / "gru_ts" / "1"
    ts_dir.mkdir(parents=True)
    torch.jit.script(step).save(str(ts_dir / "model.pt"))
    ModelManifest(name="gru_ts", version=1, format="torchscript", artifact="model.pt", **spec).write(ts_dir)
    return root


@pytest.fixture(scope="module")
def address(repository: Path) -> Iterator[str]:
    """The address of one server process per module on that module's own ``repository`` fixture."""
    handle = ServerHandle(repository)
    yield handle.address
    handle.stop()


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_repository(tmp_path_factory.mktemp("tiny-repo"))


@pytest.fixture(scope="session")
def perf_analyzer_path() -> Path:
    """Triton's perf_analyzer (scripts/setup.sh installs it): skipped where it is missing, except on CI, where a
    missing one fails (CI installs it)."""
    import os

    from rnnserve.bench import perf_analyzer

    found = perf_analyzer.find()
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(perf_analyzer.INSTALL_HINT)
        pytest.skip(perf_analyzer.INSTALL_HINT)
    return found
