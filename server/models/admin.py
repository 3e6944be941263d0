"""Loading, reloading and unloading model versions while the server runs (LoadModel, UnloadModel, --watch).

What a caller can rely on:

- **A load never takes a working version down.** The new LoadedModel is built completely (manifest,
  runtime, self-check) on a worker thread, while the event loop keeps serving; only then is it swapped in.
  If that fails, a version that was serving keeps serving (the listing shows it READY with the reload error)
  and the call reports it FAILED; a version that was not serving is listed FAILED with its error.
- **Sessions pin the object they opened.** A reload serves new sessions from the new object; open sessions
  keep their state slab, runtime and batcher, and so compute exactly as before, until they close. When the
  last one goes, the old batcher stops.
- **Unload refuses a version with open sessions** (FAILED_PRECONDITION, with the count) unless forced. A
  forced unload ends them: a batch computing finishes, steps still queued fail, and the next call on such a
  session gets FAILED_PRECONDITION saying the model was unloaded (for one session TTL, then NOT_FOUND).
- One load or unload runs at a time, so two loads of one version never race.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from rnnserve.server.core.sessions import SessionManager
from rnnserve.server.errors import FailedPrecondition, ModelNotFound, echo
from rnnserve.server.models.model import LoadedModel
from rnnserve.server.models.paths import check_name, check_version, version_dirs
from rnnserve.server.models.repository import FailedModel, ModelRepository, describe_error

log = logging.getLogger(__name__)

Key = tuple[str, int]


@dataclass
class UnloadResult:
    unloaded: list[LoadedModel | FailedModel]
    closed_sessions: int


class Retirement:
    """Loads no longer in the repository's table (reloaded or unloaded) whose batcher still runs for their
    sessions: each stops once its last session goes. Every model is built with ``idle`` as its idle hook
    (server/models/repository.py ModelFactory); it acts only on retired ones."""

    def __init__(self) -> None:
        # Each retired object, with a future that completes once it stopped.
        self.draining: dict[LoadedModel, asyncio.Future[None]] = {}
        self._stopping: set[LoadedModel] = set()
        self._tasks: set[asyncio.Task] = set()  # strong references: the loop only keeps weak ones

    def retire(self, model: LoadedModel) -> asyncio.Future[None]:
        """Stop ``model``'s batcher once no session uses it (now, when none does). The future completes
        when it has stopped."""
        done = self.draining.get(model)
        if done is not None:
            return done
        done = self.draining[model] = asyncio.get_running_loop().create_future()
        if model.open_sessions == 0:
            self.idle(model)
        return done

    def idle(self, model: LoadedModel) -> None:
        """LoadedModel.release calls it when its last session goes."""
        if model not in self.draining or model in self._stopping:
            return
        self._stopping.add(model)
        # A task, not a call: release() may run inside this model's own batcher, which stop() waits for.
        task = asyncio.get_running_loop().create_task(self._stop(model), name=f"stop-{model.key}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _stop(self, model: LoadedModel) -> None:
        try:
            await model.stop()
        finally:
            done = self.draining.pop(model, None)
            self._stopping.discard(model)
            if done is not None and not done.done():
                done.set_result(None)
        log.info("stopped %s: no session uses this load any more", model.key)

    async def stop(self) -> None:
        """Server shutdown: stop every retired object that still had sessions."""
        for model in list(self.draining):
            if model not in self._stopping:
                self._stopping.add(model)
                await self._stop(model)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


class ModelAdmin:
    def __init__(self, repository: ModelRepository, sessions: SessionManager, retirement: Retirement):
        self.repository = repository
        self.sessions = sessions
        self.retirement = retirement
        # A serving version whose last reload failed -> that error (shown beside its READY listing).
        self.reload_errors: dict[Key, str] = {}
        self._lock: asyncio.Lock | None = None

    @property
    def draining(self) -> dict[LoadedModel, asyncio.Future[None]]:
        """Retired loads whose batcher still runs for their sessions."""
        return self.retirement.draining

    def _locked(self) -> asyncio.Lock:
        if self._lock is None:  # created on the loop that runs the server
            self._lock = asyncio.Lock()
        return self._lock

    # ---- load -------------------------------------------------------------------------------------------
    async def load(self, name: str, version: int = 0) -> list[LoadedModel | FailedModel]:
        """Load ``name``'s version folder (every one when ``version`` is 0): new versions load, loaded ones
        reload. Returns each version's outcome; a FailedModel for one that did not (re)load."""
        dirs = version_dirs(self.repository.root, name, version)
        async with self._locked():
            return [await self._load_one(name, v, path) for v, path in sorted(dirs.items())]

    async def _load_one(self, name: str, version: int, path) -> LoadedModel | FailedModel:
        key = (name, version)
        loop = asyncio.get_running_loop()
        try:
            # torch.jit.load / onnxruntime session creation and the self-check block: keep them off the loop.
            model = await loop.run_in_executor(None, self.repository.build, name, version, path)
        except Exception as exc:
            return self._load_failed(key, describe_error(exc))
        model.start()
        old = self.repository.models.get(key)
        self.repository.models[key] = model
        self.repository.failed.pop(key, None)
        self.reload_errors.pop(key, None)
        if old is None:
            log.info("loaded %s (%s, %s)", model.key, model.manifest.format, model.runtime.device)
        else:
            log.info(
                "reloaded %s; %d open session(s) stay on the previous load until they close",
                model.key,
                old.open_sessions,
            )
            self.retirement.retire(old)
        return model

    def _load_failed(self, key: Key, error: str) -> FailedModel:
        name, version = key
        if key in self.repository.models:
            self.reload_errors[key] = error
            log.error("reload of %s:%s failed; the loaded version keeps serving: %s", name, version, error)
            return FailedModel(
                name, version, f"reload failed: {error} (the previously loaded {name}:{version} keeps serving)"
            )
        failed = self.repository.failed[key] = FailedModel(name, version, error)
        log.error("model %s:%s failed to load: %s", name, version, error)
        return failed

    # ---- unload -----------------------------------------------------------------------------------------
    async def unload(self, name: str, version: int = 0, *, force: bool = False) -> UnloadResult:
        """Unload ``name``'s version (every one when ``version`` is 0), loaded or FAILED. Refused while a
        version has open sessions, unless ``force``: then those sessions end. Returns once the batchers
        stopped."""
        check_name(name)
        check_version(version)

        def wanted(key: Key) -> bool:
            return key[0] == name and (not version or key[1] == version)

        async with self._locked():
            loaded = sorted(k for k in self.repository.models if wanted(k))
            failed = sorted(k for k in self.repository.failed if wanted(k))
            if not loaded and not failed:
                what = f"{echo(name)}:{version}" if version else echo(name)
                known = sorted({f"{n}:{v}" for n, v in [*self.repository.models, *self.repository.failed] if n == name})
                raise ModelNotFound(f"model {what} is not loaded; loaded versions of {echo(name)!r}: {known}")
            # Sessions still on an older load of a version count too: they are sessions of that version.
            objects = [self.repository.models[k] for k in loaded]
            objects += [m for m in self.draining if wanted((m.name, m.version))]
            busy: dict[str, int] = {}
            for m in objects:
                if m.open_sessions:
                    busy[m.key] = busy.get(m.key, 0) + m.open_sessions
            if busy and not force:
                counts = ", ".join(f"{key} has {n} open session(s)" for key, n in sorted(busy.items()))
                raise FailedPrecondition(f"not unloading: {counts}; close them first, or unload with force to end them")
            unloaded: list[LoadedModel | FailedModel] = [self.repository.models.pop(k) for k in loaded]
            unloaded += [self.repository.failed.pop(k) for k in failed]
            for k in loaded:
                self.reload_errors.pop(k, None)
            closed = 0
            stopped = []
            for m in objects:
                reason = f"model {m.key} was unloaded (forced); open a new session"
                closed += self.sessions.end_model_sessions(m, reason)
                stopped.append(self.retirement.retire(m))
            await asyncio.gather(*stopped)
        for item in unloaded:
            log.info("unloaded %s:%s", item.name, item.version)
        if closed:
            log.warning("forced unload of %s ended %d open session(s)", name, closed)
        return UnloadResult(unloaded, closed)

    async def stop(self) -> None:
        """Server shutdown: stop every retired object that still had sessions."""
        await self.retirement.stop()
