"""The model repository: ``REPO/NAME/VERSION/{manifest.json, artifact}``.

A version that fails to load (missing artifact, invalid manifest, a graph that disagrees with its manifest)
is kept in the listing as FAILED with its error, and the server goes on serving the others.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydantic import ValidationError

from rnnserve.manifest import MANIFEST_FILE, ModelManifest
from rnnserve.server.errors import ModelNotFound, echo
from rnnserve.server.models.model import LoadedModel
from rnnserve.server.models.paths import inside
from rnnserve.server.models.runtime import load_runtime
from rnnserve.server.scheduling.execution import CommitHook

log = logging.getLogger(__name__)


@dataclass
class FailedModel:
    name: str
    version: int
    error: str


def describe_error(exc: Exception) -> str:
    """A load failure in one line: pydantic errors by field, others by type and message."""
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'manifest'}: {e['msg']}" for e in exc.errors())
    return f"{type(exc).__name__}: {exc}"


class ModelPersistence(CommitHook, Protocol):
    """The session store policy every model is built with (server/durability/persistence.py Persistence)."""

    def check(self, model: LoadedModel) -> None:
        """A model version about to serve through it: warn when its durability outruns the store."""
        ...


class ModelFactory:
    """Builds every LoadedModel the server serves, at start and later (load, reload, --watch), each with its
    batcher, the server's defaults for what its manifest leaves unset, the session store policy, and the hook
    that stops a retired load once idle. The composition root (server/app.py) makes one."""

    def __init__(
        self,
        *,
        device: str = "cpu",
        threads: int = 1,
        max_batch_size: int | None = None,
        max_queue_delay_us: int | None = None,
        durability: str | None = None,
        concurrent_batches: int | None = None,
        inline_budget_us: int = 1000,
        persistence: ModelPersistence | None = None,
        on_idle: Callable[[LoadedModel], None] | None = None,
    ):
        self.device = device
        self.threads = threads
        self.max_batch_size = max_batch_size
        self.max_queue_delay_us = max_queue_delay_us
        self.durability = durability  # for manifests that set none (--durability)
        self.concurrent_batches = concurrent_batches  # for manifests that set none; None: auto (_concurrency)
        self.inline_budget_us = inline_budget_us
        self.persistence = persistence  # None: sessions are never written
        self.on_idle = on_idle

    def __call__(self, name: str, version: int, version_dir: Path) -> LoadedModel:
        """Load and self-check one version folder; raise when it can't serve.

        Touches no table, so it can run on a worker thread while the event loop serves (a reload builds the
        new model completely before anything is swapped).
        """
        if not (version_dir / MANIFEST_FILE).is_file():
            raise FileNotFoundError(f"{MANIFEST_FILE} is missing from {version_dir}")
        # A symlink out would let the repository describe (shapes, initial-state files) with a file it does
        # not hold; the artifact and .npy files are refused the same way.
        if not inside(version_dir, version_dir / MANIFEST_FILE):
            raise ValueError(f"{MANIFEST_FILE} resolves outside the model folder {version_dir}; refusing it")
        manifest = ModelManifest.read(version_dir)
        if manifest.name != name or manifest.version != version:
            raise ValueError(f"manifest says {manifest.name}:{manifest.version} but lives in {name}/{version}")
        settings = manifest.runtime  # per-model settings win over the server's
        runtime = load_runtime(
            manifest,
            version_dir,
            device=settings.device or self.device,
            threads=self.threads if settings.intra_op_threads is None else settings.intra_op_threads,
        )
        model = LoadedModel(
            manifest,
            version_dir,
            runtime,
            max_batch_size=self.max_batch_size,
            max_queue_delay_us=self.max_queue_delay_us,
            durability=self.durability,
            concurrent_batches=settings.concurrent_batches or self.concurrent_batches or _concurrency(runtime.device),
            inline_budget_us=self.inline_budget_us,
            persistence=self.persistence,
            on_idle=self.on_idle,
        )
        model.self_check()
        if self.persistence is not None:
            self.persistence.check(model)
        return model


class ModelRepository:
    def __init__(self, root: Path, build: ModelFactory | None = None):
        self.root = root
        # Builds each version (server/app.py gives the server's; the default serves with no store, no defaults).
        self.build = build if build is not None else ModelFactory()
        self.models: dict[tuple[str, int], LoadedModel] = {}
        self.failed: dict[tuple[str, int], FailedModel] = {}

    def load_all(self) -> None:
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"model repository {self.root} does not exist; export a model into it first "
                "(rnnserve export ... --repository DIR)"
            )
        root = self.root.resolve()
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for version_dir in sorted(p for p in model_dir.iterdir() if p.is_dir()):
                if not version_dir.name.isdigit():
                    continue
                if root not in version_dir.resolve().parents:
                    log.error("skipping %s: it resolves outside the repository", version_dir)
                    continue
                self.load_version(model_dir.name, int(version_dir.name), version_dir)
        log.info(
            "repository %s: %d model version(s) ready, %d failed",
            self.root,
            len(self.models),
            len(self.failed),
        )

    def load_version(self, name: str, version: int, version_dir: Path) -> LoadedModel | None:
        try:
            model = self.build(name, version, version_dir)
        except Exception as exc:
            error = describe_error(exc)
            log.error("model %s:%s failed to load: %s", name, version, error)
            self.failed[(name, version)] = FailedModel(name, version, error)
            return None
        self.models[(name, version)] = model
        log.info("loaded %s (%s, %s)", model.key, model.manifest.format, model.runtime.device)
        return model

    def get(self, name: str, version: int = 0) -> LoadedModel:
        """The given version, or the newest ready one when version is 0."""
        if version:
            model = self.models.get((name, version))
            if model is None:
                failed = self.failed.get((name, version))
                if failed is not None:
                    raise ModelNotFound(f"model {name}:{version} failed to load: {failed.error}")
                raise ModelNotFound(f"model {echo(name)} has no version {version}; versions: {self.versions(name)}")
            return model
        versions = [v for (n, v) in self.models if n == name]
        if not versions:
            known = sorted({n for n, _ in self.models})
            hint = f"; it failed to load: {self._failure(name)}" if self._failure(name) else ""
            raise ModelNotFound(f"model '{echo(name)}' not found{hint}; ready models: {known}")
        return self.models[(name, max(versions))]

    def _failure(self, name: str) -> str:
        errors = [f.error for (n, _), f in sorted(self.failed.items()) if n == name]
        return errors[-1] if errors else ""

    def versions(self, name: str) -> list[int]:
        return sorted(v for (n, v) in self.models if n == name)


def _concurrency(device: str) -> int:
    """Concurrent batches when neither the manifest nor the server says: on a CPU with cores to spare, two,
    so one batch computes while the event loop completes the other; on a GPU one (it wants large batches).
    The cores are those this process may run on (``taskset``, container CPU sets), not the machine's."""
    return 2 if device == "cpu" and len(os.sched_getaffinity(0)) >= 2 else 1
