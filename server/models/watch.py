"""``rnnserve serve --watch [SECONDS]``: follow the repository folder by polling (no extra dependencies).

Every interval the watcher fingerprints each ``REPO/NAME/VERSION/`` folder (name, size and mtime of every
file in it) and acts on what changed on disk since it last looked:

- a new or changed folder is loaded (a new version loads, a loaded one reloads) once its fingerprint has
  held still for one interval, so a copy in progress is not loaded half-written;
- a folder that vanished is unloaded, unless sessions are open on it: it is not forced; the unload is
  retried every interval until they close.

It acts only on changes it sees, so it never undoes a LoadModel/UnloadModel call made by hand.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from rnnserve.server.errors import FailedPrecondition, ModelNotFound, RnnServeError
from rnnserve.server.models.admin import ModelAdmin
from rnnserve.server.models.paths import all_version_dirs

log = logging.getLogger(__name__)

Key = tuple[str, int]
Fingerprint = tuple[tuple[str, int, int], ...]


def fingerprint(folder: Path) -> Fingerprint:
    """Every file under ``folder`` (symlinks not followed) as (relative path, size, mtime in ns)."""
    entries = []
    for dirpath, _, files in os.walk(folder):
        for file in files:
            path = Path(dirpath, file)
            try:
                st = path.stat()
            except OSError:  # removed while we looked: the next poll sees the folder as it settles
                continue
            entries.append((str(path.relative_to(folder)), st.st_size, st.st_mtime_ns))
    return tuple(sorted(entries))


def scan(root: Path) -> dict[Key, Fingerprint]:
    return {key: fingerprint(path) for key, path in all_version_dirs(root).items()}


class RepositoryWatcher:
    def __init__(self, admin: ModelAdmin, root: Path, interval: float):
        self.admin = admin
        self.root = root
        self.interval = interval
        self._seen: dict[Key, Fingerprint] = {}  # what the server last acted on (or found at start)
        self._settling: dict[Key, Fingerprint] = {}  # changed, waiting to hold still for one interval
        self._blocked: set[Key] = set()  # removed from disk, but sessions are open: logged once
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        # The baseline: the folders the server loaded (or failed to) at start, as they are now; anything else
        # on disk is new. Taken before the first await, so nothing created after start is mistaken for it.
        known = {*self.admin.repository.models, *self.admin.repository.failed}
        self._seen = {key: print_ for key, print_ in scan(self.root).items() if key in known}
        log.info("watching %s every %gs for new, changed and removed versions", self.root, self.interval)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="repository-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.poll()
            except Exception:  # a bad poll must not end the watching
                log.exception("watching %s failed; trying again in %gs", self.root, self.interval)

    async def poll(self) -> None:
        current = await asyncio.to_thread(scan, self.root)
        for key, print_ in current.items():
            if self._seen.get(key) == print_:
                self._settling.pop(key, None)
                continue
            if self._settling.get(key) != print_:
                self._settling[key] = print_  # changed (again): look once more before loading
                continue
            del self._settling[key]
            self._seen[key] = print_
            name, version = key
            log.info("watch: %s/%s is new or changed on disk; loading it", name, version)
            try:
                await self.admin.load(name, version)
            except RnnServeError as exc:  # e.g. it vanished meanwhile; failures to load are logged by admin
                log.error("watch: loading %s/%s: %s", name, version, exc.message)
        for key in [k for k in self._seen if k not in current]:
            await self._unload(key)
        for key in [k for k in self._settling if k not in current]:
            del self._settling[key]

    async def _unload(self, key: Key) -> None:
        name, version = key
        try:
            await self.admin.unload(name, version)
        except ModelNotFound:
            pass  # already unloaded by hand
        except FailedPrecondition as exc:
            if key not in self._blocked:
                self._blocked.add(key)
                log.warning("watch: %s/%s was removed from disk; unloading once its sessions close (%s)", *key, exc)
            return
        else:
            log.info("watch: %s/%s was removed from disk; unloaded it", name, version)
        self._blocked.discard(key)
        del self._seen[key]
