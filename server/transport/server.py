"""The gRPC server: RnnServe and the KServe v2 API on one port, the standard health service, reflection."""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rnnserve.server.settings import ServerSettings
from rnnserve.server.transport.auth import AuthInterceptor
from rnnserve.server.transport.kserve import servicer as kserve
from rnnserve.server.transport.native import servicer as native
from rnnserve.server.transport.rpc import transport_receive_limit

log = logging.getLogger(__name__)


class GrpcServer:
    """Given its servicers, token table and credentials (server/app.py builds them): ``port = await start()``
    binds and serves, ``await stop(grace)`` drains."""

    def __init__(
        self,
        settings: ServerSettings,
        servicer: native.RnnServeServicer,
        kserve_servicer: kserve.KServeServicer,
        *,
        tokens: dict[str, str],
        credentials: grpc.ServerCredentials | None,
    ):
        self.settings = settings
        self.servicer = servicer
        self.kserve_servicer = kserve_servicer
        self.tokens = tokens
        self.credentials = credentials
        self.health = health.aio.HealthServicer()
        self.interceptors: list[grpc.aio.ServerInterceptor] = []
        if tokens:
            admins = settings.admin_principals
            self.interceptors.append(
                AuthInterceptor(
                    tokens,
                    admins=frozenset(a.strip() for a in admins.split(",") if a.strip()) if admins else None,
                    on_refused=lambda method, code: servicer.rejected.update([(method, code.name)]),
                )
            )
        self._server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        # The grpc.aio server belongs to the event loop that serves it: made here, on that loop.
        limit = self.settings.max_message_bytes
        server = grpc.aio.server(
            interceptors=self.interceptors,
            options=[
                # Past the limit, up to the transport's, ``parse`` refuses a message naming the flag.
                ("grpc.max_receive_message_length", transport_receive_limit(limit)),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
            ],
        )
        server.add_generic_rpc_handlers((native.handler(self.servicer),))
        # The KServe v2 / Triton API on the same port, over the same data plane (server/transport/kserve/).
        server.add_generic_rpc_handlers((kserve.handler(self.kserve_servicer),))
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
        return self.port

    async def serving(self) -> None:
        """Tell health checks the server serves."""
        for service in ("", native.SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    def describe(self) -> str:
        """How it listens and whom it lets in, for the start-up log line."""
        settings = self.settings
        return (
            f"{settings.host}:{self.port} ("
            + ("plaintext" if self.credentials is None else ("mutual TLS" if settings.tls_client_ca else "TLS"))
            + (f", {len(set(self.tokens.values()))} principal(s) by token" if self.tokens else ", no authentication")
            + ")"
        )

    async def stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()
