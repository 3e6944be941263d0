"""Model runtimes: call an exported step artifact on a batch of numpy arrays."""

from __future__ import annotations

from pathlib import Path

from rnnserve.manifest import ModelManifest
from rnnserve.server.models.runtime.base import Runtime


def load_runtime(manifest: ModelManifest, version_dir: Path, *, device: str, threads: int) -> Runtime:
    """Load the manifest's artifact with the runtime its format needs."""
    artifact = version_dir / manifest.artifact
    if not artifact.is_file():
        raise FileNotFoundError(f"artifact {manifest.artifact} is missing from {version_dir}")
    # The manifest refuses '..' and absolute paths; a symlink can still lead out, so check where it resolves.
    if version_dir.resolve() not in artifact.resolve().parents:
        raise ValueError(f"artifact {manifest.artifact} resolves outside the model folder {version_dir}; refusing it")
    if manifest.format == "onnx":
        from rnnserve.server.models.runtime.onnx import OnnxRuntime

        return OnnxRuntime(manifest, artifact, device=device, threads=threads)
    from rnnserve.server.models.runtime.torchscript import TorchScriptRuntime

    return TorchScriptRuntime(manifest, artifact, device=device, threads=threads)


__all__ = ["Runtime", "load_runtime"]
