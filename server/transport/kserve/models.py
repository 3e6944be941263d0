"""KServe v2 / Triton descriptions of rnnserve models: metadata, config, statistics, repository index.

Shapes follow Triton's convention for a model with ``max_batch_size > 0``: every tensor has a leading batch
dimension, which metadata shows as -1 and the config leaves out of ``dims``. A sequence (session) request
carries a batch of 1, as Triton's sequence batcher expects: ``x`` float32[3] per step travels as [1, 3].
"""

from __future__ import annotations

from pathlib import Path

from rnnserve.manifest import TensorSpec
from rnnserve.proto import kserve_grpc_service_pb2 as kpb
from rnnserve.proto import kserve_model_config_pb2 as kcfg
from rnnserve.server.models.model import LoadedModel
from rnnserve.server.models.paths import all_version_dirs
from rnnserve.server.models.repository import ModelRepository
from rnnserve.server.scheduling.stats import BatchStats
from rnnserve.server.transport.kserve.tensors import CONFIG_TYPES, DATATYPES

PLATFORMS: dict[str, tuple[str, str]] = {  # manifest format -> (Triton platform, backend)
    "onnx": ("onnxruntime_onnx", "onnxruntime"),
    "torchscript": ("pytorch_libtorch", "pytorch"),
}


def is_stateful(model: LoadedModel) -> bool:
    """Step models keep state per sequence; whole-sequence models answer each request alone."""
    return model.manifest.kind != "sequence"


def _metadata(spec: TensorSpec) -> kpb.ModelMetadataResponse.TensorMetadata:
    return kpb.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=DATATYPES[spec.dtype], shape=[-1, *spec.session_shape]
    )


def model_metadata(model: LoadedModel, versions: list[int]) -> kpb.ModelMetadataResponse:
    m = model.manifest
    return kpb.ModelMetadataResponse(
        name=m.name,
        versions=[str(v) for v in versions],
        platform=PLATFORMS[m.format][0],
        inputs=[_metadata(t) for t in m.inputs],
        outputs=[_metadata(t) for t in m.outputs],
    )


def model_config(model: LoadedModel, session_ttl: float) -> kcfg.ModelConfig:
    m = model.manifest
    platform, backend = PLATFORMS[m.format]
    config = kcfg.ModelConfig(
        name=m.name,
        platform=platform,
        backend=backend,
        max_batch_size=model.max_batch_size,
        input=[kcfg.ModelInput(name=t.name, data_type=CONFIG_TYPES[t.dtype], dims=t.session_shape) for t in m.inputs],
        output=[
            kcfg.ModelOutput(name=t.name, data_type=CONFIG_TYPES[t.dtype], dims=t.session_shape) for t in m.outputs
        ],
    )
    if is_stateful(model):
        seq = config.sequence_batching
        seq.max_sequence_idle_microseconds = int(session_ttl * 1_000_000)
        seq.oldest.max_candidate_sequences = model.max_batch_size
        seq.oldest.max_queue_delay_microseconds = model.max_queue_delay_us
        seq.oldest.preserve_ordering = True
        for s in m.states:
            seq.state.add(
                input_name=s.name, output_name=s.output, data_type=CONFIG_TYPES[s.dtype], dims=s.session_shape
            )
    return config


def _duration(count: int, ns: int) -> kpb.StatisticDuration:
    return kpb.StatisticDuration(count=count, ns=ns)


def model_statistics(model: LoadedModel) -> kpb.ModelStatistics:
    """Triton's statistics from the model's batcher (server/scheduling/stats.py BatchStats), all cumulative: a step is
    one request, counted once answered, and its compute time is its batch's (input, infer and output as
    BatchStats splits them); ``batch_stats`` has one entry per exact batch size executed, counting executions."""
    s = model.batcher.stats if model.batcher is not None else BatchStats()
    n = s.success
    return kpb.ModelStatistics(
        name=model.name,
        version=str(model.version),
        last_inference=s.last_inference_ms(),
        inference_count=n,
        execution_count=s.batches,
        inference_stats=kpb.InferStatistics(
            success=_duration(n, s.success_queue_ns + s.input_ns + s.infer_ns + s.output_ns),
            fail=_duration(s.fail, s.fail_ns),
            queue=_duration(n, s.success_queue_ns),
            compute_input=_duration(n, s.input_ns),
            compute_infer=_duration(n, s.infer_ns),
            compute_output=_duration(n, s.output_ns),
        ),
        batch_stats=[
            kpb.InferBatchStatistics(
                batch_size=size,
                compute_input=_duration(count, input_ns),
                compute_infer=_duration(count, infer_ns),
                compute_output=_duration(count, output_ns),
            )
            for size, (count, input_ns, infer_ns, output_ns) in sorted(s.sizes.items())
        ],
    )


def repository_index(repository: ModelRepository, ready_only: bool) -> kpb.RepositoryIndexResponse:
    """Every version folder in the repository: READY when loaded, else UNAVAILABLE with the reason."""
    index = kpb.RepositoryIndexResponse()
    on_disk: dict[tuple[str, int], Path | None] = dict(all_version_dirs(repository.root))
    keys = sorted(set(on_disk) | set(repository.models) | set(repository.failed))
    for name, version in keys:
        if (name, version) in repository.models:
            state, reason = "READY", ""
        elif (name, version) in repository.failed:
            state, reason = "UNAVAILABLE", repository.failed[(name, version)].error
        else:
            state, reason = "UNAVAILABLE", "unloaded"
        if ready_only and state != "READY":
            continue
        index.models.add(name=name, version=str(version), state=state, reason=reason)
    return index
