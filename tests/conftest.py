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
        from rnnserve.server.grpc.server import RnnServer
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
