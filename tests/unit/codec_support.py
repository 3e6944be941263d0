"""A real data plane on the tiny repository, in the test's own event loop, for the codec tests: no server,
no sockets; the codecs are given wire bytes and their answers checked against the eager model."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from rnnserve.server.app import RnnServer
from rnnserve.server.settings import ServerSettings


@contextlib.asynccontextmanager
async def serving(repository: Path, **settings: Any) -> AsyncIterator[RnnServer]:
    """The server's objects, built as for serving and started, except that nothing listens."""
    server = RnnServer(ServerSettings(repository=repository, host="127.0.0.1", port=0, **settings))
    server.repository.load_all()
    server.dataplane.start()
    try:
        yield server
    finally:
        await server.dataplane.stop()
