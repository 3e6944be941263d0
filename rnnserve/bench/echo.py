"""The floor: a bare ``grpc.aio`` server answering the RPCs the bench sends, without a model.

What it reaches under a load is what Python gRPC itself carries on this machine with that load, so every
server's figure is read against it. It serves, with ``rnnserve serve``'s message-size options:

- rnnserve's ``StreamStep``: requests are taken as raw bytes (nothing parsed) and each is answered with a
  pre-serialized ``StreamStepResponse`` of exactly the size rnnserve would send. The load generator names the
  message shape once per stream in metadata (``x-bench-shape: STEPS_PER_MESSAGE,CHUNK,COLUMNAR``).
- Triton/KServe's ``ModelStreamInfer``: each ``ModelInferRequest`` is parsed (the client matches answers by
  its id) and answered with the model's outputs' worth of zeros; plus the calls perf_analyzer makes around
  a measurement (ServerLive/Ready, ServerMetadata, ModelReady, ModelMetadata, ModelConfig, ModelStatistics),
  describing the model as rnnserve does. Its statistics count every answered request as one execution of
  batch 1 whose queue and compute times are zero: counts that agree, as perf_analyzer requires.

    python -m rnnserve.bench.echo --model-dir REPO/NAME/VERSION --port-file F
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np

import rnnserve
from rnnserve.manifest import ModelManifest
from rnnserve.proto import kserve_grpc_service_pb2 as kpb
from rnnserve.proto import rnnserve_pb2 as pb
from rnnserve.server.transport.kserve import models as kserve_models
from rnnserve.server.transport.kserve.servicer import EXTENSIONS
from rnnserve.server.transport.kserve.tensors import DATATYPES
from rnnserve.tensors import to_proto

SHAPE_KEY = "x-bench-shape"
# The rnnserve server's defaults (settings.max_message_bytes), so both servers accept the same messages.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def canned_response(manifest: ModelManifest, group: int, chunk: int, columnar: bool = False) -> bytes:
    """A ``StreamStepResponse`` the size of rnnserve's answer to ``group`` steps of ``chunk`` timesteps
    (or, ``columnar``, to a StepBatch of ``group`` sessions)."""
    response = pb.StreamStepResponse()
    if columnar:
        batch = response.batch
        batch.session_ids.extend(["0" * 32] * group)
        batch.steps.extend([1_000_000] * group)
        batch.codes.extend([0] * group)
        batch.messages.extend([""] * group)
        for spec in manifest.outputs:
            shape = (group, *(1 if d == -1 else d for d in spec.session_shape))
            to_proto(np.zeros(shape, dtype=spec.dtype), batch.outputs[spec.name])
        return response.SerializeToString()
    lead = (chunk,) if chunk else ()
    for _ in range(group):
        result = response.results.add(session_id="0" * 32, steps=1_000_000)
        for spec in manifest.outputs:
            shape = lead + tuple(1 if d == -1 else d for d in spec.session_shape)
            to_proto(np.zeros(shape, dtype=spec.dtype), result.outputs[spec.name])
    return response.SerializeToString()


class Echo:
    """rnnserve's ``StreamStep``, answered with canned bytes."""

    def __init__(self, manifest: ModelManifest):
        self.manifest = manifest
        self._cache: dict[tuple[int, ...], bytes] = {}

    def _response_for(self, context: grpc.aio.ServicerContext) -> bytes:
        shape = dict(context.invocation_metadata() or ()).get(SHAPE_KEY, "1,0,0")
        group, chunk, columnar = (int(v) for v in shape.split(","))
        key = (group, chunk, columnar)
        if key not in self._cache:
            self._cache[key] = canned_response(self.manifest, group, chunk, bool(columnar))
        return self._cache[key]

    async def stream_step(self, request_iterator: AsyncIterator[bytes], context) -> AsyncIterator[bytes]:
        response = self._response_for(context)
        async for _ in request_iterator:
            yield response


class KServeEcho:
    """Triton's streaming inference and the calls around it, answered without a model (module docstring)."""

    def __init__(self, manifest: ModelManifest):
        self.manifest = manifest
        self.answered = 0
        # The model as rnnserve describes it over KServe (the same functions build the same answers).
        described = SimpleNamespace(
            name=manifest.name, manifest=manifest, max_batch_size=manifest.max_batch_size, max_queue_delay_us=0
        )
        # perf_analyzer reads a server's statistics only when its metadata names the extension.
        self._server = kpb.ServerMetadataResponse(name="floor", version=rnnserve.__version__, extensions=EXTENSIONS)
        self._metadata = kserve_models.model_metadata(described, [manifest.version])  # type: ignore[arg-type]
        self._config = kpb.ModelConfigResponse(config=kserve_models.model_config(described, 3600.0))  # type: ignore[arg-type]
        response = kpb.ModelStreamInferResponse()
        infer = response.infer_response
        infer.model_name, infer.model_version = manifest.name, str(manifest.version)
        for spec in manifest.outputs:
            shape = [1, *(1 if d == -1 else d for d in spec.session_shape)]
            infer.outputs.add(name=spec.name, datatype=DATATYPES[spec.dtype], shape=shape)
            infer.raw_output_contents.append(np.zeros(shape, dtype=spec.dtype).tobytes())
        self._template = response

    async def stream_infer(self, request_iterator: AsyncIterator[bytes], context) -> AsyncIterator[bytes]:
        template = self._template
        async for raw in request_iterator:
            response = kpb.ModelStreamInferResponse()
            response.CopyFrom(template)
            response.infer_response.id = kpb.ModelInferRequest.FromString(raw).id
            self.answered += 1
            yield response.SerializeToString()

    def statistics(self) -> kpb.ModelStatisticsResponse:
        n = self.answered
        zero = kpb.StatisticDuration(count=n, ns=0)
        reply = kpb.ModelStatisticsResponse()
        reply.model_stats.add(
            name=self.manifest.name,
            version=str(self.manifest.version),
            inference_count=n,
            execution_count=n,
            inference_stats=kpb.InferStatistics(
                success=zero, queue=zero, compute_input=zero, compute_infer=zero, compute_output=zero
            ),
            batch_stats=[
                kpb.InferBatchStatistics(batch_size=1, compute_input=zero, compute_infer=zero, compute_output=zero)
            ]
            if n
            else [],
        )
        return reply

    def unary_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        answers: dict[str, tuple[type, Callable[[Any], Any]]] = {
            "ServerLive": (kpb.ServerLiveRequest, lambda r: kpb.ServerLiveResponse(live=True)),
            "ServerReady": (kpb.ServerReadyRequest, lambda r: kpb.ServerReadyResponse(ready=True)),
            "ModelReady": (kpb.ModelReadyRequest, lambda r: kpb.ModelReadyResponse(ready=True)),
            "ServerMetadata": (kpb.ServerMetadataRequest, lambda r: self._server),
            "ModelMetadata": (kpb.ModelMetadataRequest, lambda r: self._metadata),
            "ModelConfig": (kpb.ModelConfigRequest, lambda r: self._config),
            "ModelStatistics": (kpb.ModelStatisticsRequest, lambda r: self.statistics()),
        }

        def handler(request_type: type, answer: Callable[[Any], Any]) -> grpc.RpcMethodHandler:
            async def call(raw: bytes, context) -> bytes:
                return answer(request_type.FromString(raw)).SerializeToString()

            return grpc.unary_unary_rpc_method_handler(call)

        return {name: handler(request_type, answer) for name, (request_type, answer) in answers.items()}


async def serve(model_dir: Path, port_file: Path, host: str) -> None:
    manifest = ModelManifest.read(model_dir)
    echo = Echo(manifest)
    kserve = KServeEcho(manifest)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ]
    )
    kserve_handlers = {
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(kserve.stream_infer),
        **kserve.unary_handlers(),
    }
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "rnnserve.v1.RnnServe", {"StreamStep": grpc.stream_stream_rpc_method_handler(echo.stream_step)}
            ),
            grpc.method_handlers_generic_handler("inference.GRPCInferenceService", kserve_handlers),
        )
    )
    port = server.add_insecure_port(f"{host}:0")
    await server.start()
    port_file.write_text(f"{port}\n")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="REPO/NAME/VERSION (for the output sizes)")
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.model_dir, args.port_file, args.host))


if __name__ == "__main__":
    main()
