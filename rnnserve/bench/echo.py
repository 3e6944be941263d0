"""The transport ceiling: a bare ``grpc.aio`` service answering rnnserve's ``StreamStep`` with canned bytes.

It serves the same method path with the same server options as ``rnnserve serve``, takes requests as raw
bytes (nothing is parsed) and answers every request message with a pre-serialized ``StreamStepResponse``
of exactly the size rnnserve would send: one result per step carrying the model's outputs. The load
generator names the message shape once per stream in metadata (``x-bench-shape: STEPS_PER_MESSAGE,CHUNK``).
What it reaches is what Python gRPC itself carries on this machine with this client.

With ``--floor`` it is instead the least a real server must do per step, and no more: parse each request,
decode each step's tensors, hand the steps of each event-loop turn to a worker thread and back through one
future per step (the thread makes zero outputs: no model, no state, no checks), and encode a real response.
The bench's ``minimal server`` row, against the echo's: how much of the transport ceiling any Python server
doing per-step work keeps on this machine.

It also answers Triton's ``ModelStreamInfer`` (and the ``ModelStatistics`` call the peer's load generator
makes), for ``--peer triton``: each ``ModelInferRequest`` is parsed for its id only, which the client matches
responses by, and answered with the model's outputs' worth of zero bytes. That is the floor any Python gRPC
server pays per step under the peer's tritonclient load.

    python -m rnnserve.bench.echo --model-dir REPO/NAME/VERSION --port-file F [--kserve-model NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np

from rnnserve.manifest import ModelManifest
from rnnserve.proto import kserve_grpc_service_pb2 as kpb
from rnnserve.proto import rnnserve_pb2 as pb
from rnnserve.server.grpc.kserve_tensors import DATATYPES
from rnnserve.tensors import decode_map, to_proto

SHAPE_KEY = "x-bench-shape"
STREAM_METHOD = "/rnnserve.v1.RnnServe/StreamStep"
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


class MinimalServer:
    """``StreamStep`` with only the unavoidable per-step work (see the module docstring); no model."""

    def __init__(self, manifest: ModelManifest):
        self.outputs = [
            (s.name, tuple(1 if d == -1 else d for d in s.session_shape), s.dtype) for s in manifest.outputs
        ]
        self._pending: list[asyncio.Future] = []
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="floor")

    def _outputs(self, n: int) -> list[np.ndarray]:
        return [np.zeros((n, *shape), dtype) for _, shape, dtype in self.outputs]

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        done = asyncio.get_running_loop().run_in_executor(self._thread, self._outputs, len(batch))

        def answer(f: asyncio.Future) -> None:
            outputs = f.result()
            for i, future in enumerate(batch):
                future.set_result([out[i] for out in outputs])

        done.add_done_callback(answer)

    async def stream_step(self, request_iterator: AsyncIterator[bytes], context) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        async for raw in request_iterator:
            message = pb.StreamStepRequest.FromString(raw)
            futures = []
            for step in message.steps:
                decode_map(step.inputs)
                if not self._pending:
                    loop.call_soon(self._flush)  # every step of this event-loop turn goes in one hand-off
                future = loop.create_future()
                self._pending.append(future)
                futures.append((step, future))
            response = pb.StreamStepResponse()
            for step, future in futures:
                result = response.results.add(session_id=step.session_id, steps=1)
                for (name, _, _), value in zip(self.outputs, await future, strict=True):
                    to_proto(value, result.outputs[name])
            yield response.SerializeToString()


class KServeEcho:
    """Triton's streaming inference, answered without a model (see the module docstring)."""

    def __init__(self, manifest: ModelManifest, model_name: str):
        self.model_name = model_name
        response = kpb.ModelStreamInferResponse()
        infer = response.infer_response
        infer.model_name, infer.model_version = model_name, "1"
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
            yield response.SerializeToString()

    async def statistics(self, raw: bytes, context) -> bytes:
        reply = kpb.ModelStatisticsResponse()
        reply.model_stats.add(name=self.model_name, version="1")
        return reply.SerializeToString()


async def serve(model_dir: Path, port_file: Path, host: str, kserve_model: str, floor: bool = False) -> None:
    manifest = ModelManifest.read(model_dir)
    echo: Echo | MinimalServer = MinimalServer(manifest) if floor else Echo(manifest)
    kserve = KServeEcho(manifest, kserve_model or manifest.name)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ]
    )
    handler = grpc.stream_stream_rpc_method_handler(echo.stream_step)  # raw bytes both ways
    kserve_handlers = {
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(kserve.stream_infer),
        "ModelStatistics": grpc.unary_unary_rpc_method_handler(kserve.statistics),
    }
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler("rnnserve.v1.RnnServe", {"StreamStep": handler}),
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
    parser.add_argument("--kserve-model", default="", help="model name Triton clients use (default: the manifest's)")
    parser.add_argument("--floor", action="store_true", help="answer StreamStep as the minimal server does")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.model_dir, args.port_file, args.host, args.kserve_model, args.floor))


if __name__ == "__main__":
    main()
