"""Build, start and stop the asyncio gRPC server: RnnServe, the standard health service, reflection."""

from __future__ import annotations

import gc
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rnnserve.server.dataplane import DataPlane
from rnnserve.server.limits import Limits
from rnnserve.server.metrics import MetricsServer
from rnnserve.server.repository import ModelRepository
from rnnserve.server.sessions import SessionManager
from rnnserve.server.settings import ServerSettings
from rnnserve.server.transport.auth import AuthInterceptor, load_tokens
from rnnserve.server.transport.kserve import servicer as kserve
from rnnserve.server.transport.native import servicer as native
from rnnserve.server.transport.rpc import transport_receive_limit
from rnnserve.server.transport.tls import server_credentials
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
            durability=settings.durability,
            concurrent_batches=settings.concurrent_batches,
            inline_budget_us=settings.inline_budget_us,
        )
        self.sessions = SessionManager(max_sessions=settings.max_sessions, ttl=settings.session_ttl)
        self.dataplane = DataPlane(
            self.repository,
            self.sessions,
            max_pending_steps=settings.max_pending_steps,
            replay_window=settings.replay_window,
            session_store=settings.session_store,
        )
        self.limits = Limits.from_settings(settings)
        self.dataplane.limits = self.limits
        self.sessions.max_sessions_per_client = settings.max_sessions_per_client
        self.servicer = native.RnnServeServicer(
            self.dataplane, max_stream_inflight=settings.max_stream_inflight, limits=self.limits
        )
        # Read before anything starts, so a bad token file or certificate stops the server with its error.
        self.tokens = load_tokens(settings.auth_tokens, settings.tokens)
        self.credentials = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        self.metrics: MetricsServer | None = None
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
        interceptors = []
        if self.tokens:
            admins = self.settings.admin_principals
            interceptors.append(
                AuthInterceptor(
                    self.tokens,
                    admins=frozenset(a.strip() for a in admins.split(",") if a.strip()) if admins else None,
                    on_refused=lambda method, code: self.servicer.rejected.update([(method, code.name)]),
                )
            )
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                # Past the limit, up to the transport's, ``parse`` refuses a message naming the flag.
                ("grpc.max_receive_message_length", transport_receive_limit(limit)),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
            ],
        )
        server.add_generic_rpc_handlers((native.handler(self.servicer),))
        # The KServe v2 / Triton API on the same port, over the same data plane (server/transport/kserve/).
        kserve_servicer = kserve.KServeServicer(self.dataplane, max_stream_inflight=self.settings.max_stream_inflight)
        server.add_generic_rpc_handlers((kserve.handler(kserve_servicer),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if self.settings.reflection:
            names = (
                native.SERVICE_NAME,
                kserve.SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            )
            reflection.enable_server_reflection(names, server)
        address = f"{self.settings.host}:{self.settings.port}"
        if self.credentials is not None:
            self.port = server.add_secure_port(address, self.credentials)
        else:
            self.port = server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"could not bind {self.settings.host}:{self.settings.port}")
        await server.start()
        self._server = server
        if self.settings.metrics_port is not None:
            self.metrics = MetricsServer(
                self.dataplane, self.servicer.rejected, self.settings.metrics_address, self.settings.metrics_port
            )
        for service in ("", native.SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if self.settings.port_file:
            self.settings.port_file.write_text(f"{self.port}\n")
        log.info(
            "rnnserve listening on %s:%d (%s%s)",
            self.settings.host,
            self.port,
            "plaintext" if self.credentials is None else ("mutual TLS" if self.settings.tls_client_ca else "TLS"),
            f", {len(set(self.tokens.values()))} principal(s) by token" if self.tokens else ", no authentication",
        )
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        grace = self.settings.grace if grace is None else grace
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
        if self.watcher is not None:
            await self.watcher.stop()
        if self.metrics is not None:
            self.metrics.stop()
        await self.dataplane.stop()
        log.info("rnnserve stopped")

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()
