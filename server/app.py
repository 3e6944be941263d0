"""The composition root: from ServerSettings, every object of one server process, each built once here with
its collaborators passed to its constructor; nothing is re-wired afterwards.

The graph, bottom up: the limits and the session table; the session store and its persistence (which drops a
session another replica changed from the table); the retirement of reloaded or unloaded loads; the one model
factory (each model with its batcher, the persistence and the retirement's idle hook), handed to the repository
and so used for every model, at start and when loaded later (LoadModel, --watch); the admin; the data plane;
the watcher; the transport's servicers and the gRPC server. ``start`` and ``stop`` run the lifecycle only.
"""

from __future__ import annotations

import gc
import logging

from rnnserve.server.core.sessions import SessionManager
from rnnserve.server.dataplane import DataPlane
from rnnserve.server.durability.persistence import Persistence
from rnnserve.server.durability.store import open_store
from rnnserve.server.limits import Limits
from rnnserve.server.metrics import MetricsServer, RnnServeCollector
from rnnserve.server.models.admin import ModelAdmin, Retirement
from rnnserve.server.models.model import LoadedModel
from rnnserve.server.models.predict import Predictor
from rnnserve.server.models.repository import ModelFactory, ModelRepository
from rnnserve.server.models.watch import RepositoryWatcher
from rnnserve.server.settings import ServerSettings
from rnnserve.server.transport.auth import load_tokens
from rnnserve.server.transport.kserve.servicer import KServeServicer
from rnnserve.server.transport.native.servicer import RnnServeServicer
from rnnserve.server.transport.server import GrpcServer
from rnnserve.server.transport.tls import server_credentials

log = logging.getLogger(__name__)


class RnnServer:
    """One server process: ``port = await server.start()``, then ``await server.stop()``."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        # Read before anything starts, so a bad token file or certificate stops the server with its error.
        tokens = load_tokens(settings.auth_tokens, settings.tokens)
        credentials = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        self.limits = Limits.from_settings(settings)
        self.sessions = SessionManager[LoadedModel](
            max_sessions=settings.max_sessions,
            ttl=settings.session_ttl,
            max_sessions_per_client=settings.max_sessions_per_client,
        )
        self.persistence = Persistence(
            open_store(settings.session_store, ttl=settings.session_ttl), on_moved=self.sessions.drop
        )
        self.retirement = Retirement()
        self.repository = ModelRepository(
            settings.repository,
            ModelFactory(
                device=settings.device,
                threads=settings.intra_op_threads,
                max_batch_size=settings.max_batch_size,
                max_queue_delay_us=settings.max_queue_delay_us,
                durability=settings.durability,
                concurrent_batches=settings.concurrent_batches,
                inline_budget_us=settings.inline_budget_us,
                persistence=self.persistence,
                on_idle=self.retirement.idle,
            ),
        )
        self.admin = ModelAdmin(self.repository, self.sessions, self.retirement)
        self.dataplane = DataPlane(
            self.repository,
            self.sessions,
            self.admin,
            self.persistence,
            self.limits,
            Predictor(),
            max_pending_steps=settings.max_pending_steps,
            replay_window=settings.replay_window,
        )
        self.watcher = (
            RepositoryWatcher(self.admin, settings.repository, settings.watch_interval)
            if settings.watch_interval
            else None
        )
        self.servicer = RnnServeServicer(
            self.dataplane, max_stream_inflight=settings.max_stream_inflight, limits=self.limits
        )
        self.grpc = GrpcServer(
            settings,
            self.servicer,
            KServeServicer(self.dataplane, max_stream_inflight=settings.max_stream_inflight),
            tokens=tokens,
            credentials=credentials,
        )
        # Listens on its own port and thread, opened by start() once the gRPC port is bound.
        self.metrics = (
            MetricsServer(
                RnnServeCollector(self.repository, self.sessions, self.persistence.errors, self.servicer.rejected),
                settings.metrics_address,
                settings.metrics_port,
            )
            if settings.metrics_port is not None
            else None
        )

    @property
    def port(self) -> int:
        return self.grpc.port

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
        port = await self.grpc.start()
        if self.metrics is not None:
            self.metrics.start()
        await self.grpc.serving()
        if self.settings.port_file:
            self.settings.port_file.write_text(f"{port}\n")
        log.info("rnnserve listening on %s", self.grpc.describe())
        return port

    async def stop(self, grace: float | None = None) -> None:
        await self.grpc.stop(self.settings.grace if grace is None else grace)
        if self.watcher is not None:
            await self.watcher.stop()
        if self.metrics is not None:
            self.metrics.stop()
        await self.dataplane.stop()
        log.info("rnnserve stopped")

    async def wait(self) -> None:
        await self.grpc.wait()
