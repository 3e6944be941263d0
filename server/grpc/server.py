"""Build, start and stop the asyncio gRPC server: RnnServe, the standard health service, reflection."""

from __future__ import annotations

import gc
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rnnserve.proto import rnnserve_pb2 as pb
from rnnserve.server.dataplane import DataPlane
from rnnserve.server.grpc import kserve
from rnnserve.server.grpc.servicers import SERVICE_NAME, RnnServeServicer, generic_handler
from rnnserve.server.repository import ModelRepository
from rnnserve.server.sessions import SessionManager
from rnnserve.server.settings import ServerSettings
from rnnserve.server.watch import RepositoryWatcher

log = logging.getLogger(__name__)


class RnnServer:
    """One server process: ``port = await server.start()``, then ``await server.stop()``."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.repository = ModelRepository(
            settings.repository,
            device=settings.device,
            threads=settings.intra_op_threads,
            max_batch_size=settings.max_batch_size,
            max_queue_delay_us=settings.max_queue_delay_us,
        )
        self.sessions = SessionManager(max_sessions=settings.max_sessions, ttl=settings.session_ttl)
        self.dataplane = DataPlane(
            self.repository,
            self.sessions,
            max_pending_steps=settings.max_pending_steps,
            replay_window=settings.replay_window,
        )
        self.health = health.aio.HealthServicer()
        self.watcher = (
            RepositoryWatcher(self.dataplane.admin, settings.repository, settings.watch_interval)
            if settings.watch_interval
            else None
        )
        self._server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        self.repository.load_all()
        self.dataplane.start()
        if self.watcher is not None:
            self.watcher.start()
        # Loaded models and modules are long-lived: move them out of the collector's way, and collect young
        # objects less often. The step path allocates many short-lived objects; at the default threshold the
        # collector took ~10% of the event loop's time under load (rnnserve bench, py-spy).
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        limit = self.settings.max_message_bytes
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
            ]
        )
        server.add_generic_rpc_handlers(
            (generic_handler(RnnServeServicer(self.dataplane, max_stream_inflight=self.settings.max_stream_inflight)),)
        )
        # The KServe v2 / Triton API on the same port, over the same data plane (server/grpc/kserve.py).
        kserve_servicer = kserve.KServeServicer(self.dataplane, max_stream_inflight=self.settings.max_stream_inflight)
        server.add_generic_rpc_handlers((kserve.kserve_handler(kserve_servicer),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if self.settings.reflection:
            names = (
                SERVICE_NAME,
                kserve.SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            )
            assert pb.DESCRIPTOR.services_by_name["RnnServe"].full_name == SERVICE_NAME
            reflection.enable_server_reflection(names, server)
        self.port = server.add_insecure_port(f"{self.settings.host}:{self.settings.port}")
        if self.port == 0:
            raise OSError(f"could not bind {self.settings.host}:{self.settings.port}")
        await server.start()
        self._server = server
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if self.settings.port_file:
            self.settings.port_file.write_text(f"{self.port}\n")
        log.info("rnnserve listening on %s:%d", self.settings.host, self.port)
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        grace = self.settings.grace if grace is None else grace
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
        if self.watcher is not None:
            await self.watcher.stop()
        await self.dataplane.stop()
        log.info("rnnserve stopped")

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()
