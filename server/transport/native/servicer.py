"""The RnnServe gRPC service. Thin: decode the request, call the data plane, encode the response (codec.py)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import grpc

from rnnserve.proto import rnnserve_pb2 as pb
from rnnserve.server.dataplane import DataPlane
from rnnserve.server.limits import Limits
from rnnserve.server.models.model import LoadedModel
from rnnserve.server.models.predict import PredictRequest
from rnnserve.server.models.repository import FailedModel
from rnnserve.server.transport.native import codec
from rnnserve.server.transport.pump import stream_handler
from rnnserve.server.transport.rpc import service_handler

SERVICE = pb.DESCRIPTOR.services_by_name["RnnServe"]
SERVICE_NAME = SERVICE.full_name  # rnnserve.v1.RnnServe


def _outcome(model: LoadedModel | FailedModel) -> pb.ModelInfo:
    if isinstance(model, FailedModel):
        return codec.failed_model_info(model)
    return codec.model_info(model)


class RnnServeServicer:
    def __init__(self, dataplane: DataPlane, *, max_stream_inflight: int, limits: Limits | None = None):
        self.dp = dataplane
        self.max_stream_inflight = max_stream_inflight
        self.limits = limits or Limits()
        # (method, status name) -> refused calls and streamed steps, for the metrics (server/metrics.py).
        self.rejected: Counter[tuple[str, str]] = Counter()
        # StreamStep: the stream pump (server/transport/pump.py) with this service's codec, one for every stream.
        stream = codec.StepStream(dataplane, self.limits, self.rejected)
        self.StreamStep = stream_handler(lambda context: stream, max_stream_inflight)

    # ---- models -----------------------------------------------------------------------------------------
    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        models = [self._info(m) for m in self.dp.models(request.name)]
        failed = [
            codec.failed_model_info(f)
            for key, f in sorted(self.dp.repository.failed.items())
            if not request.name or key[0] == request.name
        ]
        return pb.ListModelsResponse(models=models + failed)

    async def GetModel(self, request: pb.GetModelRequest, context) -> pb.ModelInfo:
        return self._info(self.dp.model(request.name, request.version))

    def _info(self, model: LoadedModel) -> pb.ModelInfo:
        """A serving model's description; READY with an error when its last reload failed."""
        info = codec.model_info(model)
        error = self.dp.admin.reload_errors.get((model.name, model.version))
        if error:
            info.error = f"reload failed, still serving the previous load: {error}"
        return info

    async def LoadModel(self, request: pb.LoadModelRequest, context) -> pb.LoadModelResponse:
        loaded = await self.dp.load_model(request.name, request.version)
        return pb.LoadModelResponse(models=[_outcome(m) for m in loaded])

    async def UnloadModel(self, request: pb.UnloadModelRequest, context) -> pb.UnloadModelResponse:
        result = await self.dp.unload_model(request.name, request.version, force=request.force)
        models = [_outcome(m) for m in result.unloaded]
        for info in models:
            info.state = "UNLOADED"
        return pb.UnloadModelResponse(models=models, closed_sessions=result.closed_sessions)

    # ---- sessions ---------------------------------------------------------------------------------------
    async def OpenSession(self, request: pb.OpenSessionRequest, context) -> pb.OpenSessionResponse:
        session = self.dp.open_session(
            request.model,
            request.version,
            self.limits.tensors(request.initial_state),
            request.snapshot,
            self.limits.tensors(request.parameters),
            owner=self.limits.session_owner(context.peer()),
            session_id=request.session_id,
            allow_other_version=request.allow_other_version,
        )
        await self.dp.opened(session)  # a durable model's session is in the session store before we answer
        return pb.OpenSessionResponse(session_id=session.id, model=codec.model_info(session.model), steps=session.steps)

    async def CloseSession(self, request: pb.SessionRequest, context) -> pb.CloseSessionResponse:
        await self._restored((request.session_id,))  # one only the session store holds is closed there too
        self.dp.close_session(request.session_id)
        return pb.CloseSessionResponse()

    async def ResetSession(self, request: pb.ResetSessionRequest, context) -> pb.ResetSessionResponse:
        await self.dp.reset_session(request.session_id, self.limits.tensors(request.state))
        return pb.ResetSessionResponse()

    async def GetState(self, request: pb.SessionRequest, context) -> pb.SessionState:
        return codec.session_state(await self.dp.get_state(request.session_id))

    async def SetState(self, request: pb.SetStateRequest, context) -> pb.SetStateResponse:
        await self.dp.set_state(
            request.session_id, self.limits.tensors(request.state), request.snapshot, request.allow_other_version
        )
        return pb.SetStateResponse()

    async def GetStats(self, request: pb.StatsRequest, context) -> pb.StatsResponse:
        return pb.StatsResponse(
            models=[codec.model_stats(m) for m in self.dp.models(request.model)],
            open_sessions=len(self.dp.sessions),
            expired_sessions=self.dp.sessions.expired,
        )

    async def _restored(self, session_ids: Sequence[str], step_indices: Sequence[int] = ()) -> None:
        """Sessions only the session store holds (this server restarted, or the gateway moved them here), or
        whose copy here is behind it (they moved and came back), are loaded before the call goes on."""
        if (restoring := self.dp.restore_missing(session_ids, step_indices)) is not None:
            await restoring

    # ---- steps ------------------------------------------------------------------------------------------
    async def Step(self, request: pb.StepRequest, context) -> pb.StepResponse:
        self.limits.check_steps(request.num_steps or 1)
        await self._restored((request.session_id,), (request.step_index,))
        model, future = codec.submit_step(self.dp, self.limits, request)
        return codec.step_response(request, model, await future)

    async def Predict(self, request: pb.PredictRequest, context) -> pb.PredictResponse:
        model = self.dp.model(request.model, request.version)
        wanted = model.checks.outputs(request.outputs)
        sequences = PredictRequest(
            self.limits.tensors(request.inputs),
            self.limits.tensor(request.lengths, "lengths") if request.HasField("lengths") else None,
            self.limits.tensors(request.initial_state),
            self.limits.tensors(request.parameters),
        )
        result = await self.dp.predict(request.model, request.version, sequences)
        return codec.predict_response(request, model, result, wanted)


def handler(servicer: RnnServeServicer) -> grpc.GenericRpcHandler:
    """The service's handlers, on raw request bytes (server/transport/rpc.py); refusals are counted."""
    return service_handler(
        SERVICE_NAME, SERVICE, servicer, max_bytes=servicer.limits.max_message_bytes, rejected=servicer.rejected
    )
