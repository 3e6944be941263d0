"""A TCP proxy on loopback that drops connections at random points, for testing clients against a flaky network."""

from __future__ import annotations

import asyncio
import random
import threading


class DroppingProxy:
    """Forwards ``127.0.0.1:<port>`` to ``127.0.0.1:<target_port>``. Until ``drops`` connections were dropped,
    each new connection gets a byte budget drawn from ``[min_bytes, max_bytes]`` (seeded); once the bytes it
    carried (both directions) reach it, both sockets are reset, mid-message as likely as not."""

    def __init__(self, target_port: int, *, seed: int, drops: int, min_bytes: int = 300, max_bytes: int = 6000):
        self.target_port = target_port
        self.drops = drops
        self.dropped = 0
        self._rng = random.Random(seed)
        self._bytes = (min_bytes, max_bytes)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="dropping-proxy", daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop
        ).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.transport.abort()
            return
        budget = [self._rng.randint(*self._bytes) if self.dropped < self.drops else -1]
        writers = (client_writer, server_writer)

        async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    if budget[0] >= 0:
                        if len(data) >= budget[0]:
                            writer.write(data[: budget[0]])  # the part of a message that gets through
                            await writer.drain()
                            self._drop(writers)
                            return
                        budget[0] -= len(data)
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            for w in writers:
                w.transport.abort()

        await asyncio.gather(pump(client_reader, server_writer), pump(server_reader, client_writer))

    def _drop(self, writers: tuple[asyncio.StreamWriter, ...]) -> None:
        if self.dropped < self.drops:
            self.dropped += 1
        for w in writers:
            w.transport.abort()  # a reset, not a clean close: what a dying network looks like

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
