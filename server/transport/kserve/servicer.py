"""``inference.GRPCInferenceService``: the KServe v2 / Triton gRPC API on rnnserve's data plane.

Served on the native API's port, so ``tritonclient.grpc`` code works unchanged. Thin: metadata, repository
and statistics calls read the data plane; inference goes through the codec (codec.py).
"""

from __future__ import annotations

from typing import cast

import grpc

import rnnserve
from rnnserve.proto import kserve_grpc_service_pb2 as kpb
from rnnserve.server.dataplane import DataPlane
from rnnserve.server.errors import InvalidArgument, NotFound, echo, echo_names
from rnnserve.server.models.repository import FailedModel
from rnnserve.server.transport.kserve import models
from rnnserve.server.transport.kserve.codec import InferCodec, InferStream, client_key, version_number
from rnnserve.server.transport.pump import stream_handler
from rnnserve.server.transport.rpc import service_handler

SERVICE = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
SERVICE_NAME = "inference.GRPCInferenceService"  # Triton's name: the path every KServe client calls
EXTENSIONS = ("model_repository", "model_configuration", "statistics", "sequence")


class KServeServicer:
    def __init__(self, dataplane: DataPlane, *, max_stream_inflight: int):
        self.dp = dataplane
        self.max_stream_inflight = max_stream_inflight
        self.infer = InferCodec(dataplane)
        # ModelStreamInfer: the stream pump (server/transport/pump.py) with a codec per stream, which holds whose
        # stream it is (its sequence ids are the caller's).
        self.ModelStreamInfer = stream_handler(
            lambda context: InferStream(self.infer, client_key(context), context.peer()), max_stream_inflight
        )

    # ---- health and metadata ----------------------------------------------------------------------------
    async def ServerLive(self, request: kpb.ServerLiveRequest, context) -> kpb.ServerLiveResponse:
        return kpb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: kpb.ServerReadyRequest, context) -> kpb.ServerReadyResponse:
        return kpb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: kpb.ModelReadyRequest, context) -> kpb.ModelReadyResponse:
        try:
            self.dp.model(request.name, version_number(request.version))
        except NotFound:
            return kpb.ModelReadyResponse(ready=False)
        return kpb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request: kpb.ServerMetadataRequest, context) -> kpb.ServerMetadataResponse:
        return kpb.ServerMetadataResponse(name="rnnserve", version=rnnserve.__version__, extensions=EXTENSIONS)

    async def ModelMetadata(self, request: kpb.ModelMetadataRequest, context) -> kpb.ModelMetadataResponse:
        model = self.dp.model(request.name, version_number(request.version))
        return models.model_metadata(model, self.dp.repository.versions(model.name))

    async def ModelConfig(self, request: kpb.ModelConfigRequest, context) -> kpb.ModelConfigResponse:
        model = self.dp.model(request.name, version_number(request.version))
        return kpb.ModelConfigResponse(config=models.model_config(model, self.dp.sessions.ttl))

    async def ModelStatistics(self, request: kpb.ModelStatisticsRequest, context) -> kpb.ModelStatisticsResponse:
        if not request.name:
            chosen = self.dp.models()
        elif request.version:
            chosen = [self.dp.model(request.name, version_number(request.version))]
        else:
            chosen = self.dp.models(request.name) or [self.dp.model(request.name)]  # the latter: NOT_FOUND
        return kpb.ModelStatisticsResponse(model_stats=[models.model_statistics(m) for m in chosen])

    # ---- repository -------------------------------------------------------------------------------------
    async def RepositoryIndex(self, request: kpb.RepositoryIndexRequest, context) -> kpb.RepositoryIndexResponse:
        return models.repository_index(self.dp.repository, request.ready)

    async def RepositoryModelLoad(
        self, request: kpb.RepositoryModelLoadRequest, context
    ) -> kpb.RepositoryModelLoadResponse:
        if request.parameters:
            # Triton's load may carry a config or files to load instead of the repository's; rnnserve loads
            # only what is in its repository.
            raise InvalidArgument(f"load parameters {echo_names(sorted(request.parameters))} are not supported")
        failed = [m for m in await self.dp.load_model(request.model_name) if isinstance(m, FailedModel)]
        if failed:
            reasons = "; ".join(f"version {f.version}: {f.error}" for f in failed)
            raise InvalidArgument(f"failed to load '{echo(request.model_name)}': {reasons}")
        return kpb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: kpb.RepositoryModelUnloadRequest, context
    ) -> kpb.RepositoryModelUnloadResponse:
        # Never forced: a model with open sequences stays (FAILED_PRECONDITION names how many).
        await self.dp.unload_model(request.model_name)
        return kpb.RepositoryModelUnloadResponse()

    # ---- inference --------------------------------------------------------------------------------------
    async def ModelInfer(self, request: kpb.ModelInferRequest, context) -> kpb.ModelInferResponse:
        response = await self.infer.submit(request, client_key(context), context.peer())
        return cast(kpb.ModelInferResponse, response)  # not a stream's: ``submit`` without ``stream``


def handler(servicer: KServeServicer) -> grpc.GenericRpcHandler:
    """Handlers under Triton's service name, on raw request bytes as the native API's (server/transport/rpc.py)."""
    return service_handler(SERVICE_NAME, SERVICE, servicer, max_bytes=servicer.dp.limits.max_message_bytes)
